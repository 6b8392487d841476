"""NodeStoreCore: the tiers, policy, pins and index of one node, without Ray or gRPC.

The Ray actor and the gRPC servicer are thin shells around this class. It is
thread-safe: the index is guarded by one lock, and the bulk copies of puts and
gets run outside it between the two phases of the tiers' I/O, so a put of one
block never waits for another block's copy.

The core holds the public operations and the node's bookkeeping (namespaces,
pins, stats) and delegates to three parts it owns, all run under its lock:

* :class:`~kvfabric.node.placement.Placement` — the index and every move of
  bytes between tiers (making room, demotion, promotion, drops, restart);
* :class:`~kvfabric.node.dataplane.DataPlane` — the two-phase copies in and
  out of the tiers (put, get, and the transports' read leases and write
  reservations);
* :class:`~kvfabric.node.annotations.Annotations` — block annotations and
  their TTLs, program hints and replica counts, applied and told to the policy.

Invariants kept here (tested in tests/unit/test_node_invariants.py and
tests/integration/test_node_store.py):
* a committed block's bytes never change; a second put of its key is a no-op;
* a tier never holds more than its capacity;
* a pinned block is never evicted or demoted automatically;
* every read and every move verifies the block's checksum; a block that fails
  is a miss, is dropped, and is counted — never served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from kvfabric import integrity
from kvfabric.config import KVFabricConfig
from kvfabric.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from kvfabric.hints import ProgramHint
from kvfabric.node.annotations import Annotations
from kvfabric.node.changes import ChangeFeed, ChangeKind
from kvfabric.node.dataplane import DataPlane
from kvfabric.node.leases import ReadLease, WriteReservation
from kvfabric.node.pins import PinTable
from kvfabric.node.placement import Placement
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
        self.policy.bind(
            PolicyContext(
                clock,
                self.types,
                config.tool_lease_default_s,
                config.tool_lease_slack,
                tuple(sorted(self.tiers)),
            )
        )
        self.programs = ProgramTable(config.max_programs, config.tool_lease_default_s)
        self.counters = Counters()
        self.pins = PinTable(
            config.pin_budget_bytes, config.max_pin_ttl_s, config.program_pin_budget_bytes
        )
        self._namespaces: dict[str, NamespaceInfo] = {}
        self.changes = ChangeFeed()
        self._lock = threading.RLock()
        # The parts the core delegates to. Placement is only called with ``_lock`` held;
        # the data plane and annotations take it themselves, as the core does.
        self._placement = Placement(
            self.tiers, self.policy, self.pins, self.changes, self.counters, clock
        )
        self._dataplane = DataPlane(self._lock, self._placement, self.namespace, self._expire)
        self._annotations = Annotations(
            self._lock, config, self._placement, self.pins, self.programs, self._expire
        )
        self._placement.rebuild(self._namespace_of_stored)

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
            self._placement.index.setdefault(namespace, {})
            return info

    def _namespace_of_stored(self, namespace: str, block_bytes: int) -> NamespaceInfo:
        """The namespace of a block found on restart, registered with its size if new."""
        known = self._namespaces.get(namespace)
        return known if known is not None else self.register_namespace(namespace, block_bytes)

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
        return self._dataplane.put_many(keys, datas, block_type, program_id, tier)

    def check_blocks(self, keys: Sequence[BlockKey], datas: Sequence[integrity.Buffer]) -> None:
        """Raise the error a put of these blocks would raise, changing nothing."""
        if len(keys) != len(datas):
            raise InvalidArgument(f"{len(keys)} keys but {len(datas)} buffers", "datas")
        for k, d in zip(keys, datas, strict=True):
            self._dataplane.check_block(k, d)

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
        return self._dataplane.get_into(keys, dsts, promote)

    def get(self, key: BlockKey) -> bytes | None:
        """The verified bytes of one block, or None on a miss."""
        info = self.namespace(key.namespace)
        out = bytearray(info.block_bytes)
        return bytes(out) if self.get_into([key], [out])[0] else None

    # -- lookup -------------------------------------------------------------------------
    def lookup(self, namespace: str, hashes: Sequence[bytes]) -> LookupResult:
        """The longest prefix of the chain ``hashes`` stored here, with each block's tier."""
        self.namespace(namespace)
        with self._lock:
            self._expire()
            index = self._placement.index[namespace]
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
            return [None if (m := self._placement.find(k)) is None else m.tier for k in keys]

    def meta(self, key: BlockKey) -> BlockMeta | None:
        """A copy of the metadata of a stored block."""
        with self._lock:
            m = self._placement.find(key)
            if m is None:
                return None
            return BlockMeta(
                m.key, m.size, m.checksum, m.tier, m.type, m.program_id,
                m.created_at, m.last_access, m.access_count, dict(m.pins),
            )  # fmt: skip

    def inventory(self, namespace: str | None = None) -> list[BlockMeta]:
        """Copies of the metadata of every block (optionally of one namespace)."""
        with self._lock:
            spaces = [namespace] if namespace is not None else list(self._placement.index)
            keys = [m.key for ns in spaces for m in self._placement.index.get(ns, {}).values()]
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
            present, missing = self._placement.split(keys)
            new_bytes = self.pins.pin(present, owner, ttl_s, self.clock(), program_id=program_id)
            for m in present:
                self.changes.record(ChangeKind.PINS, m)
        return PinResult(tuple(m.key for m in present), tuple(missing), new_bytes)

    def unpin(self, keys: Sequence[BlockKey], owner: str, *, all_counts: bool = False) -> int:
        """Drop ``owner``'s pin (one count, or all) on ``keys``; returns blocks released."""
        with self._lock:
            present, _ = self._placement.split(keys)
            released = self.pins.unpin(present, owner, all_counts=all_counts)
            for m in present:
                self.changes.record(ChangeKind.PINS, m)
            return released

    def _expire(self) -> None:
        """End expired pins and drop blocks whose TTL has passed (lock held)."""
        self._annotations.expire_blocks()
        ended = self.pins.expire(
            self.clock(), lambda ns, h: self._placement.index.get(ns, {}).get(h)
        )
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
        return self._annotations.annotate(keys, block_type, program_id, ttl_s)

    def hint(self, hint: ProgramHint) -> HintPlan:
        """Apply a program hint: check it, pin/unpin/demote/prefetch as it asks, tell the policy.

        A refused hint raises a typed error and changes nothing; the moves it
        asks for are best effort (see :meth:`Annotations.hint`).
        """
        return self._annotations.hint(hint)

    def note_replicas(self, keys: Sequence[BlockKey], elsewhere: Sequence[int]) -> int:
        """Tell the policy how many copies of each key other nodes hold (from the directory).

        Losing a block copied elsewhere costs a fetch, losing the sole copy a
        recompute; the policy may use this to choose its victims. Keys not
        stored here are skipped; returns how many were. Validated whole first.
        """
        return self._annotations.note_replicas(keys, elsewhere)

    # -- evict, move, prefetch ----------------------------------------------------------
    def evict(self, keys: Sequence[BlockKey]) -> int:
        """Remove blocks from this node; refused whole if any of them is pinned."""
        with self._lock:
            self._expire()
            present, _ = self._placement.split(keys)
            pinned = [m for m in present if m.pinned]
            if pinned:
                raise FailedPrecondition(
                    f"{len(pinned)} of {len(present)} blocks are pinned "
                    f"(first: {pinned[0].key.short()} by {', '.join(pinned[0].pins)}); unpin first",
                    "keys",
                )
            for meta in present:
                self._placement.drop(meta)
                self.counters.evictions += 1
            self.counters.evictions_requested += len(present)
            return len(present)

    def move(self, keys: Sequence[BlockKey], tier: Tier) -> MoveResult:
        """Move blocks (pinned ones too) to ``tier`` on this node.

        A pinned block whose type has a pinned floor (execution checkpoints:
        CPU) is never moved below it: the whole move is refused.
        """
        with self._lock:
            for meta in self._placement.split(keys)[0]:
                floor = self.types.rule(meta.type).pinned_floor
                if meta.pinned and floor is not None and isinstance(tier, Tier) and tier > floor:
                    raise FailedPrecondition(
                        f"block {meta.key.short()} is a pinned {meta.type.name}: it may not go "
                        f"below {floor.name} while pinned",
                        "tier",
                    )
            return self._placement.relocate_many(keys, tier, only_up=False)

    def prefetch(self, keys: Sequence[BlockKey], tier: Tier | None = None) -> MoveResult:
        """Promote blocks to ``tier`` (default: the fastest tier); never moves one down."""
        dst = tier if tier is not None else min(self.tiers)
        with self._lock:
            return self._placement.relocate_many(keys, dst, only_up=True)

    # -- data plane ---------------------------------------------------------------------
    def open_read(self, keys: Sequence[BlockKey]) -> ReadLease:
        """Lease host buffers of stored blocks for sending (absent keys give None).

        Blocks on the GPU tier are staged through host memory. The receiver
        verifies the checksums; the lease counts as an access of each block.
        """
        return self._dataplane.open_read(keys)

    def open_write(self, records: Sequence[BlockRecord]) -> WriteReservation:
        """Reserve CPU-tier slots for incoming blocks whose checksums are known.

        Keys already stored (or being written) are reported in ``present`` and
        get no slot. Nothing is visible until the reservation is committed.
        """
        return self._dataplane.open_write(records)

    def tier_list(self) -> list[Tier]:
        """The tiers present on this node, fastest first."""
        return self._placement.tier_list()

    # -- stats and lifecycle ------------------------------------------------------------
    def stats(self) -> NodeStats:
        """A consistent snapshot of occupancy, counters and pins."""
        with self._lock:
            self._expire()
            per_tier = dict.fromkeys(self.tiers, 0)
            by_type: dict[str, int] = {}
            bytes_by_type: dict[str, int] = {}
            pinned_blocks = 0
            for index in self._placement.index.values():
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
