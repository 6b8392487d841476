"""Annotations: what callers tell a node about the future of its blocks, applied.

Three kinds of information reach a node store besides the bytes themselves:

* an annotation of stored blocks — their semantic type, their program, a TTL
  after which they are dropped (unless pinned);
* a program hint — an event in an agent program's life, which
  :class:`~kvfabric.node.programs.ProgramTable` turns into a plan of pins,
  unpins, demotions and prefetches that is applied here;
* replica counts — how many copies of a block other nodes hold, from the
  cluster directory.

Each is told to the policy, which uses it to choose what to keep. The TTLs
that annotations set are kept here too, in a heap ordered by expiry.
:class:`~kvfabric.node.core.NodeStoreCore` owns this part and shares its lock
and :class:`~kvfabric.node.placement.Placement` with it.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Callable, Sequence

from kvfabric.config import KVFabricConfig
from kvfabric.errors import InvalidArgument, ResourceExhausted
from kvfabric.hints import ProgramHint
from kvfabric.node.changes import ChangeKind
from kvfabric.node.pins import PinTable
from kvfabric.node.placement import Placement
from kvfabric.node.programs import HintPlan, ProgramTable
from kvfabric.types import BlockKey, BlockType, Tier, validate_program_id

log = logging.getLogger(__name__)


class Annotations:
    """Block annotations and TTLs, program hints and replica counts of one node store.

    ``lock`` is the owning store's lock, taken by the public methods here;
    ``expire`` (called with it held) ends expired pins and TTLs before a hint
    is planned.
    """

    def __init__(
        self,
        lock: threading.RLock,
        config: KVFabricConfig,
        placement: Placement,
        pins: PinTable,
        programs: ProgramTable,
        expire: Callable[[], None],
    ) -> None:
        self._lock = lock
        self._config = config
        self._placement = placement
        self._pins = pins
        self._programs = programs
        self._expire = expire
        self._ttl_heap: list[tuple[float, str, bytes]] = []  # (expires_at, namespace, hash)

    def annotate(
        self,
        keys: Sequence[BlockKey],
        block_type: BlockType | None,
        program_id: str | None,
        ttl_s: float | None,
    ) -> int:
        """Set the type, program and/or TTL of stored blocks; returns how many."""
        if block_type is not None and not isinstance(block_type, BlockType):
            raise InvalidArgument(
                f"block_type must be a BlockType, got {block_type!r}", "block_type"
            )
        validate_program_id(program_id)
        max_ttl_s = self._config.max_pin_ttl_s
        if ttl_s is not None and not (isinstance(ttl_s, (int, float)) and 0 < ttl_s <= max_ttl_s):
            raise InvalidArgument(f"ttl_s={ttl_s!r} is outside (0, {max_ttl_s}] seconds", "ttl_s")
        place = self._placement
        with self._lock:
            present, _ = place.split(keys)
            now = place.clock()
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
                place.policy.on_update(meta)
                place.changes.record(ChangeKind.ANNOTATED, meta)
            return len(present)

    def expire_blocks(self) -> None:
        """Drop the blocks whose TTL has passed, unless pinned (call with the lock held)."""
        place = self._placement
        now = place.clock()
        while self._ttl_heap and self._ttl_heap[0][0] <= now:
            when, ns, digest = heapq.heappop(self._ttl_heap)
            meta = place.index.get(ns, {}).get(digest)
            if meta is None or meta.expires_at != when or meta.pinned:
                continue  # gone, re-annotated, or held by a pin (expires when unpinned)
            place.drop(meta)
            place.counters.evictions += 1
            place.counters.evictions_ttl += 1

    def hint(self, hint: ProgramHint) -> HintPlan:
        """Apply a program hint: check it, pin/unpin/demote/prefetch as it asks, tell the policy.

        A refused hint (unknown program, join without fork, pin budget) raises
        a typed error and changes nothing. A tool call's start moves the
        context out of the GPU tier (the memory the running programs compute
        in); where the fastest tier is host memory it stays put and the policy
        makes it the first demoted, not dropped, when that tier needs room. The
        GPU→CPU move takes only the CPU tier's free room (see
        :meth:`Placement.demote_into_room`).
        """
        place, pins, config = self._placement, self._pins, self._config
        with self._lock:
            self._expire()
            now = place.clock()
            plan = self._programs.plan(hint, now)
            if plan.pin_owner is not None:
                present, _ = place.split(plan.pin_keys)
                ttl = min(config.program_pin_ttl_s, config.max_pin_ttl_s)
                pins.pin(present, plan.pin_owner, ttl, now, program_id=hint.program_id)
                for m in present:
                    place.changes.record(ChangeKind.PINS, m)
            plan.commit()
            for owner, keys in plan.unpins:
                held = place.split(keys)[0]
                pins.unpin(held, owner, all_counts=True)
                pins.forget_owner(owner)
                for m in held:
                    place.changes.record(ChangeKind.PINS, m)
            place.policy.on_hint(hint)
            tiers = place.tiers
            try:
                if plan.demote_keys and min(tiers) == Tier.GPU and len(tiers) > 1:
                    place.demote_into_room(plan.demote_keys, sorted(tiers)[1])
                if plan.prefetch_keys:
                    place.relocate_many(plan.prefetch_keys, min(tiers), only_up=True)
            except ResourceExhausted as exc:  # the hint is applied; the move is best effort
                log.info("moves of program %s hint %s stopped: %s",
                         hint.program_id, hint.kind.value, exc.message)  # fmt: skip
            return plan

    def note_replicas(self, keys: Sequence[BlockKey], elsewhere: Sequence[int]) -> int:
        """Tell the policy how many copies of each key other nodes hold (from the directory).

        Keys not stored here are skipped; returns how many were. Validated whole first.
        """
        if len(keys) != len(elsewhere):
            raise InvalidArgument(f"{len(keys)} keys but {len(elsewhere)} counts", "elsewhere")
        for key, n in zip(keys, elsewhere, strict=True):
            if not isinstance(key, BlockKey):
                raise InvalidArgument(f"key must be a BlockKey, got {type(key).__name__}", "keys")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InvalidArgument(f"replica counts must be ints >= 0, got {n!r}", "elsewhere")
        place = self._placement
        with self._lock:
            present = 0
            for key, n in zip(keys, elsewhere, strict=True):
                meta = place.find(key)
                if meta is not None:
                    place.policy.on_replicas(meta, n)
                    present += 1
            return present
