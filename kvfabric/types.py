"""Core value types shared by every kvfabric module.

Everything here is a plain dataclass or enum: no Ray, no gRPC, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import NewType

from kvfabric.errors import InvalidArgument

BlockHash = NewType("BlockHash", bytes)
"""A canonical chained block hash (see ``kvfabric.hashing``); 32 bytes."""

BLOCK_HASH_BYTES = 32
MAX_NAMESPACE_CHARS = 64
MAX_PROGRAM_ID_CHARS = 128


class Tier(IntEnum):
    """Storage tiers; a lower value is faster."""

    GPU = 0
    CPU = 1
    DISK = 2


class BlockType(Enum):
    """Semantic type of a block; each type has its own caching policy."""

    GENERIC = 0
    SYSTEM_PROMPT = 1
    TOOL_DEFINITION = 2
    REASONING_BRANCH = 3
    EXECUTION_CHECKPOINT = 4


def as_block_hash(value: bytes, field_name: str = "hash") -> BlockHash:
    """Validate ``value`` as a canonical block hash and return it typed."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{field_name} must be bytes, got {type(value).__name__}", field_name)
    raw = bytes(value)
    if len(raw) != BLOCK_HASH_BYTES:
        raise InvalidArgument(
            f"{field_name} must be {BLOCK_HASH_BYTES} bytes, got {len(raw)}", field_name
        )
    return BlockHash(raw)


def validate_namespace(namespace: str, field_name: str = "namespace") -> str:
    """Check that a namespace id is a short printable ASCII name without '/'."""
    if not isinstance(namespace, str) or not namespace:
        raise InvalidArgument(f"{field_name} must be a non-empty string", field_name)
    if len(namespace) > MAX_NAMESPACE_CHARS:
        raise InvalidArgument(
            f"{field_name} is {len(namespace)} characters; the limit is {MAX_NAMESPACE_CHARS}",
            field_name,
        )
    if not namespace.isascii() or not namespace.isprintable() or "/" in namespace:
        raise InvalidArgument(f"{field_name} must be printable ASCII without '/'", field_name)
    return namespace


def validate_program_id(program_id: str | None, field_name: str = "program_id") -> str | None:
    """Check an optional program id (an agent program's name chosen by the caller)."""
    if program_id is None:
        return None
    if not isinstance(program_id, str) or not program_id:
        raise InvalidArgument(f"{field_name} must be a non-empty string or absent", field_name)
    if len(program_id) > MAX_PROGRAM_ID_CHARS:
        raise InvalidArgument(
            f"{field_name} is {len(program_id)} characters; the limit is {MAX_PROGRAM_ID_CHARS}",
            field_name,
        )
    return program_id


@dataclass(frozen=True, slots=True)
class BlockKey:
    """The identity of a stored block: its namespace and canonical chained hash."""

    namespace: str
    hash: BlockHash

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        as_block_hash(self.hash)

    def storage_key(self) -> bytes:
        """The byte key used by persistent tiers: ``namespace/hash``."""
        return self.namespace.encode("ascii") + b"/" + self.hash

    @classmethod
    def from_storage_key(cls, raw: bytes) -> BlockKey:
        """Inverse of :meth:`storage_key`."""
        ns, sep, digest = raw.rpartition(b"/")
        if not sep or len(digest) != BLOCK_HASH_BYTES:
            # A '/' may be a byte of the hash itself, so split at the fixed offset.
            ns, digest = raw[: -BLOCK_HASH_BYTES - 1], raw[-BLOCK_HASH_BYTES:]
        return cls(ns.decode("ascii"), BlockHash(bytes(digest)))

    def short(self) -> str:
        """A human-readable abbreviation for logs and tables."""
        return f"{self.namespace}/{self.hash[:8].hex()}"


@dataclass(frozen=True, slots=True)
class Pin:
    """One owner's counted hold on a block; ``expires_at`` is on the store's clock."""

    owner: str
    count: int = 1
    expires_at: float | None = None


@dataclass(slots=True)
class BlockMeta:
    """What the node store knows about one committed block."""

    key: BlockKey
    size: int
    checksum: int
    tier: Tier
    type: BlockType = BlockType.GENERIC
    program_id: str | None = None
    created_at: float = 0.0
    last_access: float = 0.0
    access_count: int = 0
    pins: dict[str, Pin] = field(default_factory=dict)
    expires_at: float | None = None  # a block TTL (Annotate): dropped once past, unless pinned

    @property
    def pinned(self) -> bool:
        """True while any owner holds a pin on the block."""
        return bool(self.pins)
