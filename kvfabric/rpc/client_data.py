"""What the Python client returns, and how it converts to and from the wire.

* Typed results: frozen dataclasses and enums, never protobuf messages, so
  callers do not depend on the generated code.
* Enum conversions: the proto enums are offset by one from the Python ones
  (``TIER_GPU = 1`` is ``Tier.GPU = 0``); conversions go by name.
* :func:`error_from_rpc`: a ``grpc.RpcError`` becomes the typed
  :mod:`kvfabric.errors` class of its status code, keeping the server's
  message, so callers catch domain errors.
* The bulk codec: ``PutChunk``/``GetChunk`` messages that carry block bytes
  are encoded and decoded here by hand (protobuf wire format, proto3 rules),
  because the generated classes copy a payload several times and refuse a
  ``memoryview``: :func:`encode_data_chunk` copies the caller's slice once, into
  the message, and :func:`decode_get_chunk` returns the payload as a view of
  the received message. Header messages go through the generated classes.
* :class:`BlockGetter`: one attempt of a get — headers over gRPC, bytes over
  the data plane, streamed chunks where the data plane cannot be reached.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import grpc

from kvfabric import errors, integrity
from kvfabric.errors import (
    Corrupt,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KVFabricError,
    Unavailable,
)
from kvfabric.hints import HintKind
from kvfabric.node.results import TierStats
from kvfabric.rpc.v1 import kvfabric_pb2 as pb
from kvfabric.transfer.reader import MAX_BLOCK_BYTES, BlockReader
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Location:
    """Where one replica of a block lives: a node, its data-plane address and the tier."""

    node_id: str
    address: str
    tier: Tier | None  # None when the server did not say


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The longest stored prefix of a chain and the best replica of each matched block."""

    matched: int
    locations: tuple[Location, ...] = ()


class PutStatus(Enum):
    """Outcome of one block of a put."""

    STORED = "stored"  # stored by this call
    EXISTS = "exists"  # already stored in the cluster; bytes unchanged
    PENDING = "pending"  # another writer is storing it now


@dataclass(frozen=True, slots=True)
class MoveCounts:
    """Outcome of a move or prefetch: how many blocks moved, stayed, were absent or corrupt."""

    moved: int = 0
    unchanged: int = 0
    missing: int = 0
    corrupt: int = 0


@dataclass(frozen=True, slots=True)
class PinCounts:
    """How many blocks a pin reached, how many were absent, and the bytes newly pinned."""

    pinned: int = 0
    missing: int = 0
    new_bytes: int = 0
    missing_indexes: tuple[int, ...] = ()  # positions in the call of the absent blocks


@dataclass(frozen=True, slots=True)
class HintResult:
    """Whether the node took a hint, and how many blocks a fork copied to its targets."""

    accepted: bool
    copied: int = 0


@dataclass(frozen=True, slots=True)
class Stats:
    """A node's statistics as served by ``Stats``."""

    node_id: str
    address: str
    tiers: tuple[TierStats, ...]
    counters: dict[str, int] = field(default_factory=dict)
    pinned_bytes: int = 0
    pinned_blocks: int = 0
    blocks_by_type: dict[str, int] = field(default_factory=dict)
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    namespaces: dict[str, int] = field(default_factory=dict)  # namespace -> block bytes


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One block a node holds, as listed by ``ListBlocks``."""

    namespace: str
    hash: bytes
    tier: Tier | None
    block_type: BlockType | None
    program_id: str | None
    size: int
    pins: int
    pin_owners: tuple[str, ...]
    idle_s: float
    access_count: int


@dataclass(frozen=True, slots=True)
class BlockPage:
    """One page of a listing; ``next_page_token`` is empty on the last page."""

    node_id: str
    blocks: tuple[BlockInfo, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Event:
    """One directory event: ``kind`` is the event's name (e.g. ``"COMMITTED"``)."""

    seq: int
    kind: str
    namespace: str = ""
    hash: bytes = b""
    node_id: str = ""
    tier: Tier | None = None


# -- enums -----------------------------------------------------------------------------------
def tier_to_pb(tier: Tier | int | None) -> str:
    """The proto name of a tier (None: TIER_UNSPECIFIED); InvalidArgument for an unknown one."""
    if tier is None:
        return "TIER_UNSPECIFIED"
    try:
        return f"TIER_{Tier(tier).name}"
    except (ValueError, TypeError):
        raise InvalidArgument(
            f"unknown tier {tier!r}; tiers are 0 GPU, 1 CPU, 2 DISK", "tier"
        ) from None


_TIERS: dict[int, Tier] = {int(pb.Tier.Value(f"TIER_{t.name}")): t for t in Tier}


def tier_from_pb(value: int) -> Tier | None:
    """The tier of a proto value; None for TIER_UNSPECIFIED or a value this client lacks."""
    return _TIERS.get(value)


