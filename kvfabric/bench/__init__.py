"""Benchmarks runnable as `kvfabric bench NAME`; each measures its baseline in the same run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Runner = Callable[..., dict[str, Any]]


def _tiers(**kw: Any) -> dict[str, Any]:
    from kvfabric.bench.tiers import run

    return run(**kw)


def _cluster(**kw: Any) -> dict[str, Any]:
    from kvfabric.bench.cluster import run

    return run(**kw)


BENCHMARKS: dict[str, Runner] = {"tiers": _tiers, "cluster": _cluster}
BENCHMARKS["rpc"] = lambda **kw: __import__("kvfabric.bench.rpc", fromlist=["run"]).run(**kw)
BENCHMARKS["local"] = lambda **kw: __import__("kvfabric.bench.local", fromlist=["run"]).run(**kw)
BENCHMARKS["vllm"] = lambda **kw: __import__("kvfabric.bench.vllm", fromlist=["run"]).run(**kw)
BENCHMARKS["sglang"] = lambda **kw: __import__("kvfabric.bench.sglang", fromlist=["run"]).run(**kw)
