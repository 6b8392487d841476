"""The data plane of a node store: every path that copies block bytes into or out of the tiers.

Each path is two-phase like the tiers beneath it — reserve or lease under the
store's lock, copy outside it, then publish or release under it again — so a
put of one block never waits for another block's copy:

* :meth:`DataPlane.put_many` and :meth:`DataPlane.get_into` copy between the
  caller's buffers and the tiers, verifying every checksum;
* :meth:`DataPlane.open_read` and :meth:`DataPlane.open_write` hand a
  transport the tiers' own host buffers (a :class:`ReadLease`, a
  :class:`WriteReservation`) so it can send or receive without a copy.

A block being written is "in flight" from its reservation to its publication:
a second write of its key meanwhile is reported as already present, never
stored twice. :class:`~kvfabric.node.core.NodeStoreCore` owns the data plane
and shares its lock and :class:`~kvfabric.node.placement.Placement` with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from kvfabric import integrity
from kvfabric.errors import InvalidArgument
from kvfabric.node.leases import ReadLease, WriteReservation
from kvfabric.node.placement import Placement
from kvfabric.node.results import NamespaceInfo, PutResult
from kvfabric.tiers.base import BlockRecord
from kvfabric.types import BlockKey, BlockMeta, BlockType, Tier, validate_program_id


class DataPlane:
    """Two-phase copies of block bytes between buffers and a node's tiers.

    ``lock`` is the owning store's lock; ``namespace`` looks up a registered
    namespace (NotFound otherwise); ``expire`` ends expired pins and TTLs and
    is called with the lock held before blocks are looked up.
    """

    def __init__(
        self,
        lock: threading.RLock,
        placement: Placement,
        namespace: Callable[[str], NamespaceInfo],
        expire: Callable[[], None],
    ) -> None:
        self._lock = lock
        self._placement = placement
        self._namespace = namespace
        self._expire = expire
        self._inflight: set[BlockKey] = set()

    # -- put ----------------------------------------------------------------------------
    def put_many(
        self,
        keys: Sequence[BlockKey],
        datas: Sequence[integrity.Buffer],
        block_type: BlockType,
        program_id: str | None,
        tier: Tier | None,
    ) -> list[PutResult]:
        """Store blocks write-once (see :meth:`NodeStoreCore.put_many`)."""
        if len(keys) != len(datas):
            raise InvalidArgument(f"{len(keys)} keys but {len(datas)} buffers", "datas")
        if not isinstance(block_type, BlockType):
            raise InvalidArgument(
                f"block_type must be a BlockType, got {block_type!r}", "block_type"
            )
        validate_program_id(program_id)
        views = [self.check_block(k, d) for k, d in zip(keys, datas, strict=True)]
        place = self._placement
        with self._lock:
            target = place.present_tier(tier) if tier is not None else None
            results: dict[int, PutResult] = {}
            new: list[int] = []
            seen: set[BlockKey] = set()
            for i, key in enumerate(keys):
                meta = place.find(key)
                if meta is not None:
                    results[i] = PutResult(key, False, meta.tier, meta.checksum)
                elif key in self._inflight or key in seen:
                    results[i] = PutResult(key, False, target or Tier.CPU, 0)
                else:
                    seen.add(key)
                    new.append(i)
            place.counters.dedup_puts += len(keys) - len(new)
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
        tiers = self._placement.tiers
        limit = min(tiers[t].capacity() for t in ([target] if target else tiers)) // 2
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
        place = self._placement
        with self._lock:
            now = place.clock()
            metas = [
                BlockMeta(keys[i], len(views[i]), 0, Tier.CPU, block_type, program_id, now, now)
                for i in chunk
            ]
            dst = (
                target
                if target is not None
                else place.policy.placement(metas[0], place.tier_list())
            )
            backend = place.tiers[dst]
            place.make_room(dst, [m.size for m in metas])
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
                place.publish(meta)
                results[i] = PutResult(meta.key, True, dst, checksum)
            place.counters.puts += len(chunk)

    def check_block(self, key: BlockKey, data: integrity.Buffer) -> memoryview:
        """``data`` as bytes if it may be stored under ``key``; InvalidArgument otherwise."""
        if not isinstance(key, BlockKey):
            raise InvalidArgument(f"key must be a BlockKey, got {type(key).__name__}", "key")
        info = self._namespace(key.namespace)
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
        self, keys: Sequence[BlockKey], dsts: Sequence[integrity.Buffer], promote: bool
    ) -> list[bool]:
        """Copy verified blocks into ``dsts`` (see :meth:`NodeStoreCore.get_into`)."""
        if len(keys) != len(dsts):
            raise InvalidArgument(f"{len(keys)} keys but {len(dsts)} buffers", "dsts")
        outs: list[memoryview] = []
        for k, d in zip(keys, dsts, strict=True):
            info = self._namespace(k.namespace)
            view = memoryview(d).cast("B")
            if view.readonly or len(view) != info.block_bytes:
                raise InvalidArgument(
                    f"destination must be a writable buffer of {info.block_bytes} bytes", "dsts"
                )
            outs.append(view)
        place = self._placement
        hits = [False] * len(keys)
        corrupt: set[int] = set()
        with self._lock:
            self._expire()
            by_tier: dict[Tier, list[int]] = {}
            want: dict[int, int] = {}  # position -> checksum on record in the index
            for i, key in enumerate(keys):
                meta = place.find(key)
                if meta is not None:
                    by_tier.setdefault(meta.tier, []).append(i)
                    want[i] = meta.checksum
            leases = [
                (place.tiers[t], idx, place.tiers[t].prepare_get([keys[i] for i in idx]))
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
                meta = place.find(key)
                if meta is None or meta.checksum != want.get(i):
                    hits[i] = False
                elif i in corrupt:
                    place.drop_corrupt(meta, "read")
                elif hits[i]:
                    place.touch(meta)
                    if promote:
                        place.maybe_promote(meta, outs[i])
            n_hits = sum(hits)
            place.counters.hits += n_hits
            place.counters.misses += len(keys) - n_hits
        return hits

    # -- zero-copy leases ---------------------------------------------------------------
    def open_read(self, keys: Sequence[BlockKey]) -> ReadLease:
        """Lease host buffers of stored blocks (see :meth:`NodeStoreCore.open_read`)."""
        place = self._placement
        with self._lock:
            self._expire()
            metas = [place.find(k) for k in keys]
            by_tier: dict[Tier, list[int]] = {}
            for i, m in enumerate(metas):
                if m is not None:
                    by_tier.setdefault(m.tier, []).append(i)
                    place.touch(m)
            handles = [(place.tiers[t], idx, place.tiers[t].prepare_get([keys[i] for i in idx]))
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
        """Reserve CPU-tier slots for incoming blocks (see :meth:`NodeStoreCore.open_write`)."""
        for r in records:
            self._check_record(r)
        place = self._placement
        with self._lock:
            self._expire()
            todo = [r for r in records if place.find(r.key) is None and r.key not in self._inflight]
            todo = list({r.key: r for r in todo}.values())
            present = [r.key for r in records if r.key not in {t.key for t in todo}]
            backend = place.tiers[Tier.CPU]
            if todo:
                place.make_room(Tier.CPU, [r.size for r in todo])
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
                        place.counters.checksum_failures += got
                        out.append(None)
                        continue
                    backend.complete_put(handle)
                    now = place.clock()
                    meta = BlockMeta(r.key, r.size, r.checksum, Tier.CPU, r.type, r.program_id,
                                     now, now)  # fmt: skip
                    place.publish(meta)
                    place.counters.puts += 1
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
        info = self._namespace(r.key.namespace)
        if r.size != info.block_bytes:
            raise InvalidArgument(
                f"incoming block of {r.size} bytes; namespace {r.key.namespace} blocks are "
                f"{info.block_bytes} bytes",
                "size",
            )
        if not isinstance(r.checksum, int) or not 0 <= r.checksum < 1 << 64:
            raise InvalidArgument("checksum must be an unsigned 64-bit int", "checksum")