def locations_from_pb(items: Any) -> tuple[Location, ...]:
    """Typed locations; equal ones share one object (a chain's blocks mostly share a node)."""
    seen: dict[tuple[str, str, int], Location] = {}
    out = []
    for x in items:
        k = (x.node_id, x.address, x.tier)
        loc = seen.get(k)
        if loc is None:
            loc = seen[k] = Location(k[0], k[1], _TIERS.get(k[2]))
        out.append(loc)
    return tuple(out)


def block_type_to_pb(block_type: BlockType | None) -> str:
    """The proto name of a block type (None: BLOCK_TYPE_UNSPECIFIED)."""
    if block_type is None:
        return "BLOCK_TYPE_UNSPECIFIED"
    if not isinstance(block_type, BlockType):
        raise InvalidArgument(f"unknown block type {block_type!r}", "block_type")
    return f"BLOCK_TYPE_{block_type.name}"


def hint_kind_to_pb(kind: HintKind) -> str:
    """The proto name of a hint kind."""
    return f"HINT_KIND_{kind.name}"


_PUT_STATUS: dict[int, PutStatus] = {
    pb.PUT_STATUS_STORED: PutStatus.STORED,
    pb.PUT_STATUS_EXISTS: PutStatus.EXISTS,
    pb.PUT_STATUS_PENDING: PutStatus.PENDING,
}


def put_status_from_pb(value: int) -> PutStatus:
    """A put status; Corrupt for one the contract does not define."""
    status = _PUT_STATUS.get(value)
    if status is None:
        raise Corrupt(f"server answered an unknown put status {value}", "statuses")
    return status


def stats_from_pb(r: pb.StatsResponse) -> Stats:
    """Typed statistics from a StatsResponse."""
    tiers = tuple(
        TierStats(t, s.blocks, s.used_bytes, s.capacity_bytes)
        for s in r.tiers
        if (t := tier_from_pb(s.tier)) is not None
    )
    return Stats(r.node_id, r.address, tiers, dict(r.counters), r.pinned_bytes,
                 r.pinned_blocks, dict(r.blocks_by_type), dict(r.bytes_by_type),
                 {n.namespace: n.block_bytes for n in r.namespaces})  # fmt: skip


def block_page_from_pb(r: pb.ListBlocksResponse) -> BlockPage:
    """A typed page of listed blocks."""
    types = {int(pb.BlockType.Value(f"BLOCK_TYPE_{t.name}")): t for t in BlockType}
    blocks = tuple(
        BlockInfo(
            b.namespace, bytes(b.hash), tier_from_pb(b.tier), types.get(b.block_type),
            b.program_id or None, b.size, b.pins, tuple(b.pin_owners), b.idle_s, b.access_count,
        )
        for b in r.blocks
    )  # fmt: skip
    return BlockPage(r.node_id, blocks, r.next_page_token)


def event_from_pb(e: pb.Event) -> Event:
    """A typed event."""
    return Event(e.seq, e.kind, e.namespace, e.hash, e.node_id, tier_from_pb(e.tier))


# -- errors ----------------------------------------------------------------------------------

FIELD_METADATA_KEY = "kvfabric-field"  # trailing metadata naming the offending field, if sent


