"""The disk tier: one LMDB environment per node, on its local NVMe.

Each block is one LMDB value under ``BlockKey.storage_key()``; the value is a
small self-describing header followed by the payload. The header (full table
and checks in :mod:`kvfabric.tiers.diskformat`) is little-endian::

    magic "KVFB" | version u16 (=1) | header_len u16 | payload_size u64
    | payload XXH3-64 u64 | block_type u8 | flags u8 (=0) | program_id_len u16
    | program_id UTF-8 | zero pad to a multiple of 16 | CRC-32 of all before u32

It carries everything a restarted node needs to rebuild its index (size,
checksum, type, program id), so the tier keeps no side tables. A value whose
header fails any check is ``Corrupt``: reads treat it as a miss.

Write path: ``prepare_put`` reserves capacity and hands out, per block, a
writable view into one ``bytearray`` laid out as ``[header space | payload]``;
``complete_put`` writes the header in place and puts every block of the
handle in ONE write transaction (a batch is all visible or not at all, also
after a crash). That is one copy into LMDB and no re-concatenation. Existing
keys are skipped: committed blocks are immutable.

Read path: ``prepare_get`` opens a read transaction with ``buffers=True`` and
keeps it in ``handle.lease``; the returned payload views point straight into
the LMDB map and stay valid (LMDB's MVCC never reuses pages a live reader can
see) until ``complete_get``. The caller verifies the payload checksum while
copying out; :meth:`DiskTier.read_verified` does both for tests and tools.

Durability: the environment is opened with ``writemap=True, sync=False,
metasync=False`` (the fastest LMDB write mode, see PITFALLS.md). A committed
transaction survives a crash of the process at once (it is in the page
cache); ``env.sync()`` runs from ``complete_put`` at most every
``sync_interval_s`` and on ``close()``, bounding what an OS crash or power
loss can take. With ``writemap`` and no sync LMDB does not order its writes,
so after a power loss the file itself may be damaged: an open that fails is
reported as ``Corrupt`` and the caller decides whether to wipe the directory.

Capacity rule: ``capacity() = 90% of the map size``. Each block is charged its
real LMDB footprint, not just its bytes: a value larger than a node is stored
in ``ceil((16 + header + payload) / page_size)`` whole overflow pages, plus
twice the size of its leaf-node entry (leaf pages are at least half full after
splits). Small inline values are charged twice their node size. The other 10%
is headroom for branch pages, the free list, pages copied on write by the
current transaction and free runs too fragmented for a large value. A long
read lease keeps freed pages from being reused (and LMDB hands out pages a
commit freed only from the commit after next, see ``_advance_epoch``), so
LMDB can still report
``MapFullError`` within the 90%; that is turned into ``ResourceExhausted`` with
the transaction aborted and nothing committed lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import lmdb

from kvfabric.errors import (
    Corrupt,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from kvfabric.integrity import checksum
from kvfabric.tiers.base import BlockRecord, GetHandle, PutHandle, TierBackend
from kvfabric.tiers.diskformat import (
    MAX_HEADER_BYTES,
    ValueHeader,
    encode_program_id,
    header_len_for,
    pack_header_into,
    parse_header,
)
from kvfabric.types import BLOCK_HASH_BYTES, MAX_NAMESPACE_CHARS, BlockKey, Tier

log = logging.getLogger(__name__)

USABLE_FRACTION = 0.9
"""Share of the LMDB map that blocks may fill; the rest is B-tree and COW headroom."""

_DB_NAME = b"blocks"
_META_DB_NAME = b"meta"
_EPOCH_KEY = b"free-epoch"
_MAX_READERS = 1024  # one per concurrent read lease (and inventory batch)
_INVENTORY_BATCH = 512  # entries read per short read transaction
_PAGE_HEADER = 16  # LMDB PAGEHDRSZ on 64-bit builds
_NODE_HEADER = 8  # LMDB NODESIZE
_PGNO = 8  # an overflow value's leaf node stores its first page number
_INDEX_PTR = 2  # per-node slot in the page's index array
_MAX_STORAGE_KEY = MAX_NAMESPACE_CHARS + 1 + BLOCK_HASH_BYTES


@dataclass(slots=True)
class _PendingBlock:
    """One block of a put reservation: its future LMDB value and what it is charged."""

    owner: DiskTier
    key: bytes
    record: BlockRecord
    program_id: bytes
    value: bytearray
    footprint: int


@dataclass(eq=False, slots=True)
class _ReadLease:
    """The read transaction behind a :class:`GetHandle`."""

    owner: DiskTier
    txn: lmdb.Transaction
    views: list[memoryview]


class DiskTier(TierBackend):
    """The LMDB-backed disk tier of one node (see the module docstring for the rules)."""

    tier = Tier.DISK

    def __init__(
        self,
        path: str | os.PathLike[str],
        map_size: int,
        *,
        max_block_bytes: int,
        sync_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(map_size, int) or map_size <= 0:
            raise InvalidArgument(f"map_size must be a positive int, got {map_size!r}", "map_size")
        if not isinstance(max_block_bytes, int) or max_block_bytes <= 0:
            raise InvalidArgument(
                f"max_block_bytes must be a positive int, got {max_block_bytes!r}",
                "max_block_bytes",
            )
        if not sync_interval_s >= 0:
            raise InvalidArgument(
                f"sync_interval_s must be >= 0, got {sync_interval_s!r}", "sync_interval_s"
            )
        self.path = os.fspath(path)
        self.max_block_bytes = max_block_bytes
        self._sync_interval = float(sync_interval_s)
        self._clock = clock
        os.makedirs(self.path, exist_ok=True)
        try:
            self._env = lmdb.open(
                self.path,
                map_size=map_size,
                subdir=True,
                writemap=True,
                sync=False,
                metasync=False,
                map_async=False,
                # A value is MiBs of contiguous overflow pages read whole: with
                # read-around on, cold random 2 MiB reads ran at ~1.2-1.7 GB/s
                # here; with it off (MADV_RANDOM, 4 KiB faults) at ~75 MB/s.
                readahead=True,
                max_dbs=2,
                max_readers=_MAX_READERS,
                lock=True,
            )
        except lmdb.Error as exc:
            raise Unavailable(f"disk tier: cannot open LMDB at {self.path}: {exc}") from exc
        try:
            self._db = self._env.open_db(_DB_NAME)
            self._meta_db = self._env.open_db(_META_DB_NAME)
            self._map_size = int(self._env.info()["map_size"])
            self._psize = int(self._env.stat()["psize"])
        except lmdb.Error as exc:
            self._env.close()
            raise Corrupt(f"disk tier: LMDB at {self.path} is unreadable: {exc}") from exc
        # LMDB's me_nodemax: a larger leaf node moves its value to overflow pages.
        self._nodemax = (((self._psize - _PAGE_HEADER) // 2) & ~1) - _INDEX_PTR
        self._capacity = int(self._map_size * USABLE_FRACTION)
        # Lock order: _write_lock -> _sync_lock -> _lock.
        self._write_lock = threading.Lock()  # LMDB has one writer; ours queue here
        self._sync_lock = threading.Lock()
        self._lock = threading.Lock()  # counters, leases, closed flag
        self._published = 0
        self._reserved = 0
        self._corrupt_found = 0
        self._leases: set[_ReadLease] = set()
        self._closed = False
        self._last_sync = clock()
        try:
            entries, self._published = self._rebuild_usage()
        except lmdb.Error as exc:
            self._env.close()
            raise Corrupt(f"disk tier: LMDB at {self.path} is unreadable: {exc}") from exc
        log.info(
            "disk tier opened at %s: %d blocks, %d of %d bytes used, %d corrupt",
            self.path,
            entries,
            self._published,
            self._capacity,
            self._corrupt_found,
        )

    # ------------------------------------------------------------------ sizes

    def footprint(self, key_len: int, value_len: int) -> int:
        """Bytes a value of ``value_len`` under a key of ``key_len`` is charged."""
        node = _NODE_HEADER + key_len + value_len
        if node <= self._nodemax:
            return 2 * (node + (node & 1) + _INDEX_PTR)
        pages = (_PAGE_HEADER - 1 + value_len) // self._psize + 1
        return pages * self._psize + 2 * (_NODE_HEADER + key_len + _PGNO + _INDEX_PTR)

    def capacity(self) -> int:
        """Bytes blocks may occupy: :data:`USABLE_FRACTION` of the LMDB map."""
        return self._capacity

    def used(self) -> int:
        """Footprint of published blocks plus open reservations."""
        with self._lock:
            return self._published + self._reserved

    def can_fit(self, sizes: Sequence[int]) -> bool:
        """Whether blocks of ``sizes`` (any key, any program id) could be reserved now."""
        need = 0
        for size in sizes:
            if not isinstance(size, int) or not 1 <= size <= self.max_block_bytes:
                return False
            need += self.footprint(_MAX_STORAGE_KEY, MAX_HEADER_BYTES + size)
        with self._lock:
            return need <= self._capacity - self._published - self._reserved

    @property
    def corrupt_found(self) -> int:
        """How many corrupt values reads and scans have detected (a monotonic counter)."""
        return self._corrupt_found

    # ------------------------------------------------------------------- puts

    def prepare_put(self, records: Sequence[BlockRecord]) -> PutHandle:
        """Reserve capacity for ``records`` and return buffers for their payloads.

        Raises InvalidArgument (field ``size``) for a size outside
        ``1..max_block_bytes`` and ResourceExhausted when the reservation does
        not fit in the remaining capacity.
        """
        recs = list(records)
        planned: list[tuple[bytes, BlockRecord, bytes, int, int]] = []
        need = 0
        for rec in recs:
            if not isinstance(rec, BlockRecord):
                raise InvalidArgument(
                    f"records must hold BlockRecord, got {type(rec).__name__}", "records"
                )
            size = rec.size
            if not isinstance(size, int) or not 1 <= size <= self.max_block_bytes:
                raise InvalidArgument(
                    f"size of {rec.key.short()} is {size!r}; the disk tier accepts "
                    f"1..{self.max_block_bytes} bytes",
                    "size",
                )
            pid = encode_program_id(rec.program_id)
            key = rec.key.storage_key()
            hl = header_len_for(len(pid))
            fp = self.footprint(len(key), hl + size)
            planned.append((key, rec, pid, hl, fp))
            need += fp
        with self._lock:
            self._check_open()
            available = self._capacity - self._published - self._reserved
            if need > available:
                raise ResourceExhausted(
                    f"disk tier: {len(recs)} blocks need {need} bytes, {available} of "
                    f"{self._capacity} available"
                )
            self._reserved += need
        try:
            pending = [
                _PendingBlock(self, key, rec, pid, bytearray(hl + rec.size), fp)
                for key, rec, pid, hl, fp in planned
            ]
        except BaseException:
            self._release(need)
            raise
        buffers = [memoryview(p.value)[len(p.value) - p.record.size :] for p in pending]
        return PutHandle(self.tier, recs, buffers, list(pending))

    def complete_put(self, handle: PutHandle) -> None:
        """Publish every block of ``handle`` in one LMDB transaction.

        ``handle.records[i].checksum`` must hold the checksum of buffer ``i``
        (the caller sets it, e.g. with :meth:`PutHandle.set_checksums`); it is
        trusted, not recomputed. Keys already present are left untouched.
        """
        pending = self._pending_of(handle)
        if not pending:
            self._claim(handle)
            return
        if len(handle.records) != len(pending):
            raise InvalidArgument("handle.records no longer matches the reservation", "records")
        for p, rec in zip(pending, handle.records, strict=True):
            if rec.key != p.record.key or rec.size != p.record.size:
                raise InvalidArgument(
                    f"record for {p.record.key.short()} changed after prepare_put", "records"
                )
            pack_header_into(
                p.value,
                payload_size=rec.size,
                checksum=rec.checksum,
                block_type=p.record.type,
                program_id=p.program_id,
            )
        self._claim(handle)
        reserved = sum(p.footprint for p in pending)
        written = 0
        with self._write_lock:
            if self._closed:
                self._release(reserved)
                raise FailedPrecondition("disk tier is closed")
            try:
                txn = self._env.begin(write=True, db=self._db)
                try:
                    for p in pending:
                        if txn.put(p.key, p.value, overwrite=False):
                            written += p.footprint
                    txn.commit()
                except BaseException:
                    txn.abort()  # a no-op when commit itself failed
                    raise
            except lmdb.MapFullError as exc:
                self._release(reserved)
                raise ResourceExhausted(
                    f"disk tier: LMDB map of {self._map_size} bytes is full writing "
                    f"{len(pending)} blocks ({reserved} bytes); used {self.used()}"
                ) from exc
            except lmdb.Error as exc:
                self._release(reserved)
                raise Unavailable(f"disk tier: write failed: {exc}") from exc
            except BaseException:
                self._release(reserved)
                raise
        with self._lock:
            self._reserved -= reserved
            self._published += written
        self._maybe_sync()

    def abort_put(self, handle: PutHandle) -> None:
        """Release the reservation of ``handle``; nothing becomes visible."""
        pending = self._pending_of(handle)
        self._claim(handle)
        self._release(sum(p.footprint for p in pending))

    # ------------------------------------------------------------------- gets

    def prepare_get(self, keys: Sequence[BlockKey]) -> GetHandle:
        """Lease zero-copy views of the payloads of ``keys`` until :meth:`complete_get`.

        Absent keys give None; a value whose header fails validation gives
        None with ``corrupt[i] = True``.
        """
        ks = list(keys)
        for k in ks:
            if not isinstance(k, BlockKey):
                raise InvalidArgument(f"keys must hold BlockKey, got {type(k).__name__}", "keys")
        with self._lock:
            self._check_open()
            txn = self._read_txn()
            lease = _ReadLease(self, txn, [])
            self._leases.add(lease)
        buffers: list[memoryview | None] = []
        expected: list[int | None] = []
        corrupt: list[bool] = []
        try:
            for k in ks:
                raw = txn.get(k.storage_key())
                if raw is None:
                    buffers.append(None)
                    expected.append(None)
                    corrupt.append(False)
                    continue
                value = memoryview(raw)  # already a view into the map (buffers=True)
                header = self._parse(k, value)
                if header is None:
                    buffers.append(None)
                    expected.append(None)
                    corrupt.append(True)
                    continue
                view = value[header.header_len :]
                lease.views.append(view)
                buffers.append(view)
                expected.append(header.checksum)
                corrupt.append(False)
        except BaseException:
            self._end_lease(lease)
            raise
        return GetHandle(self.tier, ks, buffers, expected, corrupt, lease=lease)

    def complete_get(self, handle: GetHandle) -> None:
        """End the read lease of ``handle``; its buffers are released and must not be used."""
        lease = handle.lease
        if not isinstance(lease, _ReadLease) or lease.owner is not self:
            raise InvalidArgument("handle was not made by this disk tier", "handle")
        with self._lock:
            if handle.done:
                raise FailedPrecondition("get handle is already completed")
            handle.done = True
        self._end_lease(lease)

    def read_verified(self, key: BlockKey) -> bytes | None:
        """Copy one block's payload out and verify it; None when absent.

        Raises Corrupt when the header or the payload checksum is bad.
        """
        handle = self.prepare_get([key])
        try:
            if handle.corrupt[0]:
                raise Corrupt(f"disk tier: header of {key.short()} is corrupt")
            view = handle.buffers[0]
            if view is None:
                return None
            data = bytes(view)
        finally:
            self.complete_get(handle)
        if checksum(data) != handle.expected[0]:
            self._count_corrupt()
            log.warning("disk tier: payload checksum mismatch for %s", key.short())
            raise Corrupt(f"disk tier: payload of {key.short()} fails its checksum")
        return data

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each key has a committed value (its integrity is not checked here)."""
        with self._lock:
            self._check_open()
        with self._read_txn() as txn:
            return [txn.get(k.storage_key()) is not None for k in keys]

    # ---------------------------------------------------------------- removal

    def remove(self, keys: Sequence[BlockKey]) -> int:
        """Remove ``keys`` in one write transaction, corrupt values included; return the count.

        Readers that leased a removed block keep seeing it until their lease ends.
        """
        removed = 0
        freed = 0
        with self._write_lock:
            with self._lock:
                self._check_open()
            try:
                with self._env.begin(write=True, db=self._db, buffers=True) as txn:
                    for k in keys:
                        sk = k.storage_key()
                        value = txn.get(sk)
                        if value is None:
                            continue
                        size = len(value)  # the view is invalid after the delete
                        if txn.delete(sk):
                            removed += 1
                            freed += self.footprint(len(sk), size)
            except lmdb.MapFullError as exc:
                raise ResourceExhausted(
                    f"disk tier: LMDB map of {self._map_size} bytes is too full to delete"
                ) from exc
            except lmdb.Error as exc:
                raise Unavailable(f"disk tier: remove failed: {exc}") from exc
            if removed:
                self._advance_epoch()
        with self._lock:
            self._published -= freed
        self._maybe_sync()
        return removed

    def drop_corrupt(self, key: BlockKey) -> bool:
        """Remove a block whose stored form failed verification; True if it was there."""
        dropped = self.remove([key]) == 1
        if dropped:
            log.warning("disk tier: dropped corrupt block %s", key.short())
        return dropped

    # -------------------------------------------------------------- inventory

    def inventory(self) -> Iterator[BlockRecord]:
        """Records of every valid block, read from the value headers (no payload copies).

        Entries are read in short transactions of a few hundred, so the scan
        holds no reader across yields; it is not one snapshot when writers
        run beside it. Corrupt entries are skipped and counted in
        :attr:`corrupt_found`.
        """
        for key, _size, header in self._scan():
            if header is None:
                continue
            try:
                block_key = BlockKey.from_storage_key(key)
            except (InvalidArgument, UnicodeDecodeError):
                self._count_corrupt()
                log.warning("disk tier: skipping value under malformed key %r", key[:80])
                continue
            yield BlockRecord(
                block_key, header.payload_size, header.checksum, header.type, header.program_id
            )

    # ------------------------------------------------------------- durability

    def sync(self) -> None:
        """Flush every committed transaction to stable storage now."""
        with self._sync_lock:
            with self._lock:
                self._check_open()
            self._last_sync = self._clock()
            self._env.sync(True)

    def close(self) -> None:
        """Sync and close the environment; outstanding read leases are ended first.

        No other call may be running on this tier while it closes: the
        payload views of a lease point into the map that closing unmaps.
        """
        with self._write_lock, self._sync_lock:
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                leases = list(self._leases)
            if leases:
                log.warning("disk tier: closing with %d read leases still open", len(leases))
            for lease in leases:
                self._end_lease(lease)
            try:
                self._env.sync(True)
            finally:
                self._env.close()

    # -------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("disk tier is closed")

    def _read_txn(self) -> lmdb.Transaction:
        try:
            return self._env.begin(db=self._db, buffers=True)
        except lmdb.ReadersFullError as exc:
            raise ResourceExhausted(
                f"disk tier: all {_MAX_READERS} LMDB read slots are leased"
            ) from exc

    def _pending_of(self, handle: PutHandle) -> list[_PendingBlock]:
        pending = handle.slots
        if not all(isinstance(p, _PendingBlock) and p.owner is self for p in pending) or (
            len(pending) != len(handle.buffers)
        ):
            raise InvalidArgument("handle was not made by this disk tier", "handle")
        if handle.done:
            raise FailedPrecondition("put handle is already completed or aborted")
        return [p for p in pending if isinstance(p, _PendingBlock)]

    def _claim(self, handle: PutHandle) -> None:
        """Mark ``handle`` finished; exactly one complete/abort call wins."""
        with self._lock:
            if handle.done:
                raise FailedPrecondition("put handle is already completed or aborted")
            handle.done = True

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def _end_lease(self, lease: _ReadLease) -> None:
        with self._lock:
            if lease not in self._leases:
                return
            self._leases.discard(lease)
        for view in lease.views:
            # Later use raises ValueError instead of reading pages LMDB may reuse;
            # a view the caller still exports (e.g. via numpy) cannot be released.
            with contextlib.suppress(BufferError):
                view.release()
        lease.views.clear()
        lease.txn.abort()

    def _parse(self, key: BlockKey, value: memoryview) -> ValueHeader | None:
        try:
            return parse_header(value)
        except Corrupt as exc:
            self._count_corrupt()
            log.warning("disk tier: corrupt header for %s: %s", key.short(), exc.message)
            return None

    def _count_corrupt(self) -> None:
        with self._lock:
            self._corrupt_found += 1

    def _scan(self) -> Iterator[tuple[bytes, int, ValueHeader | None]]:
        """Yield ``(storage key, value length, header or None if corrupt)`` for every entry."""
        last: bytes | None = None
        while True:
            batch: list[tuple[bytes, int, ValueHeader | None]] = []
            with self._lock:
                self._check_open()
            with self._read_txn() as txn:
                cur = txn.cursor()
                more = cur.first() if last is None else cur.set_range(last)
                while more and len(batch) < _INVENTORY_BATCH:
                    key = bytes(cur.key())
                    if key != last:
                        value = cur.value()
                        header: ValueHeader | None
                        try:
                            header = parse_header(value)
                        except Corrupt as exc:
                            self._count_corrupt()
                            log.warning(
                                "disk tier: corrupt header under key %r: %s", key[:80], exc.message
                            )
                            header = None
                        batch.append((key, len(value), header))
                    more = cur.next()
            if not batch:
                return
            last = batch[-1][0]
            yield from batch

    def _rebuild_usage(self) -> tuple[int, int]:
        """Count entries and their footprint, so a restarted node knows its disk usage."""
        entries = used = 0
        for key, size, _header in self._scan():
            entries += 1
            used += self.footprint(len(key), size)
        return entries, used

    def _advance_epoch(self) -> None:
        """Commit one tiny write so the pages the last transaction freed become reusable.

        LMDB keeps the two newest committed snapshots intact, so pages freed by
        transaction T are handed out again no earlier than by T+2 (and only
        once no reader holds a snapshot older than T). Without this, "evict a
        block, store one of the same size" would hit MapFullError near full.
        """
        try:
            with self._env.begin(write=True, db=self._meta_db) as txn:
                raw = txn.get(_EPOCH_KEY)
                epoch = 0 if raw is None else int.from_bytes(raw, "little")
                txn.put(_EPOCH_KEY, (epoch + 1).to_bytes(8, "little"))
        except lmdb.Error as exc:  # the freed pages just stay unusable a little longer
            log.warning("disk tier: could not advance the free-page epoch: %s", exc)

    def _maybe_sync(self) -> None:
        if self._clock() - self._last_sync < self._sync_interval:
            return
        if not self._sync_lock.acquire(blocking=False):
            return  # another thread is syncing right now
        try:
            with self._lock:
                if self._closed:
                    return
            self._last_sync = self._clock()
            self._env.sync(True)
            log.debug("disk tier: synced %s", self.path)
        finally:
            self._sync_lock.release()
