"""Malformed and random requests against a real server: proper codes, stored data untouched.

Every unary RPC gets random namespaces, hashes (wrong lengths, chains up to
the limit + 1), TTLs (negative, NaN, infinite) and enum values; Put gets chunk
sequences that are each broken in at least one way. No call may end UNKNOWN
or INTERNAL, no broken Put may store anything, and the reference blocks stored
before the run keep their bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvfabric.config import KiB, load_config
from kvfabric.node.service import NodeStoreService
from kvfabric.rpc.server import start_server
from kvfabric.rpc.v1 import kvfabric_pb2 as pb
from kvfabric.rpc.v1 import kvfabric_pb2_grpc as pb_grpc

REF_NS, B, LIMIT = "ns-ref", 16 * KiB, 16
REFERENCE = [hashlib.blake2b(b"ref" + bytes([i]), digest_size=32).digest() for i in range(3)]
PROPER = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def ref_data(i: int) -> bytes:
    return bytes([i + 1]) * B


class Fixture:
    """The server, a stub, and what the store held before the run."""

    def __init__(self, stub: Any, address: str) -> None:
        self.stub = stub
        self.address = address
        self.before = self.snapshot()

    def snapshot(self) -> tuple[Any, ...]:
        stats = self.stub.Stats(pb.StatsRequest(), timeout=10)
        tiers = tuple((t.tier, t.blocks, t.used_bytes) for t in stats.tiers)
        data = tuple(
            m.data.data if m.WhichOneof("part") == "data" else m.header.checksum
            for m in self.stub.Get(pb.GetRequest(namespace=REF_NS, hashes=REFERENCE), timeout=10)
        )
        return tiers, data, dict(stats.blocks_by_type), stats.pinned_blocks

    def check_unchanged(self) -> None:
        assert self.snapshot() == self.before


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    data_dir = Path(tmp_path_factory.mktemp("rpc-fuzz"))
    cfg = load_config(
        overrides={
            "data_dir": str(data_dir),
            "cpu_arena_bytes": "1MiB",
            "cpu_slab_bytes": "64KiB",
            "max_block_bytes": "64KiB",
            "disk_bytes": "16MiB",
            "cpu_prefault": False,
            "transport": "tcp",
            "rpc_max_chain": LIMIT,
            "pin_budget_bytes": "32KiB",
        },
        env={},
    )
    svc = NodeStoreService(node_id="n-fuzz", config=cfg, directory=None)
    svc.put(REF_NS, REFERENCE, [ref_data(i) for i in range(3)])
    try:
        with start_server(svc, cfg) as server, grpc.insecure_channel(server.address) as ch:
            fixture = Fixture(pb_grpc.KVFabricStub(ch), server.address)
            yield fixture
            with grpc.insecure_channel(server.address) as hch:
                status = (
                    health_pb2_grpc.HealthStub(hch)
                    .Check(health_pb2.HealthCheckRequest(), timeout=10)
                    .status
                )
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        svc.close()


# -- strategies --------------------------------------------------------------------------
hash_st = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40))
chain_st = st.one_of(
    st.lists(hash_st, max_size=4),
    st.integers(LIMIT - 1, LIMIT + 1).map(
        lambda n: [hashlib.sha256(bytes([i])).digest() for i in range(n)]
    ),
)
ns_st = st.one_of(st.sampled_from([REF_NS, "ns-other", "", "a/b", "x" * 65]), st.text(max_size=12))
float_st = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 1.0, 1e12, float("nan"), float("inf")]),
)
enum_st = st.integers(-2, 12)
text_st = st.one_of(st.sampled_from(["", "owner", "p" * 200]), st.text(max_size=20))


def _request(name: str, cls: Any, **fields: Any) -> Any:
    return st.fixed_dictionaries(fields).map(lambda kw: (name, cls(**kw)))


unary_st = st.one_of(
    _request(
        "Lookup", pb.LookupRequest, namespace=ns_st, hashes=chain_st, local_only=st.booleans()
    ),
    _request(
        "Move",
        pb.MoveRequest,
        namespace=ns_st,
        hashes=chain_st,
        tier=enum_st,
        node_id=st.sampled_from(["", "n-fuzz", "n-other"]),
    ),
    _request("Pin", pb.PinRequest, namespace=ns_st, hashes=chain_st, owner=text_st, ttl_s=float_st),
    _request("Unpin", pb.UnpinRequest, namespace=ns_st, hashes=chain_st, owner=text_st),
    _request("Evict", pb.EvictRequest, namespace=ns_st, hashes=chain_st),
    _request("Prefetch", pb.PrefetchRequest, namespace=ns_st, hashes=chain_st, tier=enum_st),
    _request(
        "Annotate",
        pb.AnnotateRequest,
        namespace=ns_st,
        hashes=chain_st,
        block_type=enum_st,
        program_id=text_st,
        ttl_s=float_st,
    ),
    _request(
        "Hint",
        pb.HintRequest,
        program_id=text_st,
        kind=enum_st,
        namespace=ns_st,
        hashes=chain_st,
        step=st.integers(0, 2**32 - 1),
        targets=st.lists(st.sampled_from(["n-x", ""]), max_size=2),
        children=st.integers(0, 2**32 - 1),
        expected_duration_s=float_st,
    ),
    _request("Stats", pb.StatsRequest),
)


@FUZZ
@given(call=unary_st)
def test_unary_calls_get_proper_codes_and_change_nothing(fx: Fixture, call: Any) -> None:
    method, request = call
    try:
        getattr(fx.stub, method)(request, timeout=10)
        event(f"{method}: OK")
    except grpc.RpcError as err:
        event(f"{method}: {err.code().name}")
        assert err.code() in PROPER, (method, err.code(), err.details())
        assert err.details()
    fx.check_unchanged()


# -- Put streams, each broken in at least one way ----------------------------------------
MUTATIONS = [
    "truncate",
    "swap",
    "second_header",
    "no_header",
    "offset",
    "longer",
    "shorter",
    "index",
    "empty",
    "duplicate",
    "bad_header",
    "size_mismatch",
]


@st.composite
def broken_put(draw: st.DrawFn) -> list[pb.PutChunk]:
    n = draw(st.integers(1, 3))
    size = draw(st.integers(1, 48))
    step = draw(st.integers(1, size))
    ns = draw(st.sampled_from([REF_NS, "ns-fuzz-put"]))
    hashes = [draw(st.binary(min_size=32, max_size=32)) for _ in range(n)]
    header = pb.PutHeader(namespace=ns, hashes=hashes, block_bytes=size)
    data = [
        pb.BlockData(block_index=i, offset=o, data=bytes([i + 7]) * min(step, size - o))
        for i in range(n)
        for o in range(0, size, step)
    ]
    mutation = draw(st.sampled_from(MUTATIONS))
    pick = draw(st.integers(0, len(data) - 1))
    if (mutation == "swap" and len(data) < 2) or (
        mutation == "shorter" and len(data[pick].data) < 2
    ):
        mutation = "longer"  # the drawn mutation would leave this stream intact
    if mutation == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "swap":
        other = draw(st.integers(0, len(data) - 1).filter(lambda j: j != pick))
        data[pick], data[other] = data[other], data[pick]
    elif mutation == "offset":
        data[pick].offset += draw(st.integers(1, 100))
    elif mutation == "longer":
        data[pick].data += b"x"
    elif mutation == "shorter":
        data[pick].data = data[pick].data[:-1]
    elif mutation == "index":
        data[pick].block_index = n + draw(st.integers(0, 5))
    elif mutation == "empty":
        data.insert(
            pick,
            pb.BlockData(block_index=data[pick].block_index, offset=data[pick].offset, data=b""),
        )
    elif mutation == "duplicate":
        data.insert(
            pick,
            pb.BlockData(
                block_index=data[pick].block_index, offset=data[pick].offset, data=data[pick].data
            ),
        )
    elif mutation == "bad_header":
        bad = draw(st.sampled_from(["block_bytes", "hash", "namespace", "type"]))
        if bad == "block_bytes":
            header.block_bytes = draw(st.sampled_from([0, 64 * KiB + 1, 2**40]))
        elif bad == "hash":
            header.hashes[draw(st.integers(0, n - 1))] = draw(st.binary(max_size=31))
        elif bad == "namespace":
            header.namespace = draw(st.sampled_from(["", "a/b", "x" * 65]))
        else:
            header.block_type = draw(st.integers(6, 100))
    elif mutation == "size_mismatch":  # a complete stream, but REF_NS blocks are B bytes
        header.namespace = REF_NS
    chunks = [pb.PutChunk(data=d) for d in data]
    if mutation == "second_header":
        chunks.insert(draw(st.integers(0, len(chunks))), pb.PutChunk(header=header))
    if mutation != "no_header":
        chunks.insert(0, pb.PutChunk(header=header))
    return chunks


@FUZZ
@given(chunks=broken_put())
def test_broken_put_streams_are_refused_and_store_nothing(
    fx: Fixture, chunks: list[pb.PutChunk]
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fx.stub.Put(iter(chunks), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    fx.check_unchanged()
    with pytest.raises(grpc.RpcError) as nf:
        fx.stub.Lookup(pb.LookupRequest(namespace="ns-fuzz-put", hashes=[]), timeout=10)
    assert nf.value.code() == grpc.StatusCode.NOT_FOUND  # never even registered
