"""DirectoryLog on a real LMDB: round trip, snapshots and compaction, restarts, corruption."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lmdb
import pytest

from kvfabric.directory import ClaimStatus, DirectoryCore, DirectoryLog, Event, EventKind
from kvfabric.errors import Corrupt, FailedPrecondition
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier

NS = "ns-log"
ALL = [Tier.GPU, Tier.CPU, Tier.DISK]


def k(i: int) -> BlockKey:
    return BlockKey(
        NS, BlockHash(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest())
    )


def workload(core: DirectoryCore, dlog: DirectoryLog, n: int) -> None:
    """Nodes join, blocks are claimed, committed, replicated, pinned and dropped;
    every call's events are appended (and maybe snapshotted), as the actor does."""

    def log_(events: list[Event] | tuple[Event, ...]) -> None:
        dlog.append(events)
        dlog.maybe_snapshot(core)

    for node in ("a", "b", "c"):
        log_(core.register_node(node, f"{node}:7000", ALL))
    for i in range(n):
        node = "abc"[i % 3]
        res = core.claim(k(i), node, f"w{i}", 256)
        log_(res.events)
        if res.status != ClaimStatus.GRANTED:
            continue
        if i % 7 == 0:
            log_(core.abort(k(i), node, f"w{i}"))
            continue
        log_(core.commit(k(i), node, f"w{i}", Tier(i % 3), 256, i, BlockType(i % 5)).events)
        if i % 2:
            log_(core.add_replica(k(i), "abc"[(i + 1) % 3], Tier.DISK, i))
        if i % 5 == 0:
            log_(core.set_pins(k(i), node, 1))
        if i % 11 == 0:
            log_(core.remove_replica(k(i), node))
    log_(core.remove_node("c"))


def test_append_and_load_round_trip(tmp_path: Path) -> None:
    core = DirectoryCore()
    dlog = DirectoryLog(tmp_path / "dir", snapshot_every=1_000_000)
    workload(core, dlog, 200)
    snap, events = dlog.load()
    assert snap is None and [e.seq for e in events] == list(range(1, core.seq + 1))
    assert events == core.events_since(0, limit=10_000)
    assert DirectoryCore.restore(snap, events).state() == core.state()
    assert dlog.events_since(10, limit=5) == events[10:15]
    dlog.close()


def test_snapshot_compacts_and_restore_equals_live(tmp_path: Path) -> None:
    core = DirectoryCore()
    dlog = DirectoryLog(tmp_path / "dir", snapshot_every=50)
    workload(core, dlog, 300)
    assert dlog.snapshot_seq > 0 and dlog.last_seq == core.seq
    snap, events = dlog.load()
    assert snap is not None
    assert [e.seq for e in events] == list(range(dlog.snapshot_seq + 1, core.seq + 1))
    assert len(events) < 50  # the covered events were deleted with the snapshot
    restored = DirectoryCore.restore(snap, events)
    assert restored.state() == core.state() and restored.seq == core.seq
    with pytest.raises(FailedPrecondition) as err:
        dlog.events_since(dlog.snapshot_seq - 1)
    assert err.value.field == "seq"
    assert dlog.events_since(dlog.snapshot_seq) == events[:1000]
    dlog.close()


def test_snapshot_waits_until_the_log_has_the_cores_events(tmp_path: Path) -> None:
    core = DirectoryCore()
    dlog = DirectoryLog(tmp_path / "dir", snapshot_every=2)
    events = core.register_node("a", "a:1", ALL) + core.register_node("b", "b:1", ALL)
    events += core.register_node("c", "c:1", ALL)
    dlog.append(events[:2])
    dlog.append([])
    core2 = DirectoryCore.restore(None, events[:2])
    assert not dlog.maybe_snapshot(core)  # core is at 3, the log at 2
    assert dlog.maybe_snapshot(core2)
    dlog.append(events[2:])
    assert DirectoryCore.restore(*dlog.load()).state() == core.state()
    dlog.close()


def test_a_gap_or_a_repeat_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    core = DirectoryCore()
    dlog = DirectoryLog(tmp_path / "dir")
    events = [e for n in "abcdef" for e in core.register_node(n, f"{n}:1", ALL)]
    dlog.append(events[:3])
    for bad in ([events[2]], [events[4]], [events[3], events[5]], [events[3], events[3]]):
        with pytest.raises(FailedPrecondition) as err:
            dlog.append(bad)
        assert err.value.field == "seq"
    assert dlog.last_seq == 3 and len(dlog.load()[1]) == 3
    dlog.append(events[3:])
    assert [e.seq for e in dlog.load()[1]] == [1, 2, 3, 4, 5, 6]
    dlog.close()


def test_reopen_after_close_continues_the_log(tmp_path: Path) -> None:
    core = DirectoryCore()
    dlog = DirectoryLog(tmp_path / "dir", snapshot_every=40)
    workload(core, dlog, 60)
    dlog.close()
    dlog.close()  # idempotent
    with pytest.raises(FailedPrecondition):
        dlog.load()
    dlog = DirectoryLog(tmp_path / "dir", snapshot_every=40)
    assert dlog.last_seq == core.seq and dlog.snapshot_seq > 0
    restored = DirectoryCore.restore(*dlog.load())
    assert restored.state() == core.state()
    res = restored.claim(k(10_000), "a", "w", 64)  # the restored core keeps on logging
    dlog.append(res.events)
    dlog.append(restored.commit(k(10_000), "a", "w", Tier.CPU, 64, 1).events)
    dlog.sync()
    dlog.close()
    again = DirectoryCore.restore(*DirectoryLog(tmp_path / "dir").load())
    assert again.state() == restored.state() and again.entry(k(10_000)) is not None


def _tamper(path: Path, db: bytes, key: bytes, value: bytes | None) -> None:
    env = lmdb.open(str(path), max_dbs=2, subdir=True)
    with env.begin(write=True, db=env.open_db(db)) as txn:
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)
    env.close()


def test_corrupt_records_raise_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "dir"
    core = DirectoryCore()
    dlog = DirectoryLog(path, snapshot_every=1_000_000)
    workload(core, dlog, 20)
    dlog.close()
    seq2 = (2).to_bytes(8, "big")
    good = Event(2, EventKind.NODE_JOINED, node_id="b", address="b:7000", tiers=tuple(ALL))
    for bad in (
        b"\xff\x00garbage",
        good.to_bytes()[:-4],
        Event(9, EventKind.NODE_LEFT, node_id="b").to_bytes(),
    ):
        _tamper(path, b"events", seq2, bad)
        dlog = DirectoryLog(path)
        with pytest.raises(Corrupt):
            dlog.load()
        with pytest.raises(Corrupt):
            dlog.events_since(0)
        dlog.close()
    _tamper(path, b"events", seq2, None)  # a hole in the sequence
    dlog = DirectoryLog(path)
    with pytest.raises(Corrupt, match="event 2 is missing"):
        dlog.load()
    dlog.close()
    _tamper(path, b"snapshots", b"latest", b"KVDS" + bytes(20))
    with pytest.raises(Corrupt):
        DirectoryLog(path)  # the snapshot fails its check on open
