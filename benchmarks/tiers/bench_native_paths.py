"""Native copy+checksum paths vs their pure-Python references, in one run.

Run: ``.venv/bin/python benchmarks/tiers/bench_native_paths.py [--repeat N]``

For each case it times ``kvfabric._native.<fn>`` and ``kvfabric.integrity.<fn>_ref``
on the same pre-faulted, warmed-up numpy buffers, alternating the two in every
repetition, and reports the median throughput (payload bytes copied per second,
GB = 1e9 bytes) and the ratio native/ref (> 1: native is faster). Each case runs
[warm] (one buffer set, reused: cache-resident as far as it fits) and [cold]
(calls cycle through buffer sets totalling --cold-mib, so bytes come from DRAM).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from kvfabric import _native  # type: ignore[attr-defined]
from kvfabric import integrity as ig

KiB = 1 << 10
MiB = 1 << 20


def _filled(n: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes, every page already faulted in."""
    return rng.integers(0, 256, n, dtype=np.uint8)


def _zeros(n: int) -> np.ndarray:
    a = np.empty(n, dtype=np.uint8)
    a.fill(0)  # touch every page now, not inside a timed call
    return a


Case = tuple[str, int, Callable[[], Any], Callable[[], Any]]


def _round_robin(fns: list[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that cycles through independent buffer sets on each call."""
    if len(fns) == 1:
        return fns[0]
    state = {"i": 0}

    def call() -> Any:
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        return fns[i]()

    return call


def _cases(rng: np.random.Generator, cold_bytes: int) -> Iterator[Case]:
    """Every case twice: 'warm' reuses one buffer set (cache-resident as far as it
    fits in the last-level cache), 'cold' cycles through enough buffer sets
    (>= cold_bytes in all) that each call finds its bytes in DRAM, as a tier move
    usually does."""

    def add(
        name: str, nbytes: int, footprint: int, make: Callable[[], tuple[Any, Any]]
    ) -> Iterator[Case]:
        # Built lazily, one case at a time, so only one case's buffers are alive.
        for temp, sets in (("warm", 1), ("cold", max(2, -(-cold_bytes // footprint)))):
            pairs = [make() for _ in range(sets)]
            yield (
                f"{name} [{temp}]",
                nbytes,
                _round_robin([p[0] for p in pairs]),
                _round_robin([p[1] for p in pairs]),
            )
            del pairs

    # One 2 MiB block.
    def copy_2m() -> tuple[Any, Any]:
        src, dst = _filled(2 * MiB, rng), _zeros(2 * MiB)
        return (
            lambda: _native.copy_many_with_checksum([dst], [src]),
            lambda: ig.copy_with_checksum_ref(dst, src),
        )

    yield from add("copy_many_with_checksum 1 x 2 MiB", 2 * MiB, 4 * MiB, copy_2m)

    # 64 separate 256 KiB blocks.
    def copy_many() -> tuple[Any, Any]:
        srcs = [_filled(256 * KiB, rng) for _ in range(64)]
        dsts = [_zeros(256 * KiB) for _ in range(64)]
        return (
            lambda: _native.copy_many_with_checksum(dsts, srcs),
            lambda: ig.copy_many_with_checksum_ref(dsts, srcs),
        )

    yield from add(
        "copy_many_with_checksum 64 x 256 KiB", 64 * 256 * KiB, 2 * 64 * 256 * KiB, copy_many
    )

    # Gather/scatter: slots at shuffled positions in an arena twice the payload.
    for n, size in ((64, 256 * KiB), (512, 16 * KiB)):

        def gather(n: int = n, size: int = size) -> tuple[Any, Any]:
            arena = _filled(2 * n * size, rng)
            offsets = [int(i) * size for i in rng.permutation(2 * n)[:n]]
            dst = _zeros(n * size)
            return (
                lambda: _native.gather_with_checksum(arena, offsets, size, dst),
                lambda: ig.gather_with_checksum_ref(arena, offsets, size, dst),
            )

        def scatter(n: int = n, size: int = size) -> tuple[Any, Any]:
            arena = _zeros(2 * n * size)
            offsets = [int(i) * size for i in rng.permutation(2 * n)[:n]]
            src = _filled(n * size, rng)
            return (
                lambda: _native.scatter_with_checksum(src, arena, offsets, size),
                lambda: ig.scatter_with_checksum_ref(src, arena, offsets, size),
            )

        label = f"{n} x {size // KiB} KiB"
        yield from add(f"gather_with_checksum {label}", n * size, 3 * n * size, gather)
        yield from add(f"scatter_with_checksum {label}", n * size, 3 * n * size, scatter)


def _time_once(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def run(repeat: int, min_rep_s: float, cold_bytes: int) -> dict[str, Any]:
    rng = np.random.default_rng(1234)
    results: dict[str, Any] = {}
    for name, nbytes, native_fn, ref_fn in _cases(rng, cold_bytes):
        if native_fn() != ref_fn():
            raise AssertionError(f"{name}: native and reference checksums differ")
        # Warm up (caches, branch predictors, allocator) and size the inner loop
        # so that one repetition lasts at least min_rep_s.
        for _ in range(3):
            native_fn()
            ref_fn()
        single = max(_time_once(ref_fn, 1), 1e-7)
        inner = max(1, int(min_rep_s / single))
        t_native, t_ref = [], []
        for _ in range(repeat):
            t_native.append(_time_once(native_fn, inner))
            t_ref.append(_time_once(ref_fn, inner))
        native_s, ref_s = statistics.median(t_native), statistics.median(t_ref)
        results[name] = {
            "bytes": nbytes,
            "native_GBps": round(nbytes / native_s / 1e9, 2),
            "ref_GBps": round(nbytes / ref_s / 1e9, 2),
            "ratio_native_over_ref": round(ref_s / native_s, 2),
            "native_median_us": round(native_s * 1e6, 1),
            "ref_median_us": round(ref_s * 1e6, 1),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=15, help="timed repetitions per case")
    ap.add_argument(
        "--min-rep-ms", type=float, default=20.0, help="minimum duration of one repetition"
    )
    ap.add_argument(
        "--cold-mib",
        type=int,
        default=256,
        help="total size of the rotating buffer sets of the [cold] cases (>> last-level cache)",
    )
    args = ap.parse_args(argv)
    results = run(args.repeat, args.min_rep_ms / 1e3, args.cold_mib * MiB)
    out = {
        "benchmark": "kvfabric native copy+checksum paths vs *_ref",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "native_xxh3_impl": getattr(_native, "XXH3_IMPL", "?"),
        "native_chunk_bytes": getattr(_native, "CHUNK_SIZE", None),
        "native_stream_chunk_bytes": getattr(_native, "STREAM_CHUNK_SIZE", None),
        "native_stream_threshold_bytes": getattr(_native, "STREAM_THRESHOLD", None),
        "repeat": args.repeat,
        "statistic": "median",
        "results": results,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
