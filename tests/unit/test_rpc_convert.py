"""Proto <-> domain conversions and wire validation (kvfabric.rpc.convert), no server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvfabric.config import KiB, load_config
from kvfabric.directory.events import Event, EventKind
from kvfabric.errors import InvalidArgument, ResourceExhausted
from kvfabric.hints import HintKind
from kvfabric.node.results import Counters, MoveResult, NamespaceInfo, NodeStats, TierStats
from kvfabric.rpc import convert
from kvfabric.rpc.v1 import kvfabric_pb2 as pb
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier

CFG = load_config(
    overrides={
        "rpc_max_chain": 8,
        "max_block_bytes": "64KiB",
        "cpu_slab_bytes": "64KiB",
        "cpu_arena_bytes": "1MiB",
        "rpc_chunk_bytes": "64KiB",
        "rpc_max_message_bytes": "128KiB",
    },
    env={},
)
H = BlockHash(bytes(range(32)))


def test_tier_is_offset_by_one_and_round_trips() -> None:
    assert convert.tier_from_proto(pb.TIER_GPU) == Tier.GPU == 0
    assert convert.tier_from_proto(pb.TIER_DISK) == Tier.DISK
    assert convert.tier_from_proto(pb.TIER_UNSPECIFIED) is None
    for tier in Tier:
        assert convert.tier_from_proto(convert.tier_to_proto(tier)) == tier
    for bad in (4, 17, -1):
        with pytest.raises(InvalidArgument) as err:
            convert.tier_from_proto(bad)
        assert err.value.field == "tier"


def test_block_types_and_hint_kinds_map_by_name() -> None:
    for bt in BlockType:
        proto = convert.block_type_to_proto(bt)
        assert pb.BlockType.Name(proto) == "BLOCK_TYPE_" + bt.name
        assert convert.block_type_from_proto(proto) == bt
    assert convert.block_type_from_proto(pb.BLOCK_TYPE_UNSPECIFIED) is None
    with pytest.raises(InvalidArgument):
        convert.block_type_from_proto(99)
    for kind in HintKind:
        assert convert.hint_kind_from_proto(pb.HintKind.Value("HINT_KIND_" + kind.name)) == kind
    for bad in (pb.HINT_KIND_UNSPECIFIED, 9, 1000):
        with pytest.raises(InvalidArgument) as err:
            convert.hint_kind_from_proto(bad)
        assert err.value.field == "kind"


def test_hashes_are_32_bytes_and_bounded_by_the_chain_limit() -> None:
    assert convert.hashes([H] * 8, 8) == [H] * 8
    with pytest.raises(InvalidArgument, match=r"limit is 8 \(rpc_max_chain\)") as err:
        convert.hashes([H] * 9, 8)
    assert err.value.field == "hashes"
    with pytest.raises(InvalidArgument, match=r"hashes\[1\] is 31 bytes"):
        convert.hashes([H, H[:31]], 8)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_seconds_accepts_only_finite_non_negative(value: float) -> None:
    if math.isfinite(value) and value >= 0:
        assert convert.seconds(value, "ttl_s") == (value or None)
    else:
        with pytest.raises(InvalidArgument) as err:
            convert.seconds(value, "ttl_s")
        assert err.value.field == "ttl_s"


def test_put_spec_checks_the_header() -> None:
    header = pb.PutHeader(
        namespace="ns",
        hashes=[H, H],
        block_bytes=4 * KiB,
        block_type=pb.BLOCK_TYPE_TOOL_DEFINITION,
        program_id="p",
    )
    spec = convert.put_spec(header, CFG)
    assert spec.block_type == BlockType.TOOL_DEFINITION and spec.program_id == "p"
    assert spec.total_bytes == 8 * KiB
    assert convert.put_spec(pb.PutHeader(namespace="ns", block_bytes=1), CFG).block_type == (
        BlockType.GENERIC
    )
    for bad, field in [
        (pb.PutHeader(namespace="", block_bytes=1), "header.namespace"),
        (pb.PutHeader(namespace="ns", block_bytes=0), "header.block_bytes"),
        (pb.PutHeader(namespace="ns", block_bytes=65 * KiB), "header.block_bytes"),
        (pb.PutHeader(namespace="ns", hashes=[b"x"], block_bytes=1), "header.hashes"),
        (pb.PutHeader(namespace="ns", block_bytes=1, block_type=77), "header.block_type"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            convert.put_spec(bad, CFG)
        assert err.value.field == field
    big = load_config(
        overrides={
            "cpu_arena_bytes": "64KiB",
            "cpu_slab_bytes": "64KiB",
            "max_block_bytes": "64KiB",
        },
        env={},
    )
    with pytest.raises(ResourceExhausted, match="cpu_arena_bytes"):
        convert.put_spec(pb.PutHeader(namespace="ns", hashes=[H, H], block_bytes=64 * KiB), big)


def test_chunk_bytes_is_capped_by_config_and_message_limit() -> None:
    assert convert.chunk_bytes(0, CFG) == 64 * KiB
    assert convert.chunk_bytes(16 * KiB, CFG) == 16 * KiB
    assert convert.chunk_bytes(1 << 30, CFG) == 64 * KiB
    assert convert.chunk_bytes(1, CFG) == convert.MIN_CHUNK_BYTES
    tight = CFG.replace(rpc_max_message_bytes="64KiB")
    assert convert.chunk_bytes(0, tight) < 64 * KiB


def test_hint_from_proto_validates() -> None:
    req = pb.HintRequest(
        program_id="p",
        kind=pb.HINT_KIND_FORK,
        namespace="ns",
        hashes=[H],
        targets=["n-2"],
        children=3,
        expected_duration_s=0,
    )
    hint = convert.hint_from_proto(req, 8)
    assert hint.kind == HintKind.FORK and hint.hashes == (H,) and hint.targets == ("n-2",)
    assert hint.expected_duration_s is None
    for bad in (
        pb.HintRequest(kind=pb.HINT_KIND_FORK),  # no program id
        pb.HintRequest(program_id="p", kind=pb.HINT_KIND_FORK, hashes=[H]),  # no namespace
        pb.HintRequest(program_id="p", kind=pb.HINT_KIND_JOIN, expected_duration_s=math.nan),
        pb.HintRequest(program_id="p", kind=pb.HINT_KIND_JOIN, children=1 << 20),
    ):
        with pytest.raises(InvalidArgument):
            convert.hint_from_proto(bad, 8)


def test_responses() -> None:
    key = BlockKey("ns", H)
    moved = convert.move_response(MoveResult(moved=(key,), missing=(key, key)))
    assert (moved.moved, moved.unchanged, moved.missing, moved.corrupt) == (1, 0, 2, 0)
    stats = NodeStats(
        (TierStats(Tier.CPU, 2, 10, 100),),
        Counters(puts=5, hits=3),
        10,
        1,
        (NamespaceInfo("ns", 5),),
        {"GENERIC": 2},
    )
    msg = convert.stats_response("n-1", "127.0.0.1:1", stats)
    assert msg.tiers[0].tier == pb.TIER_CPU and msg.tiers[0].capacity_bytes == 100
    assert msg.counters["puts"] == 5 and msg.counters["hits"] == 3
    assert set(msg.counters) == set(Counters.__slots__)
    assert msg.blocks_by_type["GENERIC"] == 2 and msg.pinned_blocks == 1
    loc = convert.location("n-1", "a:1", int(Tier.DISK))
    assert loc.tier == pb.TIER_DISK and loc.node_id == "n-1"
    assert convert.put_status("pending") == pb.PUT_STATUS_PENDING


def test_events() -> None:
    committed = convert.event_to_proto(
        Event(7, EventKind.COMMITTED, key=BlockKey("ns", H), node_id="n-1", tier=Tier.DISK)
    )
    assert (committed.seq, committed.kind, committed.namespace) == (7, "COMMITTED", "ns")
    assert committed.hash == H and committed.tier == pb.TIER_DISK
    joined = convert.event_to_proto(Event(8, EventKind.NODE_JOINED, node_id="n-2"))
    assert joined.kind == "NODE_JOINED" and joined.tier == pb.TIER_UNSPECIFIED
    assert joined.hash == b"" and joined.namespace == ""
    removed = convert.event_to_proto(Event(9, EventKind.BLOCK_REMOVED, key=BlockKey("ns", H)))
    assert removed.tier == pb.TIER_UNSPECIFIED  # BLOCK_REMOVED carries no tier


# -- the auth rules (kvfabric.rpc.auth), pure as well ------------------------------------
def test_authorizer_rules() -> None:
    from kvfabric.errors import ConfigError, PermissionDenied, Unauthenticated
    from kvfabric.rpc.auth import Authorizer, parse_tokens

    tokens = parse_tokens({"t-all": "*", "t-a": ["ns-a"], "t-ab": ["ns-b", "*"]})
    auth = Authorizer({**tokens, "t-a2": frozenset({"ns-a"})}, enabled=True)

    def md(value: str) -> list[tuple[str, str]]:
        return [("authorization", value)]

    assert auth.authorize(md("Bearer t-all"), mutating=True).namespaces is None
    assert auth.authorize(md("bearer  t-ab"), mutating=True).namespaces is None
    grant = auth.authorize(md("Bearer t-a"), mutating=True)
    grant.require("ns-a")
    with pytest.raises(PermissionDenied):
        grant.require("ns-b")
    assert auth.authorize(None, mutating=False).allows("ns-b")  # reads open without auth_reads
    for metadata in (
        None,
        md("Bearer nope"),
        md("t-all"),
        md("Bearer "),
        md("Basic t-all"),
        md("Bearer t-all") + md("Bearer t-all"),
    ):
        with pytest.raises(Unauthenticated):
            auth.authorize(metadata, mutating=True)
    with pytest.raises(Unauthenticated):  # a presented token is checked on reads too
        auth.authorize(md("Bearer nope"), mutating=False)
    strict = Authorizer(tokens, enabled=True, auth_reads=True)
    with pytest.raises(Unauthenticated):
        strict.authorize(None, mutating=False)
    off = Authorizer({}, enabled=False)
    assert off.authorize(md("Bearer anything"), mutating=True).namespaces is None
    for bad in ([], {"": "*"}, {"t": "ns"}, {"t": [1]}, {"t": ["a/b"]}, {"t x": "*"}):
        with pytest.raises(ConfigError) as err:
            parse_tokens(bad)
        assert err.value.field == "auth_tokens_file"


def test_put_assembler_refuses_every_malformed_sequence() -> None:
    from kvfabric.rpc.servicer_data import PutAssembler

    spec = convert.PutSpec("ns", [H, H], 8, BlockType.GENERIC, None)
    ok = PutAssembler(spec)
    for i in range(2):
        ok.add(pb.BlockData(block_index=i, offset=0, data=b"abcde"))
        ok.add(pb.BlockData(block_index=i, offset=5, data=b"fgh"))
    assert [bytes(b) for b in ok.finish()] == [b"abcdefgh"] * 2
    bad_sequences = [
        [(0, 0, b"abcd"), (0, 5, b"x")],  # gap
        [(1, 0, b"abcdefgh")],  # block 1 before block 0
        [(2, 0, b"a")],  # index out of range
        [(0, 0, b"abcdefghi")],  # overflow past block_bytes
        [(0, 0, b"")],  # empty chunk
        [(0, 0, b"abcd"), (0, 0, b"abcd")],  # duplicate
    ]
    for seq in bad_sequences:
        asm = PutAssembler(spec)
        with pytest.raises(InvalidArgument):
            for index, offset, data in seq:
                asm.add(pb.BlockData(block_index=index, offset=offset, data=data))
    short = PutAssembler(spec)
    short.add(pb.BlockData(block_index=0, offset=0, data=b"abcdefgh"))
    with pytest.raises(InvalidArgument, match="ended after 8 of 16 bytes"):
        short.finish()


class _Node:
    """The parts of NodeStoreService a Get uses, over a real store with blocks of 16 KiB
    under ``key(0..n-1)`` (those in ``absent`` not stored); ``corrupt`` is flipped at rest."""

    def __init__(self, tmp_path: Path, n: int, absent: tuple[int, ...] = (),
                 corrupt: int | None = None) -> None:  # fmt: skip
        from tests.conftest import NS, block, key, make_store

        self.core, self.node_id, self.address = make_store(tmp_path), "n1", "127.0.0.1:1"
        self.core.register_namespace(NS, 16 * KiB)
        self.keys = [key(i) for i in range(n)]
        for i, k in enumerate(self.keys):
            if i not in absent:
                self.core.put(k, block(i, 16 * KiB))
        if corrupt is not None:
            cpu = self.core.tiers[Tier.CPU]
            offset = cpu.slot_offset(self.keys[corrupt])
            assert offset is not None
            cpu.arena.view[offset + 100] ^= 0x5A

    def pull_missing(self, absent: list[BlockKey]) -> int:
        return 0

    def get(self, **request: object) -> list[bytes]:
        """The serialized messages of a Get of every key."""
        from kvfabric.rpc.servicer_data import Deadline, stream_get
        from tests.conftest import NS

        req = pb.GetRequest(namespace=NS, **request)
        stream = stream_get(self, self.core.config, req, self.keys, Deadline(None, 10.0))
        return [m if isinstance(m, bytes) else m.SerializeToString() for m in stream]


def test_get_stream_sends_verified_blocks_and_never_a_corrupt_one(tmp_path: Path) -> None:
    """Each found block: its header, then its bytes; a block corrupt at rest: a miss only."""
    from kvfabric import integrity
    from kvfabric.rpc.client_data import DataPart, decode_get_chunk
    from tests.conftest import block

    node = _Node(tmp_path, 3, corrupt=1)
    try:
        got = [decode_get_chunk(m) for m in node.get(chunk_bytes=4 * KiB)]
        headers = [(p.block_index, p.found) for p in got if isinstance(p, pb.GetHeader)]
        assert headers == [(0, True), (1, False), (2, True)]
        data = [(p.block_index, p.offset) for p in got if isinstance(p, DataPart)]
        assert data == [(i, off) for i in (0, 2) for off in range(0, 16 * KiB, 4 * KiB)]
        for i in (0, 2):  # each header comes before its bytes, which match its checksum
            first = next(n for n, p in enumerate(got) if isinstance(p, pb.GetHeader)
                         and p.block_index == i)  # fmt: skip
            header, chunks = got[first], got[first + 1 : first + 5]
            assert isinstance(header, pb.GetHeader)
            assert all(isinstance(c, DataPart) and c.block_index == i for c in chunks)
            payload = b"".join(bytes(c.data) for c in chunks if isinstance(c, DataPart))
            assert payload == block(i, 16 * KiB)
            assert header.size == len(payload) and header.checksum == integrity.checksum(payload)
        assert node.core.contains(node.keys) == [Tier.CPU, None, Tier.CPU]  # corrupt: dropped
    finally:
        node.core.close()


def test_inline_headers_ride_on_first_chunks_and_a_corrupt_block_is_a_lone_miss(
    tmp_path: Path,
) -> None:
    from kvfabric import integrity
    from kvfabric.rpc.client_data import DataPart, decode_get_chunk
    from tests.conftest import block

    node = _Node(tmp_path, 3, corrupt=1)
    try:
        raw = node.get(chunk_bytes=4 * KiB, inline_headers=True)
        got = [decode_get_chunk(m) for m in raw]
        alone = [(p.block_index, p.found) for p in got if isinstance(p, pb.GetHeader)]
        assert alone == [(1, False)]
        assert len(got) == 4 + 1 + 4  # no header message of its own for a found block
        for i, first in ((0, 0), (2, 5)):
            part = got[first]
            assert isinstance(part, DataPart) and part.header is not None
            assert pb.GetChunk.FromString(raw[first]).block_header == part.header
            assert (part.header.block_index, part.header.found, part.header.size) == (
                i, True, 16 * KiB)  # fmt: skip
            assert part.header.checksum == integrity.checksum(block(i, 16 * KiB))
            assert all(isinstance(p, DataPart) and p.header is None
                       for p in got[first + 1 : first + 4])  # fmt: skip
        assert node.core.contains(node.keys) == [Tier.CPU, None, Tier.CPU]
    finally:
        node.core.close()


def test_batched_headers_come_in_one_message_in_order(tmp_path: Path) -> None:
    from kvfabric.errors import Corrupt
    from kvfabric.rpc.client_data import decode_get_chunk

    node = _Node(tmp_path, 4, absent=(2,))
    try:
        one = node.get(data_plane=True, batch_headers=True)
        each = node.get(data_plane=True)
        assert len(one) == 1 and len(each) == 4
        batch = decode_get_chunk(one[0])
        assert isinstance(batch, list)
        assert batch == [decode_get_chunk(m) for m in each]  # the same headers, in order
        assert [(h.block_index, h.found) for h in batch] == [(0, True), (1, True), (2, False),
                                                             (3, True)]  # fmt: skip
        both = pb.GetChunk(header=batch[0], headers=batch[1:]).SerializeToString()
        with pytest.raises(Corrupt, match="batch of headers and a part"):
            decode_get_chunk(both)
    finally:
        node.core.close()


def test_unreadable_or_malformed_files_are_config_errors(tmp_path: Path) -> None:
    from kvfabric.errors import ConfigError
    from kvfabric.rpc.auth import load_tokens
    from kvfabric.rpc.server import server_credentials

    bad = tmp_path / "auth.json"
    texts = ['{"sekrit": ', '["a list"]', '{"sekrit": [1]}', '{"sekrit": ["a/b"]}', '{"s x": "*"}']
    for text in [*texts, None]:
        if text is not None:
            bad.write_text(text)
        path = bad if text is not None else tmp_path / "absent.json"
        with pytest.raises(ConfigError) as err:
            load_tokens(CFG.replace(auth_tokens_file=str(path)))
        assert err.value.field == "auth_tokens_file" and "sekrit" not in err.value.message
    bad.write_text('{"sekrit": ["ns-a"], "all": "*"}')
    tokens = load_tokens(CFG.replace(auth_tokens_file=str(bad), auth_token="root"))
    assert tokens == {"sekrit": frozenset({"ns-a"}), "all": None, "root": None}
    for field in ("tls_cert_file", "tls_client_ca_file"):
        (tmp_path / "c.pem").write_bytes(b"cert")
        files = {"tls_cert_file": str(tmp_path / "c.pem"), "tls_key_file": str(tmp_path / "c.pem")}
        files[field] = str(tmp_path / "missing.pem")
        with pytest.raises(ConfigError) as err:
            server_credentials(CFG.replace(**files))
        assert err.value.field == field
