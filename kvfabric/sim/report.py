"""Run the simulator per pattern, summarise the runs, render a table, and draw plots.

For each pattern the summary carries the issue's headline numbers —
``recompute_vs_belady`` and ``recompute_vs_lru`` (program-aware recomputed
tokens over the baseline's; null when the baseline recomputed nothing but
program-aware did), ``zero_recompute_hit_rate`` (program-aware) and
``pct_p50_speedup_vs_lru`` (LRU's p50 program completion time over
program-aware's) — plus each policy's details, among them ``reuse_hit_rate``
(hits among reads of blocks computed before, lost ones included; the runner
documents both rates).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from kvfabric.sim.config import SimConfig
from kvfabric.sim.runner import POLICIES, PolicyRun, Replay
from kvfabric.sim.workloads import PATTERNS, generate

log = logging.getLogger(__name__)

GOALS = {"recompute_vs_belady": 1.10, "recompute_vs_lru": 0.5, "zero_recompute_hit_rate": 0.95}


def ratio(value: float, base: float) -> float | None:
    """``value / base``; 1.0 when both are 0, None when only the base is 0."""
    if base == 0:
        return 1.0 if value == 0 else None
    return value / base


def run_pattern(pattern: str, cfg: SimConfig) -> dict[str, Any]:
    """Generate one pattern's trace and replay it with every policy."""
    start = time.perf_counter()
    trace = generate(pattern, cfg)
    cache = max(3, int(trace.working_set_blocks() * cfg.cache_fraction))
    runs: dict[str, PolicyRun] = {}
    tiers: list[int] = []
    for policy in POLICIES:
        replay = Replay(trace, cfg, policy, capacity_blocks=cache)
        runs[policy] = replay.run()
        tiers = replay.blocks_per_tier
    pa, lru, opt = runs["program"], runs["lru"], runs["belady"]
    out: dict[str, Any] = {
        "recompute_vs_belady": ratio(pa.recomputed_tokens, opt.recomputed_tokens),
        "recompute_vs_lru": ratio(pa.recomputed_tokens, lru.recomputed_tokens),
        "zero_recompute_hit_rate": pa.zero_recompute_hit_rate,
        "reuse_hit_rate": pa.reuse_hit_rate,
        "pct_p50_speedup_vs_lru": ratio(lru.percentile(0.5), pa.percentile(0.5)),
        "programs": cfg.programs,
        "nodes": cfg.nodes,
        "events": len(trace.events),
        "working_set_blocks": trace.working_set_blocks(),
        "cache_blocks": cache,
        "blocks_per_tier_per_node": tiers,
        "seed": cfg.seed,
        "policies": {name: _policy_summary(r) for name, r in runs.items()},
        "wall_s": time.perf_counter() - start,
    }
    out["goals_met"] = {
        k: out[k] is not None and (out[k] <= v if k.startswith("recompute") else out[k] >= v)
        for k, v in GOALS.items()
    }
    return out


def _policy_summary(r: PolicyRun) -> dict[str, Any]:
    return {
        "recomputed_tokens": r.recomputed_tokens,
        "compulsory_tokens": r.compulsory_tokens,
        "zero_recompute_hit_rate": r.zero_recompute_hit_rate,
        "reuse_hit_rate": r.reuse_hit_rate,
        "hit_blocks": r.hit_blocks,
        "stranded_blocks": r.stranded_blocks,
        "remote_hit_blocks": r.remote_hit_blocks,
        "completion_p50_s": r.percentile(0.5),
        "completion_p95_s": r.percentile(0.95),
        "cache_use_by_type": r.cache_use_by_type,
        "max_fill": r.max_fill,
        "bytes_conserved": r.bytes_conserved,
        "store_failures": r.store_failures,
        "hints_refused": r.hints_refused,
        "fanout_blocks": r.fanout_blocks,
        "wall_s": r.wall_s,
    }


def run_all(patterns: list[str], cfg: SimConfig) -> dict[str, Any]:
    """Summaries of ``patterns`` (a JSON-ready dict keyed by pattern)."""
    return {p: run_pattern(p, cfg) for p in patterns}


def render(result: dict[str, Any]) -> None:
    """A rich table: the headline numbers per pattern, then per policy."""
    from rich.console import Console
    from rich.table import Table

    head = Table(title="kvfabric sim: program-aware vs baselines (goal in brackets)")
    head.add_column("pattern")
    for k, goal in GOALS.items():
        head.add_column(f"{k} [{'<=' if k.startswith('recompute') else '>='}{goal}]",
                        justify="right")  # fmt: skip
    head.add_column("p50 speedup vs lru", justify="right")
    for pattern, r in result.items():
        head.add_row(pattern, *(_fmt(r[k]) for k in GOALS), _fmt(r["pct_p50_speedup_vs_lru"]))
    detail = Table(title="per policy")
    for col in ("pattern", "policy", "recomputed tok", "compulsory tok", "zero-recompute hit",
                "reuse hit", "p50 s", "p95 s", "remote hits"):  # fmt: skip
        detail.add_column(col, justify="left" if col in ("pattern", "policy") else "right")
    for pattern, r in result.items():
        for name, p in r["policies"].items():
            detail.add_row(pattern, name, str(p["recomputed_tokens"]), str(p["compulsory_tokens"]),
                           _fmt(p["zero_recompute_hit_rate"]), _fmt(p["reuse_hit_rate"]),
                           _fmt(p["completion_p50_s"]),
                           _fmt(p["completion_p95_s"]), str(p["remote_hit_blocks"]))  # fmt: skip
    console = Console()
    console.print(head)
    console.print(detail)


def _fmt(v: object) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots of ``result`` in ``out_dir``: recompute, hit rate, completion, cache use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    patterns = list(result)
    written: list[Path] = []

    def bars(metric: str, title: str, name: str, ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(POLICIES)
        for i, pol in enumerate(POLICIES):
            ys = [result[p]["policies"][pol][metric] for p in patterns]
            ax.bar([x + i * width for x in range(len(patterns))], ys, width, label=pol)
        ax.set_xticks([x + width for x in range(len(patterns))], patterns)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    bars("recomputed_tokens", "Recomputed tokens (lower is better)", "recompute.png", "tokens")
    bars("zero_recompute_hit_rate", "Zero-recompute hit rate (reads of blocks that exist)",
         "hit_rate.png", "hits / reads of existing blocks")  # fmt: skip
    bars("reuse_hit_rate", "Reuse hit rate (reads of blocks computed before)",
         "reuse_hit_rate.png", "hits / (hits + recomputed)")  # fmt: skip
    bars("completion_p50_s", "Program completion time p50", "completion_p50.png", "seconds")
    bars("completion_p95_s", "Program completion time p95", "completion_p95.png", "seconds")
    fig, axes = plt.subplots(1, len(patterns), figsize=(4 * len(patterns), 4), squeeze=False)
    for ax, p in zip(axes[0], patterns, strict=True):
        types = sorted({t for pol in POLICIES
                        for t in result[p]["policies"][pol]["cache_use_by_type"]})  # fmt: skip
        bottom = [0.0] * len(POLICIES)
        for t in types:
            ys = [result[p]["policies"][pol]["cache_use_by_type"].get(t, 0.0) for pol in POLICIES]
            ax.bar(POLICIES, ys, bottom=bottom, label=t)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
        ax.set_title(f"{p}: cache use by type")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share of cluster capacity (mean)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "cache_use.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


ALL_PATTERNS = list(PATTERNS)