def error_from_rpc(exc: Any) -> KVFabricError:
    """The typed error of a ``grpc.RpcError`` (its status code), with the server's message."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    name = getattr(code, "name", "UNKNOWN")
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    message = details or f"RPC failed with {name}"
    field_name: str | None = None
    trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else ()
    for k, v in trailing or ():
        if k == FIELD_METADATA_KEY and isinstance(v, str):
            field_name = v
    cls = errors.BY_CODE.get(name)
    if cls is None:
        err = KVFabricError(message, field_name)
        err.code = name  # keep the status (e.g. INTERNAL, CANCELLED) for the caller to see
        return err
    return cls(message, field_name)


# -- the bulk codec --------------------------------------------------------------------------
class DataPart(NamedTuple):
    """A decoded ``BlockData``: ``data`` is a view into the received message.

    ``header`` is the block's header when it rode on this message
    (``GetChunk.block_header``, sent for ``inline_headers``).
    """

    block_index: int
    offset: int
    data: memoryview
    header: pb.GetHeader | None = None


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise Corrupt("malformed varint in a GetChunk", "response")


def _fields(buf: memoryview, pos: int, end: int) -> list[tuple[int, int, int, int]]:
    """``(number, wire_type, value_or_start, stop)`` of each field in ``buf[pos:end]``."""
    out = []
    while pos < end:
        tag, pos = _read_varint(buf, pos, end)
        number, kind = tag >> 3, tag & 7
        if kind == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            out.append((number, kind, value, pos))
        elif kind == _LEN:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise Corrupt("truncated field in a GetChunk", "response")
            out.append((number, kind, pos, pos + n))
            pos += n
        elif kind in (_I64, _I32):
            pos += 8 if kind == _I64 else 4
            if pos > end:
                raise Corrupt("truncated field in a GetChunk", "response")
        else:
            raise Corrupt(f"unsupported wire type {kind} in a GetChunk", "response")
    return out


def decode_get_chunk(raw: bytes) -> pb.GetHeader | DataPart | list[pb.GetHeader] | None:
    """Decode one serialized ``GetChunk``: its header, its data (zero-copy), the batch of
    headers it carries (``batch_headers``), or None if empty.

    As protobuf does for a ``oneof``, the part that comes last wins; an inline
    ``block_header`` comes back on the data part.
    """
    view = memoryview(raw)
    part: pb.GetHeader | DataPart | None = None
    inline: pb.GetHeader | None = None
    batch: list[pb.GetHeader] = []
    for number, kind, start, stop in _fields(view, 0, len(view)):
        if kind != _LEN:
            continue
        if number == 4:
            batch.append(pb.GetHeader.FromString(bytes(view[start:stop])))
        elif number == 3:
            inline = pb.GetHeader.FromString(bytes(view[start:stop]))
        elif number == 1:
            part = pb.GetHeader.FromString(bytes(view[start:stop]))
        elif number == 2:
            index = offset = 0
            data = view[0:0]
            for n, k, a, b in _fields(view, start, stop):
                if n == 1 and k == _VARINT:
                    index = a
                elif n == 2 and k == _VARINT:
                    offset = a
                elif n == 3 and k == _LEN:
                    data = view[a:b]
            part = DataPart(index & 0xFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF, data)
    if batch:
        if part is not None:
            raise Corrupt("a GetChunk carries a batch of headers and a part", "response")
        return batch
    if isinstance(part, DataPart) and inline is not None:
        return part._replace(header=inline)
    return part


# -- the get path ----------------------------------------------------------------------------
_GET = "/kvfabric.v1.KVFabric/Get"


class _Block:
    """One requested block while a Get stream is read: its header, buffer and bytes so far.

    The checksum is computed while the bytes land, not after the stream: a
    block that comes in one message is copied and checksummed in one native
    pass; one in several chunks is too, chunk by chunk, into a streaming XXH3
    (equal to XXH3 of the whole block).
    """

    __slots__ = ("buf", "digest", "hasher", "header", "received")

    def __init__(self, header: pb.GetHeader, buf: memoryview | None) -> None:
        self.header, self.buf, self.received = header, buf, 0
        self.digest: int | None = None
        self.hasher: Any = None


class BlockGetter:
    """One attempt of a get: headers by gRPC, bytes by the data plane or streamed chunks.

    ``get`` returns, per hash, the buffer holding the verified block (the
    caller's ``dsts[i]``, or a new bytearray when ``dsts`` is None) or None for
    a miss. Blocks whose data-plane address cannot be read are streamed over
    gRPC instead, and that address is skipped for ``down_s`` seconds (no
    connect attempt per call to a dead or unroutable address). The whole
    attempt is bounded by ``timeout_s``.
    """

    def __init__(
        self, channel: Any, metadata: tuple[tuple[str, str], ...], reader: BlockReader,
        chunk_bytes: int, down_s: float = 10.0,
    ) -> None:  # fmt: skip
        self._call = channel.unary_stream(
            _GET, request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=decode_get_chunk,
        )  # fmt: skip
        self._metadata, self._reader, self._chunk_bytes = metadata, reader, chunk_bytes
        self._down_s = down_s
        self._down: dict[str, float] = {}  # address -> monotonic time to try it again
        self._lock = threading.Lock()

    def get(
        self, namespace: str, hashes: list[BlockHash], dsts: list[memoryview] | None,
        timeout_s: float, data_plane: bool,
    ) -> list[memoryview | None]:  # fmt: skip
        """Verified buffers (None: miss) of ``hashes``; see the class docstring."""
        deadline = time.monotonic() + timeout_s
        if not hashes:
            return []
        blocks = self._stream(namespace, hashes, dsts, deadline, data_plane)
        out = [b.buf if _verified(b) else None for b in blocks]
        if not data_plane:
            return out
        by_address: dict[str, list[int]] = {}
        fallback: list[int] = []
        for i, b in enumerate(blocks):
            if b.buf is not None and not b.received:  # found, bytes not streamed
                address = b.header.location.address
                usable = address and not self._is_down(address)
                (by_address.setdefault(address, []) if usable else fallback).append(i)
        for address, idx in by_address.items():
            keys = [BlockKey(namespace, hashes[i]) for i in idx]
            bufs = [blocks[i].buf for i in idx]
            sums = [blocks[i].header.checksum for i in idx]
            try:
                ok = self._reader.read(address, keys, bufs, sums, timeout_s=_left(deadline))
            except (Unavailable, Corrupt, FailedPrecondition) as exc:
                _left(deadline)  # DeadlineExceeded rather than a fallback with no time left
                log.warning("data plane at %s unusable (%s); streaming over gRPC for %.0f s",
                            address, exc, self._down_s)  # fmt: skip
                with self._lock:
                    self._down[address] = time.monotonic() + self._down_s
                fallback += idx
                continue
            for i, good in zip(idx, ok, strict=True):
                out[i] = blocks[i].buf if good else None
        if fallback:
            fallback.sort()
            landing = [buf for i in fallback if (buf := blocks[i].buf) is not None]
            again = self._stream(namespace, [hashes[i] for i in fallback], landing, deadline, False)
            for i, b in zip(fallback, again, strict=True):
                out[i] = b.buf if _verified(b) else None
        return out

    def _is_down(self, address: str) -> bool:
        with self._lock:
            until = self._down.get(address)
            if until is not None and until <= time.monotonic():
                del self._down[address]
                until = None
        return until is not None

    def _stream(
        self, namespace: str, hashes: list[BlockHash], dsts: list[memoryview] | None,
        deadline: float, data_plane: bool,
    ) -> list[_Block]:  # fmt: skip
        """Read one Get stream: every header, and the chunks of the blocks it streams."""
        request = pb.GetRequest(namespace=namespace, hashes=hashes, data_plane=data_plane,
                                chunk_bytes=self._chunk_bytes, inline_headers=True,
                                batch_headers=data_plane)  # fmt: skip
        call = self._call(request, timeout=_left(deadline), metadata=self._metadata)
        blocks: list[_Block] = []
        try:
            for part in call:
                if isinstance(part, list):
                    for h in part:
                        blocks.append(_new_block(h, len(blocks), len(hashes), dsts))
                elif isinstance(part, DataPart):
                    if part.header is not None:
                        blocks.append(_new_block(part.header, len(blocks), len(hashes), dsts))
                    _land(blocks, part)
                elif part is not None:
                    blocks.append(_new_block(part, len(blocks), len(hashes), dsts))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()
        if len(blocks) != len(hashes):
            raise Corrupt(f"Get answered {len(blocks)} headers for {len(hashes)} hashes",
                          "response")  # fmt: skip
        return blocks


def _verified(b: _Block) -> bool:
    """Found, and its streamed bytes are complete and match the header's checksum."""
    if b.buf is None or not b.received:
        return False
    if b.received == len(b.buf) and b.digest == b.header.checksum:
        return True
    log.warning("streamed block %d failed its size or checksum check; a miss",
                b.header.block_index)  # fmt: skip
    return False


def _new_block(h: pb.GetHeader, index: int, count: int, dsts: list[memoryview] | None) -> _Block:
    if h.block_index != index or index >= count:
        raise Corrupt(f"Get header {h.block_index} out of order (expected {index})", "response")
    if not h.found:
        return _Block(h, None)
    if not 0 < h.size <= MAX_BLOCK_BYTES:
        raise Corrupt(f"Get header announces a block of {h.size} bytes", "size")
    if dsts is None:
        return _Block(h, memoryview(bytearray(h.size)))
    if len(dsts[index]) != h.size:
        raise InvalidArgument(f"dsts[{index}] holds {len(dsts[index])} bytes; the block has "
                              f"{h.size}", "dsts")  # fmt: skip
    return _Block(h, dsts[index])


def _land(blocks: list[_Block], part: DataPart) -> None:
    """Copy one streamed chunk into its block's buffer; chunks must come in order."""
    b = blocks[-1] if blocks else None
    n = len(part.data)
    if (
        b is None or b.buf is None or part.block_index != b.header.block_index
        or part.offset != b.received or b.received + n > len(b.buf)
    ):  # fmt: skip
        raise Corrupt(f"Get chunk of block {part.block_index} at {part.offset} out of order",
                      "response")  # fmt: skip
    if n == len(b.buf):  # the whole block: copy and checksum in one pass, without the GIL
        (b.digest,) = integrity.copy_many_with_checksum([b.buf], [part.data])
        b.received = n
        return
    if b.hasher is None:
        b.hasher = integrity.StreamingChecksum()
    # One pass: copied into place and hashed while in cache (GIL released for
    # large pieces, so gRPC's threads keep going).
    b.hasher.copy(b.buf[b.received : b.received + n], part.data)
    b.received += n
    if b.received == len(b.buf):
        b.digest = b.hasher.intdigest()


def _left(deadline: float) -> float:
    """Seconds before ``deadline``; DeadlineExceeded once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the get ran out of time", "timeout_s")
    return left
