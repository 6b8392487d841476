"""The disk tier's write path: put reservations laid out as LMDB values, committed at once.

``prepare`` checks each record, charges its footprint against the capacity
(:mod:`kvfabric.tiers.diskspace`) and hands out, per block, a writable view
into one ``bytearray`` laid out as ``[header space | payload]``. ``complete``
writes each header in place (:mod:`kvfabric.tiers.diskformat`) and puts every
block of the handle in ONE write transaction, so a batch is all visible or
not at all, also after a crash. That is one copy into LMDB and no
re-concatenation. Existing keys are skipped: committed blocks are immutable.
``abort`` releases the reservation. Exactly one of ``complete`` and
``abort`` ends a handle.

A full map (``MapFullError``) becomes ResourceExhausted, any other LMDB
error Unavailable; the transaction is aborted and its reservation released,
and nothing committed before is lost.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import lmdb

from kvfabric.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from kvfabric.tiers.base import BlockRecord, PutHandle
from kvfabric.tiers.diskenv import DiskEnv
from kvfabric.tiers.diskformat import encode_program_id, header_len_for, pack_header_into
from kvfabric.tiers.diskspace import DiskSpace
from kvfabric.types import Tier


@dataclass(slots=True)
class PendingBlock:
    """One block of a put reservation: its future LMDB value and what it is charged."""

    owner: DiskWriter
    key: bytes
    record: BlockRecord
    program_id: bytes
    value: bytearray
    footprint: int


class DiskWriter:
    """Two-phase puts into the disk tier's environment (see the module docstring).

    ``lock`` is the tier's lock; it guards ``space`` and the handles' ``done`` flags.
    """

    def __init__(
        self, env: DiskEnv, space: DiskSpace, lock: threading.Lock, max_block_bytes: int
    ) -> None:
        self._env = env
        self._space = space
        self._lock = lock
        self.max_block_bytes = max_block_bytes

    def prepare(self, records: Sequence[BlockRecord]) -> PutHandle:
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
            fp = self._space.footprint(len(key), hl + size)
            planned.append((key, rec, pid, hl, fp))
            need += fp
        with self._lock:
            self._env.check_open()
            self._space.reserve(need, len(recs))
        try:
            pending = [
                PendingBlock(self, key, rec, pid, bytearray(hl + rec.size), fp)
                for key, rec, pid, hl, fp in planned
            ]
        except BaseException:
            self._release(need)
            raise
        buffers = [memoryview(p.value)[len(p.value) - p.record.size :] for p in pending]
        return PutHandle(Tier.DISK, recs, buffers, list(pending))

    def complete(self, handle: PutHandle) -> None:
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
        with self._env.write_lock:
            if self._env.closed:
                self._release(reserved)
                raise FailedPrecondition("disk tier is closed")
            try:
                txn = self._env.lmdb.begin(write=True, db=self._env.db)
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
                    f"disk tier: LMDB map of {self._env.map_size} bytes is full writing "
                    f"{len(pending)} blocks ({reserved} bytes); used {self._used()}"
                ) from exc
            except lmdb.Error as exc:
                self._release(reserved)
                raise Unavailable(f"disk tier: write failed: {exc}") from exc
            except BaseException:
                self._release(reserved)
                raise
        with self._lock:
            self._space.reserved -= reserved
            self._space.published += written
        self._env.maybe_sync()

    def abort(self, handle: PutHandle) -> None:
        """Release the reservation of ``handle``; nothing becomes visible."""
        pending = self._pending_of(handle)
        self._claim(handle)
        self._release(sum(p.footprint for p in pending))

    def _pending_of(self, handle: PutHandle) -> list[PendingBlock]:
        pending = handle.slots
        if not all(isinstance(p, PendingBlock) and p.owner is self for p in pending) or (
            len(pending) != len(handle.buffers)
        ):
            raise InvalidArgument("handle was not made by this disk tier", "handle")
        if handle.done:
            raise FailedPrecondition("put handle is already completed or aborted")
        return [p for p in pending if isinstance(p, PendingBlock)]

    def _claim(self, handle: PutHandle) -> None:
        """Mark ``handle`` finished; exactly one complete/abort call wins."""
        with self._lock:
            if handle.done:
                raise FailedPrecondition("put handle is already completed or aborted")
            handle.done = True

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._space.reserved -= nbytes

    def _used(self) -> int:
        with self._lock:
            return self._space.used()
