"""The CPU tier: one pre-allocated host arena carved by a slab allocator.

The arena is either private anonymous memory or a named segment under
``/dev/shm`` that co-located engine processes can map (DESIGN.md, node-local
data path). When CUDA is usable the arena is registered as pinned host memory
so device copies into and out of it run at full DMA speed. Nothing is
allocated per block: a put takes a slot, a get leases one.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kvfabric.errors import FailedPrecondition
from kvfabric.tiers.base import BlockRecord, GetHandle, PutHandle, TierBackend
from kvfabric.tiers.slab import SlabAllocator
from kvfabric.types import BlockKey, Tier

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


class Arena:
    """A fixed block of host memory, optionally a named shared-memory segment."""

    def __init__(self, size: int, shm_name: str = "", prefault: bool = True) -> None:
        self.size = size
        self.shm_path = os.path.join(SHM_DIR, shm_name) if shm_name else ""
        if self.shm_path:
            fd = os.open(self.shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        else:
            self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)
        if prefault:
            self._prefault()
        self.pinned = _pin_host_memory(self)

    def _prefault(self) -> None:
        # First-touch page faults would otherwise land on the put path.
        populate = getattr(mmap, "MADV_POPULATE_WRITE", None)
        if populate is not None:
            try:
                self._map.madvise(populate)
                return
            except OSError:
                pass
        step = mmap.PAGESIZE
        zero = b"\0"
        for off in range(0, self.size, step):
            self._map[off : off + 1] = zero

    def close(self) -> None:
        """Unmap the arena and unlink its shared-memory name.

        If callers still hold views into the arena, unmapping is left to the
        garbage collector rather than invalidating memory they may read.
        """
        try:
            self.view.release()
            self._map.close()
        except BufferError:
            log.warning("arena closed while views into it are still held; unmap deferred")
        if self.shm_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.shm_path)


def _pin_host_memory(arena: Arena) -> bool:
    """Register the arena as page-locked memory when CUDA is usable; False otherwise."""
    from kvfabric.tiers.gpu import cuda_usable

    if not cuda_usable():
        return False
    import ctypes

    import torch

    address = ctypes.addressof(ctypes.c_char.from_buffer(arena._map))
    err = torch.cuda.cudart().cudaHostRegister(address, arena.size, 0)  # type: ignore[no-untyped-call]
    if int(err) != 0:
        log.warning("cudaHostRegister of the %d-byte arena failed (%s)", arena.size, err)
        return False
    return True


@dataclass(slots=True)
class _Slot:
    offset: int
    size: int
    record: BlockRecord
    readers: int = 0
    removed: bool = False


class CpuTier(TierBackend):
    """The host-memory tier; buffers are zero-copy views into the arena."""

    tier = Tier.CPU

    def __init__(
        self, arena_bytes: int, slab_bytes: int, *, shm_name: str = "", prefault: bool = True
    ) -> None:
        self.arena = Arena(arena_bytes, shm_name, prefault)
        self.allocator = SlabAllocator(arena_bytes, slab_bytes)
        self._published: dict[BlockKey, _Slot] = {}
        self._lock = threading.Lock()

    # -- put -------------------------------------------------------------------------
    def prepare_put(self, records: Sequence[BlockRecord]) -> PutHandle:
        """Reserve one slot per record; all or nothing."""
        with self._lock:
            offsets = self.allocator.reserve([r.size for r in records], "CPU", "cpu_arena_bytes")
        buffers = [self.arena.view[o : o + r.size] for o, r in zip(offsets, records, strict=True)]
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
        buffers: list[memoryview | None] = []
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
                buffers.append(self.arena.view[slot.offset : slot.offset + slot.size])
                expected.append(slot.record.checksum)
        return GetHandle(self.tier, list(keys), buffers, expected, [False] * len(keys), slots)

    def complete_get(self, handle: GetHandle) -> None:
        """End the lease; slots removed meanwhile are freed now."""
        if handle.done:
            raise FailedPrecondition("get handle was already completed", "handle")
        handle.done = True
        for buf in handle.buffers:
            if buf is not None:
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
        """Bytes of whole slabs in the arena."""
        return self.allocator.capacity

    def used(self) -> int:
        """Bytes of slots held by published, reserved and leased blocks."""
        return self.allocator.used

    def slot_offset(self, key: BlockKey) -> int | None:
        """Arena offset of a published block (for co-located readers of the shm arena)."""
        with self._lock:
            slot = self._published.get(key)
            return None if slot is None else slot.offset

    def close(self) -> None:
        """Free the arena."""
        with self._lock:
            self._published.clear()
        self.arena.close()
