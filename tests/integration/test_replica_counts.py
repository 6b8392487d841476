"""The directory tells each node how many copies of its blocks other nodes hold.

Two real node services share a real directory service (no Ray: the Ray
actor's supervisor only forwards ``replica_updates()`` to each node's
``note_replicas``, which is what this test does by hand). The program-aware
policy of each node then knows which of its blocks are copied elsewhere
(cheap to lose: a fetch) and which are sole copies (a recompute).
"""

from __future__ import annotations

from pathlib import Path

from kvfabric.config import load_config
from kvfabric.directory.service import DirectoryService
from kvfabric.node.service import NodeStoreService
from kvfabric.types import BlockHash, BlockKey
from tests.rpcnode import hashes, node_config, random_blocks

NS = "ns-replicas"
SIZE = 64 * 1024


def deliver(directory: DirectoryService, nodes: dict[str, NodeStoreService]) -> set[str]:
    """What the directory actor's supervisor does each tick; returns the nodes told."""
    updates = directory.replica_updates()
    for node_id, (keys, counts) in updates.items():
        nodes[node_id].note_replicas(keys, counts)
    return set(updates)


def elsewhere(node: NodeStoreService, hs: list[bytes]) -> list[int | None]:
    known = node.core.policy._elsewhere  # type: ignore[attr-defined]
    return [known.get(BlockKey(NS, BlockHash(h))) for h in hs]


def test_replica_counts_follow_copies_and_removals(tmp_path: Path) -> None:
    directory = DirectoryService(load_config(overrides={"data_dir": str(tmp_path / "dir")},
                                             env={}))  # fmt: skip
    a = NodeStoreService("node-a", node_config(tmp_path / "a"), directory)
    b = NodeStoreService("node-b", node_config(tmp_path / "b"), directory)
    nodes = {"node-a": a, "node-b": b}
    try:
        assert a.core.policy.name == "program"  # the default policy
        assert directory.replica_updates() == {}  # the first call starts from now
        hs = hashes(3, "rc")
        a.put(NS, hs, random_blocks(3, SIZE, "rc"))
        assert deliver(directory, nodes) == {"node-a"}
        assert elsewhere(a, hs) == [None] * 3  # sole copies
        assert b.get(NS, hs[:2]) == random_blocks(3, SIZE, "rc")[:2]  # B pulls two from A
        assert deliver(directory, nodes) == {"node-a", "node-b"}
        assert elsewhere(a, hs) == [1, 1, None]
        assert elsewhere(b, hs[:2]) == [1, 1]
        assert b.evict(NS, hs[:1]) == 1
        deliver(directory, nodes)
        assert elsewhere(a, hs) == [None, 1, None]  # A's copy of block 0 is the sole one again
        assert deliver(directory, nodes) == set()  # nothing changed since
    finally:
        a.close()
        b.close()
        directory.close()
