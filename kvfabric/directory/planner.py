"""The replication planner: which blocks to copy where, before anyone asks for them.

Pure: it reads the directory index and returns copy tasks; the directory's
shell carries them out through the nodes' data planes. Three triggers:

* a block of a type copied everywhere (tool definitions, system prompts) is
  committed: copy it to every node that lacks it;
* a node joins: push it every such block plus the hottest blocks, so the
  common prefixes are local before its first request;
* a fan-out hint names a shared prefix and target nodes: copy the prefix to
  the targets before the children start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvfabric.directory.index import DirectoryCore
from kvfabric.types import BlockKey, BlockType


@dataclass(frozen=True, slots=True)
class CopyTask:
    """Copy ``keys`` (one namespace, one block size) from a source node to a target node."""

    target_node: str
    source_node: str
    source_address: str
    namespace: str
    size: int
    keys: tuple[BlockKey, ...]


def plan_copies(
    core: DirectoryCore, keys: Iterable[BlockKey], targets: Sequence[str]
) -> list[CopyTask]:
    """Tasks that give every target node a replica of every key it lacks.

    The source of each block is its replica on the fastest tier (ties: the
    lowest node id, so plans are deterministic); keys not committed are skipped.
    """
    addresses = {n.node_id: n.address for n in core.nodes()}
    groups: dict[tuple[str, str, str, str, int], list[BlockKey]] = {}
    for key in dict.fromkeys(keys):
        entry = core.entry(key)
        if entry is None or not entry.replicas:
            continue
        holders = {r.node_id for r in entry.replicas}
        best = min(entry.replicas, key=lambda r: (int(r.tier), r.node_id))
        address = addresses.get(best.node_id)
        if address is None:
            continue
        for target in targets:
            if target not in holders:
                group = (target, best.node_id, address, key.namespace, entry.size)
                groups.setdefault(group, []).append(key)
    return [CopyTask(t, s, a, ns, size, tuple(ks)) for (t, s, a, ns, size), ks in groups.items()]


def plan_type_replication(
    core: DirectoryCore, keys: Iterable[BlockKey], types: frozenset[BlockType]
) -> list[CopyTask]:
    """Copy the given keys of replicated types to every registered node."""
    wanted = [k for k in keys if (e := core.entry(k)) is not None and e.block_type in types]
    return plan_copies(core, wanted, [n.node_id for n in core.nodes()])


def plan_join(
    core: DirectoryCore, node_id: str, types: frozenset[BlockType], hot_limit: int
) -> list[CopyTask]:
    """What a joining node should hold before it serves: replicated types, then the hottest."""
    keys = list(core.keys_of_type(set(types))) if types else []
    if hot_limit:
        keys += core.hot_keys(hot_limit)
    return plan_copies(core, keys, [node_id])
