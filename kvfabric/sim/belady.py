"""Bélády's offline optimum as a policy: evict the block whose next read is furthest away.

It reads the whole trace in advance (``next_use``), which no online policy
can; the simulator runs it on the same node-store core as the others to give
the lower bound the program-aware policy is measured against. It is not in
the policy registry: a node in production has no trace to read.

A block that will never be read again is dropped instead of demoted; a
block read now is promoted to the fastest tier if it will be read again.
Among blocks read at the same future moment the chain's tail goes first,
which keeps the longest prefix (the optimum under prefix reuse).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvfabric.tiers.policy import Evictable, Policy, take_victims
from kvfabric.types import BlockKey, BlockMeta, Tier

NextUse = Callable[[BlockKey], float]  # position of the key's next read (inf: never)


class BeladyPolicy(Policy):
    """Furthest-next-use eviction with an oracle over the trace."""

    name = "belady"

    def __init__(self, next_use: NextUse) -> None:
        self._next_use = next_use
        self._tiers: dict[Tier, dict[BlockKey, BlockMeta]] = {t: {} for t in Tier}
        self._order: dict[BlockKey, int] = {}
        self._seq = 0

    def on_insert(self, meta: BlockMeta) -> None:
        self._seq += 1
        self._order[meta.key] = self._seq
        self._tiers[meta.tier][meta.key] = meta

    def on_access(self, meta: BlockMeta) -> None:
        """Accesses change nothing: the oracle already knows every read."""

    def on_move(self, meta: BlockMeta, old_tier: Tier) -> None:
        self._tiers[old_tier].pop(meta.key, None)
        self._tiers[meta.tier][meta.key] = meta

    def on_remove(self, meta: BlockMeta) -> None:
        self._tiers[meta.tier].pop(meta.key, None)
        self._order.pop(meta.key, None)

    def victims(self, tier: Tier, need_bytes: int, evictable: Evictable) -> list[BlockMeta]:
        order = self._order
        ranked = sorted(
            self._tiers[tier].values(),
            key=lambda m: (-self._next_use(m.key), -order.get(m.key, 0)),
        )
        return take_victims(ranked, need_bytes, evictable)

    def demotion_target(self, meta: BlockMeta, tiers: Sequence[Tier]) -> Tier | None:
        if self._next_use(meta.key) == float("inf"):
            return None
        return super().demotion_target(meta, tiers)

    def promotion_target(self, meta: BlockMeta, tiers: Sequence[Tier]) -> Tier | None:
        fastest = min(tiers)
        if meta.tier > fastest and self._next_use(meta.key) != float("inf"):
            return fastest
        return None
