"""Conversions between the kvfabric.v1 protobuf messages and kvfabric's domain types.

Everything that arrives over the wire is checked here, once, before the node
store sees it: a bad value raises :class:`~kvfabric.errors.InvalidArgument`
naming the request field and the limit. Two offsets to keep in mind:

* the proto ``Tier`` enum reserves 0 for ``TIER_UNSPECIFIED``, so
  ``TIER_GPU = 1`` is the domain's ``Tier.GPU = 0`` (proto = domain + 1);
* proto ``BLOCK_TYPE_<NAME>`` / ``HINT_KIND_<NAME>`` map to the domain enum
  member ``<NAME>`` by name, never by number.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvfabric.config import KVFabricConfig
from kvfabric.directory.events import EVENT_FIELDS, Event
from kvfabric.errors import InvalidArgument, ResourceExhausted
from kvfabric.hints import HintKind, ProgramHint
from kvfabric.node.results import MoveResult, NodeStats
from kvfabric.rpc.v1 import kvfabric_pb2 as pb
from kvfabric.types import (
    BLOCK_HASH_BYTES,
    BlockHash,
    BlockMeta,
    BlockType,
    Tier,
    validate_namespace,
    validate_program_id,
)

MIN_CHUNK_BYTES = 4096
"""Smallest chunk the server streams, whatever the client prefers (bounds messages per block)."""

_MESSAGE_OVERHEAD = 1024
"""Room left in a message for everything but a chunk's bytes."""

_PUT_STATUS = {
    "stored": pb.PUT_STATUS_STORED,
    "exists": pb.PUT_STATUS_EXISTS,
    "pending": pb.PUT_STATUS_PENDING,
}


# -- scalars ---------------------------------------------------------------------------
def namespace(value: str, field: str = "namespace") -> str:
    """A validated namespace id (non-empty printable ASCII without '/')."""
    return validate_namespace(value, field)


def hashes(values: Sequence[bytes], max_chain: int, field: str = "hashes") -> list[BlockHash]:
    """A validated hash chain: at most ``max_chain`` hashes of exactly 32 bytes each."""
    if len(values) > max_chain:
        raise InvalidArgument(
            f"{field} has {len(values)} hashes; the limit is {max_chain} (rpc_max_chain)", field
        )
    out: list[BlockHash] = []
    for i, h in enumerate(values):
        if len(h) != BLOCK_HASH_BYTES:
            raise InvalidArgument(
                f"{field}[{i}] is {len(h)} bytes; every hash must be {BLOCK_HASH_BYTES} bytes",
                field,
            )
        out.append(BlockHash(bytes(h)))
    return out


def seconds(value: float, field: str) -> float | None:
    """A finite, non-negative duration; 0 means "not set" and becomes None."""
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field}={value!r} must be a finite number >= 0 seconds", field)
    return value if value > 0 else None


def optional_text(value: str) -> str | None:
    """Proto3 has no absent strings: the empty string means "not set"."""
    return value or None


# -- enums -----------------------------------------------------------------------------
def tier_from_proto(value: int, field: str = "tier") -> int | None:
    """The domain tier (0 GPU, 1 CPU, 2 DISK) of a proto ``Tier``; None for UNSPECIFIED."""
    if value == pb.TIER_UNSPECIFIED:
        return None
    if value not in (pb.TIER_GPU, pb.TIER_CPU, pb.TIER_DISK):
        raise InvalidArgument(
            f"{field}={value} is not a known Tier (TIER_GPU=1, TIER_CPU=2, TIER_DISK=3)", field
        )
    return int(value) - 1


_TIER_TO_PROTO: dict[int, Any] = {int(t): pb.Tier.Value("TIER_" + t.name) for t in Tier}


def tier_to_proto(tier: int) -> pb.Tier:
    """The proto ``Tier`` of a domain tier (a table lookup: this is on the Lookup hot path)."""
    value: pb.Tier = _TIER_TO_PROTO[int(tier)]
    return value


def block_type_from_proto(value: int, field: str = "block_type") -> BlockType | None:
    """The domain :class:`BlockType` of a proto ``BlockType``; None for UNSPECIFIED."""
    if value == pb.BLOCK_TYPE_UNSPECIFIED:
        return None
    try:
        name = pb.BlockType.Name(value)
    except ValueError:
        raise InvalidArgument(f"{field}={value} is not a known BlockType", field) from None
    return BlockType[name.removeprefix("BLOCK_TYPE_")]


def block_type_to_proto(block_type: BlockType) -> pb.BlockType:
    """The proto ``BlockType`` of a domain block type."""
    value: pb.BlockType = pb.BlockType.Value("BLOCK_TYPE_" + block_type.name)
    return value


def hint_kind_from_proto(value: int, field: str = "kind") -> HintKind:
    """The domain :class:`HintKind` of a proto ``HintKind`` (UNSPECIFIED is refused)."""
    name = pb.HintKind.Name(value) if value in pb.HintKind.values() else ""
    if value == pb.HINT_KIND_UNSPECIFIED or not name:
        raise InvalidArgument(f"{field}={value} must name a known HintKind", field)
    return HintKind[name.removeprefix("HINT_KIND_")]


def put_status(status: str) -> pb.PutStatus:
    """The proto ``PutStatus`` of a :class:`~kvfabric.node.service.PutOutcome` status."""
    return _PUT_STATUS.get(status, pb.PUT_STATUS_UNSPECIFIED)


# -- requests --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PutSpec:
    """A validated Put header: what the chunks that follow must fill."""

    namespace: str
    hashes: list[BlockHash]
    block_bytes: int
    block_type: BlockType
    program_id: str | None

    @property
    def total_bytes(self) -> int:
        """Bytes the whole call carries."""
        return len(self.hashes) * self.block_bytes


