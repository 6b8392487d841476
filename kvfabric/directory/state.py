"""The mutable state behind :class:`~kvfabric.directory.index.DirectoryCore`.

It owns the records the index is made of: one :class:`BlockRecord` per
committed block, one :class:`NodeRecord` per registered node (with the reverse
indexes of the keys it holds and has claimed), the live claims, the per-type
key sets, the last applied seq and the :class:`EventRing` of recent events.

Only :func:`kvfabric.directory.apply.apply_event` changes it, except for the
state that is not event-sourced: access counts (``BlockRecord.hits``) and the
rebuild from a snapshot. None of these objects leaves the directory: callers
get the frozen copies of :mod:`kvfabric.directory.model`. There is no lock
here; ``DirectoryCore`` holds its lock around every use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvfabric.directory.events import Event
from kvfabric.directory.model import Claim, Location
from kvfabric.errors import Corrupt, FailedPrecondition, InvalidArgument, NotFound
from kvfabric.types import BlockKey, BlockType, Tier


def by_tier_then_node(loc: Location) -> tuple[Tier, str]:
    """Replica order: fastest tier first, then node id."""
    return loc.tier, loc.node_id


@dataclass(slots=True)
class BlockRecord:
    """The index record of one committed block (mutable; never handed out)."""

    key: BlockKey
    size: int
    checksum: int
    block_type: BlockType
    program_id: str | None
    replicas: dict[str, Location]  # node_id -> location; never empty
    best: Location  # min of replicas by (tier, node_id)
    pins: dict[str, int] = field(default_factory=dict)  # node_id -> pins, zeros omitted
    hits: int = 0

    def reselect(self) -> None:
        """Recompute :attr:`best` after the replicas changed."""
        self.best = min(self.replicas.values(), key=by_tier_then_node)

    def sorted_locations(self) -> tuple[Location, ...]:
        """Every replica, fastest tier first (ties: node id)."""
        return tuple(sorted(self.replicas.values(), key=by_tier_then_node))

    def check_same(self, checksum: int, size: int) -> None:
        """A committed block never changes: a different checksum or size is refused."""
        if checksum != self.checksum:
            raise Corrupt(
                f"{self.key.short()} is committed with checksum {self.checksum:#x}, "
                f"not {checksum:#x}; a committed block never changes",
                "checksum",
            )
        if size != self.size:
            raise Corrupt(
                f"{self.key.short()} is committed with {self.size} bytes, not {size}", "size"
            )


@dataclass(slots=True)
class NodeRecord:
    """A registered node with its reverse indexes (keys it holds, keys it has claimed)."""

    node_id: str
    address: str
    tiers: tuple[Tier, ...]
    keys: set[BlockKey] = field(default_factory=set)
    claims: set[BlockKey] = field(default_factory=set)
    bytes: int = 0

    def check_tier(self, tier: Tier) -> None:
        """InvalidArgument (field ``tier``) unless the node registered ``tier``."""
        if tier not in self.tiers:
            names = ", ".join(t.name for t in self.tiers)
            raise InvalidArgument(
                f"node {self.node_id!r} has no {tier.name} tier (it registered {names})", "tier"
            )


class EventRing:
    """The last ``size`` applied events, by seq, served to followers that fell behind.

    ``start`` is the oldest seq this process applied: after a restore from a
    snapshot the ring holds nothing older, whatever its size.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.start = 1
        self._slots: list[Event | None] = [None] * size

    def put(self, ev: Event) -> None:
        """Keep ``ev``, overwriting the event ``size`` seqs older."""
        self._slots[ev.seq % self.size] = ev

    def since(self, seq: int, limit: int, last: int) -> list[Event]:
        """Up to ``limit`` events after ``seq``, ``last`` being the newest applied seq.

        FailedPrecondition (field ``seq``) when the ring no longer holds them
        (or ``seq`` is ahead of ``last``).
        """
        oldest = max(self.start, last - self.size + 1)
        if seq > last or seq + 1 < oldest:
            raise FailedPrecondition(
                f"events after {seq} are not in memory (it holds {oldest}..{last}); "
                "resync from the log or a snapshot",
                "seq",
            )
        end = min(last, seq + limit)
        return [e for s in range(seq + 1, end + 1) if (e := self._slots[s % self.size])]


class IndexState:
    """Every record of the index, and the lookups that turn a missing one into an error.

    Invariants: every block has at least one replica; ``NodeRecord.keys`` is
    the reverse index of the replicas and ``NodeRecord.claims`` of the claims,
    so losing a node costs O(its blocks).
    """

    def __init__(self, ring_size: int) -> None:
        self.index: dict[str, dict[bytes, BlockRecord]] = {}  # namespace -> hash -> record
        self.nodes: dict[str, NodeRecord] = {}
        self.claims: dict[BlockKey, Claim] = {}
        self.by_type: dict[BlockType, set[BlockKey]] = {t: set() for t in BlockType}
        self.seq = 0  # of the last applied event
        self.ring = EventRing(ring_size)

    def node(self, node_id: str) -> NodeRecord:
        """The registered node (NotFound, field ``node_id``, otherwise)."""
        node = self.nodes.get(node_id) if isinstance(node_id, str) else None
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered", "node_id")
        return node

    def find(self, key: BlockKey) -> BlockRecord | None:
        """The record of ``key`` if it is committed."""
        index = self.index.get(key.namespace)
        return None if index is None else index.get(key.hash)

    def get(self, key: BlockKey) -> BlockRecord:
        """The record of a key an event names (Corrupt if it is not committed)."""
        entry = self.find(key)
        if entry is None:  # only reachable from a malformed event stream
            raise Corrupt(f"event refers to {key.short()}, which is not committed", "event")
        return entry

    def committed(self, key: BlockKey) -> BlockRecord:
        """The record of a key a caller names (NotFound, field ``key``, if not committed)."""
        entry = self.find(key)
        if entry is None:
            raise NotFound(f"{key.short()} is not committed", "key")
        return entry
