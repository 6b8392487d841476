"""kvfabric_* metrics end to end: real Ray with its dashboard, real traffic, real Prometheus.

One two-node fabric for the module, with Ray reporting metrics every second.
Traffic touches every metric (puts that push blocks to disk, lookups, a pull
between nodes, pins with and without TTL, evict, move, prefetch, a block
corrupted on disk). Then: every node's metrics export port is scraped and the
``ray_kvfabric_*`` series are checked against what the traffic did; the
dashboard's HTTP API lists the NodeStore and Directory actors alive; and a
real Prometheus scrapes the same ports and answers every PromQL query of the
Grafana dashboard in deploy/grafana/ with data. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kvfabric import cluster as kvcluster  # noqa: E402
from kvfabric.config import KVFabricConfig, load_config  # noqa: E402
from kvfabric.localray import private_ray_cluster  # noqa: E402
from kvfabric.rpc.client import Client  # noqa: E402
from kvfabric.types import BlockType, Tier  # noqa: E402

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kvfabric-dashboard.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
NS = "ns-metrics"
B = 16 * 1024
CPU_BYTES = 256 * 1024  # 16 blocks: a put of 24 pushes 8 or more down to disk
REPORT_INTERVAL = "RAY_metrics_report_interval_ms"  # Ray's spelling, lower case included


@dataclass
class Traffic:
    """What the fabric was asked to do, to compare the metrics with."""

    matched: int = 0
    block_tokens: int = 16
    pulled: int = 0
    evicted: int = 0
    moved_down: int = 0


@dataclass
class Fabric:
    config: KVFabricConfig
    nodes: list[str]  # sorted node ids
    rpc: dict[str, str]
    traffic: Traffic

    def actor(self, i: int) -> Any:
        return ray.get_actor(kvcluster.node_actor_name(self.nodes[i]), namespace="kvfabric")


def h(i: int) -> bytes:
    return hashlib.blake2b(f"m{i}".encode(), digest_size=32).digest()


def data(i: int) -> bytes:
    return hashlib.shake_256(f"d{i}".encode()).digest(B)  # no repeats: found once on disk


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


def corrupt_on_disk(fab: Fabric, node: int, block: bytes) -> None:
    """Flip one byte of ``block``'s payload in the node's LMDB file (the actor has it mapped)."""
    path = fab.config.for_node(fab.nodes[node]).disk_path / "data.mdb"
    raw = path.read_bytes()
    at = raw.find(block[:64])
    assert at >= 0 and raw.find(block[:64], at + 1) < 0, "the block must be on disk once"
    with open(path, "r+b") as f:
        f.seek(at + B // 2)
        f.write(bytes([raw[at + B // 2] ^ 0x10]))


def run_traffic(fab: Fabric) -> None:
    t = fab.traffic
    a, b = fab.actor(0), fab.actor(1)
    hashes = [h(i) for i in range(24)]
    with Client(fab.rpc[fab.nodes[0]]) as c:
        for first in range(0, 24, 8):  # CPU holds 16: the rest go down to disk
            c.put(NS, hashes[first : first + 8], [data(i) for i in range(first, first + 8)])
        t.matched = c.lookup(NS, [*hashes, h(999)], block_tokens=t.block_tokens).matched
        c.pin(NS, hashes[:4], "ops")
        c.unpin(NS, hashes[:2], "ops")
        c.pin(NS, hashes[4:6], "short-lived", ttl_s=1.0)
        t.evicted = c.evict(NS, hashes[20:22])
        c.annotate(NS, hashes[22:23], block_type=BlockType.TOOL_DEFINITION, ttl_s=1.0)
        t.moved_down = c.move(NS, hashes[6:9], tier=Tier.DISK).moved
        c.prefetch(NS, hashes[6:8], tier=Tier.CPU)
        c.get(NS, hashes[:2])
        c.put(NS, [h(100)], [data(100)])
    got = ray.get(b.get.remote(NS, hashes[10:14]), timeout=60)  # B pulls them from A
    t.pulled = sum(x is not None for x in got)
    ray.get(a.move.remote(NS, [h(100)], int(Tier.DISK)), timeout=60)
    time.sleep(1.5)  # flushed by LMDB's periodic sync at the latest
    corrupt_on_disk(fab, 0, data(100))
    assert ray.get(a.get.remote(NS, [h(100)]), timeout=60) == [None]  # a miss, never bad bytes


@pytest.fixture(scope="module")
def fab() -> Iterator[Fabric]:
    saved = os.environ.get(REPORT_INTERVAL)
    os.environ[REPORT_INTERVAL] = "1000"  # series in ~1 s, not ~10 s
    try:
        with private_ray_cluster(2, resources=[{"node_a": 1}, {"node_b": 1}],
                                 dashboard=True) as local:  # fmt: skip
            config = load_config(
                overrides={
                    "data_dir": os.path.join(local.tmp, "data"), "cpu_arena_bytes": CPU_BYTES,
                    "cpu_slab_bytes": "64KiB", "max_block_bytes": "64KiB",
                    "disk_bytes": "32MiB", "cpu_prefault": False, "node_check_interval_s": 0.2,
                    "metrics_interval_s": 0.5, "disk_sync_interval_s": 0.2, "policy": "lru",
                    # the gRPC path is what this test accounts for byte by byte
                    "local_channel": False,
                },
                env={},
            )  # fmt: skip
            up = kvcluster.up(config, local.cluster.address, timeout_s=120)
            rpc = {n: i["rpc_address"] for n, i in up["nodes"].items()}
            fabric = Fabric(config, sorted(rpc), rpc, Traffic())
            run_traffic(fabric)
            yield fabric
    finally:
        if saved is None:
            os.environ.pop(REPORT_INTERVAL, None)
        else:
            os.environ[REPORT_INTERVAL] = saved


def metrics_ports() -> list[str]:
    """host:port of every alive node's metrics export endpoint."""
    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
            if n["Alive"]]  # fmt: skip


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(endpoint: str) -> Samples:
    """The kvfabric samples (name, labels without Ray's own) of one endpoint."""
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_kvfabric_"):
                keep = {k: v for k, v in s.labels.items() if k[0].islower() and
                        not k.startswith("otel_")}  # fmt: skip
                out[(s.name, frozenset(keep.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and set(labels.items()) <= lab)  # fmt: skip


def all_samples() -> Samples:
    merged: Samples = {}
    for endpoint in metrics_ports():
        merged.update(scrape(endpoint))
    return merged


def test_every_node_exports_kvfabric_series_with_plausible_values(fab: Fabric) -> None:
    a, b = fab.nodes[0][:12], fab.nodes[1][:12]
    t = fab.traffic

    def ready() -> Samples | None:
        s = all_samples()
        done = (total(s, "ray_kvfabric_checksum_failures_total", node=a) >= 1
                and total(s, "ray_kvfabric_transfer_bytes_total", node=b) > 0
                and total(s, "ray_kvfabric_evictions_total", reason="ttl") >= 1
                and total(s, "ray_kvfabric_pins_expired_total") >= 1
                and total(s, "ray_kvfabric_directory_seq") > 0)  # fmt: skip
        return s if done else None

    s = wait_for(ready, 90, "every kvfabric series on the metrics ports")
    assert total(s, "ray_kvfabric_tier_capacity_bytes", node=a, tier="CPU") == CPU_BYTES
    used = total(s, "ray_kvfabric_tier_used_bytes", node=a, tier="CPU")
    assert 0 < used <= CPU_BYTES
    assert total(s, "ray_kvfabric_tier_used_bytes", node=a, tier="DISK") > 0
    assert total(s, "ray_kvfabric_type_bytes", node=a, type="GENERIC") % B == 0
    assert t.matched == 24
    assert total(s, "ray_kvfabric_hits_total", node=a, op="lookup") == 24
    assert total(s, "ray_kvfabric_hits_total", node=a, op="lookup", tier="DISK") >= 8
    assert total(s, "ray_kvfabric_misses_total", node=a, op="lookup") == 1
    assert total(s, "ray_kvfabric_recompute_avoided_tokens_total", node=a) == 24 * t.block_tokens
    assert total(s, "ray_kvfabric_transfer_bytes_total", node=b, transport="tcp",
                 direction="in") == t.pulled * B == 4 * B  # fmt: skip
    assert total(s, "ray_kvfabric_transfer_seconds_total", node=b, transport="tcp") > 0
    assert total(s, "ray_kvfabric_transfer_bytes_total", node=a, transport="grpc",
                 direction="in") == 25 * B  # fmt: skip
    assert total(s, "ray_kvfabric_pins_total", node=a, op="pin") == 6
    assert total(s, "ray_kvfabric_pins_total", node=a, op="unpin") == 2
    assert total(s, "ray_kvfabric_pinned_blocks", node=a) == 2  # "ops" on 2; the TTL pins ended
    assert total(s, "ray_kvfabric_evictions_total", node=a, reason="requested") == t.evicted == 2
    assert total(s, "ray_kvfabric_demotions_total", node=a, reason="capacity") >= 8
    assert total(s, "ray_kvfabric_demotions_total", node=a, reason="requested") == t.moved_down + 1
    assert total(s, "ray_kvfabric_promotions_total", node=a) >= 2
    assert total(s, "ray_kvfabric_checksum_failures_total", node=a) == 1
    assert total(s, "ray_kvfabric_puts_total", node=a, result="stored") == 25
    commits = total(s, "ray_kvfabric_directory_events_total", node="directory", kind="COMMITTED")
    assert commits >= 25
    assert total(s, "ray_kvfabric_directory_nodes") == 2
    assert total(s, "ray_kvfabric_rpc_latency_seconds_count", node=a, method="Put") == 4
    assert total(s, "ray_kvfabric_rpc_latency_seconds_count", node=a, method="Lookup") == 1


def test_dashboard_api_shows_the_actors_alive(fab: Fabric) -> None:
    url = ray._private.worker.get_dashboard_url()
    assert url, "the dashboard is not running"

    def actors() -> list[dict[str, Any]] | None:
        with urllib.request.urlopen(f"http://{url}/api/v0/actors?limit=1000", timeout=10) as r:
            found = json.load(r)["data"]["result"]["result"]
        alive = [x for x in found if x["state"] == "ALIVE"]
        classes = [x["class_name"] for x in alive]
        return alive if classes.count("NodeStoreActorImpl") == 2 and \
            "DirectoryActorImpl" in classes else None  # fmt: skip

    alive = wait_for(actors, 30, "the fabric's actors in the dashboard API")
    stores = {x["node_id"] for x in alive if x["class_name"] == "NodeStoreActorImpl"}
    assert stores == set(fab.nodes)
    assert any(x["name"] == kvcluster.DIRECTORY_NAME for x in alive)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus(fab: Fabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not os.access(PROMETHEUS, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: run scripts/install-prometheus.sh")
        pytest.skip("prometheus is not installed (scripts/install-prometheus.sh)")
    d = tmp_path_factory.mktemp("prom")
    targets = json.dumps(metrics_ports())
    (d / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: {targets}\n"
    )
    port = _free_port()
    log = open(d / "prometheus.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'db'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200
        except OSError:
            return proc.poll() is not None  # exited: reported below
    try:
        wait_for(up, 60, "Prometheus to start")
        assert proc.poll() is None, (d / "prometheus.log").read_text()[-2000:]
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the Grafana dashboard, ``$node`` = all."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"].replace("$node", ".*")))
    return out


def query(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_answers_every_dashboard_query(fab: Fabric, prometheus: str) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    targets = wait_for(
        lambda: (t := json.load(urllib.request.urlopen(f"{prometheus}/api/v1/targets",
                                                       timeout=10))["data"]["activeTargets"])
        and all(x["health"] == "up" for x in t) and t,
        60, "Prometheus to scrape every node",
    )  # fmt: skip
    assert len(targets) == 2
    # Keep the counters moving so rate() has something to say.
    with Client(fab.rpc[fab.nodes[0]]) as c:
        c.lookup(NS, [h(0), h(1)], block_tokens=16)
    pending = dict(queries)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for title, expr in list(pending.items()):
            if query(prometheus, expr):
                del pending[title]
        time.sleep(1.0)
    assert not pending, f"dashboard queries without data: {pending}"
