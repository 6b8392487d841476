"""The TCP transport between two real node stores on loopback: what a peer fetch guarantees."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvfabric.bench.rawtcp import raw_loopback_gbps
from kvfabric.errors import InvalidArgument, NotFound, Unavailable
from kvfabric.node.core import NodeStoreCore
from kvfabric.transfer import make_transport, wire
from kvfabric.transfer.nixl import NixlTransport
from kvfabric.transfer.tcp import TcpTransport
from kvfabric.types import BlockType, Tier
from tests.conftest import NS, block, fake_server, key, make_store

pytestmark = pytest.mark.timeout(60)
B = 16 * 1024  # the CPU tiers hold 16 blocks of NS


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[NodeStoreCore, NodeStoreCore]]:
    a, b = make_store(tmp_path / "a"), make_store(tmp_path / "b")
    for s in (a, b):
        s.register_namespace(NS, B)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def served(
    stores: tuple[NodeStoreCore, NodeStoreCore],
) -> Iterator[tuple[NodeStoreCore, NodeStoreCore, str, TcpTransport]]:
    a, b = stores
    server, client = TcpTransport(), TcpTransport()
    address = server.serve(a)
    yield a, b, address, client
    client.close()
    server.close()


def cpu_used(store: NodeStoreCore) -> int:
    return next(t.used_bytes for t in store.stats().tiers if t.tier == Tier.CPU)


def test_fetch_copies_bytes_and_reports_every_key(served: tuple) -> None:
    a, b, address, client = served
    a.put_many([key(i) for i in range(6)], [block(i, B) for i in range(6)],
               block_type=BlockType.TOOL_DEFINITION, program_id="agent-7")  # fmt: skip
    b.put(key(0), block(0, B))
    r = client.fetch(address, [key(i) for i in range(8)] + [key(3)], b, timeout_s=5)
    assert set(r.fetched) == {key(i) for i in range(1, 6)}
    assert r.missing == (key(6), key(7)) and r.already_present == (key(0),) and r.corrupt == ()
    assert r.bytes == 5 * B and r.seconds > 0
    for i in range(6):
        assert b.get(key(i)) == block(i, B)
    meta = b.meta(key(3))
    assert meta is not None and meta.type == BlockType.TOOL_DEFINITION
    assert meta.program_id == "agent-7" and meta.tier == Tier.CPU
    again = client.fetch(address, [key(i) for i in range(6)], b, timeout_s=5)
    assert again.fetched == () and len(again.already_present) == 6 and again.bytes == 0


def test_many_pipelined_batches_on_one_connection(served: tuple) -> None:
    a, b, address, _ = served
    keys = [key(i) for i in range(12)]
    a.put_many(keys, [block(i, B) for i in range(12)])
    client = TcpTransport(max_request_bytes=2 * B, pipeline_depth=3)  # six batches
    try:
        r = client.fetch(address, keys, b, timeout_s=5)
    finally:
        client.close()
    assert r.fetched == tuple(keys) and r.bytes == 12 * B
    assert [b.get(k) for k in keys] == [block(i, B) for i in range(12)]


def test_block_stored_locally_meanwhile_is_read_past(
    served: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, address, client = served
    a.put_many([key(1), key(2)], [block(1, B), block(2, B)])
    b.put(key(1), block(1, B))
    # A concurrent writer that lands between the fetch's check and its reservation:
    monkeypatch.setattr(b, "contains", lambda keys: [None] * len(keys))
    r = client.fetch(address, [key(1), key(2)], b, timeout_s=5)
    assert r.already_present == (key(1),) and r.fetched == (key(2),)
    assert b.get(key(2)) == block(2, B)  # the stream stayed in step after the skipped payload


def test_blocks_on_the_peers_disk_tier_are_served(served: tuple) -> None:
    a, b, address, client = served
    keys = [key(i) for i in range(4)]
    a.put_many(keys, [block(i, B) for i in range(4)])
    assert a.move(keys, Tier.DISK).moved == tuple(keys)
    r = client.fetch(address, keys, b, timeout_s=5)
    assert set(r.fetched) == set(keys)
    assert [b.get(k) for k in keys] == [block(i, B) for i in range(4)]


def test_corrupt_payload_is_dropped_and_counted(served: tuple) -> None:
    a, b, address, client = served
    a.put_many([key(1), key(2)], [block(1, B), block(2, B)])
    cpu = a.tiers[Tier.CPU]
    off = cpu.slot_offset(key(1))
    assert off is not None
    cpu.arena.view[off + 100] ^= 0xFF  # bit rot in the sender's memory
    r = client.fetch(address, [key(1), key(2)], b, timeout_s=5)
    assert r.corrupt == (key(1),) and r.fetched == (key(2),)
    assert b.contains([key(1)]) == [None] and b.get(key(2)) == block(2, B)
    assert b.stats().counters.checksum_failures == 1


def test_peer_dying_mid_stream_leaves_nothing_visible(served: tuple) -> None:
    a, b, address, client = served
    a.put_many([key(1), key(2)], [block(1, B), block(2, B)])
    used = cpu_used(b)

    def half_then_close(conn: socket.socket) -> None:
        lease = a.open_read([key(1), key(2)])
        try:
            entries = [wire.Entry(wire.Status.OK, B, c) for c in lease.checksums if c is not None]
            conn.sendall(wire.encode_response(entries) + bytes(lease.buffers[0] or b"")[: B // 2])
        finally:
            lease.release()

    bad, thread = fake_server(half_then_close)
    with pytest.raises(Unavailable) as err:
        client.fetch(bad, [key(1), key(2)], b, timeout_s=5)
    assert err.value.field == "address"
    thread.join(5)
    assert b.contains([key(1), key(2)]) == [None, None]
    assert cpu_used(b) == used  # the reserved slots went back
    assert set(client.fetch(address, [key(1), key(2)], b, timeout_s=5).fetched) == {key(1), key(2)}


def test_stalled_peer_times_out_within_the_deadline(served: tuple) -> None:
    _, b, _, client = served
    stop = threading.Event()

    def header_then_stall(conn: socket.socket) -> None:
        conn.sendall(wire.encode_response([wire.Entry(wire.Status.OK, B, 1)]) + b"x" * 100)
        stop.wait(10)

    bad, thread = fake_server(header_then_stall)
    start = time.monotonic()
    with pytest.raises(Unavailable, match="timed out"):
        client.fetch(bad, [key(1)], b, timeout_s=0.5)
    assert time.monotonic() - start < 3
    stop.set()
    thread.join(5)
    assert b.contains([key(1)]) == [None]


def test_server_survives_malformed_requests(served: tuple) -> None:
    a, b, address, client = served
    a.put(key(1), block(1, B))
    host, port = wire.parse_address(address)
    too_many = wire.PREAMBLE.pack(wire.REQUEST_MAGIC, wire.VERSION, 0, 0, 10**6, 0)
    for garbage in (b"GET / HTTP/1.1\r\n\r\n", too_many, wire.encode_request([key(1)])[:20]):
        with socket.create_connection((host, port), timeout=5) as raw:
            raw.sendall(garbage)
            raw.shutdown(socket.SHUT_WR)
            # the server closes this connection (a reset when bytes were left unread)
            with contextlib.suppress(ConnectionResetError):
                assert raw.recv(100) == b""
    assert client.fetch(address, [key(1)], b, timeout_s=5).fetched == (key(1),)


def test_concurrent_fetches_from_four_threads(served: tuple) -> None:
    a, b, address, client = served
    keys = [key(i) for i in range(12)]
    a.put_many(keys, [block(i, B) for i in range(12)])
    results: list = []
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:  # overlapping key sets: every key is wanted by two threads
            results.append(client.fetch(address, keys[offset:] + keys[:offset], b, timeout_s=10))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(3 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors and len(results) == 4
    fetched = [k for r in results for k in r.fetched]
    assert sorted(fetched, key=lambda k: k.hash) == sorted(keys, key=lambda k: k.hash)
    assert all(set(r.fetched) | set(r.already_present) == set(keys) for r in results)
    assert [b.get(k) for k in keys] == [block(i, B) for i in range(12)]


def test_idle_pooled_connections_do_not_starve_the_server(stores: tuple) -> None:
    a, b = stores
    a.put(key(1), block(1, B))
    server = TcpTransport(max_connections=2, idle_timeout_s=0.3)
    address = server.serve(a)
    clients = [TcpTransport() for _ in range(5)]
    try:
        for c in clients:  # each keeps an idle connection open afterwards
            b.evict([key(1)])
            assert c.fetch(address, [key(1)], b, timeout_s=2).fetched == (key(1),)
        time.sleep(0.8)  # the server drops idle connections; the pool reconnects
        b.evict([key(1)])
        assert clients[0].fetch(address, [key(1)], b, timeout_s=2).fetched == (key(1),)
    finally:
        for c in clients:
            c.close()
        server.close()


def test_bad_arguments_and_unreachable_peers(served: tuple, tmp_path: Path) -> None:
    _, b, address, client = served
    with pytest.raises(InvalidArgument):
        client.fetch("no-port", [key(1)], b, timeout_s=1)
    with pytest.raises(InvalidArgument):
        client.fetch(address, [key(1)], b, timeout_s=0)
    with pytest.raises(NotFound):
        client.fetch(address, [key(1, "other-ns")], b, timeout_s=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(Unavailable):
        client.fetch(f"127.0.0.1:{free}", [key(1)], b, timeout_s=1)


def test_make_transport_picks_tcp_on_a_cpu_only_host() -> None:
    # With or without NIXL installed: a CPU-only host prefers TCP (see transfer/nixl.py).
    assert isinstance(make_transport("auto"), TcpTransport)
    assert make_transport("auto").name == "tcp" and make_transport("tcp").name == "tcp"
    assert NixlTransport.probe().detail
    assert make_transport("nixl").name == "nixl"
    with pytest.raises(InvalidArgument) as err:
        make_transport("carrier-pigeon")
    assert err.value.field == "transport"


def test_nixl_transport_refuses_cleanly_where_nixl_is_absent(served: tuple) -> None:
    if NixlTransport.probe().usable:
        pytest.skip("NIXL is usable here; tests/integration/test_nixl_transport.py covers it")
    a, b, address, _ = served
    nixl = NixlTransport()
    with pytest.raises(Unavailable, match="NIXL is not usable"):
        nixl.serve(a)
    with pytest.raises(Unavailable, match="NIXL is not usable"):
        nixl.fetch(address, [key(1)], b, timeout_s=1)
    nixl.close()


def test_throughput_of_2mib_blocks_next_to_raw_tcp(tmp_path: Path) -> None:
    size, n = 2 << 20, 64
    cfg = {"cpu_arena_bytes": "160MiB", "cpu_slab_bytes": "16MiB", "max_block_bytes": "4MiB",
           "disk_enabled": False, "cpu_prefault": True}  # fmt: skip
    a, b = make_store(tmp_path / "a", **cfg), make_store(tmp_path / "b", **cfg)
    server, client = TcpTransport(), TcpTransport()
    try:
        for s in (a, b):
            s.register_namespace(NS, size)
        keys = [key(i) for i in range(n)]
        rng = np.random.default_rng(1)
        a.put_many(keys, [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)])
        address = server.serve(a)
        rates = []
        for _ in range(3):
            b.evict(keys)
            r = client.fetch(address, keys, b, timeout_s=20)
            assert len(r.fetched) == n and r.bytes == n * size
            rates.append(r.gbps)
        raw = max(raw_loopback_gbps(n * size) for _ in range(2))
        hot = max(raw_loopback_gbps(n * size, region_bytes=size) for _ in range(2))
        best = max(rates)
        print(f"\n64 x 2 MiB: transfer {best:.2f} GB/s | raw TCP, distinct buffers {raw:.2f} GB/s "
              f"(ratio {best / raw:.2f}) | raw TCP, one cache-hot buffer {hot:.2f} GB/s "
              f"(ratio {best / hot:.2f})")  # fmt: skip
    finally:
        client.close()
        server.close()
        a.close()
        b.close()
