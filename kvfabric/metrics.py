"""kvfabric's metrics: counted in-process, exported through ``ray.util.metrics``.

Hot paths (an RPC, a lookup, a transfer) only add to plain counters of a
:class:`Telemetry` under one lock — a dict update, no call into Ray. An
:class:`Exporter` thread in each actor (NodeStore, Directory) reads the pure
cores' ``stats()`` into gauges and totals once per interval, then pushes what
changed to Ray's metric objects. Ray's metrics agent serves them in
Prometheus text on each node's metrics export port with a ``ray_`` prefix
(``kvfabric_hits`` is scraped as ``ray_kvfabric_hits_total``), and the Ray
dashboard shows them. Without Ray (standalone node, unit tests) nothing is
exported; the counters still feed the Stats RPC and ``kvfabric top``.

Every metric is declared once in :data:`METRICS` with its tag keys; a record
with other tags raises ValueError. Each series also carries a ``node`` tag
(the first 12 characters of the Ray node id, or ``directory``).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)


class Kind(Enum):
    """How a metric behaves (Prometheus types)."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class MetricDef:
    """One metric: its name without the ``kvfabric_`` prefix, kind, tag keys and help."""

    name: str
    kind: Kind
    tags: tuple[str, ...]
    help: str

    @property
    def full_name(self) -> str:
        """The name given to Ray (Ray adds ``ray_``; a counter also gets ``_total``)."""
        return f"kvfabric_{self.name}"


LATENCY_BOUNDARIES = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Bucket upper bounds of the RPC latency histogram, in seconds."""

MAX_SAMPLES_PER_FLUSH = 20_000
"""Latency samples kept between two exports; beyond that, samples are dropped (counted)."""

_C, _G, _H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM
METRICS: dict[str, MetricDef] = {
    d.name: d
    for d in (
        MetricDef("hits", _C, ("op", "tier"), "blocks found, by operation and tier"),
        MetricDef("misses", _C, ("op",), "blocks asked for and not found"),
        MetricDef("recompute_avoided_tokens", _C, (), "prompt tokens found stored by lookups"),
        MetricDef("puts", _C, ("result",), "blocks offered to the store: stored or deduplicated"),
        MetricDef("evictions", _C, ("reason",), "blocks removed: capacity, ttl or requested"),
        MetricDef("demotions", _C, ("reason",), "blocks moved to a slower tier"),
        MetricDef("promotions", _C, (), "blocks moved to a faster tier"),
        MetricDef("checksum_failures", _C, (), "blocks whose bytes failed their checksum"),
        MetricDef("pins", _C, ("op",), "pin and unpin operations, in blocks"),
        MetricDef("pins_expired", _C, (), "pins ended by their TTL"),
        MetricDef("transfer_bytes", _C, ("transport", "direction"), "block bytes moved"),
        MetricDef("transfer_seconds", _C, ("transport", "direction"), "time spent moving them"),
        MetricDef("directory_events", _C, ("kind",), "directory index events, by kind"),
        MetricDef("tier_used_bytes", _G, ("tier",), "bytes used in each tier"),
        MetricDef("tier_capacity_bytes", _G, ("tier",), "capacity of each tier"),
        MetricDef("tier_blocks", _G, ("tier",), "blocks held in each tier"),
        MetricDef("type_bytes", _G, ("type",), "bytes held per semantic block type"),
        MetricDef("type_blocks", _G, ("type",), "blocks held per semantic block type"),
        MetricDef("pinned_bytes", _G, (), "bytes held by at least one pin"),
        MetricDef("pinned_blocks", _G, (), "blocks held by at least one pin"),
        MetricDef("directory_seq", _G, (), "last applied directory event"),
        MetricDef("directory_nodes", _G, (), "nodes registered with the directory"),
        MetricDef("directory_replicas", _G, (), "block replicas the directory knows"),
        MetricDef("rpc_latency_seconds", _H, ("method", "code"), "gRPC call duration"),
    )
}

Series = tuple[str, tuple[str, ...]]  # (metric name, tag values in the def's order)
_MAX_MEMO = 4096  # distinct tag sets remembered as checked (bounded: tags could be many)


def _ray_ready() -> bool:
    """True in a process connected to Ray (never imports Ray itself)."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


