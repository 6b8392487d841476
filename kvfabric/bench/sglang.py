"""`kvfabric bench sglang`: the HiCache backend against plain memcpy, same node, same run.

Builds SGLang's own host KV pool (``MHATokenToKVPoolHost``, ``page_first``)
with the geometry of Llama-3.1-8B at tensor-parallel size 1 (32 layers, 8 KV
heads of 128, bfloat16) and SGLang's recommended HiCache page of 64 tokens:
a page is 8 MiB in two 4 MiB segments (K and V). A standalone node runs in
this process; the backend talks to it through :class:`kvfabric.Client` (its
node-local path where available). Measured, alternating with the baseline,
best of a few rounds:

* ``batch_set_gbps``: ``batch_set_v1`` of N pages from the pool (the pages are
  evicted between rounds, so every round stores them);
* ``batch_get_gbps``: ``batch_get_v1`` of the N pages into a second pool;
* ``memcpy_gbps``: numpy copies of the same segments between the two pools —
  what moving the pages costs with no store at all;
* ``batch_*_vs_memcpy``: their ratios; ``exists_p50_us``: ``exists`` of one
  stored page; ``batch_exists_p50_us``: ``batch_exists`` of 128 keys (SGLang's
  storage batch) whose first N are stored.

SGLang lives in its own venv (``make install-sglang``). Run from the main
venv, :func:`run` re-executes this module under ``.venv-sglang`` and returns
its result.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvfabric.errors import FailedPrecondition, Unavailable

MiB = 1 << 20
PAGE_TOKENS, LAYERS, KV_HEADS, HEAD_DIM = 64, 32, 8, 128
NS = "ns-bench-sglang"


def run(*, quick: bool = False, progress: bool = False) -> dict[str, Any]:
    """Measure here if SGLang imports, else in ``.venv-sglang``; returns the metrics."""
    if importlib.util.find_spec("sglang") is not None:
        return _measure(quick, progress)
    python = Path(__file__).resolve().parents[2] / ".venv-sglang" / "bin" / "python"
    if not python.exists():
        raise FailedPrecondition(
            f"SGLang is not importable by {sys.executable} and {python} does not exist; "
            "build it with `make install-sglang`", "sglang",
        )  # fmt: skip
    cmd = [str(python), "-m", "kvfabric.bench.sglang", *(["--quick"] if quick else [])]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else
                          subprocess.DEVNULL, text=True, timeout=1800, check=False)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise Unavailable(f"{' '.join(cmd)} failed with exit code {done.returncode}", "sglang")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _measure(quick: bool, progress: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from kvfabric.config import load_config
    from kvfabric.node.service import NodeStoreService
    from kvfabric.rpc.server import start_server

    pages, reps, samples = (8, 3, 200) if quick else (32, 5, 1000)
    tmp = tempfile.mkdtemp(prefix="kvf-bench-sglang-", dir="/tmp")
    src, dst = _pool(pages, seed=1), _pool(pages, seed=None)
    seg = src.get_data_page(0, flat=False)[0].numel() * src.dtype.itemsize
    config = load_config(overrides={
        "data_dir": tmp, "cpu_arena_bytes": pages * 2 * seg + 64 * MiB, "cpu_slab_bytes": seg,
        "max_block_bytes": seg, "disk_bytes": "64MiB", "transport": "tcp",
        "rpc_host": "127.0.0.1", "rpc_port": 0,
    }, env={})  # fmt: skip
    service = server = None
    try:
        service = NodeStoreService("n-bench-sglang", config)
        server = start_server(service, config)
        service.start_local()  # as `kvfabric up` does: co-located clients map the arena
        writer, reader = _backend(server.address, src), _backend(server.address, dst)
        keys = [f"{i:064x}" for i in range(pages)]
        idx = torch.arange(pages * PAGE_TOKENS, dtype=torch.int64)
        assert writer.page is not None and writer.namespace == NS
        chain = [h for k in keys for h in writer_hashes(k, writer.page.segments)]
        spans = [s for p in range(pages) for s in writer.page.spans(p)]
        sbuf = src.kv_buffer.view(-1).view(torch.uint8).numpy()
        dbuf = dst.kv_buffer.view(-1).view(torch.uint8).numpy()
        total = pages * writer.page.page_bytes

        def memcpy() -> None:
            for a, b in spans:
                np.copyto(dbuf[a:b], sbuf[a:b])

        def put() -> None:
            if not all(writer.batch_set_v1(keys, idx)):
                raise Unavailable("a benchmark page was not stored", "pages")

        def get() -> None:
            if not all(reader.batch_get_v1(keys, idx)):
                raise Unavailable("a benchmark page was not read back", "pages")

        _say(progress, f"… {pages} pages of {writer.page.page_bytes // MiB} MiB")
        put_s = get_s = copy_s = float("inf")
        for _ in range(reps):
            writer.client.evict(NS, chain)
            put_s = min(put_s, _timed(put))
            dst.kv_buffer.zero_()
            get_s = min(get_s, _timed(get))
            if not torch.equal(dst.kv_buffer.view(torch.int16), src.kv_buffer.view(torch.int16)):
                raise Unavailable("a get returned wrong bytes", "pages")
            copy_s = min(copy_s, _timed(memcpy))
        _say(progress, "… exists")
        one = [_timed(lambda: writer.exists(keys[0])) for _ in range(samples)]
        many = [f"{i:064x}" for i in range(128)]
        batch = [_timed(lambda: writer.batch_exists(many)) for _ in range(samples // 4)]
        gbps = {n: total / s / 1e9 for n, s in (("set", put_s), ("get", get_s), ("copy", copy_s))}
        return {
            "benchmark": "sglang", "quick": quick, "pages": pages,
            "page_bytes": writer.page.page_bytes, "segments_per_page": writer.page.segments,
            "batch_set_gbps": gbps["set"], "batch_get_gbps": gbps["get"],
            "memcpy_gbps": gbps["copy"], "batch_set_vs_memcpy": gbps["set"] / gbps["copy"],
            "batch_get_vs_memcpy": gbps["get"] / gbps["copy"],
            "exists_p50_us": _p50(one) * 1e6, "batch_exists_p50_us": _p50(batch) * 1e6,
        }  # fmt: skip
    finally:
        if server is not None:
            server.stop(0.5)
        if service is not None:
            service.close()
        shutil.rmtree(tmp, ignore_errors=True)


def writer_hashes(key: str, segments: int) -> list[bytes]:
    """The kvfabric hashes of one page (re-exported for the evict between rounds)."""
    from kvfabric.connectors.sglang_keys import page_block_hashes

    return list(page_block_hashes(key, segments))


def _pool(pages: int, seed: int | None) -> Any:
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    tokens = pages * PAGE_TOKENS
    dev = MHATokenToKVPool(size=PAGE_TOKENS, page_size=PAGE_TOKENS, dtype=torch.bfloat16,
                           head_num=KV_HEADS, head_dim=HEAD_DIM, layer_num=LAYERS,
                           device="cpu", enable_memory_saver=False)  # fmt: skip
    host = MHATokenToKVPoolHost(
        buffer_info=dev._mha_buffer_info(), host_to_device_ratio=1.0, host_size=0,
        page_size=PAGE_TOKENS, layout="page_first", pin_memory=False, device="cpu",
        device_capacity_tokens=PAGE_TOKENS, start_layer=0, end_layer=LAYERS,
        host_token_capacity=tokens,
    )  # fmt: skip
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        raw = host.kv_buffer.view(torch.int16)
        raw.copy_(torch.randint(-30000, 30000, raw.shape, generator=g, dtype=torch.int16))
    return host


def _backend(address: str, pool: Any) -> Any:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    extra = {"backend_name": "kvfabric", "module_path": "kvfabric.connectors.sglang",
             "class_name": "KVFabricStorage", "interface_v1": 1, "rpc_address": address,
             "namespace": NS, "timeout_s": 60.0}  # fmt: skip
    cfg = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
                               attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                               is_page_first_layout=True, model_name="bench/llama-3.1-8b",
                               extra_config=extra)  # fmt: skip
    backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    backend.register_mem_pool_host(pool)
    return backend


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _p50(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def main() -> None:
    """``python -m kvfabric.bench.sglang [--quick]``: the metrics as one JSON line."""
    result = _measure("--quick" in sys.argv[1:], progress=True)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
