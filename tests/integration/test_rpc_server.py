"""The kvfabric.v1 gRPC server for real: a NodeStoreService on real tiers, 127.0.0.1, stubs."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import xxhash
from cryptography import x509
from cryptography.hazmat.primitives import hashes as crypto_hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvfabric.config import KiB, MiB, load_config
from kvfabric.directory.service import DirectoryService
from kvfabric.node.service import NodeStoreService
from kvfabric.rpc.server import RpcServer, start_server
from kvfabric.rpc.v1 import kvfabric_pb2 as pb
from kvfabric.rpc.v1 import kvfabric_pb2_grpc as pb_grpc

NS = "ns-rpc"
B = 16 * KiB
SMALL = dict(cpu_arena_bytes="1MiB", cpu_slab_bytes="64KiB", max_block_bytes="64KiB",
             disk_bytes="16MiB", cpu_prefault=False, transport="tcp")  # fmt: skip
BIG = {**SMALL, **dict(cpu_arena_bytes="32MiB", cpu_slab_bytes="4MiB", max_block_bytes="4MiB",
                       disk_bytes="64MiB")}  # fmt: skip
ROOT, LIMITED = "root-secret-token", "limited-secret-token"


def h(i: int) -> bytes:
    """A deterministic 32-byte block hash."""
    return hashlib.blake2b(b"rpc" + i.to_bytes(8, "little"), digest_size=32).digest()


def blob(i: int, size: int) -> bytes:
    """Deterministic block content."""
    seed = hashlib.blake2b(b"data" + i.to_bytes(8, "little"), digest_size=64).digest()
    return (seed * (size // 64 + 1))[:size]


@contextlib.contextmanager
def serve(data_dir: Path, **overrides: Any) -> Iterator[tuple[NodeStoreService, RpcServer]]:
    """A standalone node store and its gRPC server on an ephemeral port."""
    cfg = load_config(overrides={"data_dir": str(data_dir), **SMALL, **overrides}, env={})
    svc = NodeStoreService(node_id="n-test", config=cfg, directory=None)
    try:
        with start_server(svc, cfg) as server:
            yield svc, server
    finally:
        svc.close()


@contextlib.contextmanager
def stub_for(server: RpcServer) -> Iterator[pb_grpc.KVFabricStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.KVFabricStub(channel)


def put_chunks(
    ns: str, hashes: Sequence[bytes], datas: Sequence[bytes], chunk: int = 4 * KiB
) -> Iterator[pb.PutChunk]:
    size = len(datas[0]) if datas else B
    yield pb.PutChunk(header=pb.PutHeader(namespace=ns, hashes=list(hashes), block_bytes=size))
    for i, data in enumerate(datas):
        for off in range(0, len(data), chunk):
            piece = data[off : off + chunk]
            yield pb.PutChunk(data=pb.BlockData(block_index=i, offset=off, data=piece))


def get_blocks(stub: Any, ns: str, hashes: Sequence[bytes], **kw: Any) -> list[Any]:
    """[(header, bytes)] of a streamed Get."""
    out: list[Any] = []
    for msg in stub.Get(pb.GetRequest(namespace=ns, hashes=list(hashes), **kw), timeout=30):
        if msg.WhichOneof("part") == "header":
            out.append([msg.header, bytearray()])
        else:
            assert msg.data.block_index == out[-1][0].block_index
            assert msg.data.offset == len(out[-1][1])
            out[-1][1] += msg.data.data
    return out


def refused(rpc: Any, request: Any, **kw: Any) -> tuple[grpc.StatusCode, str]:
    """The status and details ``rpc`` is refused with (streamed responses are drained)."""
    with pytest.raises(grpc.RpcError) as err:
        out = rpc(request, timeout=10, **kw)
        if hasattr(out, "__next__"):
            list(out)
    return err.value.code(), err.value.details()


def code_of(rpc: Any, request: Any, **kw: Any) -> grpc.StatusCode:
    """The status code ``rpc`` is refused with."""
    return refused(rpc, request, **kw)[0]


def health_status(address: str, creds: Any = None) -> Any:
    request = health_pb2.HealthCheckRequest(service="kvfabric.v1.KVFabric")
    with grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(request, timeout=10).status


def get_msgs(stub: Any, **request: Any) -> list[Any]:
    """Every message of a Get."""
    return list(stub.Get(pb.GetRequest(**request), timeout=30))


def total_blocks(stub: Any, **kw: Any) -> int:
    return sum(t.blocks for t in stub.Stats(pb.StatsRequest(), timeout=10, **kw).tiers)


# -- data --------------------------------------------------------------------------------
def test_put_get_of_3mib_blocks_streamed_in_1mib_chunks(tmp_path: Path) -> None:
    with serve(tmp_path, **BIG) as (svc, server), stub_for(server) as stub:
        hashes, datas = [h(i) for i in range(3)], [blob(i, 3 * MiB) for i in range(3)]
        res = stub.Put(put_chunks(NS, hashes, datas, chunk=1 * MiB), timeout=30)
        assert list(res.statuses) == [pb.PUT_STATUS_STORED] * 3
        again = stub.Put(put_chunks(NS, hashes, datas, chunk=1 * MiB), timeout=30)
        assert list(again.statuses) == [pb.PUT_STATUS_EXISTS] * 3

        got = get_blocks(stub, NS, [*hashes, h(99)])
        assert [g[0].block_index for g in got] == [0, 1, 2, 3]
        for (header, data), want in zip(got, datas, strict=False):
            assert header.found and header.size == 3 * MiB and bytes(data) == want
            assert header.checksum == xxhash.xxh3_64_intdigest(want)
            assert header.location.address == svc.address
            assert header.location.node_id == "n-test" and header.location.tier == pb.TIER_CPU
        assert not got[3][0].found and not got[3][1]

        chunks = get_msgs(stub, namespace=NS, hashes=hashes[:1], chunk_bytes=256 * KiB)
        assert len(chunks) == 1 + 12 and all(len(c.data.data) == 256 * KiB for c in chunks[1:])

        plane = get_msgs(stub, namespace=NS, hashes=[*hashes, h(99)], data_plane=True)
        assert all(m.WhichOneof("part") == "header" for m in plane)
        assert [m.header.found for m in plane] == [True, True, True, False]
        assert plane[0].header.location.address == svc.address
        assert plane[1].header.checksum == xxhash.xxh3_64_intdigest(datas[1])


def test_control_calls_are_observable_in_lookup_and_stats(tmp_path: Path) -> None:
    with serve(tmp_path) as (_svc, server), stub_for(server) as stub:
        hashes = [h(i) for i in range(4)]
        stub.Put(put_chunks(NS, hashes, [blob(i, B) for i in range(4)]), timeout=10)
        req = {"namespace": NS, "hashes": hashes}

        found = stub.Lookup(pb.LookupRequest(namespace=NS, hashes=[*hashes, h(50)]), timeout=10)
        assert found.matched == 4 and [loc.tier for loc in found.locations] == [pb.TIER_CPU] * 4

        moved = stub.Move(pb.MoveRequest(tier=pb.TIER_DISK, **req), timeout=10)
        assert (moved.moved, moved.missing) == (4, 0)
        local = stub.Lookup(pb.LookupRequest(local_only=True, **req), timeout=10)
        assert [loc.tier for loc in local.locations] == [pb.TIER_DISK] * 4

        back = stub.Prefetch(pb.PrefetchRequest(**req), timeout=10)
        assert back.moved == 4
        local = stub.Lookup(pb.LookupRequest(local_only=True, **req), timeout=10)
        assert [loc.tier for loc in local.locations] == [pb.TIER_CPU] * 4

        pinned = stub.Pin(pb.PinRequest(owner="alice", ttl_s=60, **req), timeout=10)
        assert (pinned.pinned, pinned.missing, pinned.new_bytes) == (4, 0, 4 * B)
        stats = stub.Stats(pb.StatsRequest(), timeout=10)
        assert stats.pinned_blocks == 4 and stats.pinned_bytes == 4 * B
        assert stats.node_id == "n-test" and stats.counters["puts"] == 4
        evict = pb.EvictRequest(**req)
        assert code_of(stub.Evict, evict) == grpc.StatusCode.FAILED_PRECONDITION
        assert stub.Unpin(pb.UnpinRequest(owner="alice", **req), timeout=10).released == 4
        assert stub.Stats(pb.StatsRequest(), timeout=10).pinned_blocks == 0

        ann = stub.Annotate(
            pb.AnnotateRequest(block_type=pb.BLOCK_TYPE_SYSTEM_PROMPT, program_id="prog-1", **req),
            timeout=10,
        )
        assert ann.annotated == 4
        assert stub.Stats(pb.StatsRequest(), timeout=10).blocks_by_type["SYSTEM_PROMPT"] == 4

        start = pb.HintRequest(program_id="prog-1", kind=pb.HINT_KIND_PROGRAM_START)
        assert stub.Hint(start, timeout=10).accepted  # a program's hints follow its start
        step = pb.HintRequest(program_id="prog-1", kind=pb.HINT_KIND_STEP_START, step=2, **req)
        hint = stub.Hint(step, timeout=10)
        assert hint.accepted and hint.copied == 0

        evicted = stub.Evict(pb.EvictRequest(namespace=NS, hashes=hashes[2:]), timeout=10)
        assert evicted.evicted == 2 and total_blocks(stub) == 2
        assert stub.Lookup(pb.LookupRequest(**req), timeout=10).matched == 2


def test_domain_errors_map_to_status_codes(tmp_path: Path) -> None:
    with serve(tmp_path, pin_budget_bytes=2 * B) as (_svc, server), stub_for(server) as stub:
        hs, codes = [h(i) for i in range(3)], grpc.StatusCode
        stub.Put(put_chunks(NS, hs, [blob(i, B) for i in range(3)]), timeout=10)
        assert code_of(stub.Lookup, pb.LookupRequest(namespace="ns-no", hashes=hs)) == (
            codes.NOT_FOUND
        )
        pin = pb.PinRequest(namespace=NS, hashes=hs, owner="o")
        assert code_of(stub.Pin, pin) == codes.RESOURCE_EXHAUSTED
        code, details = refused(stub.Evict, pb.EvictRequest(namespace=NS, hashes=[h(1), b"ab"]))
        assert code == codes.INVALID_ARGUMENT and "hashes" in details and "32" in details
        pin.ttl_s = float("nan")
        code, details = refused(stub.Pin, pin)
        assert code == codes.INVALID_ARGUMENT and "ttl_s" in details
        code, details = refused(stub.Move, pb.MoveRequest(namespace=NS, hashes=hs))
        assert code == codes.INVALID_ARGUMENT and "tier" in details
        for move, want in [
            ({"tier": 9}, codes.INVALID_ARGUMENT),
            ({"node_id": "n-2"}, codes.FAILED_PRECONDITION),  # standalone: no directory
            ({"tier": pb.TIER_GPU}, codes.FAILED_PRECONDITION),  # no GPU tier on this node
        ]:
            assert code_of(stub.Move, pb.MoveRequest(namespace=NS, hashes=hs, **move)) == want
        assert code_of(stub.Lookup, pb.LookupRequest(namespace="a/b")) == codes.INVALID_ARGUMENT
        assert code_of(stub.Hint, pb.HintRequest(program_id="p", kind=42)) == (
            codes.INVALID_ARGUMENT
        )
        assert code_of(stub.WatchEvents, pb.WatchEventsRequest()) == codes.FAILED_PRECONDITION
        chunks = list(put_chunks(NS, [h(10), h(11)], [blob(10, B), blob(11, B)]))
        assert code_of(stub.Put, iter(chunks[:-1])) == codes.INVALID_ARGUMENT
        assert stub.Lookup(pb.LookupRequest(namespace=NS, hashes=[h(10)])).matched == 0
        assert total_blocks(stub) == 3  # nothing of the malformed Put was stored


# -- limits ------------------------------------------------------------------------------
def test_chain_and_message_limits(tmp_path: Path) -> None:
    overrides = {"rpc_max_chain": 8, "rpc_max_message_bytes": "256KiB"}
    with serve(tmp_path, **overrides) as (_svc, server), stub_for(server) as stub:
        code, details = refused(stub.Lookup, pb.LookupRequest(namespace=NS, hashes=[h(0)] * 9))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "hashes" in details and "8" in details
        huge = pb.LookupRequest(namespace=NS, hashes=[h(0)] * 8 + [b"x" * (300 * KiB)])
        assert code_of(stub.Lookup, huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING


def test_concurrency_limit_and_server_deadline_cap(tmp_path: Path) -> None:
    overrides = {"rpc_max_concurrent": 1, "rpc_max_deadline_s": 1.0}
    with serve(tmp_path, **overrides) as (_svc, server), stub_for(server) as stub:
        release = threading.Event()

        def slow_put() -> Iterator[pb.PutChunk]:
            yield next(put_chunks(NS, [h(1)], [blob(1, B)]))  # the header, then nothing
            release.wait(timeout=10)

        started = time.monotonic()
        future = stub.Put.future(slow_put(), timeout=20)
        time.sleep(0.3)
        assert code_of(stub.Stats, pb.StatsRequest()) == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:
            future.result(timeout=15)  # the server ends the stalled stream at its cap
        release.set()
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert time.monotonic() - started < 8
        time.sleep(0.2)
        assert total_blocks(stub) == 0


# -- auth --------------------------------------------------------------------------------
def _auth_server(tmp_path: Path, **overrides: Any) -> Any:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({LIMITED: ["ns-a"], "other-token": "*"}))
    return serve(tmp_path / "data", auth_token=ROOT, auth_tokens_file=str(tokens), **overrides)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_auth_on_mutations_reads_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvfabric")
    with _auth_server(tmp_path) as (_svc, server), stub_for(server) as stub:
        codes = grpc.StatusCode
        put = list(put_chunks("ns-a", [h(1)], [blob(1, B)]))
        for metadata in (None, _bearer("wrong"), [("authorization", ROOT)]):
            assert code_of(stub.Put, iter(put), metadata=metadata) == codes.UNAUTHENTICATED
        assert list(stub.Put(iter(put), metadata=_bearer(LIMITED)).statuses) == [
            pb.PUT_STATUS_STORED
        ]
        evict = pb.EvictRequest(namespace="ns-b", hashes=[h(1)])
        assert code_of(stub.Evict, evict) == codes.UNAUTHENTICATED
        assert code_of(stub.Evict, evict, metadata=_bearer(LIMITED)) == codes.PERMISSION_DENIED
        assert stub.Evict(evict, metadata=_bearer(ROOT)).evicted == 0
        # Reads are open without a token, but a presented token is still checked.
        assert stub.Lookup(pb.LookupRequest(namespace="ns-a", hashes=[h(1)])).matched == 1
        other = pb.LookupRequest(namespace="ns-b", hashes=[h(1)])
        assert code_of(stub.Lookup, other, metadata=_bearer(LIMITED)) == codes.PERMISSION_DENIED
        assert code_of(stub.Lookup, other, metadata=_bearer("wrong")) == codes.UNAUTHENTICATED
        assert stub.Stats(pb.StatsRequest(), timeout=10).node_id == "n-test"
        assert len(get_blocks(stub, "ns-a", [h(1)])) == 1
        assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert ROOT not in caplog.text and LIMITED not in caplog.text


def test_auth_reads_needs_a_token_for_reads(tmp_path: Path) -> None:
    with _auth_server(tmp_path, auth_reads=True) as (_svc, server), stub_for(server) as stub:
        codes = grpc.StatusCode
        lookup = pb.LookupRequest(namespace="ns-a", hashes=[h(1)])
        assert code_of(stub.Lookup, lookup) == codes.UNAUTHENTICATED
        assert code_of(stub.Stats, pb.StatsRequest()) == codes.UNAUTHENTICATED
        assert code_of(stub.Get, pb.GetRequest(namespace="ns-a")) == codes.UNAUTHENTICATED
        other = pb.LookupRequest(namespace="ns-b", hashes=[h(1)])
        assert code_of(stub.Lookup, other, metadata=_bearer(LIMITED)) == codes.PERMISSION_DENIED
        assert code_of(stub.Lookup, lookup, metadata=_bearer(LIMITED)) == codes.NOT_FOUND  # let in
        assert stub.Stats(pb.StatsRequest(), metadata=_bearer(LIMITED), timeout=10).node_id
        assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING


# -- TLS ---------------------------------------------------------------------------------
def _self_signed(tmp_path: Path, cn: str) -> tuple[bytes, bytes]:
    """A self-signed certificate (its own CA) for localhost and 127.0.0.1, written as
    ``<cn>.crt``/``<cn>.key``; returns the PEM certificate and key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name)
    builder = builder.public_key(key.public_key()).serial_number(x509.random_serial_number())
    builder = builder.not_valid_before(now - datetime.timedelta(minutes=5))
    builder = builder.not_valid_after(now + datetime.timedelta(days=1))
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(key, crypto_hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    pem = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    key_pem = key.private_bytes(*pem, serialization.NoEncryption())
    (tmp_path / f"{cn}.crt").write_bytes(cert)
    (tmp_path / f"{cn}.key").write_bytes(key_pem)
    return cert, key_pem


def test_tls_round_trip_and_mutual_tls(tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path, "localhost")
    tls = {"tls_cert_file": str(tmp_path / "localhost.crt")}
    tls["tls_key_file"] = str(tmp_path / "localhost.key")
    with serve(tmp_path / "a", **tls) as (_svc, server):
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        with grpc.secure_channel(server.address, creds) as channel:
            stub = pb_grpc.KVFabricStub(channel)
            put = stub.Put(put_chunks(NS, [h(1)], [blob(1, B)]), timeout=10)
            assert list(put.statuses) == [pb.PUT_STATUS_STORED]
            assert bytes(get_blocks(stub, NS, [h(1)])[0][1]) == blob(1, B)
        assert health_status(server.address, creds) == health_pb2.HealthCheckResponse.SERVING
        with stub_for(server) as plain:  # plaintext is refused
            assert code_of(plain.Stats, pb.StatsRequest()) == grpc.StatusCode.UNAVAILABLE

    client_cert, client_key = _self_signed(tmp_path, "client")
    mtls = {**tls, "tls_client_ca_file": str(tmp_path / "client.crt")}
    with serve(tmp_path / "b", **mtls) as (_svc, server):
        anonymous = grpc.ssl_channel_credentials(root_certificates=cert)
        with grpc.secure_channel(server.address, anonymous) as channel:
            stub = pb_grpc.KVFabricStub(channel)
            assert code_of(stub.Stats, pb.StatsRequest()) == grpc.StatusCode.UNAVAILABLE
        known = grpc.ssl_channel_credentials(cert, client_key, client_cert)
        with grpc.secure_channel(server.address, known) as channel:
            assert pb_grpc.KVFabricStub(channel).Stats(pb.StatsRequest(), timeout=10).node_id


# -- cluster -----------------------------------------------------------------------------
def test_get_on_any_node_and_watch_events(tmp_path: Path) -> None:
    cfg = load_config(
        overrides={"data_dir": str(tmp_path), **SMALL, "rpc_max_deadline_s": 2.0}, env={}
    )
    directory = DirectoryService(cfg)
    a = NodeStoreService("n-a", cfg.for_node("n-a"), directory)
    b = NodeStoreService("n-b", cfg.for_node("n-b"), directory)
    try:
        with start_server(a, cfg) as sa, start_server(b, cfg) as sb, contextlib.ExitStack() as st:
            stub_a, stub_b = (st.enter_context(stub_for(x)) for x in (sa, sb))
            hashes = [h(1), h(2)]
            stub_a.Put(put_chunks(NS, hashes, [blob(1, B), blob(2, B)]), timeout=10)
            found = stub_b.Lookup(pb.LookupRequest(namespace=NS, hashes=hashes), timeout=10)
            assert found.matched == 2 and found.locations[0].node_id == "n-a"
            got = get_blocks(stub_b, NS, hashes)  # pulled from n-a over the data plane
            assert [bytes(g[1]) for g in got] == [blob(1, B), blob(2, B)]
            assert got[0][0].location.node_id == "n-b"

            events = list(stub_b.WatchEvents(pb.WatchEventsRequest(from_seq=0), timeout=10))
            seqs = [e.seq for e in events]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            committed = [e for e in events if e.kind == "COMMITTED"]
            assert {e.hash for e in committed} == set(hashes)
            assert all(e.namespace == NS and e.tier == pb.TIER_CPU for e in committed)

            watch = pb.WatchEventsRequest(from_seq=seqs[-1], follow=True)
            follow = stub_b.WatchEvents(watch, timeout=10)
            stub_a.Put(put_chunks(NS, [h(3)], [blob(3, B)]), timeout=10)
            fresh = next(e for e in follow if e.kind == "COMMITTED")
            assert fresh.hash == h(3) and fresh.seq > seqs[-1]
            with pytest.raises(grpc.RpcError) as err:  # the server's cap ends a follow
                list(follow)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        a.close()
        b.close()
        directory.close()
