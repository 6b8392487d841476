"""Two vLLM engines on two Ray nodes share KV through the directory and a peer transfer.

A 2-node ``ray.cluster_utils.Cluster`` runs the fabric (directory + one
NodeStore per node); engine A talks to node a's gRPC API, engine B to node
b's. A prefix computed by A is found by B's node through the directory,
pulled from node a over the data plane (B loads it asynchronously, so its
scheduler never waits on the network), and B's output is identical to A's.
When the blocks then leave the cluster, the connector reports vLLM
``BlockRemoved`` events.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", exc_type=ImportError)
ray = pytest.importorskip("ray")

from kvfabric import cluster as kvcluster  # noqa: E402
from kvfabric.config import load_config  # noqa: E402
from kvfabric.hashing import chain_hashes  # noqa: E402
from kvfabric.localray import private_ray_cluster  # noqa: E402
from kvfabric.rpc.client import Client  # noqa: E402
from tests.e2e.harness import Engine, EventSubscriber, tokens  # noqa: E402
from tests.e2e.test_vllm_connector import namespace_of  # noqa: E402
from tests.e2e.tiny_model import build_tiny_model  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BS = 32


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """{"a": gRPC address of node a's NodeStore, "b": node b's}."""
    with private_ray_cluster(2, resources=[{"node_a": 1}, {"node_b": 1}]) as local:
        config = load_config(overrides={
            "data_dir": os.path.join(local.tmp, "data"), "cpu_arena_bytes": "128MiB",
            "cpu_prefault": False, "disk_bytes": "128MiB", "transport": "tcp",
            "node_check_interval_s": 0.5, "rpc_timeout_s": 30,
        }, env={})  # fmt: skip
        started = kvcluster.up(config, local.cluster.address, timeout_s=120)
        order = [n.node_id for n in local.cluster.list_all_nodes()]
        nodes = started["nodes"]
        yield {"a": nodes[order[0]]["rpc_address"], "b": nodes[order[1]]["rpc_address"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-cluster")


@pytest.fixture(scope="module")
def engines(work: Path, fabric: dict[str, str]) -> Iterator[dict[str, Any]]:
    model = build_tiny_model(work / "tiny")
    endpoint = f"ipc://{work}/kv-events.sock"
    sub = EventSubscriber(endpoint)
    a = Engine(model, work, "engine-a", address=fabric["a"], events=endpoint)
    b = Engine(model, work, "engine-b", address=fabric["b"])
    yield {"a": a, "b": b, "events": sub}
    for e in (a, b):
        e.close()
    sub.close()


def test_engine_b_hits_what_engine_a_computed_on_another_node(
    engines: dict[str, Any], fabric: dict[str, str]
) -> None:
    prompt = tokens(300, 11)
    want = engines["a"].generate(prompt)  # computed from scratch on node a's engine
    assert want["cached"] == 0
    got = engines["b"].generate(prompt)
    assert got["tokens"] == want["tokens"]
    assert got["cached"] == (300 - 1) // BS * BS  # every usable block came from node a
    ns = namespace_of(fabric["b"])
    hashes = [bytes(h) for h in chain_hashes(prompt[:288], BS)]
    with Client(fabric["b"]) as c:
        assert c.lookup(ns, hashes, local_only=True).matched == 9  # the peer copy landed on b


def test_blocks_leaving_the_cluster_are_reported_as_removed(
    engines: dict[str, Any], fabric: dict[str, str]
) -> None:
    prompt = tokens(96, 700)
    engines["a"].generate(prompt)
    ns = namespace_of(fabric["a"])
    hashes = [bytes(h) for h in chain_hashes(prompt[:96], BS)]
    with Client(fabric["a"]) as c:
        assert c.evict(ns, hashes) == 3
    deadline = time.monotonic() + 60
    removed: list[Any] = []
    while not removed and time.monotonic() < deadline:
        engines["a"].generate(tokens(40, 7))  # the engine publishes events as it steps
        removed = engines["events"].wait_for(
            lambda e: type(e).__name__ == "BlockRemoved" and e.medium == "kvfabric"
            and bytes(e.block_hashes[0]) in hashes, timeout_s=2.0,
        )  # fmt: skip
    assert {bytes(e.block_hashes[0]) for e in removed} == set(hashes)
