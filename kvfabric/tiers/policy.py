"""Eviction and placement policies, chosen by name from a registry.

A policy decides and never moves bytes: the node-store core tells it what
happened (insert, access, move, remove) and asks it where a new block goes,
which blocks to push out of a full tier, and whether a read block should be
promoted. Policies are plain classes registered with :func:`register_policy`;
nothing else in the code compares policy names.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from kvfabric.errors import InvalidArgument
from kvfabric.tiers.typepolicy import TypeTable
from kvfabric.types import BlockKey, BlockMeta, Tier

Evictable = Callable[[BlockMeta], bool]


@dataclass(frozen=True)
class PolicyContext:
    """What a node store tells its policy once, at start: its clock and its config."""

    clock: Callable[[], float] = time.monotonic
    types: TypeTable = field(default_factory=TypeTable.default)
    lease_default_s: float = 30.0
    lease_slack: float = 1.5
    tiers: tuple[Tier, ...] = tuple(Tier)  # the tiers the node has, fastest first


class Policy(ABC):
    """Decides placement, victims and promotion for one node store."""

    name: ClassVar[str]

    def bind(self, context: PolicyContext) -> None:
        """Called once by the node store before any event; the baselines need nothing."""

    @abstractmethod
    def on_insert(self, meta: BlockMeta) -> None:
        """A block was committed in ``meta.tier``."""

    @abstractmethod
    def on_access(self, meta: BlockMeta) -> None:
        """A block was read (hit)."""

    @abstractmethod
    def on_move(self, meta: BlockMeta, old_tier: Tier) -> None:
        """A block moved from ``old_tier`` to ``meta.tier``."""

    @abstractmethod
    def on_remove(self, meta: BlockMeta) -> None:
        """A block left the node."""

    def on_update(self, meta: BlockMeta) -> None:
        """A stored block's type or program changed (Annotate)."""

    def on_replicas(self, meta: BlockMeta, elsewhere: int) -> None:
        """Other nodes now hold ``elsewhere`` copies of a stored block; baselines ignore it."""

    def on_hint(self, hint: object) -> None:
        """A validated program hint was accepted; the baseline policies ignore hints."""

    @abstractmethod
    def victims(self, tier: Tier, need_bytes: int, evictable: Evictable) -> list[BlockMeta]:
        """Blocks of ``tier`` to push out, in order, covering at least ``need_bytes``.

        Only blocks for which ``evictable`` is True may be returned; an empty
        list means nothing can be pushed out.
        """

    def placement(self, meta: BlockMeta, tiers: Sequence[Tier]) -> Tier:
        """The tier a new block is written to: the fastest one present by default."""
        return min(tiers)

    def demotion_target(self, meta: BlockMeta, tiers: Sequence[Tier]) -> Tier | None:
        """Where a victim of ``meta.tier`` goes: the next slower tier, or None to drop it."""
        lower = [t for t in tiers if t > meta.tier]
        return min(lower) if lower else None

    def promotion_target(self, meta: BlockMeta, tiers: Sequence[Tier]) -> Tier | None:
        """Where a block just read should be copied up to, or None to leave it."""
        return None


def take_victims(
    ordered: Iterable[BlockMeta], need_bytes: int, evictable: Evictable
) -> list[BlockMeta]:
    """The evictable blocks of ``ordered``, in order, until they cover ``need_bytes``."""
    chosen: list[BlockMeta] = []
    freed = 0
    for meta in ordered:
        if freed >= need_bytes and chosen:
            break
        if evictable(meta):
            chosen.append(meta)
            freed += meta.size
    return chosen


_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` selectable by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    # The program-aware policy lives in its own module, which imports this one.
    import kvfabric.tiers.program  # noqa: F401


def policy_names() -> list[str]:
    """Names of every registered policy."""
    _load_builtins()
    return sorted(_REGISTRY)


def make_policy(name: str) -> Policy:
    """A new instance of the policy registered as ``name``."""
    _load_builtins()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise InvalidArgument(
            f"unknown policy {name!r}; registered: {', '.join(policy_names())}", "policy"
        )
    return cls()


@register_policy
class LRUPolicy(Policy):
    """Least recently used per tier; promotes disk hits to the CPU tier."""

    name = "lru"

    def __init__(self) -> None:
        self._order: dict[Tier, OrderedDict[BlockKey, BlockMeta]] = {t: OrderedDict() for t in Tier}

    def on_insert(self, meta: BlockMeta) -> None:
        self._order[meta.tier][meta.key] = meta

    def on_access(self, meta: BlockMeta) -> None:
        order = self._order[meta.tier]
        if meta.key in order:
            order.move_to_end(meta.key)

    def on_move(self, meta: BlockMeta, old_tier: Tier) -> None:
        self._order[old_tier].pop(meta.key, None)
        self._order[meta.tier][meta.key] = meta

    def on_remove(self, meta: BlockMeta) -> None:
        self._order[meta.tier].pop(meta.key, None)

    def victims(self, tier: Tier, need_bytes: int, evictable: Evictable) -> list[BlockMeta]:
        return take_victims(self._order[tier].values(), need_bytes, evictable)

    def promotion_target(self, meta: BlockMeta, tiers: Sequence[Tier]) -> Tier | None:
        if meta.tier == Tier.DISK and Tier.CPU in tiers:
            return Tier.CPU
        return None