class Telemetry:
    """The counters, gauges and latency samples of one component (thread-safe).

    ``inc`` adds to a counter; ``set_total`` sets a counter from a monotonic
    total kept elsewhere (a core's ``Counters``); ``set`` sets a gauge;
    ``observe_rpc`` records one call's latency. ``flush`` pushes everything
    to Ray (a no-op without Ray).
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self._lock = threading.Lock()
        self._values: dict[Series, float] = {}
        self._exported: dict[Series, float] = {}
        self._samples: dict[tuple[str, str], list[float]] = {}
        self.dropped_samples = 0
        self._ray_metrics: dict[str, Any] | None = None
        self._memo: dict[tuple[Any, ...], Series] = {}

    # -- recording ----------------------------------------------------------------------
    def _series(self, name: str, kind: Kind, tags: Mapping[str, str]) -> Series:
        # Checked once per distinct (name, tags): the hot paths record the same few series.
        memo = (name, kind, *tags.items())
        series = self._memo.get(memo)
        if series is not None:
            return series
        d = METRICS.get(name)
        if d is None or d.kind != kind:
            raise ValueError(f"{name!r} is not a declared {kind.value} metric")
        if set(tags) != set(d.tags):
            raise ValueError(f"metric {name} takes tags {d.tags}, got {tuple(tags)}")
        series = (name, tuple(str(tags[k]) for k in d.tags))
        if len(self._memo) < _MAX_MEMO:
            self._memo[memo] = series
        return series

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        """Add ``value`` (> 0; smaller values are ignored) to a counter."""
        if value <= 0:
            return
        series = self._series(name, Kind.COUNTER, tags)
        with self._lock:
            self._values[series] = self._values.get(series, 0.0) + value

    def set_total(self, name: str, total: float, **tags: str) -> None:
        """Set a counter to a monotonic total counted elsewhere."""
        series = self._series(name, Kind.COUNTER, tags)
        with self._lock:
            self._values[series] = float(total)

    def set(self, name: str, value: float, **tags: str) -> None:
        """Set a gauge."""
        series = self._series(name, Kind.GAUGE, tags)
        with self._lock:
            self._values[series] = float(value)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Record one gRPC call's duration."""
        key = ("rpc_calls", (method, code))  # for the Stats RPC (Ray counts the histogram)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + 1
            samples = self._samples.setdefault((method, code), [])
            if len(samples) < MAX_SAMPLES_PER_FLUSH:
                samples.append(seconds)
            else:
                self.dropped_samples += 1

    # -- reading ------------------------------------------------------------------------
    def value(self, name: str, **tags: str) -> float:
        """The current value of one series (0 if never recorded)."""
        d = METRICS[name]
        series = (name, tuple(str(tags[k]) for k in d.tags))
        with self._lock:
            return self._values.get(series, 0.0)

    def counters(self) -> dict[str, int]:
        """Every counter as ``name{tag=value,...}`` → integer (seconds as microseconds).

        This is what the Stats RPC adds to the core's counters.
        """
        with self._lock:
            items = list(self._values.items())
        out: dict[str, int] = {}
        for (name, values), v in items:
            d = METRICS.get(name)
            if d is not None and d.kind != Kind.COUNTER:
                continue
            keys = d.tags if d is not None else ("method", "code")
            label = ",".join(f"{k}={x}" for k, x in zip(keys, values, strict=True))
            if name.endswith("_seconds"):
                name, v = name[: -len("_seconds")] + "_us", v * 1e6
            out[f"{name}{{{label}}}" if label else name] = int(v)
        return out

    # -- export -------------------------------------------------------------------------
    def flush(self) -> bool:
        """Push changes to Ray's metrics; False (and nothing done) without Ray."""
        if not _ray_ready():
            return False
        metrics = self._ray()
        with self._lock:
            values = dict(self._values)
            samples, self._samples = self._samples, {}
        node = {"node": self.node}
        for series, v in values.items():
            name, tag_values = series
            d = METRICS.get(name)
            if d is None:
                continue
            tags = {**dict(zip(d.tags, tag_values, strict=True)), **node}
            if d.kind == Kind.GAUGE:
                metrics[name].set(v, tags=tags)
                continue
            delta = v - self._exported.get(series, 0.0)
            if delta > 0:
                metrics[name].inc(delta, tags=tags)
            self._exported[series] = max(v, self._exported.get(series, 0.0))
        hist = metrics["rpc_latency_seconds"]
        for (method, code), secs in samples.items():
            tags = {"method": method, "code": code, **node}
            for s in secs:
                hist.observe(s, tags=tags)
        return True

    def _ray(self) -> dict[str, Any]:
        if self._ray_metrics is None:
            from ray.util import metrics as rm

            made: dict[str, Any] = {}
            for d in METRICS.values():
                tags = (*d.tags, "node")
                if d.kind == Kind.COUNTER:
                    made[d.name] = rm.Counter(d.full_name, d.help, tag_keys=tags)
                elif d.kind == Kind.GAUGE:
                    made[d.name] = rm.Gauge(d.full_name, d.help, tag_keys=tags)
                else:
                    made[d.name] = rm.Histogram(
                        d.full_name, d.help, boundaries=list(LATENCY_BOUNDARIES), tag_keys=tags
                    )
            self._ray_metrics = made
        return self._ray_metrics


