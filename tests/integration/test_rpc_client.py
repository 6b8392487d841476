"""The Python client against the real gRPC server of a real node store on loopback."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from kvfabric.config import KVFabricConfig
from kvfabric.directory.service import DirectoryService
from kvfabric.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from kvfabric.hints import HintKind
from kvfabric.rpc.chunks import encode_data_chunk as encode_put_data
from kvfabric.rpc.client import Client, MoveCounts, PutStatus
from kvfabric.rpc.client_data import DataPart, decode_get_chunk
from kvfabric.rpc.v1 import kvfabric_pb2 as pb
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier
from tests.rpcnode import RpcNode, hashes, node_config, random_blocks

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
BIG, SMALL = 3 * MiB, 4096
NS_BIG, NS_SMALL = "ns-big", "ns-small"


def blocks(n: int, size: int, salt: str) -> list[bytes]:
    return random_blocks(n, size, salt)


def config(tmp: Path, **overrides: Any) -> KVFabricConfig:
    return node_config(tmp, **overrides)


Node = RpcNode  # a standalone node store with its gRPC server

@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("node"))
    yield n
    n.close()


@pytest.fixture
def client(node: Node) -> Iterator[Client]:
    with Client(node.server.address, timeout_s=10) as c:
        yield c


def test_put_and_get_agree_over_data_plane_and_stream(node: Node, client: Client) -> None:
    for ns, size, n in ((NS_BIG, BIG, 3), (NS_SMALL, SMALL, 5)):
        hs, data = hashes(n, f"agree-{ns}"), blocks(n, size, f"agree-{ns}")
        assert client.put(ns, hs, [memoryview(d) for d in data]) == [PutStatus.STORED] * n
        assert client.put(ns, hs[:1], data[:1]) == [PutStatus.EXISTS]
        assert client.get(ns, hs) == data
        # The bytes came over the data plane: the client pooled a connection to it.
        assert node.service.address in client._reader._pool._idle
        with Client(node.server.address, data_plane=False, timeout_s=10) as streamed:
            assert streamed.get(ns, hs) == data
            dsts = [bytearray(size) for _ in hs]
            assert streamed.get_into(ns, hs, dsts) == [True] * n
            assert [bytes(d) for d in dsts] == data
        arrays = [np.zeros(size, dtype=np.uint8) for _ in hs]
        assert client.get_into(ns, hs, arrays) == [True] * n
        assert [a.tobytes() for a in arrays] == data
    missing = hashes(1, "never-put")
    assert client.get(NS_SMALL, [*hashes(1, f"agree-{NS_SMALL}"), *missing]) == [
        blocks(1, SMALL, f"agree-{NS_SMALL}")[0],
        None,
    ]
    assert client.get(NS_SMALL, []) == [] and client.put(NS_SMALL, [], []) == []


def test_block_corrupted_in_the_arena_is_a_miss_never_wrong_bytes(
    node: Node, client: Client
) -> None:
    hs, data = hashes(4, "corrupt"), blocks(4, SMALL, "corrupt")
    client.put(NS_SMALL, hs, data)
    cpu = node.service.core.tiers[Tier.CPU]
    for i in (1, 2):
        offset = cpu.slot_offset(BlockKey(NS_SMALL, BlockHash(hs[i])))
        assert offset is not None
        cpu.arena.view[offset + 100] ^= 0x5A
    assert client.get(NS_SMALL, hs) == [data[0], None, None, data[3]]  # data plane
    with Client(node.server.address, data_plane=False, timeout_s=10) as streamed:
        dsts = [bytearray(SMALL) for _ in hs]
        assert streamed.get_into(NS_SMALL, hs, dsts) == [True, False, False, True]
        assert bytes(dsts[3]) == data[3]


def test_unreachable_data_plane_falls_back_to_streaming(tmp_path: Path) -> None:
    n = Node(tmp_path)
    try:
        with Client(n.server.address, timeout_s=10) as c:
            hs, data = hashes(2, "fallback"), blocks(2, BIG, "fallback")
            c.put(NS_BIG, hs, data)
            assert c.get(NS_BIG, hs) == data
            n.service.transport.close()  # headers still name the data-plane address
            assert c.get(NS_BIG, hs) == data
            # The dead address is skipped for a while rather than tried on every get.
            assert n.service.address in c._getter._down
            dsts = [bytearray(BIG) for _ in hs]
            assert c.get_into(NS_BIG, hs, dsts) == [True, True]
            assert [bytes(d) for d in dsts] == data
    finally:
        n.close()


def test_lookup_stats_and_health(node: Node, client: Client) -> None:
    hs = hashes(6, "chain")
    client.put(NS_SMALL, hs[:4], blocks(4, SMALL, "chain"))
    for local_only in (False, True):
        r = client.lookup(NS_SMALL, hs, local_only=local_only)
        assert r.matched == 4 and len(r.locations) == 4
        assert {(x.node_id, x.address, x.tier) for x in r.locations} == {
            ("n-test", node.service.address, Tier.CPU)
        }
    s = client.stats()
    assert s.node_id == "n-test" and s.address == node.service.address
    assert Tier.CPU in {t.tier for t in s.tiers} and s.counters["puts"] >= 4
    assert client.health() is True


def test_move_prefetch_pin_unpin_evict_annotate_hint(node: Node, client: Client) -> None:
    hs, data = hashes(3, "control"), blocks(3, SMALL, "control")
    client.put(NS_SMALL, hs, data)
    assert client.move(NS_SMALL, hs, tier=Tier.DISK) == MoveCounts(moved=3)
    assert {x.tier for x in client.lookup(NS_SMALL, hs).locations} == {Tier.DISK}
    assert client.get(NS_SMALL, hs) == data  # served from the disk tier
    first = client.prefetch(NS_SMALL, hs[:1], Tier.CPU)
    assert first.moved + first.unchanged == 1
    assert client.prefetch(NS_SMALL, hs[:1], Tier.CPU) == MoveCounts(unchanged=1)
    assert client.move(NS_SMALL, hs, tier=Tier.CPU).missing == 0
    pinned = client.pin(NS_SMALL, hs, "owner-1", ttl_s=60)
    assert pinned.pinned == 3 and pinned.missing == 0
    with pytest.raises(FailedPrecondition):
        client.evict(NS_SMALL, hs)
    assert client.unpin(NS_SMALL, hs, "owner-1") == 3
    assert client.annotate(NS_SMALL, hs, BlockType.TOOL_DEFINITION, program_id="prog-1") == 3
    assert client.stats().blocks_by_type.get("TOOL_DEFINITION", 0) >= 3
    r = client.hint("prog-1", HintKind.PROGRAM_START, namespace=NS_SMALL, hashes=hs, step=1)
    assert r.accepted and r.copied == 0
    assert client.hint("prog-1", HintKind.TOOL_CALL_START, expected_duration_s=2.0).accepted
    assert client.evict(NS_SMALL, hs) == 3
    assert client.get(NS_SMALL, hs) == [None] * 3
    assert client.lookup(NS_SMALL, hs).matched == 0


def test_typed_errors_keep_the_servers_message(node: Node, client: Client) -> None:
    with pytest.raises(NotFound, match="ns-unknown") as missing:
        client.lookup("ns-unknown", hashes(1, "x"))
    assert missing.value.field == "namespace"  # the server's field survives the trip
    with pytest.raises(InvalidArgument) as bad:  # wrong block size for the namespace
        client.put(NS_SMALL, hashes(1, "size"), [bytes(2 * SMALL)])
    assert bad.value.message
    with pytest.raises(FailedPrecondition):  # a fork to other nodes needs a directory
        client.hint("prog-2", HintKind.FORK, namespace=NS_SMALL, hashes=hashes(1, "f"),
                    targets=["n-other"])  # fmt: skip
    with pytest.raises(FailedPrecondition):
        client.move(NS_SMALL, hashes(1, "m"), node_id="n-other")
    with pytest.raises(FailedPrecondition):  # standalone: no directory, no events
        list(client.watch_events())
    # Validated before anything is sent:
    with pytest.raises(InvalidArgument, match="32 bytes"):
        client.get(NS_SMALL, [b"short"])
    with pytest.raises(InvalidArgument):
        client.put(NS_SMALL, hashes(2, "v"), [bytes(SMALL), bytes(SMALL - 1)])
    with pytest.raises(InvalidArgument):
        client.move(NS_SMALL, hashes(1, "v"))
    with pytest.raises(InvalidArgument):
        client.get_into(NS_SMALL, hashes(1, "v"), [bytes(SMALL)])  # read-only
    with pytest.raises(InvalidArgument):
        client.pin("bad/ns", hashes(1, "v"), "owner")


def test_token_protected_server(tmp_path: Path) -> None:
    n = Node(tmp_path, auth_token="s3cret")
    try:
        hs, data = hashes(2, "auth"), blocks(2, SMALL, "auth")
        with Client(n.server.address, timeout_s=10) as anonymous:
            with pytest.raises(Unauthenticated):
                anonymous.put(NS_SMALL, hs, data)
            assert anonymous.health()
        with (
            Client(n.server.address, token="wrong", timeout_s=10) as wrong,
            pytest.raises(Unauthenticated),
        ):
            wrong.pin(NS_SMALL, hs, "o")
        with Client(n.server.address, token="s3cret", timeout_s=10) as c:
            assert c.put(NS_SMALL, hs, data) == [PutStatus.STORED] * 2
            assert c.get(NS_SMALL, hs) == data
    finally:
        n.close()


def test_deadline_on_a_big_get(node: Node) -> None:
    hs, data = hashes(8, "deadline"), blocks(8, BIG, "deadline")
    with Client(node.server.address, timeout_s=10) as c:
        c.put(NS_BIG, hs, data)
    for data_plane in (True, False):
        with Client(node.server.address, timeout_s=0.002, retries=1,
                    data_plane=data_plane) as c:  # fmt: skip
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                c.get(NS_BIG, hs)
            assert time.monotonic() - start < 3


def test_watch_events_from_a_directory(tmp_path: Path) -> None:
    directory = DirectoryService(config(tmp_path / "dir"))
    n = Node(tmp_path / "node", directory=directory)
    try:
        with Client(n.server.address, timeout_s=10) as c:
            hs = hashes(2, "events")
            c.put(NS_SMALL, hs, blocks(2, SMALL, "events"))
            events = list(c.watch_events())
            assert [e.seq for e in events] == sorted(e.seq for e in events)
            committed = [e for e in events if e.kind == "COMMITTED"]
            assert {e.hash for e in committed} == set(hs)
            assert all(e.namespace == NS_SMALL for e in committed)
            assert list(c.watch_events(from_seq=events[-1].seq)) == []
            seen: list[int] = []
            start = time.monotonic()
            for e in c.watch_events(from_seq=events[-1].seq, follow=True, timeout_s=1.0):
                seen.append(e.seq)
            assert seen == [] and time.monotonic() - start < 3  # ends at its deadline
    finally:
        n.close()
        directory.close()


class FlakyServer:
    """A plain gRPC server that answers UNAVAILABLE ``fail`` times per method, then succeeds."""

    def __init__(self, fail: int) -> None:
        self.calls: dict[str, int] = {}
        self._fail, self._lock = fail, threading.Lock()
        ok = {"Lookup": pb.LookupResponse(), "Stats": pb.StatsResponse(node_id="flaky"),
              "Pin": pb.PinResponse(), "Evict": pb.EvictResponse()}  # fmt: skip

        def unary(name: str) -> Any:
            def handle(request: bytes, context: Any) -> bytes:
                with self._lock:
                    self.calls[name] = self.calls.get(name, 0) + 1
                    n = self.calls[name]
                if n <= self._fail:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
                return ok[name].SerializeToString() if name in ok else b""

            return grpc.unary_unary_rpc_method_handler(handle)

        def stream(request_iterator: Iterator[bytes], context: Any) -> bytes:
            for _ in request_iterator:
                pass
            with self._lock:
                self.calls["Put"] = self.calls.get("Put", 0) + 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

        handlers = {m: unary(m) for m in ok}
        handlers["Put"] = grpc.stream_unary_rpc_method_handler(stream)
        self.server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("kvfabric.v1.KVFabric", handlers),)
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


def test_only_reads_are_retried() -> None:
    flaky = FlakyServer(fail=100)
    try:
        with Client(flaky.address, timeout_s=5, retries=2, local=False) as c:
            for call in (lambda: c.lookup(NS_SMALL, hashes(1, "r")), c.stats):
                with pytest.raises(Unavailable, match="try again"):
                    call()
            with pytest.raises(Unavailable):
                c.pin(NS_SMALL, hashes(1, "r"), "owner")
            with pytest.raises(Unavailable):
                c.evict(NS_SMALL, hashes(1, "r"))
            with pytest.raises(Unavailable):
                c.put(NS_SMALL, hashes(1, "r"), [bytes(SMALL)])
        assert flaky.calls == {"Lookup": 3, "Stats": 3, "Pin": 1, "Evict": 1, "Put": 1}
    finally:
        flaky.server.stop(0)
    flaky = FlakyServer(fail=1)
    try:
        with Client(flaky.address, timeout_s=5, retries=2) as c:
            assert c.lookup(NS_SMALL, hashes(1, "r")).matched == 0
            assert c.stats().node_id == "flaky"
        assert flaky.calls == {"Lookup": 2, "Stats": 2}
    finally:
        flaky.server.stop(0)


def test_closed_client_refuses_calls(node: Node) -> None:
    c = Client(node.server.address)
    assert c.stats().node_id == "n-test"
    c.close()
    c.close()
    with pytest.raises(FailedPrecondition):
        c.get(NS_SMALL, hashes(1, "closed"))
    with pytest.raises(FailedPrecondition):
        c.watch_events()


def test_unreachable_server() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout_s=0.5, retries=1) as c:
        assert c.health() is False
        with pytest.raises(Unavailable):
            c.stats()


def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    n = Node(tmp_path / "node", tls_cert_file=str(cert), tls_key_file=str(key))
    try:
        with Client(n.server.address, tls_root_cert=cert.read_bytes(), timeout_s=10) as c:
            hs, data = hashes(1, "tls"), blocks(1, SMALL, "tls")
            assert c.put(NS_SMALL, hs, data) == [PutStatus.STORED]
            assert c.get(NS_SMALL, hs) == data
    finally:
        n.close()


def test_bulk_codec_matches_the_generated_classes() -> None:
    for index, offset, data in ((0, 0, b"x"), (3, 300, b"abc" * 1000), (2**32 - 1, 2**40, b"z")):
        ours = encode_put_data(index, offset, memoryview(data))
        msg = pb.PutChunk(data=pb.BlockData(block_index=index, offset=offset, data=data))
        assert ours == msg.SerializeToString()
        raw = pb.GetChunk(data=pb.BlockData(block_index=index, offset=offset, data=data))
        part = decode_get_chunk(raw.SerializeToString())
        assert isinstance(part, DataPart)
        assert (part.block_index, part.offset, bytes(part.data)) == (index, offset, data)
    header = pb.GetHeader(block_index=7, found=True, size=9, checksum=2**64 - 1)
    part = decode_get_chunk(pb.GetChunk(header=header).SerializeToString())
    assert part == header
    assert decode_get_chunk(b"") is None


def test_import_kvfabric_stays_light_and_client_loads_lazily() -> None:
    code = (
        "import sys, kvfabric; assert 'grpc' not in sys.modules; "
        "from kvfabric import Client; assert 'grpc' in sys.modules; "
        "assert Client.__module__ == 'kvfabric.rpc.client'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
