"""`kvfabric bench cluster`: node-to-node transfer and directory latency, same run.

Starts its own 2-node ``ray.cluster_utils.Cluster`` on loopback (a private
Ray temp dir), brings the fabric up on it, and measures:

* ``transfer_gbps``: 2 MiB blocks pulled by node B from node A through the
  NodeStore actors and the data plane (wall time of the actor call);
* ``transfer_vs_tcp``: that divided by raw loopback TCP between two processes
  streaming the same number of bytes into distinct memory (what moving
  distinct blocks physically costs), and ``transfer_vs_tcp_cachehot`` divided
  by a raw stream that re-sends one cache-hot buffer (the loopback ceiling);
* ``cluster_lookup_p50_us`` / ``p99``: a 64-block chain through the directory actor;
* ``claim_commit_p50_us``: one claim plus one commit through the directory actor.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from typing import Any

from kvfabric.bench.rawtcp import raw_loopback_gbps
from kvfabric.config import MiB, load_config
from kvfabric.localray import private_ray_cluster
from kvfabric.node.changes import ChangeKind, NodeChange
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier

NS = "ns-bench-cluster"


def _hashes(n: int, salt: str) -> list[bytes]:
    return [hashlib.blake2b(f"{salt}{i}".encode(), digest_size=32).digest() for i in range(n)]


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(*, quick: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run the cluster benchmark on a private 2-node Ray cluster."""
    import ray

    from kvfabric import cluster as kv

    n_blocks, reps, lookups = (32, 3, 200) if quick else (128, 5, 1000)
    size = 2 * MiB
    out: dict[str, Any] = {"benchmark": "cluster", "quick": quick, "block_bytes": size}
    with private_ray_cluster(2) as local:
        c, tmp = local.cluster, local.tmp
        arena = (n_blocks * 2 + 64) * MiB
        config = load_config(
            overrides={"data_dir": os.path.join(tmp, "data"), "cpu_arena_bytes": arena,
                       "disk_bytes": "256MiB", "node_check_interval_s": 0.5},
            env={},
        )  # fmt: skip
        kv.up(config, c.address)
        a_id, b_id = (n.node_id for n in c.list_all_nodes())
        stores = kv.node_stores()
        a, b = stores[a_id], stores[b_id]
        a_addr = ray.get(a.info.remote())["address"]
        if progress:
            print("… transfer", flush=True)
        hashes = _hashes(n_blocks, "xfer")
        block = os.urandom(size)
        for i in range(0, n_blocks, 16):
            ray.get(a.put.remote(NS, hashes[i : i + 16], [block] * len(hashes[i : i + 16])))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            got = ray.get(b.pull_from.remote(a_addr, NS, hashes, size))
            times.append(time.perf_counter() - t0)
            if got != n_blocks:
                raise RuntimeError(f"pulled {got} of {n_blocks} blocks")
            ray.get(b.evict.remote(NS, hashes))
        total = n_blocks * size
        transfer = total / min(times) / 1e9
        raw = raw_loopback_gbps(total)
        hot = raw_loopback_gbps(total, region_bytes=size)
        out.update(
            transfer_gbps=transfer, raw_tcp_gbps=raw, raw_tcp_cachehot_gbps=hot,
            transfer_vs_tcp=transfer / raw, transfer_vs_tcp_cachehot=transfer / hot,
        )  # fmt: skip
        if progress:
            print("… directory", flush=True)
        directory = kv.directory_handle()
        chain = hashes[:64] if n_blocks >= 64 else hashes + _hashes(64 - n_blocks, "pad")
        samples = []
        for _ in range(lookups):
            t0 = time.perf_counter()
            ray.get(directory.lookup.remote(NS, chain, a_id))
            samples.append(time.perf_counter() - t0)
        out["cluster_lookup_p50_us"] = statistics.median(samples) * 1e6
        out["cluster_lookup_p99_us"] = _percentile(samples, 0.99) * 1e6
        claims = []
        for i, hh in enumerate(_hashes(lookups // 2, "claim")):
            key = BlockKey(NS, BlockHash(hh))
            change = NodeChange(ChangeKind.STORED, key, Tier.CPU, size, i, BlockType.GENERIC,
                                None, 0)  # fmt: skip
            t0 = time.perf_counter()
            ray.get(directory.claim_many.remote(a_id, "bench-writer", [(key, size)]))
            ray.get(directory.commit_many.remote(a_id, "bench-writer", [change]))
            claims.append(time.perf_counter() - t0)
        out["claim_commit_p50_us"] = statistics.median(claims) * 1e6
        echo = []
        for _ in range(lookups):
            t0 = time.perf_counter()
            ray.get(directory.ping.remote())
            echo.append(time.perf_counter() - t0)
        out["actor_echo_p50_us"] = statistics.median(echo) * 1e6
        out["goal_transfer_vs_tcp"] = 0.7
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
