"""Snapshots of the directory's index: their encoding, the rebuild from one, and a canonical view.

A snapshot is the whole index at one seq (nodes, blocks, replicas, pins and
access counts), sorted so that equal states encode to equal bytes, and framed
by :func:`~kvfabric.directory.events.pack_snapshot`. Pending claims are left
out: they are not durable.

:func:`load_snapshot` is the one place besides
:func:`~kvfabric.directory.apply.apply_event` that builds records: it fills an
empty state from a snapshot, which then takes the events after it. All three
functions run under ``DirectoryCore``'s lock.
"""

from __future__ import annotations

from typing import Any

from kvfabric.directory.events import pack_snapshot, unpack_snapshot
from kvfabric.directory.model import Location
from kvfabric.directory.state import BlockRecord, IndexState, NodeRecord, by_tier_then_node
from kvfabric.errors import Corrupt, KVFabricError
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier


def encode_snapshot(state: IndexState) -> bytes:
    """The snapshot of ``state`` at its seq, deterministically encoded."""
    nodes = [[n.node_id, n.address, [int(t) for t in n.tiers]]
             for _, n in sorted(state.nodes.items())]  # fmt: skip
    blocks = [
        [e.key.namespace, bytes(e.key.hash), e.size, e.checksum, e.block_type.value,
         e.program_id, e.hits,
         [[n, int(loc.tier), e.pins.get(n, 0)] for n, loc in sorted(e.replicas.items())]]
        for ns in sorted(state.index)
        for _, e in sorted(state.index[ns].items())
    ]  # fmt: skip
    return pack_snapshot(state.seq, [nodes, blocks])


def load_snapshot(state: IndexState, data: bytes) -> None:
    """Fill an empty ``state`` from a snapshot (Corrupt, field ``snapshot``, if malformed).

    The event ring then starts after the snapshot's seq: it never held older events.
    """
    seq, body = unpack_snapshot(data)
    try:
        nodes, blocks = body
        for node_id, address, tiers in nodes:
            state.nodes[node_id] = NodeRecord(node_id, address, tuple(Tier(t) for t in tiers))
        for ns, digest, size, checksum, btype, pid, hits, reps in blocks:
            key = BlockKey(ns, BlockHash(digest))
            locs = {n: Location(n, state.nodes[n].address, Tier(t)) for n, t, _ in reps}
            best = min(locs.values(), key=by_tier_then_node)
            pins = {n: p for n, _, p in reps if p}
            entry = BlockRecord(key, size, checksum, BlockType(btype), pid, locs, best, pins, hits)
            state.index.setdefault(ns, {})[key.hash] = entry
            state.by_type[entry.block_type].add(key)
            for n in locs:
                state.nodes[n].keys.add(key)
                state.nodes[n].bytes += size
    except (TypeError, ValueError, KeyError, KVFabricError) as exc:
        raise Corrupt(f"snapshot at seq {seq} has a malformed body: {exc!r}", "snapshot") from exc
    state.seq = seq
    state.ring.start = seq + 1


def canonical_state(state: IndexState) -> dict[str, Any]:
    """A comparable view: seq, nodes, blocks with replicas, tiers and pins.

    Leaves out claims and access counts (neither is durable).
    """
    nodes = {n.node_id: (n.address, n.tiers) for n in state.nodes.values()}
    blocks = {
        e.key: (e.size, e.checksum, e.block_type, e.program_id,
                {n: (loc.tier, e.pins.get(n, 0)) for n, loc in e.replicas.items()})
        for ix in state.index.values() for e in ix.values()
    }  # fmt: skip
    return {"seq": state.seq, "nodes": nodes, "blocks": blocks}
