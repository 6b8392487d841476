"""The data-plane framing: round trips, limits, and only typed errors on hostile bytes."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfabric.errors import Corrupt, InvalidArgument, Unavailable
from kvfabric.transfer import wire
from kvfabric.transfer.wire import Entry, Status
from kvfabric.types import BlockType
from tests.conftest import key

MAX_BLOCK = 64 * 1024
KEYS = [key(i) for i in range(3)] + [key(7, "n" * 64), key(8, "x")]
ENTRIES = [
    Entry(Status.OK, 4096, 2**64 - 1, BlockType.SYSTEM_PROMPT, "agent-π"),
    wire.MISSING,
    Entry(Status.OK, MAX_BLOCK, 0, BlockType.GENERIC, None),
    Entry(Status.REMOTE, 1, 42, BlockType.EXECUTION_CHECKPOINT, "p" * 128, address=0xDEAD_BEEF),
    wire.MISSING,
]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def response_frame(entries: list[Entry] = ENTRIES) -> bytes:
    return wire.encode_response(entries)


def test_request_round_trip() -> None:
    frame = wire.encode_request(KEYS, wire.FLAG_REMOTE)
    req = wire.decode_request(frame)
    assert req.keys == tuple(KEYS) and req.flags == wire.FLAG_REMOTE
    assert wire.decode_request(wire.encode_request([])).keys == ()


def test_response_round_trip_keeps_every_field() -> None:
    frame = response_frame() + b"payload bytes follow"
    entries, end = wire.decode_response_head(frame, len(ENTRIES), MAX_BLOCK, wire.FLAG_REMOTE)
    assert entries == ENTRIES
    assert frame[end:] == b"payload bytes follow"


def test_request_limits_are_enforced() -> None:
    with pytest.raises(InvalidArgument) as err:
        wire.encode_request([key(0)] * (wire.MAX_KEYS + 1))
    assert err.value.field == "keys"
    too_many = wire.PREAMBLE.pack(wire.REQUEST_MAGIC, wire.VERSION, 0, 0, wire.MAX_KEYS + 1, 0)
    with pytest.raises(InvalidArgument, match="limit"):
        wire.parse_request_preamble(too_many)
    # a namespace longer than 64 bytes, spliced in by hand
    body = bytes([65]) + b"n" * 65 + b"\0" * 32
    frame = wire.PREAMBLE.pack(wire.REQUEST_MAGIC, wire.VERSION, 0, 0, 1, len(body)) + body
    with pytest.raises(InvalidArgument):
        wire.decode_request(frame)
    bad_ns = bytes([3]) + b"a/b" + b"\0" * 32  # '/' is not allowed in a namespace
    frame = wire.PREAMBLE.pack(wire.REQUEST_MAGIC, wire.VERSION, 0, 0, 1, len(bad_ns)) + bad_ns
    with pytest.raises(InvalidArgument):
        wire.decode_request(frame)
    with pytest.raises(InvalidArgument, match="version"):
        wire.decode_request(wire.PREAMBLE.pack(wire.REQUEST_MAGIC, 9, 0, 0, 0, 0))
    with pytest.raises(InvalidArgument, match="flags"):
        wire.decode_request(wire.PREAMBLE.pack(wire.REQUEST_MAGIC, wire.VERSION, 0x80, 0, 0, 0))


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (Entry(Status.OK, MAX_BLOCK + 1), "size"),
        (Entry(Status.OK, 0), "size"),
        (Entry(Status.OK, 16, program_id="p" * 129), "program id"),
        (Entry(Status.REMOTE, 16, address=1), "status"),  # REMOTE without FLAG_REMOTE
    ],
)
def test_response_limits_are_enforced(entry: Entry, match: str) -> None:
    with pytest.raises(Corrupt, match=match):
        wire.decode_response_head(response_frame([entry]), 1, MAX_BLOCK)


def test_response_with_bad_codes_or_counts_is_corrupt() -> None:
    good = bytearray(response_frame([Entry(Status.OK, 16, 1, BlockType.GENERIC, None)]))
    type_at = wire.PREAMBLE.size + 1 + 16  # status, size, checksum, then the type byte
    bad_type = bytearray(good)
    bad_type[type_at] = 99
    with pytest.raises(Corrupt, match="block type"):
        wire.decode_response_head(bad_type, 1, MAX_BLOCK)
    bad_status = bytearray(good)
    bad_status[wire.PREAMBLE.size] = 7
    with pytest.raises(Corrupt, match="status"):
        wire.decode_response_head(bad_status, 1, MAX_BLOCK)
    with pytest.raises(Corrupt, match="entries"):
        wire.decode_response_head(good, 2, MAX_BLOCK)
    with pytest.raises(Corrupt):
        wire.decode_response_head(b"KVFQ" + bytes(good[4:]), 1, MAX_BLOCK)


@FUZZ
@given(st.binary(max_size=600))
def test_random_request_bytes_raise_only_invalid_argument(data: bytes) -> None:
    with contextlib.suppress(InvalidArgument):
        wire.decode_request(data)


@FUZZ
@given(st.data())
def test_truncated_or_mutated_requests_raise_only_invalid_argument(data: st.DataObject) -> None:
    frame = bytearray(wire.encode_request(KEYS, wire.FLAG_REMOTE))
    cut = data.draw(st.integers(0, len(frame)))
    for i in data.draw(st.lists(st.integers(0, len(frame) - 1), max_size=4)):
        frame[i] = data.draw(st.integers(0, 255))
    try:
        req = wire.decode_request(frame[:cut])
    except InvalidArgument:
        return
    assert len(req.keys) <= wire.MAX_KEYS


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 8))
def test_random_response_bytes_raise_only_corrupt(data: bytes, count: int) -> None:
    with contextlib.suppress(Corrupt):
        wire.decode_response_head(data, count, MAX_BLOCK, wire.FLAG_REMOTE)


@FUZZ
@given(st.data())
def test_truncated_or_mutated_responses_raise_only_corrupt(data: st.DataObject) -> None:
    frame = bytearray(response_frame())
    cut = data.draw(st.integers(0, len(frame)))
    for i in data.draw(st.lists(st.integers(0, len(frame) - 1), max_size=4)):
        frame[i] = data.draw(st.integers(0, 255))
    try:
        entries, _ = wire.decode_response_head(frame[:cut], len(ENTRIES), MAX_BLOCK, 1)
    except Corrupt:
        return
    assert all(e.status == Status.MISSING or 0 < e.size <= MAX_BLOCK for e in entries)


def test_stream_helpers_move_every_byte_and_report_eof() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # force partial sendmsg calls
    a.settimeout(5.0)
    b.settimeout(5.0)
    parts = [bytes([i]) * (1000 + 37 * i) for i in range(100)] + [b"", memoryview(b"tail")]
    expected = b"".join(bytes(p) for p in parts)
    got = bytearray(len(expected))
    reader = threading.Thread(target=wire.recv_into_exact, args=(b, memoryview(got)))
    reader.start()
    assert wire.send_buffers(a, parts) == len(expected)
    reader.join(5.0)
    assert bytes(got) == expected
    a.sendall(b"abc")
    a.close()
    with pytest.raises(Unavailable, match="after 3 of 10 bytes"):
        wire.recv_exact(b, 10)
    b.close()


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:9000", ("::1", 9000)),
        ("node-a:1", ("node-a", 1)),
    ],
)
def test_addresses_parse(address: str, parsed: tuple[str, int]) -> None:
    assert wire.parse_address(address) == parsed
    assert wire.parse_address(wire.format_address(*parsed)) == parsed


@pytest.mark.parametrize("address", ["", "host", "host:", ":80", "h:0", "h:65536", "h:x1"])
def test_bad_addresses_are_invalid_arguments(address: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        wire.parse_address(address)
    assert err.value.field == "address"
