"""`kvfabric bench rpc`: the Python client against plain gRPC and raw TCP, same run.

Starts a standalone node (NodeStoreService, its TCP data plane and the gRPC
server from :func:`kvfabric.rpc.server.start_server`) on 127.0.0.1, puts N
blocks of 2 MiB through :class:`~kvfabric.rpc.client.Client`, and measures:

* ``client_get_gbps``: ``Client.get_into`` of all N blocks into distinct,
  pre-touched memory — headers over gRPC, bytes over the data plane,
  checksum-verified; ``client_get_vs_tcp`` divides it by raw loopback TCP
  streaming the same bytes into distinct memory, ``client_get_vs_tcp_cachehot``
  by a raw stream re-sending one cache-hot 2 MiB buffer (the loopback ceiling);
* ``stream_get_gbps``: the same get with ``data_plane=False`` (the client
  asks for chunks of 1 MiB, so the node streams ``BlockData`` messages of
  1 MiB); ``stream_get_vs_grpc`` compares it with a plain grpcio
  server-streaming of the same bytes in 1 MiB messages (raw bytes, no
  protobuf, no store, no checksum), served from this process like the node:
  the two are timed back to back ``stream_pairs`` times and the ratio is the
  median of the pairs' ratios (a busy moment slows both of a pair alike, and
  one lucky rep of either side does not decide it); the GB/s reported are the
  medians of each side;
* ``small_rpc_p50_us`` / ``p99``: ``Client.lookup`` of a 16-block chain;
  ``echo_p50_us``: a plain grpcio unary echo of a message of the same size,
  sampled alternately with the lookups; ``small_rpc_vs_echo`` is their ratio.

The data-plane throughput and its baseline are measured alternately, a few
times, and the best of each is kept, so a busy machine slows both sides alike. Every
loop is bounded in count; the servers are stopped in ``finally``.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from kvfabric.bench.rawtcp import raw_loopback_gbps
from kvfabric.config import MiB, load_config
from kvfabric.errors import Unavailable
from kvfabric.node.service import NodeStoreService
from kvfabric.rpc.client import Client
from kvfabric.rpc.server import start_server
from kvfabric.rpc.v1 import kvfabric_pb2 as pb

NS = "ns-bench-rpc"
BLOCK = 2 * MiB
CHUNK = MiB
_ECHO_SERVICE = "kvfabric.bench.Echo"


def _hashes(n: int, salt: str) -> list[bytes]:
    return [hashlib.blake2b(f"{salt}{i}".encode(), digest_size=32).digest() for i in range(n)]


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _best(fn: Callable[[], object], reps: int) -> float:
    """Best wall time of ``reps`` runs of ``fn``."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class EchoServer:
    """A minimal grpcio server: unary echo and a server stream of fixed blocks in chunks.

    Raw bytes in and out (no protobuf), generic handlers, the same worker
    pool size and message limit as the node's server.
    """

    def __init__(self, blocks: list[bytes], workers: int, max_message: int) -> None:
        self._blocks = blocks
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-echo"),
            options=[("grpc.max_receive_message_length", max_message),
                     ("grpc.max_send_message_length", max_message)],
        )  # fmt: skip
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_ECHO_SERVICE, handlers),)
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        if not port:
            raise Unavailable("cannot bind the echo server on 127.0.0.1", "address")
        self.address = f"127.0.0.1:{port}"
        self._server.start()

    def _stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        for block in self._blocks:
            for off in range(0, len(block), CHUNK):
                yield block[off : off + CHUNK]  # one copy, as a plain server would make

    def stop(self) -> None:
        """Stop at once (bounded)."""
        self._server.stop(0).wait(5.0)


