"""The pure parts of the local channel: what a connection holds, the framing, the segment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfabric.errors import (
    Corrupt,
    InvalidArgument,
    KVFabricError,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from kvfabric.transfer.local import protocol as p
from kvfabric.transfer.local.segment import (
    SegmentId,
    hold,
    map_segment,
    remove_stale_segments,
    segment_name,
)
from kvfabric.transfer.local.sessions import HoldTable, Kind


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_hold_table_bounds_count_and_time() -> None:
    clock, ended = Clock(), []
    table: HoldTable[str] = HoldTable(2, 5.0, clock)
    a = table.add(Kind.LEASE, "a", lambda: ended.append("a"))
    clock.now += 1
    b = table.add(Kind.RESERVATION, "b", lambda: ended.append("b"))
    with pytest.raises(ResourceExhausted) as err:
        table.add(Kind.LEASE, "c", lambda: ended.append("c"))
    assert err.value.field == "local_max_leases" and ended == ["c"]  # refused items end too
    assert table.take(Kind.RESERVATION, a) is None  # an id of the other kind ends nothing
    assert table.next_deadline() == 105.0
    clock.now = 105.0
    assert table.expire() == 1 and ended == ["c", "a"]
    assert table.take(Kind.LEASE, a) is None  # expired: a late release finds nothing
    assert table.take(Kind.RESERVATION, b) == "b" and len(table) == 0 and ended == ["c", "a"]
    assert table.next_deadline() is None


def test_hold_table_ends_everything_even_when_one_end_fails() -> None:
    ended: list[int] = []
    table: HoldTable[int] = HoldTable(10, 60.0)

    def boom() -> None:
        raise RuntimeError("end failed")

    table.add(Kind.LEASE, 1, lambda: ended.append(1))
    table.add(Kind.LEASE, 2, boom)
    table.add(Kind.RESERVATION, 3, lambda: ended.append(3))
    with pytest.raises(RuntimeError):
        table.end_all()
    assert ended == [1, 3] and len(table) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=40), st.text(max_size=8),
                          st.lists(st.integers(-5, 5), max_size=4)), min_size=1, max_size=20))
def test_frames_round_trip(message: list[object]) -> None:  # fmt: skip
    a, b = socket.socketpair()
    with a, b:
        a.sendall(p.encode(message) + p.encode([p.OK]))
        assert p.recv_message(b) == message
        assert p.recv_message(b) == [p.OK]
        a.close()
        assert p.recv_message(b) is None  # a clean end between frames


def test_malformed_frames_are_refused() -> None:
    for raw in (b"\0\0\0\0", b"\xff\xff\xff\xff", b"\0\0\0\1\xc1", b"\0\0\0\1\x01"):
        a, b = socket.socketpair()
        with a, b:
            a.sendall(raw)
            with pytest.raises(InvalidArgument):
                p.recv_message(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\0\0\0\x09\x91")
        a.close()
        with pytest.raises(Unavailable):  # cut mid-frame
            p.recv_message(b)


def test_replies_become_typed_errors() -> None:
    assert p.check_reply([p.OK, 1, 2]) == [1, 2]
    with pytest.raises(ResourceExhausted) as err:
        p.check_reply(p.error_reply(ResourceExhausted("full", "local_max_leases")))
    assert err.value.field == "local_max_leases" and err.value.message == "full"
    with pytest.raises(KVFabricError) as unknown:  # a code kvfabric has no class for
        p.check_reply([p.ERR, "INTERNAL", "boom", ""])
    assert type(unknown.value) is KVFabricError and unknown.value.message == "boom"
    for bad in ([7], [p.ERR, 1, 2, 3], [p.ERR, "x"]):
        with pytest.raises(Corrupt):
            p.check_reply(bad)
    with pytest.raises(Unavailable):
        p.check_reply(None)


def test_arguments_are_checked_by_name() -> None:
    assert p.arg([1, "ns"], 1, str, "namespace") == "ns"
    for message, kind in (([1], str), ([1, 5], str), ([1, True], int)):
        with pytest.raises(InvalidArgument) as err:
            p.arg(message, 1, kind, "namespace")  # a bool is not an int here
        assert err.value.field == "namespace"
    assert p.int_list([0, 2**64 - 1], "checksums", 2, 2**64) == [0, 2**64 - 1]
    for bad in ([1], [1, -1], [1, 2**64], [1, True], "12", None):
        with pytest.raises(InvalidArgument) as err:
            p.int_list(bad, "checksums", 2, 2**64)
        assert err.value.field == "checksums"


def test_socket_names_are_abstract_short_and_distinct() -> None:
    a = p.socket_name("node-a", "10.0.0.1:5000")
    assert a.startswith(b"\0") and len(a) < 108
    assert a != p.socket_name("node-a", "10.0.0.1:5001") != p.socket_name("node-b", "x")
    assert a == p.socket_name("node-a", "10.0.0.1:5000")


def test_segment_names_never_repeat() -> None:
    names = {segment_name("some/odd node id that is long") for _ in range(5)}
    assert len(names) == 5
    assert all(n.startswith("kvfabric-") and "/" not in n for n in names)


def test_only_segments_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    files = {
        f"kvfabric-node-{dead_pid}-0": True,  # its process is gone
        f"kvfabric-node-{os.getpid()}-0": False,  # ours
        f"kvfabric-node-{os.getppid()}-3": False,  # alive
        "kvfabric-explicit-name": False,  # not a generated name
        "other-file": False,
        f"kvfabric-held-{dead_pid}-1": False,  # its pid is unknown here, but a node holds it
    }
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    fd = hold(str(tmp_path / f"kvfabric-held-{dead_pid}-1"))
    try:
        removed = remove_stale_segments(str(tmp_path))
    finally:
        os.close(fd)
    assert removed == [n for n, gone in files.items() if gone]
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, gone in files.items() if not gone)


def test_mapping_checks_owner_mode_and_identity(tmp_path: Path) -> None:
    path = tmp_path / "seg"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8192)
    os.close(fd)
    st = os.stat(path)
    good = SegmentId("seg", 8192, st.st_dev, st.st_ino)
    with map_segment(good, str(tmp_path)) as m:
        m[0:2] = b"ok"
    assert path.read_bytes()[:2] == b"ok"
    for seg in (SegmentId("seg", 4096, st.st_dev, st.st_ino),
                SegmentId("seg", 8192, st.st_dev, st.st_ino + 1),
                SegmentId("../seg", 8192, st.st_dev, st.st_ino)):  # fmt: skip
        with pytest.raises(PermissionDenied):
            map_segment(seg, str(tmp_path))
    os.chmod(path, 0o644)
    with pytest.raises(PermissionDenied) as err:
        map_segment(good, str(tmp_path))
    assert "other users" in err.value.message
    with pytest.raises(Unavailable):
        map_segment(SegmentId("absent", 8192, 0, 0), str(tmp_path))
