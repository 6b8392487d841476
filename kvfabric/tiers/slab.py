"""A slab allocator over a fixed byte range: no allocation per block.

The arena is cut into equal slabs. A slab, when first needed, is given to one
size class (slot size, rounded up to ``ALIGN``) and cut into slots; a slab
whose slots are all free goes back to the shared pool, so size classes can
trade memory over time. Offsets are plain ints into the arena.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvfabric.errors import InvalidArgument, ResourceExhausted

ALIGN = 256  # slot alignment: keeps every slot cache-line and DMA friendly


def slot_size(size: int) -> int:
    """The slot size class a block of ``size`` bytes occupies."""
    return max(ALIGN, (size + ALIGN - 1) // ALIGN * ALIGN)


@dataclass(slots=True)
class _Slab:
    index: int
    slot_bytes: int
    free: list[int] = field(default_factory=list)  # free slot numbers
    taken: bytearray = field(default_factory=bytearray)  # 1 per allocated slot
    used: int = 0


class SlabAllocator:
    """Hands out fixed-size slots of an arena of ``arena_bytes`` cut into ``slab_bytes`` slabs."""

    def __init__(self, arena_bytes: int, slab_bytes: int) -> None:
        if slab_bytes <= 0 or arena_bytes < slab_bytes:
            raise ValueError("arena_bytes must hold at least one slab of slab_bytes > 0")
        self.slab_bytes = slab_bytes
        self.num_slabs = arena_bytes // slab_bytes
        self._free_slabs: list[int] = list(range(self.num_slabs - 1, -1, -1))
        self._slabs: dict[int, _Slab] = {}
        self._partial: dict[int, dict[int, None]] = {}  # slot_bytes -> slabs with a free slot
        self._used_bytes = 0

    @property
    def capacity(self) -> int:
        """Bytes the allocator manages (whole slabs only)."""
        return self.num_slabs * self.slab_bytes

    @property
    def used(self) -> int:
        """Bytes of slots handed out (slot sizes, not the requested sizes)."""
        return self._used_bytes

    def can_allocate(self, sizes: list[int]) -> bool:
        """Whether every size in ``sizes`` could be allocated now, together."""
        need: dict[int, int] = {}
        for s in sizes:
            need[slot_size(s)] = need.get(slot_size(s), 0) + 1
        slabs_needed = 0
        for slot_bytes, count in need.items():
            if slot_bytes > self.slab_bytes:
                return False
            free_slots = sum(len(self._slabs[i].free) for i in self._partial.get(slot_bytes, {}))
            missing = count - free_slots
            if missing > 0:
                per_slab = self.slab_bytes // slot_bytes
                slabs_needed += -(-missing // per_slab)
        return slabs_needed <= len(self._free_slabs)

    def allocate(self, size: int) -> int | None:
        """Offset of a free slot for ``size`` bytes, or None when the arena is full."""
        slot_bytes = slot_size(size)
        if slot_bytes > self.slab_bytes:
            return None
        partial = self._partial.setdefault(slot_bytes, {})
        if partial:
            slab = self._slabs[next(iter(partial))]
        elif self._free_slabs:
            index = self._free_slabs.pop()
            per_slab = self.slab_bytes // slot_bytes
            slab = _Slab(index, slot_bytes, list(range(per_slab - 1, -1, -1)), bytearray(per_slab))
            self._slabs[index] = slab
            partial[index] = None
        else:
            return None
        slot = slab.free.pop()
        slab.taken[slot] = 1
        slab.used += 1
        if not slab.free:
            del partial[slab.index]
        self._used_bytes += slot_bytes
        return slab.index * self.slab_bytes + slot * slot_bytes

    def free(self, offset: int) -> None:
        """Return the slot at ``offset``; freeing an unknown or free slot raises ValueError."""
        index, within = divmod(offset, self.slab_bytes)
        slab = self._slabs.get(index)
        if slab is None or within % slab.slot_bytes:
            raise ValueError(f"offset {offset} is not an allocated slot")
        slot = within // slab.slot_bytes
        if slot >= len(slab.taken) or not slab.taken[slot]:
            raise ValueError(f"offset {offset} is not an allocated slot")
        slab.taken[slot] = 0
        slab.free.append(slot)
        slab.used -= 1
        self._used_bytes -= slab.slot_bytes
        partial = self._partial.setdefault(slab.slot_bytes, {})
        if slab.used == 0:
            partial.pop(index, None)
            del self._slabs[index]
            self._free_slabs.append(index)
        else:
            partial[index] = None

    def reserve(self, sizes: Sequence[int], tier_name: str, config_field: str) -> list[int]:
        """Allocate a slot for every size or none: typed errors name the limit hit."""
        offsets: list[int] = []
        for size in sizes:
            off = None
            if size > 0 and slot_size(size) <= self.slab_bytes:
                off = self.allocate(size)
            if off is None:
                for o in offsets:
                    self.free(o)
                if size <= 0 or slot_size(size) > self.slab_bytes:
                    raise InvalidArgument(
                        f"block size {size} is outside 1..{self.slab_bytes} ({tier_name} slab)",
                        "size",
                    )
                raise ResourceExhausted(
                    f"{tier_name} tier full: {self.used} of {self.capacity} bytes used, "
                    f"cannot reserve {len(sizes)} blocks",
                    config_field,
                )
            offsets.append(off)
        return offsets
