"""The store-less data-plane reader against a real block server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvfabric import integrity
from kvfabric.errors import InvalidArgument, Unavailable
from kvfabric.node.core import NodeStoreCore
from kvfabric.transfer import wire
from kvfabric.transfer.reader import BlockReader, read_blocks
from kvfabric.transfer.tcp import TcpTransport
from kvfabric.types import Tier
from tests.conftest import NS, block, fake_server, key, make_store

pytestmark = pytest.mark.timeout(60)
B = 16 * 1024


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NodeStoreCore, str]]:
    store = make_store(tmp_path)
    store.register_namespace(NS, B)
    store.put_many([key(i) for i in range(8)], [block(i, B) for i in range(8)])
    transport = TcpTransport(idle_timeout_s=0.2)
    address = transport.serve(store)
    yield store, address
    transport.close()
    store.close()


@pytest.fixture
def reader() -> Iterator[BlockReader]:
    r = BlockReader(max_request_bytes=3 * B)  # several pipelined requests per read
    yield r
    r.close()


def sums(indices: range | list[int]) -> list[int]:
    return [integrity.checksum(block(i, B)) for i in indices]


def test_reads_verified_blocks_into_caller_buffers(served: tuple, reader: BlockReader) -> None:
    _, address = served
    dsts = [bytearray(B) for _ in range(8)]
    assert reader.read(address, [key(i) for i in range(8)], dsts, sums(range(8)),
                       timeout_s=5) == [True] * 8  # fmt: skip
    assert all(bytes(d) == block(i, B) for i, d in enumerate(dsts))
    arr = np.zeros(B, dtype=np.uint8)  # any writable buffer works, numpy included
    assert reader.read(address, [key(3)], [arr], sums([3]), timeout_s=5) == [True]
    assert arr.tobytes() == block(3, B)


def test_missing_key_is_a_miss_and_the_rest_still_arrive(
    served: tuple, reader: BlockReader
) -> None:
    _, address = served
    keys = [key(0), key(99), key(2)]
    dsts = [bytearray(B) for _ in keys]
    ok = reader.read(address, keys, dsts, [*sums([0]), 1234, *sums([2])], timeout_s=5)
    assert ok == [True, False, True]
    assert bytes(dsts[0]) == block(0, B) and bytes(dsts[2]) == block(2, B)


def test_block_corrupted_in_the_servers_arena_is_a_miss(served: tuple, reader: BlockReader) -> None:
    store, address = served
    cpu = store.tiers[Tier.CPU]
    offset = cpu.slot_offset(key(1))
    assert offset is not None
    cpu.arena.view[offset + 7] ^= 0xFF  # the server sends it with the checksum on record
    dsts = [bytearray(B) for _ in range(3)]
    ok = reader.read(address, [key(i) for i in range(3)], dsts, sums(range(3)), timeout_s=5)
    assert ok == [True, False, True]
    assert bytes(dsts[2]) == block(2, B)


def test_checksum_must_match_what_the_control_plane_said(
    served: tuple, reader: BlockReader
) -> None:
    _, address = served
    dst = bytearray(B)
    assert reader.read(address, [key(4)], [dst], [sums([4])[0] ^ 1], timeout_s=5) == [False]


def test_wrong_sized_buffer_is_a_miss_and_the_stream_stays_in_step(
    served: tuple, reader: BlockReader
) -> None:
    _, address = served
    dsts = [bytearray(B), bytearray(B // 2), bytearray(B)]
    ok = reader.read(address, [key(0), key(1), key(2)], dsts, sums(range(3)), timeout_s=5)
    assert ok == [True, False, True]
    assert bytes(dsts[2]) == block(2, B)


def test_pooled_connection_closed_by_the_server_is_replaced(
    served: tuple, reader: BlockReader
) -> None:
    _, address = served
    dst = bytearray(B)
    assert reader.read(address, [key(5)], [dst], sums([5]), timeout_s=5) == [True]
    time.sleep(1.2)  # past the server's idle timeout: it closed the pooled connection
    dst[:] = bytes(B)
    assert reader.read(address, [key(5)], [dst], sums([5]), timeout_s=5) == [True]
    assert bytes(dst) == block(5, B)


def test_concurrent_reads_through_the_module_pool(served: tuple) -> None:
    _, address = served
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                dst = bytearray(B)
                assert read_blocks(address, [key(i)], [dst], sums([i]), timeout_s=5) == [True]
                assert bytes(dst) == block(i, B)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


def test_truncated_stream_raises_unavailable(reader: BlockReader) -> None:
    def half(conn: socket.socket) -> None:
        head = wire.encode_response([wire.Entry(wire.Status.OK, B, sums([0])[0])])
        conn.sendall(head + block(0, B)[: B // 2])

    address, thread = fake_server(half)
    with pytest.raises(Unavailable):
        reader.read(address, [key(0)], [bytearray(B)], sums([0]), timeout_s=5)
    thread.join(5)


def test_silent_server_times_out_as_unavailable(reader: BlockReader) -> None:
    done = threading.Event()
    address, thread = fake_server(lambda conn: done.wait(10))
    start = time.monotonic()
    with pytest.raises(Unavailable):
        reader.read(address, [key(0)], [bytearray(B)], sums([0]), timeout_s=0.3)
    assert time.monotonic() - start < 3
    done.set()
    thread.join(5)


def test_unreachable_address_is_unavailable(reader: BlockReader) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(Unavailable):
        reader.read(f"127.0.0.1:{port}", [key(0)], [bytearray(B)], sums([0]), timeout_s=2)


def test_bad_arguments_are_invalid(served: tuple, reader: BlockReader) -> None:
    _, address = served
    with pytest.raises(InvalidArgument):
        reader.read(address, [key(0)], [bytes(B)], sums([0]), timeout_s=5)  # read-only
    with pytest.raises(InvalidArgument):
        reader.read(address, [key(0)], [bytearray(B)], [], timeout_s=5)
    with pytest.raises(InvalidArgument):
        reader.read(address, [key(0)], [bytearray(B)], sums([0]), timeout_s=0)
    with pytest.raises(InvalidArgument):
        reader.read("nowhere", [key(0)], [bytearray(B)], sums([0]), timeout_s=5)
    assert reader.read(address, [], [], [], timeout_s=5) == []
