"""Slot bookkeeping shared by the tiers that live in one fixed memory region.

Publishing, read leases (a slot under a lease is freed only when the lease
ends) and removal are the same for host memory and device memory; only what a
slot's buffer is differs.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvfabric.errors import FailedPrecondition
from kvfabric.tiers.base import BlockRecord, GetHandle, PutHandle, TierBackend
from kvfabric.tiers.slab import SlabAllocator
from kvfabric.types import BlockKey


@dataclass(slots=True)
class _Slot:
    offset: int
    size: int
    record: BlockRecord
    readers: int = 0
    removed: bool = False


class SlabTier(TierBackend):
    """A tier whose bytes live in one fixed region carved by a :class:`SlabAllocator`.

    Subclasses say what a slot's buffer is (:meth:`_view`) and own the region.
    """

    config_field = ""  # the config field that sizes the region (named in errors)

    def __init__(self, nbytes: int, slab_bytes: int) -> None:
        self.allocator = SlabAllocator(nbytes, slab_bytes)
        self._published: dict[BlockKey, _Slot] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def _view(self, offset: int, size: int) -> Any:
        """The buffer of the slot at ``offset`` (a memoryview, or a device tensor)."""

    # -- put -------------------------------------------------------------------------
    def prepare_put(self, records: Sequence[BlockRecord]) -> PutHandle:
        """Reserve one slot per record; all or nothing."""
        with self._lock:
            offsets = self.allocator.reserve(
                [r.size for r in records], self.tier.name, self.config_field
            )
        buffers = [self._view(o, r.size) for o, r in zip(offsets, records, strict=True)]
        return PutHandle(self.tier, list(records), buffers, list(offsets))

    def complete_put(self, handle: PutHandle) -> None:
        """Publish the reserved slots; a key published meanwhile keeps its first bytes."""
        self._finish(handle)
        with self._lock:
            for record, off in zip(handle.records, handle.slots, strict=True):
                assert isinstance(off, int)
                if record.key in self._published:
                    self.allocator.free(off)
                else:
                    self._published[record.key] = _Slot(off, record.size, record)

    def abort_put(self, handle: PutHandle) -> None:
        """Give the reserved slots back."""
        self._finish(handle)
        with self._lock:
            for off in handle.slots:
                if isinstance(off, int):
                    self.allocator.free(off)

    @staticmethod
    def _finish(handle: PutHandle) -> None:
        if handle.done:
            raise FailedPrecondition("put handle was already completed or aborted", "handle")
        handle.done = True

    # -- get -------------------------------------------------------------------------
    def prepare_get(self, keys: Sequence[BlockKey]) -> GetHandle:
        """Lease the slots of ``keys``; they are not freed until ``complete_get``."""
        slots: list[object] = []
        buffers: list[Any] = []
        expected: list[int | None] = []
        with self._lock:
            for key in keys:
                slot = self._published.get(key)
                if slot is None:
                    slots.append(None)
                    buffers.append(None)
                    expected.append(None)
                    continue
                slot.readers += 1
                slots.append(slot)
                buffers.append(self._view(slot.offset, slot.size))
                expected.append(slot.record.checksum)
        return GetHandle(self.tier, list(keys), buffers, expected, [False] * len(keys), slots)

    def complete_get(self, handle: GetHandle) -> None:
        """End the lease; slots removed meanwhile are freed now."""
        if handle.done:
            raise FailedPrecondition("get handle was already completed", "handle")
        handle.done = True
        for buf in handle.buffers:
            if isinstance(buf, memoryview):
                buf.release()
        with self._lock:
            for slot in handle.slots:
                if isinstance(slot, _Slot):
                    slot.readers -= 1
                    if slot.removed and slot.readers == 0:
                        self.allocator.free(slot.offset)

    # -- bookkeeping -----------------------------------------------------------------
    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each key is published here."""
        with self._lock:
            return [k in self._published for k in keys]

    def remove(self, keys: Sequence[BlockKey]) -> int:
        """Unpublish ``keys``; a slot under a read lease is freed when the lease ends."""
        removed = 0
        with self._lock:
            for key in keys:
                slot = self._published.pop(key, None)
                if slot is None:
                    continue
                removed += 1
                if slot.readers:
                    slot.removed = True
                else:
                    self.allocator.free(slot.offset)
        return removed

    def can_fit(self, sizes: Sequence[int]) -> bool:
        """Whether slots for ``sizes`` are free now."""
        with self._lock:
            return self.allocator.can_allocate(list(sizes))

    def capacity(self) -> int:
        """Bytes of whole slabs in the region."""
        return self.allocator.capacity

    def used(self) -> int:
        """Bytes of slots held by published, reserved and leased blocks."""
        return self.allocator.used

    def slot_offset(self, key: BlockKey) -> int | None:
        """Region offset of a published block (co-located readers map the region)."""
        with self._lock:
            slot = self._published.get(key)
            return None if slot is None else slot.offset

    def _forget_all(self) -> None:
        with self._lock:
            self._published.clear()
