"""Result and statistics objects returned by the node-store core."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvfabric.types import BlockKey, Tier


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """A namespace known to the node: every block in it has ``block_bytes`` bytes."""

    id: str
    block_bytes: int


@dataclass(frozen=True, slots=True)
class PutResult:
    """Outcome of one block of a put: ``stored`` is False when the key existed already."""

    key: BlockKey
    stored: bool
    tier: Tier
    checksum: int


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The longest stored prefix of a hash chain and the tier of each matched block."""

    matched: int
    tiers: tuple[Tier, ...]


@dataclass(frozen=True, slots=True)
class PinResult:
    """Which blocks a pin reached and how many bytes it newly pinned."""

    pinned: tuple[BlockKey, ...]
    missing: tuple[BlockKey, ...]
    new_bytes: int


@dataclass(frozen=True, slots=True)
class MoveResult:
    """Outcome of a move or prefetch: moved, already there, absent, or lost to corruption."""

    moved: tuple[BlockKey, ...] = ()
    unchanged: tuple[BlockKey, ...] = ()
    missing: tuple[BlockKey, ...] = ()
    corrupt: tuple[BlockKey, ...] = ()


@dataclass(frozen=True, slots=True)
class TierStats:
    """Occupancy of one tier."""

    tier: Tier
    blocks: int
    used_bytes: int
    capacity_bytes: int


@dataclass(slots=True)
class Counters:
    """Monotonic event counters of a node store."""

    puts: int = 0
    dedup_puts: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    checksum_failures: int = 0
    pins_expired: int = 0
    # Why blocks left or went down (the totals above include them): asked for by a
    # caller (Evict, Move) or a block TTL that ran out; the rest is capacity pressure.
    evictions_requested: int = 0
    evictions_ttl: int = 0
    demotions_requested: int = 0


@dataclass(frozen=True, slots=True)
class NodeStats:
    """A snapshot of a node store: tiers, counters, pins and namespaces."""

    tiers: tuple[TierStats, ...]
    counters: Counters
    pinned_bytes: int
    pinned_blocks: int
    namespaces: tuple[NamespaceInfo, ...]
    blocks_by_type: dict[str, int] = field(default_factory=dict)
    bytes_by_type: dict[str, int] = field(default_factory=dict)