class Exporter:
    """A daemon thread that runs ``collect`` and flushes ``telemetry`` every ``interval_s``."""

    def __init__(
        self, telemetry: Telemetry, collect: Callable[[], None], interval_s: float
    ) -> None:
        if not 0 < interval_s <= 3600:
            raise ValueError(f"interval_s must be in (0, 3600], got {interval_s!r}")
        self.telemetry = telemetry
        self.collect = collect
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvfabric-metrics", daemon=True)

    def start(self) -> Exporter:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def tick(self) -> None:
        """One collection and flush (the thread's loop body)."""
        self.collect()
        self.telemetry.flush()

    def stop(self) -> None:
        """Stop the thread, then export once more what happened since its last round."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5.0)
        try:
            self.tick()
        except Exception:  # shutting down: the last numbers are not worth a failure
            log.warning("last metrics export failed", exc_info=True)

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # metrics must never take the actor down
                log.exception("metrics export failed")
            if self._stop.wait(self.interval_s):
                return


def record_node_stats(t: Telemetry, stats: Any) -> None:
    """Gauges and core totals of a node from its ``NodeStats``."""
    for ts in stats.tiers:
        t.set("tier_used_bytes", ts.used_bytes, tier=ts.tier.name)
        t.set("tier_capacity_bytes", ts.capacity_bytes, tier=ts.tier.name)
        t.set("tier_blocks", ts.blocks, tier=ts.tier.name)
    types = set(stats.blocks_by_type) | set(getattr(stats, "bytes_by_type", {}))
    for name in types | {"GENERIC"}:
        t.set("type_blocks", stats.blocks_by_type.get(name, 0), type=name)
        t.set("type_bytes", getattr(stats, "bytes_by_type", {}).get(name, 0), type=name)
    t.set("pinned_bytes", stats.pinned_bytes)
    t.set("pinned_blocks", stats.pinned_blocks)
    c = stats.counters
    t.set_total("puts", c.puts, result="stored")
    t.set_total("puts", c.dedup_puts, result="dedup")
    capacity = c.evictions - c.evictions_requested - c.evictions_ttl
    t.set_total("evictions", capacity, reason="capacity")
    t.set_total("evictions", c.evictions_requested, reason="requested")
    t.set_total("evictions", c.evictions_ttl, reason="ttl")
    t.set_total("demotions", c.demotions - c.demotions_requested, reason="capacity")
    t.set_total("demotions", c.demotions_requested, reason="requested")
    t.set_total("promotions", c.promotions)
    t.set_total("checksum_failures", c.checksum_failures)
    t.set_total("pins_expired", c.pins_expired)


def count_hits(t: Telemetry, op: str, tiers: Iterable[str], asked: int) -> int:
    """Count found blocks by tier name and the rest of ``asked`` as misses; returns hits."""
    per: dict[str, int] = {}
    for name in tiers:
        per[name] = per.get(name, 0) + 1
    for name, n in per.items():
        t.inc("hits", n, op=op, tier=name)
    found = sum(per.values())
    t.inc("misses", asked - found, op=op)
    return found
