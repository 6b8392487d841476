"""`kvfabric bench local`: the node-local data path against a plain memcpy, same run.

Starts a standalone node (NodeStoreService with its shared-memory arena, its
gRPC server and its local channel) in its own process on this host, as an
engine would find it, and measures from this process, for N blocks of 2 MiB
moved in one call:

* ``client_get_local_gbps``: ``Client.get_into`` through the local channel
  (READ, one checksumming copy per block out of the arena, RELEASE) into
  distinct, pre-touched memory; ``client_get_local_vs_memcpy`` divides it by
  ``memcpy_gbps``, numpy copying the same bytes between distinct, pre-touched
  buffers;
* ``client_put_local_gbps``: ``Client.put`` of N new blocks through the local
  channel (RESERVE, one checksumming copy per block into the arena, COMMIT,
  where the node verifies every block); ``client_put_local_vs_memcpy``
  likewise. Each put stores new keys (write once); the blocks are evicted
  again, untimed, between repetitions.

Each throughput and its baseline are measured alternately and the best of
each kept, so a busy machine slows both sides alike. Every loop is bounded.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from kvfabric.config import MiB, load_config
from kvfabric.errors import Unavailable

NS = "ns-bench-local"
BLOCK = 2 * MiB
_NODE_START_S, _NODE_STOP_S, _NODE_LIFETIME_S = 120.0, 10.0, 3600.0


def _hashes(n: int, salt: str) -> list[bytes]:
    return [hashlib.blake2b(f"{salt}{i}".encode(), digest_size=32).digest() for i in range(n)]


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def serve_node(overrides: dict[str, Any], pipe: Connection) -> None:
    """Run a standalone node with its local channel until told to stop (the node process).

    Sends the node's gRPC address (or an error line) through ``pipe``, then
    waits for any message on it, or for the parent to go away.
    """
    from kvfabric.node.service import NodeStoreService
    from kvfabric.rpc.server import start_server

    service = NodeStoreService("n-bench-local", load_config(overrides=overrides, env={}))
    server = start_server(service, service.config)
    try:
        pipe.send(server.address if service.start_local() else "error: no local channel")
        pipe.poll(_NODE_LIFETIME_S)
    finally:
        server.stop(0.5)
        service.close()


def run(*, quick: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run the local-path benchmark against a private node in its own process."""
    from kvfabric.rpc.client import Client, PutStatus

    n_blocks, reps = (32, 9) if quick else (128, 15)
    total = n_blocks * BLOCK
    tmp = tempfile.mkdtemp(prefix="kvf-bench-local-", dir="/tmp")
    overrides = {"data_dir": tmp, "cpu_arena_bytes": 2 * total + 64 * MiB,
                 "disk_enabled": False, "transport": "tcp", "local_channel": True}  # fmt: skip
    rng = np.random.default_rng(7)
    srcs = [rng.integers(0, 256, BLOCK, dtype=np.uint8) for _ in range(n_blocks)]
    area = np.ones(total, dtype=np.uint8)  # distinct, pre-touched destinations
    dsts = [area[i * BLOCK : (i + 1) * BLOCK] for i in range(n_blocks)]
    out: dict[str, Any] = {"benchmark": "local", "quick": quick, "block_bytes": BLOCK,
                           "blocks": n_blocks}  # fmt: skip
    # The engine and the node are separate processes, as in a deployment (and so they
    # do not share one GIL).
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    node = ctx.Process(target=serve_node, args=(overrides, child), daemon=True)
    node.start()
    try:
        if not parent.poll(_NODE_START_S):
            raise Unavailable(f"the node did not start within {_NODE_START_S} s", "node")
        address = parent.recv()
        if address.startswith("error"):
            raise Unavailable(f"the node failed: {address}", "local_channel")
        with Client(address, timeout_s=60) as client:
            hashes = _hashes(n_blocks, "get")
            client.put(NS, hashes, srcs)
            if client._local is None or client._local._client is None:
                raise Unavailable("the client did not take the local path", "local")

            def memcpy() -> None:
                for d, s in zip(dsts, srcs, strict=True):
                    np.copyto(d, s)

            def get() -> None:
                if not all(client.get_into(NS, hashes, dsts)):
                    raise Unavailable("a benchmark block was not read back", "blocks")

            area[:] = 0
            get()  # warm, and proves the bytes right
            if any(not np.array_equal(d, s) for d, s in zip(dsts, srcs, strict=True)):
                raise Unavailable("a local get returned wrong bytes", "blocks")
            _say(progress, "… local get vs memcpy")
            t_get = t_copy = float("inf")
            for _ in range(reps):
                t_get = min(t_get, _seconds(get))
                t_copy = min(t_copy, _seconds(memcpy))
            _say(progress, "… local put vs memcpy")
            t_put = float("inf")
            for r in range(reps):
                fresh = _hashes(n_blocks, f"put-{r}")
                t0 = time.perf_counter()
                statuses = client.put(NS, fresh, srcs)
                t_put = min(t_put, time.perf_counter() - t0)
                t_copy = min(t_copy, _seconds(memcpy))
                if statuses != [PutStatus.STORED] * n_blocks:
                    raise Unavailable("a benchmark put did not store every block", "blocks")
                client.evict(NS, fresh)  # untimed: room for the next repetition
        copy_gbps = total / t_copy / 1e9
        get_gbps, put_gbps = total / t_get / 1e9, total / t_put / 1e9
        out.update(client_get_local_gbps=get_gbps, client_put_local_gbps=put_gbps,
                   memcpy_gbps=copy_gbps, client_get_local_vs_memcpy=get_gbps / copy_gbps,
                   client_put_local_vs_memcpy=put_gbps / copy_gbps)  # fmt: skip
    finally:
        parent.send("stop")
        node.join(_NODE_STOP_S)
        if node.is_alive():
            node.kill()
            node.join(_NODE_STOP_S)
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _say(progress: bool, line: str) -> None:
    """Progress for a human at a terminal, on stderr (stdout is left to the caller)."""
    if progress:
        print(line, file=sys.stderr, flush=True)
