"""Applying events: the only code that changes the directory's index.

:func:`apply_event` takes one event with the next sequence number and hands it
to the handler of its kind; :func:`emit` is how the write side (claims,
replicas, node membership) builds an event, applies it and collects it for the
caller to log. Replaying the same events onto the same state gives the same
state, which is what makes a snapshot plus the events after it a full backup.

Each handler checks what it needs before it mutates, so a malformed event
(Corrupt, field ``event``) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvfabric.directory.events import Event, EventKind
from kvfabric.directory.model import Claim, Location
from kvfabric.directory.state import BlockRecord, IndexState, NodeRecord
from kvfabric.errors import Corrupt, FailedPrecondition
from kvfabric.types import BlockKey


def apply_event(state: IndexState, ev: Event) -> None:
    """Apply one event; it must carry sequence number ``state.seq + 1``."""
    if ev.seq != state.seq + 1:
        raise FailedPrecondition(f"event seq {ev.seq} does not follow {state.seq}", "seq")
    _HANDLERS[ev.kind](state, ev)
    state.seq = ev.seq
    state.ring.put(ev)


def emit(state: IndexState, out: list[Event], kind: EventKind, **fields: Any) -> None:
    """Build the next event of ``kind``, apply it and append it to ``out``."""
    ev = Event(state.seq + 1, kind, **fields)
    apply_event(state, ev)
    out.append(ev)


# ------------------------------------------------------------------ helpers


def _event_node(state: IndexState, ev: Event) -> NodeRecord:
    node = state.nodes.get(ev.node_id)
    if node is None:
        raise Corrupt(f"event {ev.seq} ({ev.kind.name}) names unknown node {ev.node_id!r}", "event")
    return node


def _remove_entry(state: IndexState, entry: BlockRecord) -> None:
    key = entry.key
    for node_id in entry.replicas:
        node = state.nodes[node_id]
        node.keys.discard(key)
        node.bytes -= entry.size
    index = state.index[key.namespace]
    del index[key.hash]
    if not index:
        del state.index[key.namespace]
    state.by_type[entry.block_type].discard(key)


def _release_claim(state: IndexState, key: BlockKey) -> None:
    held = state.claims.pop(key, None)
    if held is not None and (node := state.nodes.get(held.node_id)) is not None:
        node.claims.discard(key)


# ----------------------------------------------------------------- handlers


def _on_node_joined(state: IndexState, ev: Event) -> None:
    node = state.nodes.get(ev.node_id)
    if node is None:
        state.nodes[ev.node_id] = NodeRecord(ev.node_id, ev.address, ev.tiers)
        return
    node.tiers = ev.tiers
    if node.address != ev.address:
        node.address = ev.address
        for key in node.keys:
            entry = state.get(key)
            tier = entry.replicas[ev.node_id].tier
            entry.replicas[ev.node_id] = Location(ev.node_id, ev.address, tier)
            entry.reselect()


def _on_node_left(state: IndexState, ev: Event) -> None:
    node = _event_node(state, ev)
    for key in node.claims:
        state.claims.pop(key, None)
    keys, node.keys = node.keys, set()  # the node goes: no per-key bookkeeping on it
    for key in keys:
        entry = state.get(key)
        del entry.replicas[ev.node_id]
        entry.pins.pop(ev.node_id, None)
        if entry.replicas:
            entry.reselect()
        else:
            _remove_entry(state, entry)
    del state.nodes[ev.node_id]


def _on_claimed(state: IndexState, ev: Event) -> None:
    key = ev.block_key
    node = _event_node(state, ev)
    if state.find(key) is not None:
        raise Corrupt(f"event {ev.seq} claims {key.short()}, which is committed", "event")
    _release_claim(state, key)
    state.claims[key] = Claim(key, ev.node_id, ev.writer_id, ev.size, ev.deadline)
    node.claims.add(key)


def _on_aborted(state: IndexState, ev: Event) -> None:
    held = state.claims.get(ev.block_key)
    if held is not None and held.writer_id == ev.writer_id:  # else: gone already (restart)
        _release_claim(state, ev.block_key)


def _on_committed(state: IndexState, ev: Event) -> None:
    key = ev.block_key
    node = _event_node(state, ev)
    if state.find(key) is not None:
        raise Corrupt(f"event {ev.seq} commits {key.short()} a second time", "event")
    loc = Location(ev.node_id, node.address, ev.tier)
    entry = BlockRecord(
        key, ev.size, ev.checksum, ev.block_type, ev.program_id, {ev.node_id: loc}, loc
    )
    state.index.setdefault(key.namespace, {})[key.hash] = entry
    state.by_type[ev.block_type].add(key)
    node.keys.add(key)
    node.bytes += ev.size
    _release_claim(state, key)


def _on_replica_added(state: IndexState, ev: Event) -> None:
    entry = state.get(ev.block_key)
    node = _event_node(state, ev)
    old = entry.replicas.get(ev.node_id)
    entry.replicas[ev.node_id] = Location(ev.node_id, node.address, ev.tier)
    if old is None:
        node.keys.add(entry.key)
        node.bytes += entry.size
    entry.reselect()


def _on_replica_removed(state: IndexState, ev: Event) -> None:
    entry = state.get(ev.block_key)
    node = _event_node(state, ev)
    if ev.node_id not in entry.replicas:
        raise Corrupt(f"event {ev.seq} removes a replica that does not exist", "event")
    if len(entry.replicas) == 1:
        _remove_entry(state, entry)
        return
    del entry.replicas[ev.node_id]
    entry.pins.pop(ev.node_id, None)
    node.keys.discard(entry.key)
    node.bytes -= entry.size
    entry.reselect()


def _on_block_removed(state: IndexState, ev: Event) -> None:
    _remove_entry(state, state.get(ev.block_key))


def _on_pins_changed(state: IndexState, ev: Event) -> None:
    entry = state.get(ev.block_key)
    if ev.node_id not in entry.replicas:
        raise Corrupt(f"event {ev.seq} pins a replica that does not exist", "event")
    if ev.pins:
        entry.pins[ev.node_id] = ev.pins
    else:
        entry.pins.pop(ev.node_id, None)


_HANDLERS: dict[EventKind, Callable[[IndexState, Event], None]] = {
    EventKind.NODE_JOINED: _on_node_joined,
    EventKind.NODE_LEFT: _on_node_left,
    EventKind.CLAIMED: _on_claimed,
    EventKind.ABORTED: _on_aborted,
    EventKind.COMMITTED: _on_committed,
    EventKind.REPLICA_ADDED: _on_replica_added,
    EventKind.REPLICA_REMOVED: _on_replica_removed,
    EventKind.BLOCK_REMOVED: _on_block_removed,
    EventKind.PINS_CHANGED: _on_pins_changed,
}
