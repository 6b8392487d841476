"""NodeStoreCore: the tiers, policy, pins and index of one node, without Ray or gRPC.

The Ray actor and the gRPC servicer are thin shells around this class. It is
thread-safe: the index is guarded by one lock, and the bulk copies of puts and
gets run outside it between the two phases of the tiers' I/O, so a put of one
block never waits for another block's copy.

Invariants kept here (tested in tests/unit/test_node_core.py):
* a committed block's bytes never change; a second put of its key is a no-op;
* a tier never holds more than its capacity;
* a pinned block is never evicted or demoted automatically;
* every read and every move verifies the block's checksum; a block that fails
  is a miss, is dropped, and is counted — never served.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvfabric import integrity
from kvfabric.config import KVFabricConfig
from kvfabric.errors import (
    AlreadyExists,
    Corrupt,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvfabric.hints import ProgramHint
from kvfabric.node.changes import ChangeFeed, ChangeKind
from kvfabric.node.leases import ReadLease, WriteReservation
from kvfabric.node.pins import PinTable
from kvfabric.node.programs import HintPlan, ProgramTable
from kvfabric.node.results import (
    Counters,
    LookupResult,
    MoveResult,
    NamespaceInfo,
    NodeStats,
    PinResult,
    PutResult,
    TierStats,
)
from kvfabric.tiers.base import BlockRecord, TierBackend
from kvfabric.tiers.policy import Policy, PolicyContext, make_policy
from kvfabric.types import (
    BlockHash,
    BlockKey,
    BlockMeta,
    BlockType,
    Tier,
    validate_namespace,
    validate_program_id,
)

log = logging.getLogger(__name__)


def build_tiers(config: KVFabricConfig) -> dict[Tier, TierBackend]:
    """The tiers ``config`` asks for that this machine can run."""
    from kvfabric.tiers.cpu import CpuTier
    from kvfabric.tiers.gpu import GpuTier, cuda_usable

    tiers: dict[Tier, TierBackend] = {}
    if config.gpu_bytes and cuda_usable():
        tiers[Tier.GPU] = GpuTier(config.gpu_bytes, config.cpu_slab_bytes, config.gpu_device)
    elif config.gpu_bytes:
        log.warning("gpu_bytes=%d set but CUDA is not usable: no GPU tier", config.gpu_bytes)
    tiers[Tier.CPU] = CpuTier(
        config.cpu_arena_bytes,
        config.cpu_slab_bytes,
        shm_name=config.cpu_arena_shm_name,
        prefault=config.cpu_prefault,
    )
    if config.disk_enabled:
        from kvfabric.tiers.disk import DiskTier

        tiers[Tier.DISK] = DiskTier(
            config.disk_path,
            config.disk_bytes,
            max_block_bytes=config.max_block_bytes,
            sync_interval_s=config.disk_sync_interval_s,
        )
    return tiers


class NodeStoreCore:
    """The block store of one node: tiers GPU ▸ CPU ▸ disk, a policy, pins and an index."""

    def __init__(
        self,
        config: KVFabricConfig,
        *,
        tiers: dict[Tier, TierBackend] | None = None,
        clock: Callable[[], float] = time.monotonic,
        selftest: bool = True,
        policy: Policy | None = None,
    ) -> None:
        if selftest:
            from kvfabric.hashing import require_selftest

            require_selftest()
        self.config = config
        self.clock = clock
        # ``policy`` lets the simulator run an offline baseline (Bélády) on the same core.
        self.policy = policy if policy is not None else make_policy(config.policy)
        self.tiers = tiers if tiers is not None else build_tiers(config)
        self.types = config.type_table
        self.policy.bind(PolicyContext(clock, self.types, config.tool_lease_default_s,
                                       config.tool_lease_slack, tuple(sorted(self.tiers))))
        self.programs = ProgramTable(config.max_programs, config.tool_lease_default_s)
        self.counters = Counters()
        self.pins = PinTable(
            config.pin_budget_bytes, config.max_pin_ttl_s, config.program_pin_budget_bytes
        )
        self._index: dict[str, dict[bytes, BlockMeta]] = {}
        self._namespaces: dict[str, NamespaceInfo] = {}
        self._inflight: set[BlockKey] = set()
        # Blocks being moved: a cascade of demotions making room for one must not push it out.
        self._relocating: set[BlockKey] = set()
        self.changes = ChangeFeed()
        self._ttl_heap: list[tuple[float, str, bytes]] = []
        self._lock = threading.RLock()
        self._rebuild()

    # -- namespaces -------------------------------------------------------------------
    def register_namespace(self, namespace: str, block_bytes: int) -> NamespaceInfo:
        """Declare a namespace and the size of its blocks (idempotent for equal sizes)."""
        validate_namespace(namespace)
        if not isinstance(block_bytes, int) or not 0 < block_bytes <= self.config.max_block_bytes:
            raise InvalidArgument(
                f"block_bytes={block_bytes} is outside 1..{self.config.max_block_bytes} "
                "(max_block_bytes)",
                "block_bytes",
            )
        with self._lock:
            known = self._namespaces.get(namespace)
            if known is not None and known.block_bytes != block_bytes:
                raise AlreadyExists(
                    f"namespace {namespace} is registered with block_bytes={known.block_bytes}, "
                    f"not {block_bytes}",
                    "block_bytes",
                )
            info = known or NamespaceInfo(namespace, block_bytes)
            self._namespaces[namespace] = info
            self._index.setdefault(namespace, {})
            return info

    def namespace(self, namespace: str) -> NamespaceInfo:
        """The registered namespace, or NotFound."""
        info = self._namespaces.get(namespace)
        if info is None:
            raise NotFound(f"unknown namespace {namespace!r}", "namespace")
        return info

    # -- put ----------------------------------------------------------------------------
    def put(
        self,
        key: BlockKey,
        data: integrity.Buffer,
        *,
        block_type: BlockType = BlockType.GENERIC,
        program_id: str | None = None,
        tier: Tier | None = None,
    ) -> PutResult:
        """Store one block (see :meth:`put_many`)."""
        return self.put_many(
            [key], [data], block_type=block_type, program_id=program_id, tier=tier
        )[0]

    def put_many(
        self,
        keys: Sequence[BlockKey],
        datas: Sequence[integrity.Buffer],
        *,
        block_type: BlockType = BlockType.GENERIC,
        program_id: str | None = None,
        tier: Tier | None = None,
    ) -> list[PutResult]:
        """Store blocks; existing keys keep their bytes (write once).

        The whole call is validated before anything changes. New blocks go to
        ``tier`` or where the policy places them, pushing colder blocks down
        when the tier is full; ResourceExhausted when nothing can make room.
        """
        if len(keys) != len(datas):
            raise InvalidArgument(f"{len(keys)} keys but {len(datas)} buffers", "datas")
        if not isinstance(block_type, BlockType):
            raise InvalidArgument(
                f"block_type must be a BlockType, got {block_type!r}", "block_type"
            )
        validate_program_id(program_id)
        views = [self._check_block(k, d) for k, d in zip(keys, datas, strict=True)]
        with self._lock:
            target = self._present_tier(tier) if tier is not None else None
            results: dict[int, PutResult] = {}
            new: list[int] = []
            seen: set[BlockKey] = set()
            for i, key in enumerate(keys):
                meta = self._find(key)
                if meta is not None:
                    results[i] = PutResult(key, False, meta.tier, meta.checksum)
                elif key in self._inflight or key in seen:
                    results[i] = PutResult(key, False, target or Tier.CPU, 0)
                else:
                    seen.add(key)
                    new.append(i)
            self.counters.dedup_puts += len(keys) - len(new)
            self._inflight.update(keys[i] for i in new)
        try:
            for chunk in self._chunks(new, views, target):
                self._put_chunk(chunk, keys, views, block_type, program_id, target, results)
        finally:
            with self._lock:
                self._inflight.difference_update(keys[i] for i in new)
        return [results[i] for i in range(len(keys))]

    def _chunks(
        self, new: list[int], views: Sequence[memoryview], target: Tier | None
    ) -> list[list[int]]:
        """Split a batch so each part takes at most half of the smallest tier it may land in."""
        limit = min(self.tiers[t].capacity() for t in ([target] if target else self.tiers)) // 2
        chunks: list[list[int]] = [[]]
        size = 0
        for i in new:
            if chunks[-1] and size + len(views[i]) > limit:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += len(views[i])
        return [c for c in chunks if c]

    def _put_chunk(
        self,
        chunk: list[int],
        keys: Sequence[BlockKey],
        views: Sequence[memoryview],
        block_type: BlockType,
        program_id: str | None,
        target: Tier | None,
        results: dict[int, PutResult],
    ) -> None:
        """Reserve, copy (outside the lock) and publish one part of a put."""
        with self._lock:
            now = self.clock()
            metas = [
                BlockMeta(keys[i], len(views[i]), 0, Tier.CPU, block_type, program_id, now, now)
                for i in chunk
            ]
            dst = (
                target if target is not None else self.policy.placement(metas[0], self.tier_list())
            )
            backend = self.tiers[dst]
            self._make_room(dst, [m.size for m in metas])
            handle = backend.prepare_put(
                [BlockRecord(m.key, m.size, 0, block_type, program_id) for m in metas]
            )
        try:
            sums = backend.write(handle, [views[i] for i in chunk])
        except BaseException:
            with self._lock:
                backend.abort_put(handle)
            raise
        with self._lock:
            handle.set_checksums(sums)
            backend.complete_put(handle)
            for i, meta, checksum in zip(chunk, metas, sums, strict=True):
                meta.checksum, meta.tier = checksum, dst
                self._index[meta.key.namespace][meta.key.hash] = meta
                self.policy.on_insert(meta)
                self.changes.record(ChangeKind.STORED, meta)
                results[i] = PutResult(meta.key, True, dst, checksum)
            self.counters.puts += len(chunk)

    def check_blocks(self, keys: Sequence[BlockKey], datas: Sequence[integrity.Buffer]) -> None:
        """Raise the error a put of these blocks would raise, changing nothing."""
        if len(keys) != len(datas):
            raise InvalidArgument(f"{len(keys)} keys but {len(datas)} buffers", "datas")
        for k, d in zip(keys, datas, strict=True):
            self._check_block(k, d)

    def _check_block(self, key: BlockKey, data: integrity.Buffer) -> memoryview:
        if not isinstance(key, BlockKey):
            raise InvalidArgument(f"key must be a BlockKey, got {type(key).__name__}", "key")
        info = self.namespace(key.namespace)
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise InvalidArgument(
                "block data must be a contiguous bytes-like buffer", "data"
            ) from None
        if len(view) != info.block_bytes:
            raise InvalidArgument(
                f"block of {len(view)} bytes; namespace {key.namespace} blocks are "
                f"{info.block_bytes} bytes",
                "data",
            )
        return view

    # -- get ----------------------------------------------------------------------------
    def get_into(
        self,
        keys: Sequence[BlockKey],
        dsts: Sequence[integrity.Buffer],
        *,
        promote: bool = True,
    ) -> list[bool]:
        """Copy each stored block into ``dsts[i]``; True where it was a verified hit.

        A miss (absent or corrupt) leaves ``dsts[i]`` unspecified: never use it.
        Hits count as accesses; the policy may promote them to a faster tier.
        """
        if len(keys) != len(dsts):
            raise InvalidArgument(f"{len(keys)} keys but {len(dsts)} buffers", "dsts")
        outs: list[memoryview] = []
        for k, d in zip(keys, dsts, strict=True):
            info = self.namespace(k.namespace)
            view = memoryview(d).cast("B")
            if view.readonly or len(view) != info.block_bytes:
                raise InvalidArgument(
                    f"destination must be a writable buffer of {info.block_bytes} bytes", "dsts"
                )
            outs.append(view)
        hits = [False] * len(keys)
        corrupt: set[int] = set()
        with self._lock:
            self._expire()
            by_tier: dict[Tier, list[int]] = {}
            want: dict[int, int] = {}  # position -> checksum on record in the index
            for i, key in enumerate(keys):
                meta = self._find(key)
                if meta is not None:
                    by_tier.setdefault(meta.tier, []).append(i)
                    want[i] = meta.checksum
            leases = [
                (self.tiers[t], idx, self.tiers[t].prepare_get([keys[i] for i in idx]))
                for t, idx in by_tier.items()
            ]
        try:
            for backend, idx, handle in leases:
                sums = backend.read(handle, [outs[i] for i in idx])
                for j, i in enumerate(idx):
                    if handle.corrupt[j] or (
                        sums[j] is not None and sums[j] not in (want[i], handle.expected[j])
                    ):
                        corrupt.add(i)
                    elif sums[j] is not None:
                        hits[i] = sums[j] == want[i] == handle.expected[j]
                        if not hits[i]:
                            corrupt.add(i)
        finally:
            with self._lock:
                for backend, _, handle in leases:
                    backend.complete_get(handle)
        with self._lock:
            for i, key in enumerate(keys):
                meta = self._find(key)
                if meta is None or meta.checksum != want.get(i):
                    hits[i] = False
                elif i in corrupt:
                    self._drop_corrupt(meta, "read")
                elif hits[i]:
                    self._touch(meta)
                    if promote:
                        self._maybe_promote(meta, outs[i])
            n_hits = sum(hits)
            self.counters.hits += n_hits
            self.counters.misses += len(keys) - n_hits
        return hits

    def get(self, key: BlockKey) -> bytes | None:
        """The verified bytes of one block, or None on a miss."""
        info = self.namespace(key.namespace)
        out = bytearray(info.block_bytes)
        return bytes(out) if self.get_into([key], [out])[0] else None

    def _maybe_promote(self, meta: BlockMeta, data: memoryview) -> None:
        dst = self.policy.promotion_target(meta, self.tier_list())
        if dst is None or dst >= meta.tier:
            return
        try:
            self._relocate(meta, dst, data)
            self.counters.promotions += 1
        except (ResourceExhausted, Corrupt) as exc:
            log.debug("promotion of %s to %s skipped: %s", meta.key.short(), dst.name, exc)

    # -- lookup -------------------------------------------------------------------------
    def lookup(self, namespace: str, hashes: Sequence[bytes]) -> LookupResult:
        """The longest prefix of the chain ``hashes`` stored here, with each block's tier."""
        self.namespace(namespace)
        with self._lock:
            self._expire()
            index = self._index[namespace]
            tiers: list[Tier] = []
            for h in hashes:
                meta = index.get(h)
                if meta is None:
                    break
                tiers.append(meta.tier)
        return LookupResult(len(tiers), tuple(tiers))

    def contains(self, keys: Sequence[BlockKey]) -> list[Tier | None]:
        """The tier holding each key here, or None."""
        with self._lock:
            self._expire()
            return [None if (m := self._find(k)) is None else m.tier for k in keys]

    def meta(self, key: BlockKey) -> BlockMeta | None:
        """A copy of the metadata of a stored block."""
        with self._lock:
            m = self._find(key)
            if m is None:
                return None
            return BlockMeta(
                m.key, m.size, m.checksum, m.tier, m.type, m.program_id,
                m.created_at, m.last_access, m.access_count, dict(m.pins),
            )  # fmt: skip

    def inventory(self, namespace: str | None = None) -> list[BlockMeta]:
        """Copies of the metadata of every block (optionally of one namespace)."""
        with self._lock:
            spaces = [namespace] if namespace is not None else list(self._index)
            keys = [m.key for ns in spaces for m in self._index.get(ns, {}).values()]
        return [m for k in keys if (m := self.meta(k)) is not None]

    # -- pins ---------------------------------------------------------------------------
    def pin(
        self,
        keys: Sequence[BlockKey],
        owner: str,
        ttl_s: float | None = None,
        *,
        program_id: str | None = None,
    ) -> PinResult:
        """Pin the present blocks of ``keys`` for ``owner``; absent ones are reported.

        With ``program_id`` the pin also counts against that program's pin budget.
        """
        validate_program_id(program_id)
        with self._lock:
            self._expire()
            present, missing = self._split(keys)
            new_bytes = self.pins.pin(present, owner, ttl_s, self.clock(), program_id=program_id)
            for m in present:
                self.changes.record(ChangeKind.PINS, m)
        return PinResult(tuple(m.key for m in present), tuple(missing), new_bytes)

    def unpin(self, keys: Sequence[BlockKey], owner: str, *, all_counts: bool = False) -> int:
        """Drop ``owner``'s pin (one count, or all) on ``keys``; returns blocks released."""
        with self._lock:
            present, _ = self._split(keys)
            released = self.pins.unpin(present, owner, all_counts=all_counts)
            for m in present:
                self.changes.record(ChangeKind.PINS, m)
            return released

    def _expire(self) -> None:
        """End expired pins and drop blocks whose TTL has passed."""
        self._expire_blocks()
        ended = self.pins.expire(self.clock(), lambda ns, h: self._index.get(ns, {}).get(h))
        self.counters.pins_expired += len(ended)
        for meta in ended:
            self.changes.record(ChangeKind.PINS, meta)

    # -- annotations and hints ----------------------------------------------------------
    def annotate(
        self,
        keys: Sequence[BlockKey],
        *,
        block_type: BlockType | None = None,
        program_id: str | None = None,
        ttl_s: float | None = None,
    ) -> int:
        """Set the semantic type, program and/or TTL of stored blocks; returns how many."""
        if block_type is not None and not isinstance(block_type, BlockType):
            raise InvalidArgument(
                f"block_type must be a BlockType, got {block_type!r}", "block_type"
            )
        validate_program_id(program_id)
        if ttl_s is not None and not (
            isinstance(ttl_s, (int, float)) and 0 < ttl_s <= self.config.max_pin_ttl_s
        ):
            raise InvalidArgument(
                f"ttl_s={ttl_s!r} is outside (0, {self.config.max_pin_ttl_s}] seconds", "ttl_s"
            )
        with self._lock:
            present, _ = self._split(keys)
            now = self.clock()
            for meta in present:
                if block_type is not None:
                    meta.type = block_type
                if program_id is not None:
                    meta.program_id = program_id
                if ttl_s is not None:
                    meta.expires_at = now + ttl_s
                    heapq.heappush(
                        self._ttl_heap, (meta.expires_at, meta.key.namespace, meta.key.hash)
                    )
                self.policy.on_update(meta)
                self.changes.record(ChangeKind.ANNOTATED, meta)
            return len(present)

    def hint(self, hint: ProgramHint) -> HintPlan:
        """Apply a program hint: check it, pin/unpin/demote/prefetch as it asks, tell the policy.

        A refused hint (unknown program, join without fork, pin budget) raises
        a typed error and changes nothing. A tool call's start moves the
        context out of the GPU tier (the memory the running programs compute
        in); where the fastest tier is host memory it stays put and the policy
        makes it the first demoted, not dropped, when that tier needs room. The
        GPU→CPU move takes only the CPU tier's free room (see
        :meth:`_demote_into_room`).
        """
        with self._lock:
            self._expire()
            now = self.clock()
            plan = self.programs.plan(hint, now)
            if plan.pin_owner is not None:
                present, _ = self._split(plan.pin_keys)
                ttl = min(self.config.program_pin_ttl_s, self.config.max_pin_ttl_s)
                self.pins.pin(present, plan.pin_owner, ttl, now, program_id=hint.program_id)
                for m in present:
                    self.changes.record(ChangeKind.PINS, m)
            plan.commit()
            for owner, keys in plan.unpins:
                held = self._split(keys)[0]
                self.pins.unpin(held, owner, all_counts=True)
                self.pins.forget_owner(owner)
                for m in held:
                    self.changes.record(ChangeKind.PINS, m)
            self.policy.on_hint(hint)
            try:
                if plan.demote_keys and min(self.tiers) == Tier.GPU and len(self.tiers) > 1:
                    self._demote_into_room(plan.demote_keys, sorted(self.tiers)[1])
                if plan.prefetch_keys:
                    self._relocate_many(plan.prefetch_keys, min(self.tiers), only_up=True)
            except ResourceExhausted as exc:  # the hint is applied; the move is best effort
                log.info("moves of program %s hint %s stopped: %s",
                         hint.program_id, hint.kind.value, exc.message)  # fmt: skip
            return plan

    def _demote_into_room(self, keys: Sequence[BlockKey], below: Tier) -> None:
        """Move a leased context's GPU blocks to ``below`` as far as it has free room.

        Pushing other blocks down (and the slowest tier's out) to make room
        would lose them now for a context that is, at worst, demoted first
        later: the policy ranks a leased context by its expected return, so
        what does not fit now leaves the GPU tier before any running program's
        blocks when that tier needs room (demoted, not dropped).
        """
        backend = self.tiers[below]
        for meta in self._split(keys)[0]:
            if meta.tier != Tier.GPU or meta.pinned:
                continue
            if not backend.can_fit([meta.size]):
                break
            self._relocate_many([meta.key], below, only_up=False)

    def note_replicas(self, keys: Sequence[BlockKey], elsewhere: Sequence[int]) -> int:
        """Tell the policy how many copies of each key other nodes hold (from the directory).

        Losing a block copied elsewhere costs a fetch, losing the sole copy a
        recompute; the policy may use this to choose its victims. Keys not
        stored here are skipped; returns how many were. Validated whole first.
        """
        if len(keys) != len(elsewhere):
            raise InvalidArgument(f"{len(keys)} keys but {len(elsewhere)} counts", "elsewhere")
        for key, n in zip(keys, elsewhere, strict=True):
            if not isinstance(key, BlockKey):
                raise InvalidArgument(f"key must be a BlockKey, got {type(key).__name__}", "keys")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InvalidArgument(f"replica counts must be ints >= 0, got {n!r}", "elsewhere")
        with self._lock:
            present = 0
            for key, n in zip(keys, elsewhere, strict=True):
                meta = self._find(key)
                if meta is not None:
                    self.policy.on_replicas(meta, n)
                    present += 1
            return present

    def _expire_blocks(self) -> None:
        now = self.clock()
        while self._ttl_heap and self._ttl_heap[0][0] <= now:
            when, ns, digest = heapq.heappop(self._ttl_heap)
            meta = self._index.get(ns, {}).get(digest)
            if meta is None or meta.expires_at != when or meta.pinned:
                continue  # gone, re-annotated, or held by a pin (expires when unpinned)
            self._drop(meta)
            self.counters.evictions += 1
            self.counters.evictions_ttl += 1

    # -- evict, move, prefetch ----------------------------------------------------------
    def evict(self, keys: Sequence[BlockKey]) -> int:
        """Remove blocks from this node; refused whole if any of them is pinned."""
        with self._lock:
            self._expire()
            present, _ = self._split(keys)
            pinned = [m for m in present if m.pinned]
            if pinned:
                raise FailedPrecondition(
                    f"{len(pinned)} of {len(present)} blocks are pinned "
                    f"(first: {pinned[0].key.short()} by {', '.join(pinned[0].pins)}); unpin first",
                    "keys",
                )
            for meta in present:
                self._drop(meta)
                self.counters.evictions += 1
            self.counters.evictions_requested += len(present)
            return len(present)

    def move(self, keys: Sequence[BlockKey], tier: Tier) -> MoveResult:
        """Move blocks (pinned ones too) to ``tier`` on this node.

        A pinned block whose type has a pinned floor (execution checkpoints:
        CPU) is never moved below it: the whole move is refused.
        """
        with self._lock:
            for meta in self._split(keys)[0]:
                floor = self.types.rule(meta.type).pinned_floor
                if meta.pinned and floor is not None and isinstance(tier, Tier) and tier > floor:
                    raise FailedPrecondition(
                        f"block {meta.key.short()} is a pinned {meta.type.name}: it may not go "
                        f"below {floor.name} while pinned",
                        "tier",
                    )
        return self._relocate_many(keys, tier, only_up=False)

    def prefetch(self, keys: Sequence[BlockKey], tier: Tier | None = None) -> MoveResult:
        """Promote blocks to ``tier`` (default: the fastest tier); never moves one down."""
        return self._relocate_many(
            keys, tier if tier is not None else min(self.tiers), only_up=True
        )

    def _relocate_many(self, keys: Sequence[BlockKey], tier: Tier, *, only_up: bool) -> MoveResult:
        with self._lock:
            self._present_tier(tier)
            present, missing = self._split(keys)
            moved, unchanged, corrupt = [], [], []
            for meta in present:
                if meta.tier == tier or (only_up and meta.tier < tier):
                    unchanged.append(meta.key)
                    continue
                old_tier = meta.tier
                try:
                    self._relocate(meta, tier)
                except Corrupt:
                    corrupt.append(meta.key)
                    continue
                moved.append(meta.key)
                self.counters.promotions += tier < old_tier
                self.counters.demotions += tier > old_tier
                self.counters.demotions_requested += tier > old_tier
        return MoveResult(tuple(moved), tuple(unchanged), tuple(missing), tuple(corrupt))

    # -- data plane ---------------------------------------------------------------------
    def open_read(self, keys: Sequence[BlockKey]) -> ReadLease:
        """Lease host buffers of stored blocks for sending (absent keys give None).

        Blocks on the GPU tier are staged through host memory. The receiver
        verifies the checksums; the lease counts as an access of each block.
        """
        with self._lock:
            self._expire()
            metas = [self._find(k) for k in keys]
            by_tier: dict[Tier, list[int]] = {}
            for i, m in enumerate(metas):
                if m is not None:
                    by_tier.setdefault(m.tier, []).append(i)
                    self._touch(m)
            handles = [(self.tiers[t], idx, self.tiers[t].prepare_get([keys[i] for i in idx]))
                       for t, idx in by_tier.items()]  # fmt: skip
        buffers: list[memoryview | None] = [None] * len(keys)
        for backend, idx, handle in handles:
            for j, i in enumerate(idx):
                meta = metas[i]
                if handle.buffers[j] is None or meta is None:
                    continue
                if backend.tier == Tier.GPU:
                    host = bytearray(meta.size)
                    backend.read(handle, [host if k == j else None for k in range(len(idx))])
                    buffers[i] = memoryview(host)
                else:
                    buffers[i] = handle.buffers[j]

        def release() -> None:
            with self._lock:
                for backend, _, handle in handles:
                    backend.complete_get(handle)

        records: list[BlockRecord | None] = [
            None if m is None else BlockRecord(m.key, m.size, m.checksum, m.type, m.program_id)
            for m in metas
        ]
        sums = [None if m is None or buffers[i] is None else m.checksum
                for i, m in enumerate(metas)]  # fmt: skip
        return ReadLease(list(keys), buffers, sums, records, release)

    def open_write(self, records: Sequence[BlockRecord]) -> WriteReservation:
        """Reserve CPU-tier slots for incoming blocks whose checksums are known.

        Keys already stored (or being written) are reported in ``present`` and
        get no slot. Nothing is visible until the reservation is committed.
        """
        for r in records:
            self._check_record(r)
        with self._lock:
            self._expire()
            todo = [r for r in records if self._find(r.key) is None and r.key not in self._inflight]
            todo = list({r.key: r for r in todo}.values())
            present = [r.key for r in records if r.key not in {t.key for t in todo}]
            backend = self.tiers[Tier.CPU]
            if todo:
                self._make_room(Tier.CPU, [r.size for r in todo])
            handles = [backend.prepare_put([r]) for r in todo]
            self._inflight.update(r.key for r in todo)

        def commit(received: list[bool], sums: list[int] | None) -> list[PutResult | None]:
            out: list[PutResult | None] = []
            recs = todo if sums is None else [
                BlockRecord(r.key, r.size, c, r.type, r.program_id)
                for r, c in zip(todo, sums, strict=True)
            ]  # fmt: skip
            # Verify outside the lock: other blocks keep moving while these are hashed.
            verified = [got and integrity.checksum(h.buffers[0]) == r.checksum
                        for r, h, got in zip(recs, handles, received, strict=True)]  # fmt: skip
            with self._lock:
                self._inflight.difference_update(r.key for r in todo)
                for r, handle, got, ok in zip(recs, handles, received, verified, strict=True):
                    handle.set_checksums([r.checksum])
                    if not ok:
                        backend.abort_put(handle)
                        self.counters.checksum_failures += got
                        out.append(None)
                        continue
                    backend.complete_put(handle)
                    now = self.clock()
                    meta = BlockMeta(r.key, r.size, r.checksum, Tier.CPU, r.type, r.program_id,
                                     now, now)  # fmt: skip
                    self._index[r.key.namespace][r.key.hash] = meta
                    self.policy.on_insert(meta)
                    self.changes.record(ChangeKind.STORED, meta)
                    self.counters.puts += 1
                    out.append(PutResult(r.key, True, Tier.CPU, r.checksum))
            return out

        def abort() -> None:
            with self._lock:
                self._inflight.difference_update(r.key for r in todo)
                for handle in handles:
                    backend.abort_put(handle)

        return WriteReservation(list(todo), [h.buffers[0] for h in handles], present, commit, abort)

    def _check_record(self, r: BlockRecord) -> None:
        if not isinstance(r, BlockRecord) or not isinstance(r.key, BlockKey):
            raise InvalidArgument("incoming blocks must be BlockRecords", "records")
        info = self.namespace(r.key.namespace)
        if r.size != info.block_bytes:
            raise InvalidArgument(
                f"incoming block of {r.size} bytes; namespace {r.key.namespace} blocks are "
                f"{info.block_bytes} bytes",
                "size",
            )
        if not isinstance(r.checksum, int) or not 0 <= r.checksum < 1 << 64:
            raise InvalidArgument("checksum must be an unsigned 64-bit int", "checksum")

    # -- internals ----------------------------------------------------------------------
    def tier_list(self) -> list[Tier]:
        """The tiers present on this node, fastest first."""
        return sorted(self.tiers)

    def _present_tier(self, tier: Tier) -> Tier:
        if not isinstance(tier, Tier):
            raise InvalidArgument(f"tier must be a Tier, got {tier!r}", "tier")
        if tier not in self.tiers:
            raise FailedPrecondition(f"tier {tier.name} is not present on this node", "tier")
        return tier

    def _find(self, key: BlockKey) -> BlockMeta | None:
        return self._index.get(key.namespace, {}).get(key.hash)

    def _split(self, keys: Sequence[BlockKey]) -> tuple[list[BlockMeta], list[BlockKey]]:
        present: list[BlockMeta] = []
        missing: list[BlockKey] = []
        for k in keys:
            if not isinstance(k, BlockKey):
                raise InvalidArgument(f"key must be a BlockKey, got {type(k).__name__}", "keys")
            m = self._find(k)
            if m is None:
                missing.append(k)
            else:
                present.append(m)
        return present, missing

    def _touch(self, meta: BlockMeta) -> None:
        meta.last_access = self.clock()
        meta.access_count += 1
        self.policy.on_access(meta)

    def _make_room(self, tier: Tier, sizes: list[int]) -> None:
        """Push unpinned blocks out of ``tier`` until ``sizes`` fit (lock held)."""
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
                self._demote_or_drop(victim)

    def _demote_or_drop(self, meta: BlockMeta) -> None:
        lower = self.policy.demotion_target(meta, self.tier_list())
        if lower is not None:
            try:
                self._relocate(meta, lower)
                self.counters.demotions += 1
                return
            except ResourceExhausted:
                pass
            except Corrupt:
                return  # already dropped and counted by _relocate
        self._drop(meta)
        self.counters.evictions += 1

    def _relocate(self, meta: BlockMeta, dst_tier: Tier, data: memoryview | None = None) -> None:
        """Copy a block to ``dst_tier`` verifying its checksum, then drop the old copy.

        ``data`` may carry the already verified bytes (a promotion after a read).
        On a checksum mismatch the block is dropped and Corrupt raised.
        """
        src, dst = self.tiers[meta.tier], self.tiers[dst_tier]
        self._relocating.add(meta.key)
        try:
            self._make_room(dst_tier, [meta.size])
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
            self._drop_corrupt(meta, "move")
            raise Corrupt(f"block {meta.key.short()} failed its checksum while moving", "checksum")
        handle.set_checksums([got])
        dst.complete_put(handle)
        src.remove([meta.key])
        old = meta.tier
        meta.tier = dst_tier
        self.policy.on_move(meta, old)
        self.changes.record(ChangeKind.MOVED, meta)

    def _host_view(self, src: TierBackend, lease: Any, meta: BlockMeta) -> memoryview:
        buf = lease.buffers[0]
        if buf is None:
            raise Corrupt(f"block {meta.key.short()} is unreadable in {src.tier.name}", "checksum")
        if src.tier != Tier.GPU:
            return memoryview(buf)
        host = bytearray(meta.size)
        src.read(lease, [host])
        return memoryview(host)

    def _drop_corrupt(self, meta: BlockMeta, where: str) -> None:
        log.warning(
            "block %s failed its checksum on %s in %s: dropped",
            meta.key.short(),
            where,
            meta.tier.name,
        )
        self.counters.checksum_failures += 1
        self._drop(meta)

    def _drop(self, meta: BlockMeta) -> None:
        self.tiers[meta.tier].remove([meta.key])
        self._index[meta.key.namespace].pop(meta.key.hash, None)
        self.pins.forget(meta)
        self.policy.on_remove(meta)
        self.changes.record(ChangeKind.DROPPED, meta)

    def _rebuild(self) -> None:
        """Index the blocks persistent tiers kept across a restart."""
        for tier in self.tier_list():
            for rec in self.tiers[tier].inventory():
                ns = rec.key.namespace
                known = self._namespaces.get(ns)
                if known is None:
                    known = self.register_namespace(ns, rec.size)
                if rec.size != known.block_bytes or self._find(rec.key) is not None:
                    self.tiers[tier].remove([rec.key])
                    continue
                now = self.clock()
                meta = BlockMeta(
                    rec.key, rec.size, rec.checksum, tier, rec.type, rec.program_id, now, now
                )
                self._index[ns][rec.key.hash] = meta
                self.policy.on_insert(meta)

    # -- stats and lifecycle ------------------------------------------------------------
    def stats(self) -> NodeStats:
        """A consistent snapshot of occupancy, counters and pins."""
        with self._lock:
            self._expire()
            per_tier = dict.fromkeys(self.tiers, 0)
            by_type: dict[str, int] = {}
            bytes_by_type: dict[str, int] = {}
            pinned_blocks = 0
            for index in self._index.values():
                for m in index.values():
                    per_tier[m.tier] += 1
                    by_type[m.type.name] = by_type.get(m.type.name, 0) + 1
                    bytes_by_type[m.type.name] = bytes_by_type.get(m.type.name, 0) + m.size
                    pinned_blocks += m.pinned
            tiers = tuple(
                TierStats(t, per_tier[t], self.tiers[t].used(), self.tiers[t].capacity())
                for t in self.tier_list()
            )
            return NodeStats(
                tiers,
                Counters(**{f: getattr(self.counters, f) for f in Counters.__slots__}),
                self.pins.total_pinned_bytes(),
                pinned_blocks,
                tuple(self._namespaces.values()),
                by_type,
                bytes_by_type,
            )

    def close(self) -> None:
        """Flush and release every tier."""
        with self._lock:
            for backend in self.tiers.values():
                backend.close()


def key_chain(namespace: str, hashes: Sequence[BlockHash]) -> list[BlockKey]:
    """BlockKeys of a hash chain in one namespace."""
    return [BlockKey(namespace, h) for h in hashes]
