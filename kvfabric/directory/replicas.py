"""Where blocks live: node membership and the replicas of committed blocks.

The write side of placement. Each function runs under ``DirectoryCore``'s
lock, checks the state, and changes it only through
:func:`~kvfabric.directory.apply.emit`; it returns (or appends to ``out``) the
events it applied. A block goes when its last replica does, and a node that
leaves takes its replicas and claims with it, found through its reverse
indexes rather than a scan of the whole index.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvfabric.directory import model as m
from kvfabric.directory.apply import emit
from kvfabric.directory.events import Event, EventKind
from kvfabric.directory.state import BlockRecord, IndexState
from kvfabric.errors import NotFound
from kvfabric.types import BlockKey, Tier

# ------------------------------------------------------------------- nodes


def join_node(
    state: IndexState, node_id: str, address: str, tiers: tuple[Tier, ...]
) -> list[Event]:
    """Add the node or update its address and tiers (NODE_JOINED; none if unchanged)."""
    old = state.nodes.get(node_id)
    if old is not None and old.address == address and old.tiers == tiers:
        return []
    out: list[Event] = []
    emit(state, out, EventKind.NODE_JOINED, node_id=node_id, address=address, tiers=tiers)
    return out


def remove_node(state: IndexState, node_id: str) -> list[Event]:
    """Abort the node's claims, remove every block only it holds, then the node."""
    node = state.node(node_id)
    out: list[Event] = []
    for key in list(node.claims):
        c = state.claims[key]
        emit(state, out, EventKind.ABORTED, key=key, node_id=c.node_id, writer_id=c.writer_id)
    for key in [k for k in node.keys if len(state.get(k).replicas) == 1]:
        emit(state, out, EventKind.BLOCK_REMOVED, key=key)
    emit(state, out, EventKind.NODE_LEFT, node_id=node_id)
    return out


# ---------------------------------------------------------------- replicas


def place_replica(
    state: IndexState, out: list[Event], entry: BlockRecord, node_id: str, tier: Tier
) -> None:
    """Record a replica of ``entry`` on ``node_id`` in ``tier`` (nothing if it is there)."""
    loc = entry.replicas.get(node_id)
    if loc is None or loc.tier != tier:
        emit(state, out, EventKind.REPLICA_ADDED, key=entry.key, node_id=node_id, tier=tier)


def drop_replica(state: IndexState, out: list[Event], key: BlockKey, node_id: str) -> None:
    """Forget the replica on ``node_id``, and the block with its last replica."""
    entry = state.find(key)
    if entry is None or node_id not in entry.replicas:
        return
    if len(entry.replicas) == 1:
        emit(state, out, EventKind.BLOCK_REMOVED, key=key)
    else:
        emit(state, out, EventKind.REPLICA_REMOVED, key=key, node_id=node_id)


def add_replica(
    state: IndexState, key: BlockKey, node_id: str, tier: Tier, checksum: int
) -> list[Event]:
    """Record a copy of a committed block whose checksum matches, or its move to ``tier``."""
    state.node(node_id).check_tier(tier)
    entry = state.committed(key)
    entry.check_same(checksum, entry.size)
    out: list[Event] = []
    place_replica(state, out, entry, node_id, tier)
    return out


def remove_replica(state: IndexState, key: BlockKey, node_id: str) -> list[Event]:
    """Forget the copy on a registered node (nothing if it holds none)."""
    state.node(node_id)
    out: list[Event] = []
    drop_replica(state, out, key, node_id)
    return out


def set_pins(state: IndexState, key: BlockKey, node_id: str, pins: int) -> list[Event]:
    """Record the pin count of the replica on ``node_id`` (PINS_CHANGED if it differs)."""
    state.node(node_id)
    entry = state.committed(key)
    if node_id not in entry.replicas:
        raise NotFound(f"node {node_id!r} holds no replica of {key.short()}", "key")
    out: list[Event] = []
    if entry.pins.get(node_id, 0) != pins:
        emit(state, out, EventKind.PINS_CHANGED, key=key, node_id=node_id, pins=pins)
    return out


def reconcile(
    state: IndexState, node_id: str, items: Sequence[m.InventoryItem]
) -> m.ReconcileResult:
    """Make the node's replicas, tiers and pins equal its (validated) inventory.

    Unknown keys are committed without a claim: the node holds the data
    already. An item whose checksum or size differs from the committed block
    is rejected, not added.
    """
    node = state.node(node_id)
    out: list[Event] = []
    rejected: list[BlockKey] = []
    seen: set[BlockKey] = set()
    for it in items:
        entry = state.find(it.key)
        if entry is None:
            emit(state, out, EventKind.COMMITTED, key=it.key, node_id=node_id, tier=it.tier,
                 size=it.size, checksum=it.checksum, block_type=it.block_type,
                 program_id=it.program_id)  # fmt: skip
            entry = state.get(it.key)
        elif entry.checksum != it.checksum or entry.size != it.size:
            rejected.append(it.key)
            seen.discard(it.key)
            continue
        else:
            place_replica(state, out, entry, node_id, it.tier)
        seen.add(it.key)
        if entry.pins.get(node_id, 0) != it.pins:
            emit(state, out, EventKind.PINS_CHANGED, key=it.key, node_id=node_id, pins=it.pins)
    for key in node.keys - seen:
        drop_replica(state, out, key, node_id)
    return m.ReconcileResult(tuple(out), tuple(rejected))
