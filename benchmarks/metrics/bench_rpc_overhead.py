"""What the kvfabric_* instrumentation costs a small RPC, measured against itself switched off.

Run: ``.venv/bin/python benchmarks/metrics/bench_rpc_overhead.py [--calls N] [--rounds R]``

One standalone node store with its gRPC server on 127.0.0.1 holds 16 blocks;
a client sends ``Lookup`` of that 16-hash chain (the engine's hot call: every
call records its latency, 16 hits by tier and the tokens spared) and ``Stats``.
The same server runs with its real :class:`kvfabric.metrics.Telemetry` and
with a telemetry whose record methods do nothing, alternating in every round;
the report is the median per-call latency of each and their ratio
(instrumented / bare, 1.0 = free). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from typing import Any

from kvfabric.config import load_config
from kvfabric.metrics import Telemetry
from kvfabric.node.service import NodeStoreService
from kvfabric.rpc.client import Client
from kvfabric.rpc.server import start_server


class _Bare(Telemetry):
    """Telemetry that records nothing: the baseline."""

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        return None

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        return None


def _p50(client: Client, hashes: list[bytes], calls: int) -> dict[str, float]:
    lookups, stats = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.lookup("ns-bench", hashes, block_tokens=16)
        t1 = time.perf_counter()
        client.stats()
        t2 = time.perf_counter()
        lookups.append(t1 - t0)
        stats.append(t2 - t1)
    return {"lookup": statistics.median(lookups), "stats": statistics.median(stats)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    hashes = [hashlib.blake2b(bytes([i]), digest_size=32).digest() for i in range(16)]
    results: dict[str, list[dict[str, float]]] = {"instrumented": [], "bare": []}
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(overrides={"data_dir": d, "cpu_arena_bytes": "16MiB",
                                     "disk_enabled": False, "cpu_prefault": False,
                                     "local_channel": False}, env={})  # fmt: skip
        service = NodeStoreService("bench", cfg)
        service.put("ns-bench", hashes, [bytes(4096)] * 16)
        real = service.telemetry
        for _ in range(args.rounds):
            for name, telemetry in (("instrumented", real), ("bare", _Bare("bench"))):
                service.telemetry = telemetry
                server = start_server(service, cfg)  # the servicer takes the telemetry now
                try:
                    with Client(server.address, data_plane=False) as c:
                        _p50(c, hashes, 200)  # warm-up
                        results[name].append(_p50(c, hashes, args.calls))
                finally:
                    server.stop()
        service.close()
    out: dict[str, Any] = {"calls": args.calls, "rounds": args.rounds}
    for op in ("lookup", "stats"):
        inst = statistics.median(r[op] for r in results["instrumented"]) * 1e6
        bare = statistics.median(r[op] for r in results["bare"]) * 1e6
        out[f"{op}_p50_us_instrumented"] = round(inst, 1)
        out[f"{op}_p50_us_bare"] = round(bare, 1)
        out[f"{op}_instrumented_vs_bare"] = round(inst / bare, 3)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
