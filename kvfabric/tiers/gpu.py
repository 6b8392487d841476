"""The GPU tier: a slab-carved region of device memory, used only where CUDA works.

Importing this module never imports torch; :func:`cuda_usable` probes lazily
and answers False on machines without a usable device. Checksums are taken on
the host side of every copy (the source of a put, the destination of a get),
so a block's checksum means the same bytes on every tier.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from kvfabric import integrity
from kvfabric.errors import Unavailable
from kvfabric.tiers.base import GetHandle, PutHandle
from kvfabric.tiers.slabtier import SlabTier
from kvfabric.types import Tier


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


class GpuTier(SlabTier):
    """Device-memory tier; buffers are uint8 tensor views on the device."""

    tier = Tier.GPU
    config_field = "gpu_bytes"

    def __init__(self, nbytes: int, slab_bytes: int, device: int = 0) -> None:
        if not cuda_usable():
            raise Unavailable("the GPU tier needs a usable CUDA device", "gpu_bytes")
        import torch

        super().__init__(nbytes, slab_bytes)
        self._torch = torch
        self.device = torch.device("cuda", device)
        self.memory = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _view(self, offset: int, size: int) -> Any:
        return self.memory[offset : offset + size]

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
        """Publish the reserved slots once the device copies have finished."""
        self._torch.cuda.synchronize(self.device)
        super().complete_put(handle)

    def close(self) -> None:
        """Drop the device allocation."""
        self._forget_all()
        del self.memory
