"""The simulator's hit rates on a hand-built cluster state, and its replica-count path.

The zero-recompute hit rate is the issue's: among reads of blocks that exist
somewhere in the cluster at the moment of the read, the share served without
recompute. These tests set up real node-store cores by hand so the answer is
known, then let the runner serve reads on them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvfabric.sim import SimConfig
from kvfabric.sim.cluster import SimCluster
from kvfabric.sim.runner import NS, Replay, block_data, block_key
from kvfabric.sim.trace import Read, Trace
from kvfabric.types import BlockType, Tier

CFG = SimConfig(nodes=2, programs=1)
BB = CFG.block_bytes


def _trace(reads: list[Read]) -> Trace:
    blocks = {b for r in reads for b in (*r.chain, *r.output)}
    return Trace("hand", list(reads), dict.fromkeys(blocks, BlockType.GENERIC), {}, {"p": 0.0})


NOW = [0.0]  # the cluster's clock


@pytest.fixture
def cluster() -> Iterator[SimCluster]:
    NOW[0] = 0.0
    c = SimCluster(2, [4, 4, 4], BB, lambda: NOW[0], policy="program")
    for n in c.nodes:
        n.register_namespace(NS, BB)
    yield c
    c.close()


def _put(c: SimCluster, node: int, blocks: list[int]) -> None:
    c.nodes[node].put_many([block_key(b) for b in blocks], [block_data(b, BB) for b in blocks])


def test_zero_recompute_counts_blocks_that_exist_but_sit_behind_a_gap(cluster: SimCluster) -> None:
    first = Read(0.0, "p", 0, 0, (0, 1, 2, 3, 4))
    second = Read(1.0, "p", 1, 1, (0, 1, 2))
    replay = Replay(_trace([first, second]), CFG, "program")
    replay.cluster = cluster
    replay.computed = {0, 1, 2, 3}  # computed before; block 4 never was
    _put(cluster, 0, [0, 1, 2])
    _put(cluster, 1, [3])
    cluster.nodes[0].evict([block_key(0)])  # the chain's head is gone from the whole cluster
    replay._read(cluster.nodes, first)
    r = replay.result
    # 1, 2 (node 0) and 3 (node 1) exist, but block 0 exists nowhere: no prefix, 3 misses.
    assert (r.hit_blocks, r.stranded_blocks, r.recomputed_blocks) == (0, 3, 4)
    assert r.zero_recompute_hit_rate == 0.0
    assert r.reuse_hit_rate == 0.0
    assert r.compulsory_tokens == CFG.block_tokens  # block 4
    replay._read(cluster.nodes, second)  # node 0 now holds 0..4: three remote hits
    assert (r.hit_blocks, r.remote_hit_blocks, r.stranded_blocks) == (3, 3, 3)
    assert r.zero_recompute_hit_rate == pytest.approx(3 / 6)
    assert r.reuse_hit_rate == pytest.approx(3 / 7)  # lost blocks count here, not above
    assert cluster.nodes[1].contains([block_key(b) for b in (0, 1, 2)]) == [Tier.GPU] * 3


def test_rates_are_one_with_nothing_to_reuse() -> None:
    replay = Replay(_trace([Read(0.0, "p", 0, 0, (0,))]), CFG, "lru")
    assert replay.result.zero_recompute_hit_rate == 1.0 == replay.result.reuse_hit_rate


def test_the_cluster_reports_replica_counts_and_a_copy_is_dropped_before_a_sole_one(
    cluster: SimCluster,
) -> None:
    n0 = cluster.nodes[0]
    _put(cluster, 0, [0, 1, 2, 3])  # n0's GPU tier is full
    _put(cluster, 1, [0])  # a second copy of block 0 on n1
    cluster.sync_replicas()
    assert cluster.take_changes(1)[0].key == block_key(0)
    assert cluster.take_changes(1) == []
    _put(cluster, 0, [9])  # n0 needs GPU room: its copy of 0 goes, and is not demoted
    assert n0.contains([block_key(b) for b in (0, 1, 2, 3, 9)]) == [None] + [Tier.GPU] * 4
    assert (n0.counters.evictions, n0.counters.demotions) == (1, 0)
    cluster.sync_replicas()  # n1 now holds the sole copy of 0: it is demoted, not dropped
    n1 = cluster.nodes[1]
    NOW[0] = 1.0  # block 0 is now the least recently used of n1
    _put(cluster, 1, [20, 21, 22, 23])
    assert n1.contains([block_key(0)]) == [Tier.CPU]
    assert n1.counters.evictions == 0
