"""The cluster on real Ray: 3 nodes of ``ray.cluster_utils.Cluster`` on this machine.

Write once, read anywhere; concurrent writers; node and directory failures;
a node joining; fan-out replication; bad input. One cluster for the module.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from kvfabric import cluster as kvcluster  # noqa: E402
from kvfabric.config import KVFabricConfig, load_config  # noqa: E402
from kvfabric.errors import InvalidArgument, NotFound  # noqa: E402
from kvfabric.localray import private_ray_cluster  # noqa: E402
from kvfabric.types import BlockKey, BlockType, Tier  # noqa: E402

NS = "ns-cluster"
B = 64 * 1024

pytestmark = pytest.mark.timeout(600)


@dataclass
class Fabric:
    cluster: Any
    config: KVFabricConfig
    node_ids: list[str]

    def node(self, i: int) -> Any:
        return ray.get_actor(kvcluster.node_actor_name(self.node_ids[i]), namespace="kvfabric")

    @property
    def directory(self) -> Any:
        return kvcluster.directory_handle()


def h(i: int, salt: str = "") -> bytes:
    return hashlib.blake2b(f"{salt}{i}".encode(), digest_size=32).digest()


def data(i: int, salt: str = "") -> bytes:
    seed = hashlib.blake2b(f"data{salt}{i}".encode(), digest_size=32).digest()
    return (seed * (B // 32))[:B]


def wait_for(cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def replicas(fab: Fabric, hashes: list[bytes]) -> list[set[str]]:
    keys = [BlockKey(NS, x) for x in hashes]
    locs = ray.get(fab.directory.locate.remote(keys, ""))
    return [{loc[0] for loc in per_key} for per_key in locs]


@pytest.fixture(scope="module")
def fab() -> Iterator[Fabric]:
    resources = [{"node_a": 1}, {"node_b": 1}, {"node_c": 1}]
    with private_ray_cluster(3, resources=resources) as local:
        config = load_config(
            overrides={
                "data_dir": os.path.join(local.tmp, "data"),
                "cpu_arena_bytes": "8MiB", "cpu_slab_bytes": "1MiB", "max_block_bytes": "1MiB",
                "disk_bytes": "64MiB", "cpu_prefault": False, "node_check_interval_s": 0.2,
                "claim_timeout_s": 3, "rpc_timeout_s": 30, "join_push_blocks": 64,
                # the data plane under test; CI runs with whatever "auto" picks there
                "transport": os.environ.get("KVFABRIC_TRANSPORT", "auto"),
            },
            env={},
        )  # fmt: skip
        kvcluster.up(config, local.cluster.address, timeout_s=120)
        yield Fabric(local.cluster, config, [n.node_id for n in local.cluster.list_all_nodes()])


def test_put_on_a_read_on_c_without_recompute(fab: Fabric) -> None:
    hashes = [h(i, "wr") for i in range(4)]
    out = ray.get(fab.node(0).put.remote(NS, hashes, [data(i, "wr") for i in range(4)]))
    assert [o.status for o in out] == ["stored"] * 4
    got = ray.get(fab.node(2).get.remote(NS, hashes))
    assert got == [data(i, "wr") for i in range(4)]
    assert all(r == {fab.node_ids[0], fab.node_ids[2]} for r in replicas(fab, hashes))
    # C now holds its own verified copy: a second read is local
    matched, _ = ray.get(fab.node(2).lookup_local.remote(NS, hashes))
    assert matched == 4
    again = ray.get(fab.node(0).put.remote(NS, hashes[:1], [data(0, "wr")]))
    assert again[0].status == "exists"


def test_eight_concurrent_writers_one_commit(fab: Fabric) -> None:
    key = h(0, "race")
    refs = [fab.node(i % 3).put.remote(NS, [key], [data(i, "race")]) for i in range(8)]
    statuses = [r[0].status for r in ray.get(refs)]
    assert statuses.count("stored") == 1, statuses
    winner = statuses.index("stored")
    reads = ray.get([fab.node(i).get.remote(NS, [key]) for i in range(3)])
    assert all(r == [data(winner, "race")] for r in reads)
    entry = ray.get(fab.directory.state.remote())
    assert entry is not None


def test_lost_nodestore_replicas_disappear_and_reads_fall_back(fab: Fabric) -> None:
    hashes = [h(i, "kill") for i in range(3)]
    datas = [data(i, "kill") for i in range(3)]
    ray.get(fab.node(1).put.remote(NS, hashes, datas))
    assert ray.get(fab.node(0).get.remote(NS, hashes)) == datas  # replica on A too
    b = fab.node_ids[1]
    ray.kill(fab.node(1))
    wait_for(lambda: all(b not in r for r in replicas(fab, hashes)), 20, "B's replicas to go")
    assert ray.get(fab.node(2).get.remote(NS, hashes)) == datas  # from A's replica
    # the supervisor restarts a NodeStore on B; it becomes ready again
    wait_for(lambda: b in ray.get(fab.directory.ready_nodes.remote()), 60, "B to restart")


def test_directory_restart_restores_the_same_index(fab: Fabric) -> None:
    hashes = [h(i, "dir") for i in range(5)]
    ray.get(fab.node(0).put.remote(NS, hashes, [data(i, "dir") for i in range(5)]))
    ray.get(fab.node(0).pin.remote(NS, hashes[:2], "ops"))
    ray.get(fab.node(0).move.remote(NS, hashes[2:4], 2))  # to disk
    before = ray.get(fab.directory.state.remote())
    ray.kill(fab.directory)
    kvcluster.ensure_directory(fab.config)
    wait_for(lambda: _pings(), 30, "the directory to come back")
    time.sleep(1.0)  # nodes re-send inventories; nothing should change
    after = ray.get(fab.directory.state.remote())
    assert after == before
    # and the restarted directory keeps serving writes and reads
    ray.get(fab.node(1).put.remote(NS, [h(9, "dir")], [data(9, "dir")]))
    assert ray.get(fab.node(2).get.remote(NS, [h(9, "dir")])) == [data(9, "dir")]


def _pings() -> bool:
    try:
        ray.get(kvcluster.directory_handle().ping.remote(), timeout=5)
        return True
    except Exception:
        return False


def test_new_node_gets_tool_definitions_and_hot_prefixes_before_serving(fab: Fabric) -> None:
    tools = [h(i, "tool") for i in range(3)]
    ray.get(fab.node(0).put.remote(NS, tools, [data(i, "tool") for i in range(3)],
                                   block_type=BlockType.TOOL_DEFINITION))  # fmt: skip
    wait_for(lambda: all(len(r) == 3 for r in replicas(fab, tools)), 30, "tools on all 3 nodes")
    hot = [h(i, "hot") for i in range(4)]
    ray.get(fab.node(1).put.remote(NS, hot, [data(i, "hot") for i in range(4)]))
    for _ in range(5):
        ray.get(fab.directory.lookup.remote(NS, hot, None))
    new = fab.cluster.add_node(num_cpus=1, resources={"node_d": 1})
    fab.node_ids.append(new.node_id)
    wait_for(lambda: new.node_id in ray.get(fab.directory.ready_nodes.remote()), 90, "D ready")
    d = fab.node(3)
    assert ray.get(d.lookup_local.remote(NS, tools))[0] == 3
    assert ray.get(d.lookup_local.remote(NS, hot))[0] == 4
    stats = ray.get(d.stats.remote())
    assert stats.counters.hits == 0  # nothing asked D yet: the blocks were pushed, not pulled


def test_fanout_copies_the_shared_prefix_to_targets(fab: Fabric) -> None:
    prefix = [h(i, "fork") for i in range(3)]
    ray.get(fab.node(0).put.remote(NS, prefix, [data(i, "fork") for i in range(3)]))
    keys = [BlockKey(NS, x) for x in prefix]
    copied = ray.get(fab.directory.fanout.remote(keys, fab.node_ids[1:3]))
    assert copied == 6
    for i in (1, 2):
        assert ray.get(fab.node(i).lookup_local.remote(NS, prefix))[0] == 3
    with pytest.raises(NotFound):
        ray.get(fab.directory.fanout.remote(keys, ["no-such-node"]))


def test_removed_node_leaves_the_directory(fab: Fabric) -> None:
    if len(fab.node_ids) < 4:
        pytest.skip("needs the node added by the join test")
    d = fab.node_ids[3]
    hashes = [h(i, "gone") for i in range(2)]
    ray.get(fab.node(3).put.remote(NS, hashes, [data(i, "gone") for i in range(2)]))
    assert all(r == {d} for r in replicas(fab, hashes))
    node = next(n for n in fab.cluster.list_all_nodes() if n.node_id == d)
    fab.cluster.remove_node(node)
    fab.node_ids.pop()
    wait_for(lambda: all(not r for r in replicas(fab, hashes)), 60, "D's replicas to go")
    assert ray.get(fab.node(0).get.remote(NS, hashes)) == [None, None]  # gone: a miss


def test_bad_input_is_typed_and_changes_nothing(fab: Fabric) -> None:
    before = ray.get(fab.directory.state.remote())
    a = fab.node(0)
    with pytest.raises(InvalidArgument):
        ray.get(a.put.remote(NS, [b"short"], [data(0)]))
    with pytest.raises(InvalidArgument):
        ray.get(a.get.remote(NS, [h(1), b"x" * 31]))
    with pytest.raises(InvalidArgument):
        ray.get(a.put.remote(NS, [h(1, "big")], [b"x" * (2 << 20)]))
    with pytest.raises(InvalidArgument):
        ray.get(a.move.remote(NS, [h(0, "wr")], 7))
    with pytest.raises(NotFound):
        ray.get(fab.directory.claim_many.remote("no-such-node", "w", [(BlockKey(NS, h(5)), B)]))
    claims = ray.get(fab.directory.claim_many.remote(
        fab.node_ids[0], "w-test", [(BlockKey(NS, h(0, "wr")), B)]))  # fmt: skip
    assert claims == ["committed"]
    assert ray.get(fab.directory.state.remote()) == before


def test_many_concurrent_reads_and_writes_stay_consistent(fab: Fabric) -> None:
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(5):
                x = [h(i, f"mix{w}")]
                ray.get(fab.node(w % 3).put.remote(NS, x, [data(i, f"mix{w}")]))
                assert ray.get(fab.node((w + 1) % 3).get.remote(NS, x)) == [data(i, f"mix{w}")]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_grpc_api_on_every_node(fab: Fabric) -> None:
    from kvfabric.rpc.client import Client, PutStatus

    infos = [ray.get(fab.node(i).info.remote()) for i in range(3)]
    assert all(i["rpc_address"] for i in infos)
    hashes = [h(i, "grpc") for i in range(3)]
    blocks = [data(i, "grpc") for i in range(3)]
    with Client(infos[0]["rpc_address"]) as a, Client(infos[2]["rpc_address"]) as c:
        assert a.health() and c.health()
        assert a.put(NS, hashes, blocks) == [PutStatus.STORED] * 3
        found = c.lookup(NS, hashes)  # through C's API, answered by the directory
        assert found.matched == 3 and {loc.node_id for loc in found.locations} == {
            infos[0]["node_id"]
        }
        assert c.get(NS, hashes) == blocks  # pulled from A by C, then read over C's data plane
        before = c.stats().counters
        assert c.pin(NS, hashes[:1], owner="ops").pinned == 1
        assert c.move(NS, hashes[1:2], tier=Tier.DISK).moved == 1
        assert c.evict(NS, hashes[2:]) == 1
        assert c.prefetch(NS, hashes[1:2]).moved == 1
        stats = c.stats()
        assert stats.pinned_blocks >= 1
        assert stats.counters["promotions"] > before["promotions"]
        assert stats.counters["evictions"] > before["evictions"]
        assert c.unpin(NS, hashes[:1], owner="ops") == 1
        events = list(c.watch_events(from_seq=0))
        assert any(e.kind == "COMMITTED" and e.hash == hashes[0] for e in events)


def test_grpc_fork_hint_annotate_and_move_to_node(fab: Fabric) -> None:
    from kvfabric.hints import HintKind
    from kvfabric.rpc.client import Client

    infos = [ray.get(fab.node(i).info.remote()) for i in range(3)]
    prefix = [h(i, "gfork") for i in range(2)]
    with Client(infos[0]["rpc_address"]) as a:
        a.put(NS, prefix, [data(i, "gfork") for i in range(2)])
        assert a.annotate(NS, prefix, block_type=BlockType.REASONING_BRANCH, program_id="p9") == 2
        assert a.hint("p9", HintKind.PROGRAM_START).accepted  # hints follow the program's start
        res = a.hint("p9", HintKind.FORK, namespace=NS, hashes=prefix,
                     targets=[infos[1]["node_id"]], children=2)  # fmt: skip
        assert res.accepted and res.copied == 2
        assert ray.get(fab.node(1).lookup_local.remote(NS, prefix))[0] == 2
        assert a.hint("p9", HintKind.JOIN).accepted  # the fork pinned its prefix until the join
        moved = a.move(NS, prefix[:1], node_id=infos[2]["node_id"])
        assert moved.moved == 1
    assert ray.get(fab.node(2).lookup_local.remote(NS, prefix[:1]))[0] == 1
    assert ray.get(fab.node(0).lookup_local.remote(NS, prefix[:1]))[0] == 0  # moved away