def put_spec(header: pb.PutHeader, config: KVFabricConfig) -> PutSpec:
    """Validate a Put header against the server's limits."""
    ns = namespace(header.namespace, "header.namespace")
    chain = hashes(header.hashes, config.rpc_max_chain, "header.hashes")
    if not 0 < header.block_bytes <= config.max_block_bytes:
        raise InvalidArgument(
            f"header.block_bytes={header.block_bytes} is outside 1..{config.max_block_bytes} "
            "(max_block_bytes)",
            "header.block_bytes",
        )
    total = len(chain) * header.block_bytes
    if total > config.cpu_arena_bytes:
        # The server holds a whole Put in memory before storing it: bound it.
        raise ResourceExhausted(
            f"a Put of {len(chain)} blocks x {header.block_bytes} bytes = {total} bytes exceeds "
            f"cpu_arena_bytes={config.cpu_arena_bytes}; split it into smaller calls",
            "header.hashes",
        )
    block_type = block_type_from_proto(header.block_type, "header.block_type")
    program_id = validate_program_id(optional_text(header.program_id), "header.program_id")
    return PutSpec(ns, chain, header.block_bytes, block_type or BlockType.GENERIC, program_id)


def chunk_bytes(requested: int, config: KVFabricConfig) -> int:
    """Chunk size of a streamed Get: the client's preference, capped by the server's limits."""
    size = min(requested or config.rpc_chunk_bytes, config.rpc_chunk_bytes)
    size = min(size, config.rpc_max_message_bytes - _MESSAGE_OVERHEAD)
    return max(size, MIN_CHUNK_BYTES)


def hint_from_proto(req: pb.HintRequest, max_chain: int) -> ProgramHint:
    """A validated :class:`ProgramHint` from a HintRequest."""
    chain = hashes(req.hashes, max_chain)
    if req.namespace or chain:
        namespace(req.namespace)
    return ProgramHint(
        program_id=req.program_id,
        kind=hint_kind_from_proto(req.kind),
        namespace=req.namespace,
        hashes=tuple(chain),
        step=req.step,
        targets=tuple(req.targets),
        children=req.children,
        expected_duration_s=seconds(req.expected_duration_s, "expected_duration_s"),
    )


# -- responses -------------------------------------------------------------------------
def location(node_id: str, address: str, tier: int) -> pb.Location:
    """One replica's place (``tier`` is a domain tier)."""
    return pb.Location(node_id=node_id, address=address, tier=tier_to_proto(tier))


def locations(places: list[tuple[str, str, int]]) -> list[pb.Location]:
    """Messages for many places; a chain's blocks mostly share a few, built once each."""
    built: dict[tuple[str, str, int], pb.Location] = {}
    return [built.get(p) or built.setdefault(p, location(*p)) for p in places]


def move_response(result: MoveResult) -> pb.MoveResponse:
    """Counts of a move or prefetch."""
    return pb.MoveResponse(
        moved=len(result.moved),
        unchanged=len(result.unchanged),
        missing=len(result.missing),
        corrupt=len(result.corrupt),
    )


def stats_response(
    node_id: str, address: str, stats: NodeStats, extra_counters: dict[str, int] | None = None,
    allowed: Callable[[str], bool] = lambda ns: True,
) -> pb.StatsResponse:  # fmt: skip
    """A node's statistics; ``counters`` holds every field of ``NodeStats.counters`` and
    ``extra_counters`` (the node's telemetry); ``namespaces`` those ``allowed``."""
    counters = {
        f.name: int(getattr(stats.counters, f.name)) for f in dataclasses.fields(stats.counters)
    }
    for name, value in (extra_counters or {}).items():
        # The core's own counters are live; the telemetry's copies of them (same name, no
        # labels) are snapshots refreshed every metrics interval, so they never override.
        counters.setdefault(name, value)
    return pb.StatsResponse(
        node_id=node_id,
        address=address,
        tiers=[
            pb.TierStats(
                tier=tier_to_proto(t.tier),
                blocks=t.blocks,
                used_bytes=t.used_bytes,
                capacity_bytes=t.capacity_bytes,
            )
            for t in stats.tiers
        ],
        counters=counters,
        pinned_bytes=stats.pinned_bytes,
        pinned_blocks=stats.pinned_blocks,
        blocks_by_type=dict(stats.blocks_by_type),
        bytes_by_type=dict(stats.bytes_by_type),
        namespaces=[
            pb.NamespaceStats(namespace=n.id, block_bytes=n.block_bytes)
            for n in stats.namespaces
            if allowed(n.id)
        ],
    )


def block_info(meta: BlockMeta, now: float) -> pb.BlockInfo:
    """One listed block; ``now`` is on the node store's clock (idle time)."""
    return pb.BlockInfo(
        namespace=meta.key.namespace,
        hash=bytes(meta.key.hash),
        tier=tier_to_proto(meta.tier),
        block_type=block_type_to_proto(meta.type),
        program_id=meta.program_id or "",
        size=meta.size,
        pins=sum(p.count for p in meta.pins.values()),
        pin_owners=sorted(meta.pins),
        idle_s=max(now - meta.last_access, 0.0),
        access_count=meta.access_count,
    )


def event_to_proto(event: Event) -> pb.Event:
    """A directory event; ``tier`` is set only for the kinds that carry one."""
    has_tier = "tier" in EVENT_FIELDS[event.kind]
    return pb.Event(
        seq=event.seq,
        kind=event.kind.name,
        namespace=event.key.namespace if event.key is not None else "",
        hash=bytes(event.key.hash) if event.key is not None else b"",
        node_id=event.node_id,
        tier=tier_to_proto(event.tier) if has_tier else pb.TIER_UNSPECIFIED,
    )
