"""The disk tier against a real LMDB environment in a temporary directory."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import numpy as np
import pytest

from kvfabric.errors import Corrupt, FailedPrecondition, InvalidArgument, ResourceExhausted
from kvfabric.integrity import checksum
from kvfabric.tiers.base import BlockRecord
from kvfabric.tiers.disk import DiskTier
from kvfabric.tiers.diskformat import MAGIC
from kvfabric.types import BlockHash, BlockKey, BlockType

KiB, MiB = 1 << 10, 1 << 20


def key(i: int, ns: str = "m1") -> BlockKey:
    return BlockKey(ns, BlockHash(hashlib.sha256(b"%d" % i).digest()))


def payload(i: int, size: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()


def put(tier: DiskTier, items: list[tuple[BlockKey, bytes]], **fields: object) -> None:
    handle = tier.prepare_put([BlockRecord(k, len(b), **fields) for k, b in items])  # type: ignore[arg-type]
    handle.set_checksums(tier.write(handle, [b for _, b in items]))
    tier.complete_put(handle)


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[DiskTier]:
    t = DiskTier(tmp_path / "disk", 64 * MiB, max_block_bytes=2 * MiB)
    yield t
    t.close()


def test_two_phase_round_trip_with_checksums(tier: DiskTier) -> None:
    items = [(key(i), payload(i, 64 * KiB + i)) for i in range(5)]
    put(tier, items, type=BlockType.TOOL_DEFINITION, program_id="prog-1")
    handle = tier.prepare_get([k for k, _ in items] + [key(99)])
    dsts = [bytearray(len(b)) for _, b in items] + [None]
    sums = tier.read(handle, dsts)
    assert sums[:5] == handle.expected[:5] == [checksum(b) for _, b in items]
    assert handle.buffers[5] is None and handle.expected[5] is None
    assert handle.corrupt == [False] * 6
    tier.complete_get(handle)
    assert [bytes(d) for d in dsts[:5] if d is not None] == [b for _, b in items]
    assert tier.read_verified(items[0][0]) == items[0][1]
    assert tier.read_verified(key(99)) is None
    records = {r.key: r for r in tier.inventory()}
    assert records[key(3)] == BlockRecord(
        key(3), len(items[3][1]), checksum(items[3][1]), BlockType.TOOL_DEFINITION, "prog-1"
    )


def test_get_buffers_are_released_after_complete_get(tier: DiskTier) -> None:
    put(tier, [(key(1), payload(1, 4096))])
    handle = tier.prepare_get([key(1)])
    view = handle.buffers[0]
    assert bytes(view[:4]) == payload(1, 4)
    tier.complete_get(handle)
    with pytest.raises(ValueError):
        bytes(view)
    with pytest.raises(FailedPrecondition):
        tier.complete_get(handle)


def test_nothing_visible_between_prepare_and_complete(tier: DiskTier) -> None:
    data = payload(7, 100 * KiB)
    handle = tier.prepare_put([BlockRecord(key(7), len(data))])
    handle.set_checksums(tier.write(handle, [data]))
    assert tier.contains([key(7)]) == [False]
    peek = tier.prepare_get([key(7)])
    assert peek.buffers == [None] and peek.corrupt == [False]
    assert list(tier.inventory()) == []
    tier.complete_put(handle)
    assert tier.contains([key(7)]) == [True]
    # A lease taken before the commit keeps its snapshot.
    assert tier.prepare_get([key(7)]).buffers[0] is not None
    tier.complete_get(peek)


def test_abort_leaves_nothing_and_releases_the_reservation(tier: DiskTier) -> None:
    before = tier.used()
    handle = tier.prepare_put([BlockRecord(key(i), 300 * KiB) for i in range(4)])
    assert tier.used() > before + 4 * 300 * KiB
    for buf in handle.buffers:
        buf[:] = b"\xab" * len(buf)
    tier.abort_put(handle)
    assert tier.used() == before
    assert tier.contains([key(i) for i in range(4)]) == [False] * 4
    with pytest.raises(FailedPrecondition):
        tier.complete_put(handle)
    with pytest.raises(FailedPrecondition):
        tier.abort_put(handle)


def test_complete_twice_fails(tier: DiskTier) -> None:
    handle = tier.prepare_put([BlockRecord(key(1), 10)])
    handle.set_checksums(tier.write(handle, [b"0123456789"]))
    tier.complete_put(handle)
    used = tier.used()
    with pytest.raises(FailedPrecondition):
        tier.complete_put(handle)
    with pytest.raises(FailedPrecondition):
        tier.abort_put(handle)
    assert tier.used() == used


def test_committed_blocks_are_immutable(tier: DiskTier) -> None:
    first, second = payload(1, 50 * KiB), payload(2, 50 * KiB)
    put(tier, [(key(1), first)])
    used = tier.used()
    put(tier, [(key(1), second), (key(2), second)])
    assert tier.read_verified(key(1)) == first
    assert tier.read_verified(key(2)) == second
    assert tier.used() == 2 * used  # the skipped duplicate is not charged


def test_size_limits_name_the_field(tier: DiskTier) -> None:
    for size in (0, 2 * MiB + 1, -5):
        with pytest.raises(InvalidArgument) as err:
            tier.prepare_put([BlockRecord(key(1), size)])
        assert err.value.field == "size"
    assert tier.used() == 0
    assert not tier.can_fit([2 * MiB + 1])
    assert tier.can_fit([2 * MiB] * 10)


def test_bad_configuration_and_foreign_handles_are_rejected(tmp_path: Path, tier: DiskTier) -> None:
    for kwargs, field in (
        ({"map_size": 0, "max_block_bytes": 1}, "map_size"),
        ({"map_size": MiB, "max_block_bytes": 0}, "max_block_bytes"),
        ({"map_size": MiB, "max_block_bytes": 1, "sync_interval_s": -1.0}, "sync_interval_s"),
    ):
        with pytest.raises(InvalidArgument) as err:
            DiskTier(tmp_path / "bad", **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field
    other = DiskTier(tmp_path / "other", 8 * MiB, max_block_bytes=KiB)
    handle = other.prepare_put([BlockRecord(key(1), 10)])
    with pytest.raises(InvalidArgument):
        tier.complete_put(handle)
    other.abort_put(handle)
    empty = tier.prepare_put([])
    tier.complete_put(empty)
    with pytest.raises(FailedPrecondition):
        tier.abort_put(empty)
    other.close()
    with pytest.raises(FailedPrecondition):
        other.prepare_put([BlockRecord(key(1), 10)])


def test_capacity_is_enforced_and_existing_blocks_survive(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "d", 8 * MiB, max_block_bytes=1 * MiB)
    assert tier.capacity() == int(8 * MiB * 0.9)
    stored = []
    with pytest.raises(ResourceExhausted, match="disk tier") as err:
        for i in range(100):
            data = payload(i, 1 * MiB)
            put(tier, [(key(i), data)])
            stored.append((key(i), data))
    assert "available" in err.value.message
    assert 5 <= len(stored) < 8
    assert tier.used() <= tier.capacity()
    assert not tier.can_fit([1 * MiB])
    for k, data in stored:
        assert tier.read_verified(k) == data
    assert tier.remove([stored[0][0]]) == 1
    put(tier, [(key(1000), payload(1000, 1 * MiB))])
    tier.close()


def test_map_full_aborts_cleanly_and_keeps_the_env_usable(tmp_path: Path) -> None:
    # A live read lease pins the pages of removed blocks, so LMDB runs out of
    # map while the tier's accounting (which already freed them) says yes.
    tier = DiskTier(tmp_path / "d", 4 * MiB, max_block_bytes=256 * KiB)
    blocks = [(key(i), payload(i, 256 * KiB)) for i in range(12)]
    for i in range(0, 12, 4):
        put(tier, blocks[i : i + 4])
    lease = tier.prepare_get([k for k, _ in blocks])
    assert tier.remove([k for k, _ in blocks[2:]]) == 10
    used = tier.used()
    fresh = [(key(100 + i), payload(100 + i, 256 * KiB)) for i in range(6)]
    with pytest.raises(ResourceExhausted, match="full") as err:
        put(tier, fresh)
    assert isinstance(err.value.__cause__, lmdb.MapFullError)
    assert tier.used() == used
    assert tier.contains([k for k, _ in fresh]) == [False] * 6
    # The lease still reads the removed blocks' bytes.
    assert bytes(lease.buffers[5]) == blocks[5][1]
    tier.complete_get(lease)
    for k, data in blocks[:2]:
        assert tier.read_verified(k) == data
    put(tier, fresh)
    for k, data in fresh:
        assert tier.read_verified(k) == data
    tier.close()


def test_reopen_rebuilds_inventory_and_usage(tmp_path: Path) -> None:
    path = tmp_path / "d"
    tier = DiskTier(path, 64 * MiB, max_block_bytes=1 * MiB)
    items = [(key(i), payload(i, (i % 5 + 1) * 37 * KiB)) for i in range(20)]
    for i in range(0, 20, 3):
        put(tier, items[i : i + 3], type=BlockType.SYSTEM_PROMPT, program_id=f"p{i}")
    put(tier, [(key(500), b"tiny")])  # stored inline in a leaf page, not in overflow pages
    tier.remove([key(4), key(11)])
    before = sorted(tier.inventory(), key=lambda r: r.key.hash)
    used = tier.used()
    tier.close()
    with pytest.raises(FailedPrecondition):
        tier.contains([key(1)])

    again = DiskTier(path, 64 * MiB, max_block_bytes=1 * MiB)
    assert again.used() == used
    assert sorted(again.inventory(), key=lambda r: r.key.hash) == before
    assert len(before) == 19
    assert again.corrupt_found == 0
    assert again.read_verified(key(500)) == b"tiny"
    again.close()


def _find(raw: bytes, needle: bytes) -> int:
    at = raw.find(needle)
    assert at >= 0 and raw.find(needle, at + 1) < 0, "needle must occur exactly once"
    return at


def test_payload_and_header_corruption_on_disk_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "d"
    tier = DiskTier(path, 16 * MiB, max_block_bytes=1 * MiB)
    good, bad_payload, bad_header = (payload(i, 200 * KiB) for i in (1, 2, 3))
    put(tier, [(key(1), good), (key(2), bad_payload), (key(3), bad_header)], program_id="x")
    used = tier.used()
    tier.close()

    data_file = path / "data.mdb"
    raw = data_file.read_bytes()
    payload_at = _find(raw, bad_payload[:64])
    header_at = _find(raw, bad_header[:64]) - 48  # header for program id "x" is 48 bytes
    assert raw[header_at : header_at + 4] == MAGIC
    with open(data_file, "r+b") as f:
        f.seek(payload_at + 100 * KiB)
        f.write(bytes([raw[payload_at + 100 * KiB] ^ 0x04]))
        f.seek(header_at + 9)  # inside payload_size
        f.write(bytes([raw[header_at + 9] ^ 0x01]))

    tier = DiskTier(path, 16 * MiB, max_block_bytes=1 * MiB)
    assert tier.used() == used  # corrupt values still occupy their pages
    assert tier.corrupt_found == 1  # the header damage, seen by the usage scan
    assert tier.read_verified(key(1)) == good
    with pytest.raises(Corrupt):
        tier.read_verified(key(2))
    with pytest.raises(Corrupt):
        tier.read_verified(key(3))

    handle = tier.prepare_get([key(1), key(2), key(3)])
    assert handle.corrupt == [False, False, True]
    assert handle.buffers[2] is None and handle.expected[2] is None
    sums = tier.read(handle, [bytearray(200 * KiB), bytearray(200 * KiB), None])
    assert sums[0] == handle.expected[0]
    assert sums[1] != handle.expected[1]
    tier.complete_get(handle)

    assert {r.key for r in tier.inventory()} == {key(1), key(2)}
    assert tier.drop_corrupt(key(2)) and tier.drop_corrupt(key(3))
    assert not tier.drop_corrupt(key(3))
    assert tier.contains([key(1), key(2), key(3)]) == [True, False, False]
    assert tier.used() == used // 3
    tier.close()


def test_concurrent_writers_and_readers_keep_accounting_exact(tmp_path: Path) -> None:
    path = tmp_path / "d"
    tier = DiskTier(path, 256 * MiB, max_block_bytes=256 * KiB)
    errors: list[BaseException] = []

    def writer(base: int) -> None:
        try:
            for b in range(20):
                ids = [base + b * 4 + j for j in range(4)]
                put(tier, [(key(i % 150), payload(i % 150, 64 * KiB)) for i in ids])
                if b % 5 == 4:
                    tier.remove([key((base + b) % 150)])
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            for i in range(200):
                got = tier.read_verified(key(i % 150))
                assert got is None or got == payload(i % 150, 64 * KiB)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (0, 40, 77)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    used = tier.used()
    tier.close()
    again = DiskTier(path, 256 * MiB, max_block_bytes=256 * KiB)
    assert again.used() == used
    again.close()


def test_periodic_sync_follows_the_clock(tmp_path: Path) -> None:
    now = [0.0]
    tier = DiskTier(tmp_path / "d", 8 * MiB, max_block_bytes=KiB, clock=lambda: now[0])
    syncs = 0
    real_sync = tier._env.lmdb.sync

    def counting_sync(force: bool = False) -> None:
        nonlocal syncs
        syncs += 1
        real_sync(force)

    tier._env.lmdb = _EnvProxy(tier._env.lmdb, counting_sync)  # type: ignore[assignment]
    put(tier, [(key(1), b"a")])
    assert syncs == 0
    now[0] = 0.5
    put(tier, [(key(2), b"b")])
    assert syncs == 0
    now[0] = 1.2
    put(tier, [(key(3), b"c")])
    assert syncs == 1
    tier.sync()
    assert syncs == 2
    tier.close()
    assert syncs == 3


class _EnvProxy:
    """Forwards to a real lmdb.Environment but counts sync calls."""

    def __init__(self, env: lmdb.Environment, sync: object) -> None:
        self._env = env
        self.sync = sync

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)


def test_throughput_vs_plain_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Prints (never asserts) warm write/read rates of 2 MiB blocks for the benchmark author."""
    size, count, batch = 2 * MiB, 48, 8
    src = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(count)]
    total = size * count
    tier = DiskTier(tmp_path / "d", 512 * MiB, max_block_bytes=size)
    dsts = [bytearray(size) for _ in range(batch)]

    def lmdb_write(base: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        for b in range(0, count, batch):
            h = tier.prepare_put([BlockRecord(key(base + i), size) for i in range(b, b + batch)])
            h.set_checksums(tier.write(h, src[b : b + batch]))
            tier.complete_put(h)
        t1 = time.perf_counter()
        tier.sync()
        return t1 - t0, time.perf_counter() - t0

    def lmdb_read(base: int) -> float:
        t0 = time.perf_counter()
        for b in range(0, count, batch):
            h = tier.prepare_get([key(base + i) for i in range(b, b + batch)])
            sums = tier.read(h, dsts)
            assert sums == h.expected
            tier.complete_get(h)
        return time.perf_counter() - t0

    fresh, fresh_sync = lmdb_write(0)
    tier.remove([key(i) for i in range(count)])
    reuse, reuse_sync = lmdb_write(1000)
    read = min(lmdb_read(1000) for _ in range(3))
    tier.close()

    plain = tmp_path / "plain.bin"

    def file_write(name: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        with open(tmp_path / name, "wb", buffering=0) as out:
            for a in src:
                out.write(a.data)
            t1 = time.perf_counter()
            os.fsync(out.fileno())
        return t1 - t0, time.perf_counter() - t0

    file_fresh, file_fresh_sync = file_write("plain.bin")
    file_over, file_over_sync = file_write("plain.bin")  # truncated and rewritten

    def file_read(verify: bool) -> float:
        t0 = time.perf_counter()
        with open(plain, "rb", buffering=0) as f:
            for _ in range(count):
                f.readinto(dsts[0])
                if verify:
                    checksum(dsts[0])
        return time.perf_counter() - t0

    raw_read = min(file_read(False) for _ in range(3))
    sum_read = min(file_read(True) for _ in range(3))

    def rate(seconds: float) -> str:
        return f"{total / seconds / 1e9:5.2f} GB/s"

    with capsys.disabled():
        print(
            f"\n[disk tier vs plain file: {count} x 2 MiB, warm page cache; "
            "'+sync' includes env.sync()/fsync]\n"
            f"  lmdb put (copy+checksum+commit), new pages : {rate(fresh)}   "
            f"+sync {rate(fresh_sync)}\n"
            f"  lmdb put, reused pages after remove        : {rate(reuse)}   "
            f"+sync {rate(reuse_sync)}\n"
            f"  file write, new file                       : {rate(file_fresh)}   "
            f"+fsync {rate(file_fresh_sync)}\n"
            f"  file write, truncated+rewritten            : {rate(file_over)}   "
            f"+fsync {rate(file_over_sync)}\n"
            f"  lmdb get (zero-copy view, copy+verify)     : {rate(read)}\n"
            f"  file read (readinto)                       : {rate(raw_read)}\n"
            f"  file read + checksum                       : {rate(sum_read)}"
        )
