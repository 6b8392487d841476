"""Placement: where each block of a node lives, and every move of its bytes between tiers.

:class:`Placement` owns the node's index (namespace → hash → :class:`BlockMeta`)
and keeps three things in step with it whenever a block is published, moved
or dropped: the tiers' bytes and accounting, the policy's view, and the
change feed. It makes room in a full tier (demoting the policy's victims to
a slower tier, or dropping them from the slowest), relocates blocks with
their checksum verified, promotes after a read, and rebuilds the index from
persistent tiers after a restart.

It holds no lock of its own: :class:`~kvfabric.node.core.NodeStoreCore`
owns it and calls every method with the core's lock held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from kvfabric.errors import Corrupt, FailedPrecondition, InvalidArgument, ResourceExhausted
from kvfabric.node.changes import ChangeFeed, ChangeKind
from kvfabric.node.pins import PinTable
from kvfabric.node.results import Counters, MoveResult, NamespaceInfo
from kvfabric.tiers.base import BlockRecord, GetHandle, TierBackend
from kvfabric.tiers.policy import Policy
from kvfabric.types import BlockKey, BlockMeta, Tier

log = logging.getLogger(__name__)


class Placement:
    """The index of one node and the tier moves that keep it, the tiers and the policy in step.

    Every method expects the owning store's lock to be held by the caller.
    """

    def __init__(
        self,
        tiers: dict[Tier, TierBackend],
        policy: Policy,
        pins: PinTable,
        changes: ChangeFeed,
        counters: Counters,
        clock: Callable[[], float],
    ) -> None:
        self.tiers = tiers
        self.policy = policy
        self.pins = pins
        self.changes = changes
        self.counters = counters
        self.clock = clock
        self.index: dict[str, dict[bytes, BlockMeta]] = {}
        # Blocks being moved: a cascade of demotions making room for one must not push it out.
        self._relocating: set[BlockKey] = set()

    # -- the index ----------------------------------------------------------------------
    def tier_list(self) -> list[Tier]:
        """The tiers present on this node, fastest first."""
        return sorted(self.tiers)

    def present_tier(self, tier: Tier) -> Tier:
        """``tier`` itself, or InvalidArgument / FailedPrecondition if it is not one here."""
        if not isinstance(tier, Tier):
            raise InvalidArgument(f"tier must be a Tier, got {tier!r}", "tier")
        if tier not in self.tiers:
            raise FailedPrecondition(f"tier {tier.name} is not present on this node", "tier")
        return tier

    def find(self, key: BlockKey) -> BlockMeta | None:
        """The metadata of a stored block, or None."""
        return self.index.get(key.namespace, {}).get(key.hash)

    def split(self, keys: Sequence[BlockKey]) -> tuple[list[BlockMeta], list[BlockKey]]:
        """The stored blocks of ``keys`` and the keys not stored here (validated as BlockKeys)."""
        present: list[BlockMeta] = []
        missing: list[BlockKey] = []
        for k in keys:
            if not isinstance(k, BlockKey):
                raise InvalidArgument(f"key must be a BlockKey, got {type(k).__name__}", "keys")
            m = self.find(k)
            if m is None:
                missing.append(k)
            else:
                present.append(m)
        return present, missing

    def touch(self, meta: BlockMeta) -> None:
        """Count an access of a stored block."""
        meta.last_access = self.clock()
        meta.access_count += 1
        self.policy.on_access(meta)

    def publish(self, meta: BlockMeta) -> None:
        """Index a block whose bytes were just committed to ``meta.tier``."""
        self.index[meta.key.namespace][meta.key.hash] = meta
        self.policy.on_insert(meta)
        self.changes.record(ChangeKind.STORED, meta)

    # -- room and moves -----------------------------------------------------------------
    def make_room(self, tier: Tier, sizes: list[int]) -> None:
        """Push unpinned blocks out of ``tier`` until ``sizes`` fit."""
        backend = self.tiers[tier]
        if sum(sizes) > backend.capacity():
            raise ResourceExhausted(
                f"{sum(sizes)} bytes cannot fit the {tier.name} tier of {backend.capacity()} bytes",
                "size",
            )
        while not backend.can_fit(sizes):
            need = max(sum(sizes) - (backend.capacity() - backend.used()), min(sizes))
            victims = self.policy.victims(
                tier, need, lambda m: not m.pinned and m.key not in self._relocating
            )
            if not victims:
                raise ResourceExhausted(
                    f"{tier.name} tier is full and every block in it is pinned: "
                    f"{backend.used()} of {backend.capacity()} bytes used",
                    "capacity",
                )
            for victim in victims:
                self.demote_or_drop(victim)

    def demote_or_drop(self, meta: BlockMeta) -> None:
        """Move a victim to the tier the policy names below it, or drop it if that fails."""
        lower = self.policy.demotion_target(meta, self.tier_list())
        if lower is not None:
            try:
                self.relocate(meta, lower)
                self.counters.demotions += 1
                return
            except ResourceExhausted:
                pass
            except Corrupt:
                return  # already dropped and counted by relocate
        self.drop(meta)
        self.counters.evictions += 1

    def relocate(self, meta: BlockMeta, dst_tier: Tier, data: memoryview | None = None) -> None:
        """Copy a block to ``dst_tier`` verifying its checksum, then drop the old copy.

        ``data`` may carry the already verified bytes (a promotion after a read).
        On a checksum mismatch the block is dropped and Corrupt raised.
        """
        src, dst = self.tiers[meta.tier], self.tiers[dst_tier]
        self._relocating.add(meta.key)
        try:
            self.make_room(dst_tier, [meta.size])
        finally:
            self._relocating.discard(meta.key)
        handle = dst.prepare_put([BlockRecord(meta.key, meta.size, 0, meta.type, meta.program_id)])
        lease = None
        try:
            if data is None:
                lease = src.prepare_get([meta.key])
                data = self._host_view(src, lease, meta)
            (got,) = dst.write(handle, [data])
        except BaseException:
            dst.abort_put(handle)
            if lease is not None:
                src.complete_get(lease)
            raise
        if lease is not None:
            src.complete_get(lease)
        if got != meta.checksum:
            dst.abort_put(handle)
            self.drop_corrupt(meta, "move")
            raise Corrupt(f"block {meta.key.short()} failed its checksum while moving", "checksum")
        handle.set_checksums([got])
        dst.complete_put(handle)
        src.remove([meta.key])
        old = meta.tier
        meta.tier = dst_tier
        self.policy.on_move(meta, old)
        self.changes.record(ChangeKind.MOVED, meta)

    def _host_view(self, src: TierBackend, lease: GetHandle, meta: BlockMeta) -> memoryview:
        buf = lease.buffers[0]
        if buf is None:
            raise Corrupt(f"block {meta.key.short()} is unreadable in {src.tier.name}", "checksum")
        if src.tier != Tier.GPU:
            return memoryview(buf)
        host = bytearray(meta.size)
        src.read(lease, [host])
        return memoryview(host)

    def relocate_many(self, keys: Sequence[BlockKey], tier: Tier, *, only_up: bool) -> MoveResult:
        """Move the stored blocks of ``keys`` to ``tier`` (with ``only_up``: never down)."""
        self.present_tier(tier)
        present, missing = self.split(keys)
        moved, unchanged, corrupt = [], [], []
        for meta in present:
            if meta.tier == tier or (only_up and meta.tier < tier):
                unchanged.append(meta.key)
                continue
            old_tier = meta.tier
            try:
                self.relocate(meta, tier)
            except Corrupt:
                corrupt.append(meta.key)
                continue
            moved.append(meta.key)
            self.counters.promotions += tier < old_tier
            self.counters.demotions += tier > old_tier
            self.counters.demotions_requested += tier > old_tier
        return MoveResult(tuple(moved), tuple(unchanged), tuple(missing), tuple(corrupt))

    def demote_into_room(self, keys: Sequence[BlockKey], below: Tier) -> None:
        """Move a leased context's GPU blocks to ``below`` as far as it has free room.

        Pushing other blocks down (and the slowest tier's out) to make room
        would lose them now for a context that is, at worst, demoted first
        later: the policy ranks a leased context by its expected return, so
        what does not fit now leaves the GPU tier before any running program's
        blocks when that tier needs room (demoted, not dropped).
        """
        backend = self.tiers[below]
        for meta in self.split(keys)[0]:
            if meta.tier != Tier.GPU or meta.pinned:
                continue
            if not backend.can_fit([meta.size]):
                break
            self.relocate_many([meta.key], below, only_up=False)

    def maybe_promote(self, meta: BlockMeta, data: memoryview) -> None:
        """Move a block just read (``data``: its verified bytes) up if the policy says so."""
        dst = self.policy.promotion_target(meta, self.tier_list())
        if dst is None or dst >= meta.tier:
            return
        try:
            self.relocate(meta, dst, data)
            self.counters.promotions += 1
        except (ResourceExhausted, Corrupt) as exc:
            log.debug("promotion of %s to %s skipped: %s", meta.key.short(), dst.name, exc)

    # -- dropping -----------------------------------------------------------------------
    def drop_corrupt(self, meta: BlockMeta, where: str) -> None:
        """Drop a block that failed its checksum on ``where`` (read, move) and count it."""
        log.warning(
            "block %s failed its checksum on %s in %s: dropped",
            meta.key.short(),
            where,
            meta.tier.name,
        )
        self.counters.checksum_failures += 1
        self.drop(meta)

    def drop(self, meta: BlockMeta) -> None:
        """Remove a block from its tier, the index, its pins and the policy."""
        self.tiers[meta.tier].remove([meta.key])
        self.index[meta.key.namespace].pop(meta.key.hash, None)
        self.pins.forget(meta)
        self.policy.on_remove(meta)
        self.changes.record(ChangeKind.DROPPED, meta)

    # -- restart ------------------------------------------------------------------------
    def rebuild(self, namespace_of: Callable[[str, int], NamespaceInfo]) -> None:
        """Index the blocks persistent tiers kept across a restart.

        ``namespace_of(namespace, size)`` gives the namespace a found block
        belongs to, registering it with that block's size if it is new. A block
        of another size than its namespace's, or a second copy, is removed.
        """
        for tier in self.tier_list():
            for rec in self.tiers[tier].inventory():
                ns = rec.key.namespace
                known = namespace_of(ns, rec.size)
                if rec.size != known.block_bytes or self.find(rec.key) is not None:
                    self.tiers[tier].remove([rec.key])
                    continue
                now = self.clock()
                meta = BlockMeta(
                    rec.key, rec.size, rec.checksum, tier, rec.type, rec.program_id, now, now
                )
                self.index[ns][rec.key.hash] = meta
                self.policy.on_insert(meta)
