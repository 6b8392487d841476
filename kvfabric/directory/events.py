"""Directory events and their byte encoding (the unit of the durable log).

Every change to the directory index is one :class:`Event` with a sequence
number one above the previous event's; ``DirectoryCore.apply`` is the only
code that mutates the index, so a snapshot plus the events after it rebuild
the index exactly.

An event is encoded as a msgpack array ``[version, seq, kind, *fields]``
where ``fields`` are, in the order of :data:`EVENT_FIELDS`, the fields that
``kind`` carries (a key as ``[namespace, hash]``, enums as ints). The
encoding is deterministic: equal events give equal bytes.

A snapshot is framed as ``magic "KVDS" | version u16 | seq u64 | CRC-32 u32 |
msgpack body`` (big-endian), so the log can read its sequence number and
check it without decoding the body.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack  # type: ignore[import-untyped]

from kvfabric.errors import Corrupt, KVFabricError
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier

EVENT_VERSION = 1
SNAPSHOT_MAGIC = b"KVDS"
SNAPSHOT_VERSION = 1
_SNAP_HEADER = struct.Struct(">4sHQI")


class EventKind(IntEnum):
    """What an event changes; the fields each kind carries are in :data:`EVENT_FIELDS`."""

    NODE_JOINED = 1
    NODE_LEFT = 2
    CLAIMED = 3
    ABORTED = 4
    COMMITTED = 5
    REPLICA_ADDED = 6
    REPLICA_REMOVED = 7
    BLOCK_REMOVED = 8
    PINS_CHANGED = 9


EVENT_FIELDS: dict[EventKind, tuple[str, ...]] = {
    EventKind.NODE_JOINED: ("node_id", "address", "tiers"),
    EventKind.NODE_LEFT: ("node_id",),
    EventKind.CLAIMED: ("key", "node_id", "writer_id", "size", "deadline"),
    EventKind.ABORTED: ("key", "node_id", "writer_id"),
    EventKind.COMMITTED: (
        "key", "node_id", "tier", "size", "checksum", "block_type", "program_id",
    ),
    EventKind.REPLICA_ADDED: ("key", "node_id", "tier"),
    EventKind.REPLICA_REMOVED: ("key", "node_id"),
    EventKind.BLOCK_REMOVED: ("key",),
    EventKind.PINS_CHANGED: ("key", "node_id", "pins"),
}  # fmt: skip
"""The fields each kind carries; the others keep their defaults."""


@dataclass(frozen=True, slots=True)
class Event:
    """One change to the directory index.

    Only the fields of :data:`EVENT_FIELDS` ``[kind]`` are meaningful.
    ``deadline`` of CLAIMED is on the clock of the directory that issued it.
    ABORTED also records a claim's expiry or its release when its node left.
    """

    seq: int
    kind: EventKind
    key: BlockKey | None = None
    node_id: str = ""
    address: str = ""
    tiers: tuple[Tier, ...] = ()
    writer_id: str = ""
    size: int = 0
    deadline: float = 0.0
    tier: Tier = Tier.GPU
    checksum: int = 0
    block_type: BlockType = BlockType.GENERIC
    program_id: str | None = None
    pins: int = 0

    @property
    def block_key(self) -> BlockKey:
        """The key of a block event (every kind but NODE_JOINED and NODE_LEFT)."""
        if self.key is None:
            raise Corrupt(f"event {self.seq} ({self.kind.name}) has no key", "event")
        return self.key

    def to_bytes(self) -> bytes:
        """The deterministic encoding of this event (see the module docstring)."""
        return encode_event(self)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Event:
        """Inverse of :meth:`to_bytes`; undecodable bytes raise ``Corrupt``."""
        return decode_event(raw)


def _encode_field(name: str, value: Any) -> Any:
    if name == "key":
        return [value.namespace, bytes(value.hash)]
    if name == "tiers":
        return [int(t) for t in value]
    if name in ("tier", "block_type"):
        return int(value.value)
    return value


def encode_event(event: Event) -> bytes:
    """Encode ``event`` as deterministic msgpack bytes."""
    fields = [_encode_field(n, getattr(event, n)) for n in EVENT_FIELDS[event.kind]]
    packed: bytes = msgpack.packb(
        [EVENT_VERSION, event.seq, int(event.kind), *fields], use_bin_type=True
    )
    return packed


def _want(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise Corrupt(f"event field {name} has type {type(value).__name__}", "event")
    return value


def _decode_field(name: str, value: Any) -> Any:
    if name == "key":
        if not isinstance(value, list) or len(value) != 2:
            raise Corrupt("event field key is not [namespace, hash]", "event")
        ns = _want(value[0], str, "key.namespace")
        digest = _want(value[1], bytes, "key.hash")
        return BlockKey(ns, BlockHash(digest))
    if name == "tiers":
        return tuple(Tier(_want(t, int, name)) for t in _want(value, list, name))
    if name == "tier":
        return Tier(_want(value, int, name))
    if name == "block_type":
        return BlockType(_want(value, int, name))
    if name == "program_id":
        return None if value is None else _want(value, str, name)
    if name == "deadline":
        return float(_want(value, (float, int), name))
    if name in ("size", "checksum", "pins"):
        return _want(value, int, name)
    return _want(value, str, name)


def decode_event(raw: bytes) -> Event:
    """Decode bytes written by :func:`encode_event`; anything malformed raises ``Corrupt``."""
    try:
        obj = msgpack.unpackb(bytes(raw), raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise Corrupt(f"event record is not valid msgpack: {exc}", "event") from exc
    if not isinstance(obj, list) or len(obj) < 3:
        raise Corrupt("event record is not a [version, seq, kind, ...] array", "event")
    version, seq, kind_value, *values = obj
    if version != EVENT_VERSION:
        raise Corrupt(f"event record has version {version!r}; expected {EVENT_VERSION}", "event")
    try:
        seq = _want(seq, int, "seq")
        kind = EventKind(_want(kind_value, int, "kind"))
        names = EVENT_FIELDS[kind]
        if len(values) != len(names):
            raise Corrupt(
                f"event {seq} ({kind.name}) has {len(values)} fields; expected {len(names)}",
                "event",
            )
        fields = {n: _decode_field(n, v) for n, v in zip(names, values, strict=True)}
        return Event(seq, kind, **fields)
    except Corrupt:
        raise
    except (ValueError, KVFabricError) as exc:  # bad enum value, invalid key
        raise Corrupt(f"event record has an invalid field: {exc}", "event") from exc


def pack_snapshot(seq: int, body: Any) -> bytes:
    """Frame a msgpack-able snapshot ``body`` taken at ``seq``."""
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    header = _SNAP_HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, seq, zlib.crc32(payload))
    return header + payload


def snapshot_seq(data: bytes) -> int:
    """The sequence number of a snapshot, after checking its frame and CRC."""
    if len(data) < _SNAP_HEADER.size:
        raise Corrupt(f"snapshot is {len(data)} bytes, shorter than its header", "snapshot")
    magic, version, seq, crc = _SNAP_HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC or version != SNAPSHOT_VERSION:
        raise Corrupt(f"snapshot has magic {magic!r} version {version}", "snapshot")
    if zlib.crc32(memoryview(data)[_SNAP_HEADER.size :]) != crc:
        raise Corrupt(f"snapshot at seq {seq} fails its CRC", "snapshot")
    return int(seq)


def unpack_snapshot(data: bytes) -> tuple[int, Any]:
    """Inverse of :func:`pack_snapshot`: ``(seq, body)``; a bad frame raises ``Corrupt``."""
    seq = snapshot_seq(data)
    try:
        body = msgpack.unpackb(bytes(data[_SNAP_HEADER.size :]), raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise Corrupt(f"snapshot at seq {seq} is not valid msgpack: {exc}", "snapshot") from exc
    return seq, body
