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

from kvfabric.tiers.slabtier import SlabTier
from kvfabric.types import Tier

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


class CpuTier(SlabTier):
    """The host-memory tier; buffers are zero-copy views into the arena."""

    tier = Tier.CPU
    config_field = "cpu_arena_bytes"

    def __init__(
        self, arena_bytes: int, slab_bytes: int, *, shm_name: str = "", prefault: bool = True
    ) -> None:
        super().__init__(arena_bytes, slab_bytes)
        self.arena = Arena(arena_bytes, shm_name, prefault)

    def _view(self, offset: int, size: int) -> memoryview:
        return self.arena.view[offset : offset + size]

    def close(self) -> None:
        """Free the arena."""
        self._forget_all()
        self.arena.close()