def run(*, quick: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run the RPC benchmark on a private standalone node; returns the metrics."""
    n_blocks, reps, samples = (32, 3, 300) if quick else (128, 5, 2000)
    pairs = 9 if quick else 21
    total = n_blocks * BLOCK
    tmp = tempfile.mkdtemp(prefix="kvf-bench-rpc-", dir="/tmp")
    config = load_config(
        overrides={"data_dir": tmp, "cpu_arena_bytes": total + 64 * MiB, "disk_bytes": "64MiB",
                   "transport": "tcp", "rpc_host": "127.0.0.1", "rpc_port": 0},
        env={},
    )  # fmt: skip
    out: dict[str, Any] = {"benchmark": "rpc", "quick": quick, "block_bytes": BLOCK,
                           "blocks": n_blocks}  # fmt: skip
    rng = np.random.default_rng(11)
    blocks = [rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes() for _ in range(n_blocks)]
    hashes = _hashes(n_blocks, "rpc")
    service = server = echo = None
    try:
        service = NodeStoreService("n-bench", config)
        server = start_server(service, config)
        echo = EchoServer(blocks, config.rpc_workers, config.rpc_max_message_bytes)
        # local=False: these measure the network paths (bench local measures the local one).
        with Client(server.address, timeout_s=60, local=False) as client, Client(
            server.address, timeout_s=60, data_plane=False, local=False, chunk_bytes=CHUNK
        ) as streamer:  # fmt: skip
            _say(progress, "… put")
            for i in range(0, n_blocks, 8):
                client.put(NS, hashes[i : i + 8], blocks[i : i + 8])
            area = np.ones(total, dtype=np.uint8)  # distinct, pre-touched destinations
            dsts = [area[i * BLOCK : (i + 1) * BLOCK] for i in range(n_blocks)]

            def get(c: Client) -> None:
                if not all(c.get_into(NS, hashes, dsts)):
                    raise Unavailable("a benchmark block was not read back", "blocks")

            def check(c: Client) -> None:  # a warm-up that also proves the bytes right
                area[:] = 0
                get(c)
                if any(d.tobytes() != b for d, b in zip(dsts, blocks, strict=True)):
                    raise Unavailable("a get returned wrong bytes", "blocks")

            _say(progress, "… data-plane get vs raw TCP")
            check(client)
            # Alternated, best of each: a busy machine slows both sides alike.
            client_gbps, raw, hot = 0.0, 0.0, 0.0
            for _ in range(reps):
                client_gbps = max(client_gbps, total / _best(lambda: get(client), 1) / 1e9)
                raw = max(raw, raw_loopback_gbps(total))
                hot = max(hot, raw_loopback_gbps(total, region_bytes=BLOCK))
            out.update(client_get_gbps=client_gbps, raw_tcp_gbps=raw, raw_tcp_cachehot_gbps=hot,
                       client_get_vs_tcp=client_gbps / raw,
                       client_get_vs_tcp_cachehot=client_gbps / hot)  # fmt: skip
            _say(progress, "… streamed get vs plain gRPC streaming")
            out.update(_streaming(streamer, echo.address, get, check, total, pairs))
            _say(progress, "… small RPCs")
            out.update(_small_rpcs(client, echo.address, hashes, samples))
        out.update(goal_client_get_vs_tcp=0.6, goal_stream_get_vs_grpc=0.8,
                   goal_small_rpc_vs_echo=1.5)  # fmt: skip
    finally:
        if echo is not None:
            echo.stop()
        if server is not None:
            server.stop(0.5)
        if service is not None:
            service.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _streaming(
    streamer: Client, echo_address: str, get: Callable[[Client], None],
    check: Callable[[Client], None], total: int, pairs: int,
) -> dict[str, float]:  # fmt: skip
    """kvfabric's streamed Get against plain grpcio server streaming: the median of
    ``pairs`` back-to-back pairs' ratios (the order within a pair alternates)."""
    with grpc.insecure_channel(
        echo_address, options=[("grpc.max_receive_message_length", 8 * MiB)]
    ) as channel:
        stream = channel.unary_stream(f"/{_ECHO_SERVICE}/Stream")

        def plain() -> None:
            got = sum(len(m) for m in stream(b"", timeout=60))
            if got != total:
                raise Unavailable(f"the echo stream sent {got} of {total} bytes", "echo")

        ours, theirs = [], []
        check(streamer)  # warm
        plain()
        for i in range(pairs):
            if i % 2:
                theirs.append(_best(plain, 1))
                ours.append(_best(lambda: get(streamer), 1))
            else:
                ours.append(_best(lambda: get(streamer), 1))
                theirs.append(_best(plain, 1))
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]  # = our GB/s / theirs
    return {"stream_get_gbps": total / statistics.median(ours) / 1e9,
            "grpc_stream_gbps": total / statistics.median(theirs) / 1e9,
            "stream_get_vs_grpc": statistics.median(ratios),
            "stream_get_vs_grpc_p25": _percentile(ratios, 0.25),
            "stream_get_vs_grpc_p75": _percentile(ratios, 0.75)}  # fmt: skip


def _small_rpcs(
    client: Client, echo_address: str, hashes: list[bytes], samples: int
) -> dict[str, float]:
    """p50/p99 of a 16-block Lookup and p50 of a same-sized plain echo, sampled alternately."""
    chain = hashes[:16]
    payload = pb.LookupRequest(namespace=NS, hashes=chain).SerializeToString()
    with grpc.insecure_channel(echo_address) as channel:
        unary = channel.unary_unary(f"/{_ECHO_SERVICE}/Unary")
        lookups, echoes = [], []
        for i in range(samples + 50):  # the first 50 of each warm up
            t0 = time.perf_counter()
            matched = client.lookup(NS, chain).matched
            t1 = time.perf_counter()
            unary(payload, timeout=10)
            t2 = time.perf_counter()
            if matched != len(chain):
                raise Unavailable(f"lookup matched {matched} of {len(chain)} blocks", "lookup")
            if i >= 50:
                lookups.append(t1 - t0)
                echoes.append(t2 - t1)
    p50, echo_p50 = statistics.median(lookups), statistics.median(echoes)
    return {"small_rpc_p50_us": p50 * 1e6, "small_rpc_p99_us": _percentile(lookups, 0.99) * 1e6,
            "echo_p50_us": echo_p50 * 1e6, "small_rpc_vs_echo": p50 / echo_p50}  # fmt: skip


def _say(progress: bool, line: str) -> None:
    """Progress for a human at a terminal, on stderr (stdout is left to the caller)."""
    if progress:
        print(line, file=sys.stderr, flush=True)
