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
writable view into the block's future LMDB value; ``complete_put`` writes the
header in place and puts every block of the handle in ONE write transaction
(a batch is all visible or not at all, also after a crash). Existing keys are
skipped: committed blocks are immutable.

Read path: ``prepare_get`` opens a read lease (a read transaction with
``buffers=True``) and keeps it in ``handle.lease``; the returned payload
views point straight into the LMDB map and stay valid until
``complete_get``. The caller verifies the payload checksum while copying
out; :meth:`DiskTier.read_verified` does both for tests and tools.

:class:`DiskTier` is the facade over four parts, all sharing its lock:

* :mod:`~kvfabric.tiers.diskenv` — the environment's lifecycle: open,
  read leases, the free-page epoch, durability (periodic sync) and close;
* :mod:`~kvfabric.tiers.diskspace` — capacity accounting: the footprint
  each block is charged and the published and reserved totals;
* :mod:`~kvfabric.tiers.diskwrite` — the write path: reservations, headers
  and the one-transaction commit;
* :mod:`~kvfabric.tiers.diskscan` — the restart scan that rebuilds usage
  and the inventory from the value headers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import lmdb

from kvfabric.errors import (
    Corrupt,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from kvfabric.integrity import checksum
from kvfabric.tiers import diskscan
from kvfabric.tiers.base import BlockRecord, GetHandle, PutHandle, TierBackend
from kvfabric.tiers.diskenv import DiskEnv, ReadLease
from kvfabric.tiers.diskformat import ValueHeader, parse_header
from kvfabric.tiers.diskspace import USABLE_FRACTION, DiskSpace
from kvfabric.tiers.diskwrite import DiskWriter
from kvfabric.types import BlockKey, Tier

__all__ = ["USABLE_FRACTION", "DiskTier"]

log = logging.getLogger(__name__)


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
        # Lock order: env.write_lock -> env's sync lock -> _lock.
        self._lock = threading.Lock()  # counters, leases, closed flag
        self._env = DiskEnv(
            self.path, map_size, self._lock, sync_interval_s=sync_interval_s, clock=clock
        )
        self._space = DiskSpace(self._env.map_size, self._env.page_size)
        self._writer = DiskWriter(self._env, self._space, self._lock, max_block_bytes)
        self._corrupt_found = 0
        try:
            entries, used = diskscan.usage(self._entries(), self._space.footprint)
        except lmdb.Error as exc:
            self._env.lmdb.close()
            raise Corrupt(f"disk tier: LMDB at {self.path} is unreadable: {exc}") from exc
        self._space.published = used
        log.info(
            "disk tier opened at %s: %d blocks, %d of %d bytes used, %d corrupt",
            self.path,
            entries,
            self._space.published,
            self._space.capacity,
            self._corrupt_found,
        )

    # ------------------------------------------------------------------ sizes

    def footprint(self, key_len: int, value_len: int) -> int:
        """Bytes a value of ``value_len`` under a key of ``key_len`` is charged."""
        return self._space.footprint(key_len, value_len)

    def capacity(self) -> int:
        """Bytes blocks may occupy: :data:`USABLE_FRACTION` of the LMDB map."""
        return self._space.capacity

    def used(self) -> int:
        """Footprint of published blocks plus open reservations."""
        with self._lock:
            return self._space.used()

    def can_fit(self, sizes: Sequence[int]) -> bool:
        """Whether blocks of ``sizes`` (any key, any program id) could be reserved now."""
        need = 0
        for size in sizes:
            if not isinstance(size, int) or not 1 <= size <= self.max_block_bytes:
                return False
            need += self._space.largest_footprint(size)
        with self._lock:
            return need <= self._space.available()

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
        return self._writer.prepare(records)

    def complete_put(self, handle: PutHandle) -> None:
        """Publish every block of ``handle`` in one LMDB transaction.

        ``handle.records[i].checksum`` must hold the checksum of buffer ``i``
        (the caller sets it, e.g. with :meth:`PutHandle.set_checksums`); it is
        trusted, not recomputed. Keys already present are left untouched.
        """
        self._writer.complete(handle)

    def abort_put(self, handle: PutHandle) -> None:
        """Release the reservation of ``handle``; nothing becomes visible."""
        self._writer.abort(handle)

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
        lease = self._env.lease()
        txn = lease.txn
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
            self._env.end_lease(lease)
            raise
        return GetHandle(self.tier, ks, buffers, expected, corrupt, lease=lease)

    def complete_get(self, handle: GetHandle) -> None:
        """End the read lease of ``handle``; its buffers are released and must not be used."""
        lease = handle.lease
        if not isinstance(lease, ReadLease) or lease.owner is not self._env:
            raise InvalidArgument("handle was not made by this disk tier", "handle")
        with self._lock:
            if handle.done:
                raise FailedPrecondition("get handle is already completed")
            handle.done = True
        self._env.end_lease(lease)

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
        with self._env.read() as txn:
            return [txn.get(k.storage_key()) is not None for k in keys]

    # ---------------------------------------------------------------- removal

    def remove(self, keys: Sequence[BlockKey]) -> int:
        """Remove ``keys`` in one write transaction, corrupt values included; return the count.

        Readers that leased a removed block keep seeing it until their lease ends.
        """
        removed = 0
        freed = 0
        with self._env.write_lock:
            with self._lock:
                self._env.check_open()
            try:
                with self._env.lmdb.begin(write=True, db=self._env.db, buffers=True) as txn:
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
                    f"disk tier: LMDB map of {self._env.map_size} bytes is too full to delete"
                ) from exc
            except lmdb.Error as exc:
                raise Unavailable(f"disk tier: remove failed: {exc}") from exc
            if removed:
                self._env.advance_epoch()
        with self._lock:
            self._space.published -= freed
        self._env.maybe_sync()
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
        yield from diskscan.records(self._entries(), self._count_corrupt)

    # ------------------------------------------------------------- durability

    def sync(self) -> None:
        """Flush every committed transaction to stable storage now."""
        self._env.sync()

    def close(self) -> None:
        """Sync and close the environment; outstanding read leases are ended first.

        No other call may be running on this tier while it closes: the
        payload views of a lease point into the map that closing unmaps.
        """
        self._env.close()

    # -------------------------------------------------------------- internals

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

    def _entries(self) -> Iterator[diskscan.Entry]:
        """Every stored value, read back in short transactions (see :func:`diskscan.scan`)."""
        return diskscan.scan(self._env.read, self._count_corrupt)
