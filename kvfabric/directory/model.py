"""Value types of the directory: what its methods take and return.

Everything here is a frozen dataclass or an enum, safe to hand to another
thread or across a Ray call; none of them aliases the directory's index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from kvfabric.directory.events import Event
from kvfabric.errors import InvalidArgument
from kvfabric.types import BLOCK_HASH_BYTES, BlockKey, BlockType, Tier, validate_program_id

MAX_ID_CHARS = 128
"""Longest node id or writer id accepted."""
MAX_ADDRESS_CHARS = 256
MAX_PINS = (1 << 31) - 1
MAX_CHECKSUM = (1 << 64) - 1


class ClaimStatus(Enum):
    """Answer to a claim: the caller writes (GRANTED), waits or skips (PENDING), or reads."""

    GRANTED = "granted"
    PENDING = "pending"
    COMMITTED = "committed"


@dataclass(frozen=True, slots=True)
class Location:
    """One replica of a block: the node holding it, how to reach it, and on which tier."""

    node_id: str
    address: str
    tier: Tier


@dataclass(frozen=True, slots=True)
class Claim:
    """A writer's exclusive right to write ``key`` until ``deadline`` (directory clock)."""

    key: BlockKey
    node_id: str
    writer_id: str
    size: int
    deadline: float


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Outcome of :meth:`DirectoryCore.claim`.

    ``holder`` is the claim now in force (the caller's own when GRANTED, the
    other writer's when PENDING, None when COMMITTED); ``locations`` lists the
    replicas of a COMMITTED key. ``events`` are the events the call applied
    (to be appended to the durable log).
    """

    status: ClaimStatus
    key: BlockKey
    holder: Claim | None
    locations: tuple[Location, ...] = ()
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class CommitResult:
    """Outcome of :meth:`DirectoryCore.commit`.

    ``created`` is False when the key was committed already with the same
    checksum and the call only recorded one more replica.
    """

    key: BlockKey
    created: bool
    locations: tuple[Location, ...]
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """One replica as recorded in a :class:`DirEntry`."""

    node_id: str
    tier: Tier
    pins: int


@dataclass(frozen=True, slots=True)
class DirEntry:
    """A copy of the directory's record of one committed block."""

    key: BlockKey
    size: int
    checksum: int
    block_type: BlockType
    program_id: str | None
    replicas: tuple[ReplicaInfo, ...]
    hits: int


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A registered node: its address, tiers, and how many blocks/bytes it holds."""

    node_id: str
    address: str
    tiers: tuple[Tier, ...]
    blocks: int
    bytes: int


@dataclass(frozen=True, slots=True)
class InventoryItem:
    """One block a node reports holding (see :meth:`DirectoryCore.reconcile`)."""

    key: BlockKey
    tier: Tier
    size: int
    checksum: int
    block_type: BlockType = BlockType.GENERIC
    program_id: str | None = None
    pins: int = 0


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """Outcome of a reconcile: the events applied and the items the directory refused.

    ``rejected`` holds the keys whose reported checksum differs from the
    committed one: the node should drop its copy (committed blocks never change).
    """

    events: tuple[Event, ...]
    rejected: tuple[BlockKey, ...]


@dataclass(frozen=True, slots=True)
class ClusterLookup:
    """The longest committed prefix of a chain and the best replica of each matched block."""

    matched: int
    locations: tuple[Location, ...]


def check_id(value: object, field_name: str) -> str:
    """Validate a node or writer id: a non-empty printable string of at most 128 characters."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{field_name} must be a non-empty string", field_name)
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(
            f"{field_name} is {len(value)} characters; the limit is {MAX_ID_CHARS}", field_name
        )
    if not value.isprintable():
        raise InvalidArgument(f"{field_name} must be printable", field_name)
    return value


def check_int(value: object, field_name: str, low: int, high: int) -> int:
    """Validate an int (not a bool) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(
            f"{field_name} must be an int in {low}..{high}, got {value!r}", field_name
        )
    return value


def check_tier(value: object, field_name: str = "tier") -> Tier:
    """Validate a tier given as a :class:`Tier` or its int value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{field_name} must be a Tier, got {value!r}", field_name)
    try:
        return Tier(value)
    except ValueError:
        raise InvalidArgument(
            f"{field_name} must be one of {[t.value for t in Tier]}, got {value!r}", field_name
        ) from None


def check_block_type(value: object) -> BlockType:
    """Validate a :class:`BlockType`."""
    if not isinstance(value, BlockType):
        raise InvalidArgument(f"block_type must be a BlockType, got {value!r}", "block_type")
    return value


def check_key(value: object, field_name: str = "key") -> BlockKey:
    """Validate a :class:`BlockKey` argument."""
    if not isinstance(value, BlockKey):
        raise InvalidArgument(
            f"{field_name} must be a BlockKey, got {type(value).__name__}", field_name
        )
    return value


def check_address(value: object) -> str:
    """Validate a node address (``host:port`` or any printable string up to 256 characters)."""
    if not isinstance(value, str) or not value or not value.isprintable():
        raise InvalidArgument("address must be a non-empty printable string", "address")
    if len(value) > MAX_ADDRESS_CHARS:
        raise InvalidArgument(
            f"address is {len(value)} characters; the limit is {MAX_ADDRESS_CHARS}", "address"
        )
    return value


def check_chain(hashes: object, max_chain: int) -> Sequence[bytes]:
    """Validate a hash chain: at most ``max_chain`` hashes of 32 bytes each (field ``hashes``)."""
    if isinstance(hashes, (str, bytes, bytearray)) or not isinstance(hashes, Sequence):
        raise InvalidArgument("hashes must be a sequence of 32-byte hashes", "hashes")
    if len(hashes) > max_chain:
        raise InvalidArgument(
            f"hashes holds {len(hashes)} hashes; the limit is {max_chain}", "hashes"
        )
    if all(type(h) is bytes and len(h) == BLOCK_HASH_BYTES for h in hashes):
        return hashes  # the common case: no copy
    out: list[bytes] = []
    for i, h in enumerate(hashes):
        if not isinstance(h, (bytes, bytearray, memoryview)) or len(h) != BLOCK_HASH_BYTES:
            what = f"{len(h)} bytes" if isinstance(h, (bytes, bytearray)) else type(h).__name__
            raise InvalidArgument(
                f"hashes[{i}] must be {BLOCK_HASH_BYTES} bytes, got {what}", "hashes"
            )
        out.append(bytes(h))
    return out


def check_types(types: object) -> set[BlockType]:
    """Validate a collection of :class:`BlockType` (field ``types``)."""
    if isinstance(types, (str, bytes)) or not isinstance(types, Iterable):
        raise InvalidArgument("types must be a set of BlockType", "types")
    out = set(types)
    for t in out:
        if not isinstance(t, BlockType):
            raise InvalidArgument(f"types must hold BlockType, got {t!r}", "types")
    return out


def check_item(item: object, max_block_bytes: int) -> InventoryItem:
    """Validate one reported :class:`InventoryItem` (every field, named on error)."""
    if not isinstance(item, InventoryItem):
        raise InvalidArgument(
            f"inventory must hold InventoryItem, got {type(item).__name__}", "inventory"
        )
    check_key(item.key)
    check_tier(item.tier)
    check_int(item.size, "size", 1, max_block_bytes)
    check_int(item.checksum, "checksum", 0, MAX_CHECKSUM)
    check_block_type(item.block_type)
    validate_program_id(item.program_id)
    check_int(item.pins, "pins", 0, MAX_PINS)
    return item
