"""`kvfabric up`: run the fabric in the foreground and print a status line until Ctrl-C.

Cluster mode starts (or joins) Ray, the directory and a NodeStore per node;
standalone mode runs one node store in this process without Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from types import FrameType
from typing import Any

import typer

from kvfabric.config import KVFabricConfig
from kvfabric.node.results import NodeStats

log = logging.getLogger(__name__)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f}"


def status_line(stats: NodeStats) -> str:
    """One line: blocks and bytes per tier, hits, misses, pins."""
    tiers = "  ".join(
        f"{t.tier.name}: {t.blocks} blocks {_gib(t.used_bytes)}/{_gib(t.capacity_bytes)} GiB"
        for t in stats.tiers
    )
    c = stats.counters
    return (
        f"kvfabric node up | {tiers} | hits {c.hits} misses {c.misses} "
        f"| pinned {stats.pinned_blocks} blocks | checksum failures {c.checksum_failures}"
    )


def serve_forever(config: KVFabricConfig, *, once: bool = False) -> None:
    """Run one node store with its gRPC API in this process until SIGINT/SIGTERM."""
    from kvfabric.node.service import NodeStoreService
    from kvfabric.rpc.server import start_server

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    service = NodeStoreService("standalone", config)
    store = service.core
    rpc = start_server(service, config)
    local = service.start_local()
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    typer.echo(
        f"kvfabric: node store ready (data under {config.data_dir}, tiers "
        f"{', '.join(t.name for t in store.tier_list())}); gRPC API at {rpc.address}, "
        f"data plane at {service.address}"
        + (f", local clients via /dev/shm/{service.config.cpu_arena_shm_name}" if local else "")
        + "; Ctrl-C to stop"
    )
    try:
        while True:
            typer.echo(status_line(store.stats()))
            if once or stop.wait(config.status_interval_s):
                break
    finally:
        rpc.stop()
        service.close()
        typer.echo("kvfabric: stopped")


def cluster_status() -> dict[str, Any]:
    """Every node's info and stats, and the directory's sequence number."""
    import ray

    from kvfabric import cluster

    directory = cluster.directory_handle()
    seq = ray.get(directory.ping.remote(), timeout=30)
    nodes = {}
    lines = [f"kvfabric directory seq {seq}"]
    for node_id, handle in sorted(cluster.node_stores().items()):
        info = ray.get(handle.info.remote(), timeout=30)
        stats = ray.get(handle.stats.remote(), timeout=30)
        nodes[node_id] = {**info, "stats": dataclasses.asdict(stats)}
        lines.append(f"node {node_id[:12]} grpc {info['rpc_address']} ready={info['ready']} | "
                     + status_line(stats))  # fmt: skip
    return {"seq": seq, "nodes": nodes, "lines": lines}


def serve_cluster(
    config: KVFabricConfig, address: str | None, *, detach: bool = False, once: bool = False
) -> None:
    """Bring the fabric up and print status lines until SIGINT/SIGTERM; then take it down."""
    from kvfabric import cluster

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda s, f: stop.set())
    signal.signal(signal.SIGTERM, lambda s, f: stop.set())
    started = cluster.up(config, address)
    typer.echo(f"kvfabric: fabric up on Ray at {started['ray_address']}")
    for node_id, info in sorted(started["nodes"].items()):
        typer.echo(f"kvfabric: NodeStore {node_id[:12]} gRPC API at {info['rpc_address']}, "
                   f"blocks at {info['address']} ({info['transport']}, "
                   f"tiers {', '.join(info['tiers'])})")  # fmt: skip
    if detach:
        return
    try:
        while True:
            for line in cluster_status()["lines"]:
                typer.echo(line)
            if once or stop.wait(config.status_interval_s):
                break
    finally:
        cluster.down()
        typer.echo("kvfabric: stopped")
