"""The read side of the directory: lookups, KV-warmth, listings and access counts.

Functions over :class:`~kvfabric.directory.state.IndexState` that run under
``DirectoryCore``'s lock, emit no event and return copies (the frozen types of
:mod:`kvfabric.directory.model` and :class:`NodeWarmth`), never a record.

The one thing they write is the access count of a block (``lookup`` and
``record_access`` count reads, ``hot_keys`` ranks by them): a plain counter
outside the event stream on purpose, so reading never grows the log. It is
not durable; a snapshot carries the counts as they were when it was taken.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvfabric.directory import model as m
from kvfabric.directory.model import Location
from kvfabric.directory.state import BlockRecord, IndexState
from kvfabric.errors import NotFound
from kvfabric.types import BlockKey, BlockType, Tier


@dataclass(frozen=True, slots=True)
class NodeWarmth:
    """How warm a chain is on one node: its leading ``matched`` blocks are there, in ``tiers``."""

    node_id: str
    address: str
    matched: int
    tiers: tuple[Tier, ...]


def lookup(
    state: IndexState, namespace: str, chain: Sequence[bytes], prefer_node: str | None
) -> m.ClusterLookup:
    """The longest committed prefix of ``chain``, the replica of each block on
    ``prefer_node`` or else the best one; counts one access on each matched block."""
    if prefer_node is not None and prefer_node not in state.nodes:
        raise NotFound(f"node {prefer_node!r} is not registered", "prefer_node")
    index = state.index.get(namespace)
    if index is None:
        return m.ClusterLookup(0, ())
    locs: list[Location] = []
    for h in chain:
        entry = index.get(h)
        if entry is None:
            break
        loc = entry.replicas.get(prefer_node) if prefer_node is not None else None
        locs.append(entry.best if loc is None else loc)
        entry.hits += 1
    return m.ClusterLookup(len(locs), tuple(locs))


def warmth(state: IndexState, namespace: str, chain: Sequence[bytes]) -> list[NodeWarmth]:
    """For every registered node, the leading blocks of ``chain`` it holds and their tiers.

    Unordered (see :func:`best_warm_first`). Visits only the replicas of the
    chain's blocks, and stops at the first block no node still warm holds.
    """
    index = state.index.get(namespace, {})
    tiers: dict[str, list[Tier]] = {n: [] for n in state.nodes}
    warm = set(state.nodes)  # nodes holding every block so far
    for h in chain:
        entry = index.get(h)
        if entry is None or not warm:
            break
        warm &= entry.replicas.keys()
        for node_id in warm:
            tiers[node_id].append(entry.replicas[node_id].tier)
    return [NodeWarmth(n, state.nodes[n].address, len(t), tuple(t)) for n, t in tiers.items()]


def best_warm_first(rows: Iterable[NodeWarmth]) -> list[NodeWarmth]:
    """Most blocks first, then fewest blocks off the fastest tier, then node id."""
    return sorted(rows, key=lambda w: (-w.matched, sum(w.tiers), w.node_id))


def locate(state: IndexState, keys: Iterable[BlockKey]) -> list[tuple[Location, ...]]:
    """Every replica of each key, fastest tier first (empty for an unknown key)."""
    return [() if (e := state.find(k)) is None else e.sorted_locations() for k in keys]


def entry_info(state: IndexState, key: BlockKey) -> m.DirEntry | None:
    """A copy of the record of ``key``, or None when it is not committed."""
    e = state.find(key)
    if e is None:
        return None
    reps = tuple(
        m.ReplicaInfo(n, loc.tier, e.pins.get(n, 0)) for n, loc in sorted(e.replicas.items())
    )
    return m.DirEntry(e.key, e.size, e.checksum, e.block_type, e.program_id, reps, e.hits)


def node_infos(state: IndexState) -> list[m.NodeInfo]:
    """Every registered node with its block count and bytes, by node id."""
    return [
        m.NodeInfo(n.node_id, n.address, n.tiers, len(n.keys), n.bytes)
        for _, n in sorted(state.nodes.items())
    ]


def record_access(state: IndexState, keys: Iterable[BlockKey]) -> None:
    """Count one access on each committed key of ``keys`` (unknown keys are ignored)."""
    for k in keys:
        e = state.find(k)
        if e is not None:
            e.hits += 1


def hot_keys(state: IndexState, limit: int, types: set[BlockType] | None) -> list[BlockKey]:
    """Up to ``limit`` accessed keys, most accessed first; ``types`` (validated here)
    restricts them to those block types."""
    if types is None:
        cands: Iterable[BlockRecord] = (e for ix in state.index.values() for e in ix.values())
    else:
        cands = (state.get(k) for t in m.check_types(types) for k in state.by_type[t])
    top = heapq.nlargest(limit, (e for e in cands if e.hits), key=lambda e: e.hits)
    return [e.key for e in top]


def keys_of_type(state: IndexState, types: set[BlockType]) -> list[BlockKey]:
    """Every committed key of one of ``types`` (validated here), unordered."""
    return [k for t in m.check_types(types) for k in state.by_type[t]]
