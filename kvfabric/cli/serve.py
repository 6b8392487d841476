"""`kvfabric up` for a single node: open the node store and print a status line until Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import typer

from kvfabric.config import KVFabricConfig
from kvfabric.node.core import NodeStoreCore
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
    """Run the node store in this process until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    store = NodeStoreCore(config)
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    typer.echo(
        f"kvfabric: node store ready (data under {config.data_dir}, tiers "
        f"{', '.join(t.name for t in store.tier_list())}); Ctrl-C to stop"
    )
    try:
        while True:
            typer.echo(status_line(store.stats()))
            if once or stop.wait(config.status_interval_s):
                break
    finally:
        store.close()
        typer.echo("kvfabric: stopped")
