"""The slab allocator never overlaps, never leaks, never exceeds its arena."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfabric.errors import InvalidArgument, ResourceExhausted
from kvfabric.tiers.slab import ALIGN, SlabAllocator, slot_size

ARENA, SLAB = 64 * 1024, 8 * 1024


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, SLAB)), max_size=200))
def test_allocations_never_overlap_or_leak(ops: list[tuple[bool, int]]) -> None:
    alloc = SlabAllocator(ARENA, SLAB)
    live: dict[int, int] = {}
    for do_alloc, size in ops:
        if do_alloc or not live:
            off = alloc.allocate(size)
            if off is None:
                # full: there really is no slab and no free slot of that class
                assert not alloc.can_allocate([size])
                continue
            end = off + slot_size(size)
            assert off >= 0 and end <= alloc.capacity and off % ALIGN == 0
            for o, s in live.items():
                assert end <= o or o + slot_size(s) <= off, "overlap"
            live[off] = size
        else:
            off = next(iter(live))
            alloc.free(off)
            del live[off]
        assert alloc.used == sum(slot_size(s) for s in live.values())
        assert alloc.used <= alloc.capacity
    for off in list(live):
        alloc.free(off)
    assert alloc.used == 0
    # every slab returned: the whole arena can be used by one size class again
    assert len([alloc.allocate(SLAB) for _ in range(ARENA // SLAB)]) == ARENA // SLAB
    assert alloc.allocate(SLAB) is None


def test_double_free_and_foreign_offsets_are_refused() -> None:
    alloc = SlabAllocator(ARENA, SLAB)
    off = alloc.allocate(1000)
    assert off is not None
    alloc.free(off)
    with pytest.raises(ValueError):
        alloc.free(off)
    with pytest.raises(ValueError):
        alloc.free(off + 7)


def test_can_allocate_agrees_with_allocate() -> None:
    alloc = SlabAllocator(ARENA, SLAB)
    sizes = [SLAB // 2] * (ARENA // SLAB * 2)
    assert alloc.can_allocate(sizes)
    assert not alloc.can_allocate([*sizes, 1])
    offs = alloc.reserve(sizes, "CPU", "cpu_arena_bytes")
    assert len(set(offs)) == len(sizes)
    with pytest.raises(ResourceExhausted) as err:
        alloc.reserve([1], "CPU", "cpu_arena_bytes")
    assert err.value.field == "cpu_arena_bytes"


def test_reserve_is_all_or_nothing() -> None:
    alloc = SlabAllocator(ARENA, SLAB)
    with pytest.raises(ResourceExhausted):
        alloc.reserve([SLAB] * (ARENA // SLAB + 1), "CPU", "cpu_arena_bytes")
    assert alloc.used == 0
    with pytest.raises(InvalidArgument) as err:
        alloc.reserve([10, SLAB + 1], "CPU", "cpu_arena_bytes")
    assert err.value.field == "size" and alloc.used == 0
