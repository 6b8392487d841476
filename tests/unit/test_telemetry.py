"""kvfabric.metrics without Ray: counting, totals from a core's stats, the Stats-RPC view."""

from __future__ import annotations

import threading
import time

import pytest

from kvfabric import metrics
from kvfabric.metrics import METRICS, Kind, Telemetry
from kvfabric.node.results import Counters, NamespaceInfo, NodeStats, TierStats
from kvfabric.types import Tier


def test_every_metric_is_named_kvfabric_noun_unit() -> None:
    for d in METRICS.values():
        assert d.full_name.startswith("kvfabric_") and d.full_name == d.full_name.lower()
        assert not d.full_name.endswith("_total"), "Ray adds _total to counters itself"
        if d.kind == Kind.HISTOGRAM:
            assert d.name.endswith("_seconds")


def test_inc_set_and_counters_view() -> None:
    t = Telemetry("n1")
    t.inc("hits", 3, op="lookup", tier="CPU")
    t.inc("hits", 2, op="lookup", tier="CPU")
    t.inc("misses", 0, op="lookup")  # nothing happened: no series
    t.inc("transfer_seconds", 0.25, transport="tcp", direction="in")
    t.set("tier_used_bytes", 4096, tier="CPU")
    t.observe_rpc("Lookup", "OK", 0.001)
    view = t.counters()
    assert view["hits{op=lookup,tier=CPU}"] == 5
    assert "misses{op=lookup}" not in view
    assert view["transfer_us{transport=tcp,direction=in}"] == 250_000
    assert view["rpc_calls{method=Lookup,code=OK}"] == 1
    assert not any(k.startswith("tier_used_bytes") for k in view)  # gauges are not counters
    assert t.value("tier_used_bytes", tier="CPU") == 4096


def test_records_are_checked_against_the_declaration() -> None:
    t = Telemetry("n1")
    with pytest.raises(ValueError, match="tags"):
        t.inc("hits", op="lookup")  # tier missing
    with pytest.raises(ValueError, match="not a declared counter"):
        t.inc("tier_used_bytes", tier="CPU")
    with pytest.raises(ValueError, match="not a declared gauge"):
        t.set("nosuch", 1)


def test_flush_without_ray_exports_nothing_and_keeps_counts() -> None:
    t = Telemetry("n1")
    t.inc("pins", 4, op="pin")
    assert t.flush() is False
    assert t.value("pins", op="pin") == 4


def test_concurrent_increments_are_not_lost() -> None:
    t = Telemetry("n1")

    def work() -> None:
        for _ in range(2000):
            t.inc("directory_events", kind="COMMITTED")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.value("directory_events", kind="COMMITTED") == 8000


def test_latency_samples_are_bounded_between_flushes() -> None:
    t = Telemetry("n1")
    for _ in range(metrics.MAX_SAMPLES_PER_FLUSH + 5):
        t.observe_rpc("Stats", "OK", 0.0001)
    assert t.dropped_samples == 5  # the samples kept for the histogram are bounded...
    calls = t.counters()["rpc_calls{method=Stats,code=OK}"]
    assert calls == metrics.MAX_SAMPLES_PER_FLUSH + 5  # ...the call count is not


def _stats(evictions: int, requested: int, ttl: int, demotions: int, asked: int) -> NodeStats:
    c = Counters(puts=7, dedup_puts=2, evictions=evictions, evictions_requested=requested,
                 evictions_ttl=ttl, demotions=demotions, demotions_requested=asked,
                 checksum_failures=1)  # fmt: skip
    tiers = (TierStats(Tier.CPU, 3, 3 * 4096, 1 << 20), TierStats(Tier.DISK, 1, 4096, 1 << 24))
    return NodeStats(tiers, c, 4096, 1, (NamespaceInfo("ns-a", 4096),),
                     {"GENERIC": 3, "SYSTEM_PROMPT": 1}, {"GENERIC": 12288, "SYSTEM_PROMPT": 4096})


def test_node_stats_become_gauges_and_reasoned_totals() -> None:
    t = Telemetry("n1")
    metrics.record_node_stats(t, _stats(evictions=10, requested=3, ttl=2, demotions=6, asked=1))
    assert t.value("tier_used_bytes", tier="CPU") == 3 * 4096
    assert t.value("tier_capacity_bytes", tier="DISK") == 1 << 24
    assert t.value("type_bytes", type="SYSTEM_PROMPT") == 4096
    assert t.value("type_blocks", type="GENERIC") == 3
    assert t.value("evictions", reason="capacity") == 5
    assert t.value("evictions", reason="requested") == 3
    assert t.value("evictions", reason="ttl") == 2
    assert t.value("demotions", reason="capacity") == 5
    assert t.value("demotions", reason="requested") == 1
    assert t.value("puts", result="dedup") == 2
    assert t.value("checksum_failures") == 1
    assert t.value("pinned_bytes") == 4096


def test_count_hits_groups_by_tier_and_counts_the_rest_as_misses() -> None:
    t = Telemetry("n1")
    found = metrics.count_hits(t, "lookup", ["CPU", "CPU", "DISK"], asked=5)
    assert found == 3
    assert t.value("hits", op="lookup", tier="CPU") == 2
    assert t.value("hits", op="lookup", tier="DISK") == 1
    assert t.value("misses", op="lookup") == 2


def test_exporter_runs_collect_until_stopped() -> None:
    t = Telemetry("n1")
    ticks = threading.Semaphore(0)

    def collect() -> None:
        t.inc("promotions")
        ticks.release()

    exporter = metrics.Exporter(t, collect, 0.01).start()
    assert ticks.acquire(timeout=10) and ticks.acquire(timeout=10)
    exporter.stop()
    seen = t.value("promotions")
    assert seen >= 3  # two rounds at least, and the last one of stop()
    time.sleep(0.05)
    assert t.value("promotions") == seen  # stopped: no more rounds
    with pytest.raises(ValueError):
        metrics.Exporter(t, collect, 0)
