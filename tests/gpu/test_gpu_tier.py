"""The GPU tier on a real device: round trips, demotion to the host arena, checksums."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvfabric.types import Tier
from tests.conftest import NS, block, key, make_store

pytestmark = pytest.mark.gpu

B = 256 * 1024


def _gpu_store(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = make_store(
        tmp_path, gpu_bytes="2MiB", cpu_slab_bytes="1MiB", max_block_bytes="1MiB",
        cpu_arena_bytes="4MiB",
    )  # fmt: skip
    store.register_namespace(NS, B)
    return store


def test_gpu_tier_is_first_and_round_trips(tmp_path: Path) -> None:
    store = _gpu_store(tmp_path)
    assert store.tier_list()[0] == Tier.GPU
    r = store.put(key(1), block(1, B))
    assert r.tier == Tier.GPU
    assert store.get(key(1)) == block(1, B)
    store.close()


def test_full_gpu_demotes_to_cpu_with_verified_bytes(tmp_path: Path) -> None:
    store = _gpu_store(tmp_path)
    n = 20  # GPU holds 8 blocks of 256 KiB
    store.put_many([key(i) for i in range(n)], [block(i, B) for i in range(n)])
    tiers = store.contains([key(i) for i in range(n)])
    assert tiers.count(Tier.GPU) <= 8 and Tier.CPU in tiers
    assert [store.get(key(i)) for i in range(n)] == [block(i, B) for i in range(n)]
    assert store.stats().counters.checksum_failures == 0
    store.close()


def test_corrupt_device_bytes_are_a_miss(tmp_path: Path) -> None:
    store = _gpu_store(tmp_path)
    store.put(key(1), block(1, B), tier=Tier.GPU)
    gpu = store.tiers[Tier.GPU]
    off = gpu.slot_offset(key(1))  # type: ignore[attr-defined]
    gpu.memory[off + 5] ^= 0xFF  # type: ignore[attr-defined]
    assert store.get(key(1)) is None
    assert store.stats().counters.checksum_failures == 1
    store.close()
