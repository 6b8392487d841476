"""The GPU tier: a slab-carved region of device memory, used only where CUDA works.

Importing this module never imports torch; :func:`cuda_usable` probes lazily
and answers False on machines without a usable device. Checksums are taken on
the host side of every copy (the source of a put, the destination of a get),
so a block's checksum means the same bytes on every tier.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from typing import Any

from kvfabric import integrity
from kvfabric.errors import FailedPrecondition, Unavailable
from kvfabric.tiers.base import BlockRecord, GetHandle, PutHandle, TierBackend
from kvfabric.tiers.slab import SlabAllocator
from kvfabric.types import BlockKey, Tier


@functools.cache
def cuda_usable() -> bool:
    """True when torch imports and reports at least one usable CUDA device.

    Without an NVIDIA driver this answers at once, without importing torch.
    """
    if not os.path.exists("/proc/driver/nvidia/version") and not os.environ.get(
        "KVFABRIC_PROBE_CUDA"
    ):
        return False
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except RuntimeError:
        return False


class GpuTier(TierBackend):
    """Device-memory tier; buffers are uint8 tensor views on the device."""

    tier = Tier.GPU

    def __init__(self, nbytes: int, slab_bytes: int, device: int = 0) -> None:
        if not cuda_usable():
            raise Unavailable("the GPU tier needs a usable CUDA device", "gpu_bytes")
        import torch

        self._torch = torch
        self.device = torch.device("cuda", device)
        self.memory = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.allocator = SlabAllocator(nbytes, slab_bytes)
        self._published: dict[BlockKey, tuple[int, BlockRecord]] = {}
        self._leases: dict[int, int] = {}  # offset -> active readers
        self._removed: set[int] = set()
        self._lock = threading.Lock()

    def _view(self, offset: int, size: int) -> Any:
        return self.memory[offset : offset + size]

    def prepare_put(self, records: Sequence[BlockRecord]) -> PutHandle:
        """Reserve one device slot per record; all or nothing."""
        with self._lock:
            offsets = self.allocator.reserve([r.size for r in records], "GPU", "gpu_bytes")
        bufs = [self._view(o, r.size) for o, r in zip(offsets, records, strict=True)]
        return PutHandle(self.tier, list(records), bufs, list(offsets))

    def write(self, handle: PutHandle, srcs: Sequence[integrity.Buffer]) -> list[int]:
        """Copy host sources to the device slots; checksums are of the host bytes."""
        sums = []
        for dst, src in zip(handle.buffers, srcs, strict=True):
            host = self._torch.frombuffer(memoryview(src), dtype=self._torch.uint8)
            dst.copy_(host, non_blocking=False)
            sums.append(integrity.checksum(src))
        return sums

    def read(self, handle: GetHandle, dsts: Sequence[integrity.Buffer | None]) -> list[int | None]:
        """Copy device slots to host destinations; checksum the bytes that arrived."""
        out: list[int | None] = []
        for buf, dst in zip(handle.buffers, dsts, strict=True):
            if buf is None or dst is None:
                out.append(None)
                continue
            host = self._torch.frombuffer(memoryview(dst), dtype=self._torch.uint8)
            host.copy_(buf)
            out.append(integrity.checksum(dst))
        return out

    def complete_put(self, handle: PutHandle) -> None:
        """Publish the reserved slots (after the device copies have finished)."""
        _finish(handle)
        self._torch.cuda.synchronize(self.device)
        with self._lock:
            for r, off in zip(handle.records, handle.slots, strict=True):
                assert isinstance(off, int)
                if r.key in self._published:
                    self.allocator.free(off)
                else:
                    self._published[r.key] = (off, r)

    def abort_put(self, handle: PutHandle) -> None:
        """Give the reserved slots back."""
        _finish(handle)
        with self._lock:
            for off in handle.slots:
                if isinstance(off, int):
                    self.allocator.free(off)

    def prepare_get(self, keys: Sequence[BlockKey]) -> GetHandle:
        """Lease device slots of ``keys``."""
        bufs: list[Any] = []
        expected: list[int | None] = []
        slots: list[object] = []
        with self._lock:
            for key in keys:
                entry = self._published.get(key)
                if entry is None:
                    bufs.append(None)
                    expected.append(None)
                    slots.append(None)
                    continue
                off, rec = entry
                self._leases[off] = self._leases.get(off, 0) + 1
                bufs.append(self._view(off, rec.size))
                expected.append(rec.checksum)
                slots.append(off)
        return GetHandle(self.tier, list(keys), bufs, expected, [False] * len(keys), slots)

    def complete_get(self, handle: GetHandle) -> None:
        """End the lease; slots removed meanwhile are freed now."""
        if handle.done:
            raise FailedPrecondition("get handle was already completed", "handle")
        handle.done = True
        with self._lock:
            for off in handle.slots:
                if not isinstance(off, int):
                    continue
                self._leases[off] -= 1
                if self._leases[off] == 0:
                    del self._leases[off]
                    if off in self._removed:
                        self._removed.discard(off)
                        self.allocator.free(off)

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each key is published on the device."""
        with self._lock:
            return [k in self._published for k in keys]

    def remove(self, keys: Sequence[BlockKey]) -> int:
        """Unpublish ``keys``; leased slots are freed when their lease ends."""
        n = 0
        with self._lock:
            for key in keys:
                entry = self._published.pop(key, None)
                if entry is None:
                    continue
                n += 1
                if self._leases.get(entry[0]):
                    self._removed.add(entry[0])
                else:
                    self.allocator.free(entry[0])
        return n

    def can_fit(self, sizes: Sequence[int]) -> bool:
        """Whether device slots for ``sizes`` are free now."""
        with self._lock:
            return self.allocator.can_allocate(list(sizes))

    def capacity(self) -> int:
        """Bytes of whole slabs of device memory."""
        return self.allocator.capacity

    def used(self) -> int:
        """Bytes of device slots in use."""
        return self.allocator.used

    def close(self) -> None:
        """Drop the device allocation."""
        with self._lock:
            self._published.clear()
        del self.memory


def _finish(handle: PutHandle) -> None:
    if handle.done:
        raise FailedPrecondition("put handle was already completed or aborted", "handle")
    handle.done = True
