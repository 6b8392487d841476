"""`kvfabric bench vllm`: time to first token with kvfabric against recompute, same engine.

Builds a random-weight Llama large enough that prefill dominates (hidden
1024, 12 layers, grouped-query attention like real Llamas; nothing
downloaded), brings the fabric up on a private 2-node Ray cluster, and runs
one vLLM engine (bf16, the CPU build here) with the kvfabric connector
talking to node b. For each of a few fresh ~2,000-token prompts it measures,
with ``max_tokens=1`` (so the wall time of ``generate`` is the TTFT):

* **miss**: the prompt computed from scratch (its blocks not saved, so the
  time holds no store cost);
* **local hit**: the engine's own prefix cache holds all but the last block —
  the limit no external store can beat;
* **hit**: engine prefix cache cleared, all but the last block loaded from
  kvfabric on node b (``external_hit_tokens`` of them);
* **peer hit**: the blocks moved to node a first, so node b pulls them from
  its peer (the engine loads asynchronously) before the engine reads them.

Reported (medians over the prompts): ``ttft_hit_vs_miss`` (goal ≤ 0.2),
``ttft_hit_vs_local_hit`` (goal ≤ 1.3), ``ttft_peer_hit_vs_miss``, and
``outputs_identical`` (the external and peer hits produce the same token as
the local hit: the loaded KV equals the engine's own).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

from kvfabric.bench.randmodel import build_random_llama
from kvfabric.config import load_config
from kvfabric.hashing import chain_hashes
from kvfabric.localray import private_ray_cluster

BLOCK = 32
VOCAB = 4096
NS = "bench-vllm"
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
              "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}  # fmt: skip


def _prompt(n: int, seed: int) -> list[int]:
    return [4 + (seed * 7919 + 31 * i + i * i) % (VOCAB - 4) for i in range(n)]


def run(*, quick: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run the benchmark (several minutes; ``quick``: fewer and shorter prompts)."""
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    n_tokens, n_prompts = (1024, 2) if quick else (2000, 4)
    tmp = tempfile.mkdtemp(prefix="kvf-bench-vllm-")
    model = build_random_llama(
        os.path.join(tmp, "model"), vocab_size=VOCAB, hidden_size=1024, num_layers=12,
        num_heads=16, num_kv_heads=4, head_dim=64,
    )  # fmt: skip
    with private_ray_cluster(2) as local:
        from kvfabric import cluster as kv  # after the cluster's env: Ray reads it on import

        config = load_config(overrides={
            "data_dir": os.path.join(local.tmp, "data"), "cpu_arena_bytes": "1GiB",
            "cpu_prefault": False, "disk_bytes": "1GiB", "node_check_interval_s": 0.5,
        }, env={})  # fmt: skip
        started = kv.up(config, local.cluster.address, timeout_s=120)
        a_id, b_id = (n.node_id for n in local.cluster.list_all_nodes())
        b_address = started["nodes"][b_id]["rpc_address"]
        result = _measure(str(model), b_address, a_id, n_tokens, n_prompts, progress)
    return {"benchmark": "vllm", "quick": quick, "prompt_tokens": n_tokens,
            "prompts": n_prompts, "model": "llama hidden 1024, 12 layers, GQA 16/4, bf16",
            **result}  # fmt: skip


def _measure(model: str, address: str, peer_id: str, n_tokens: int, n_prompts: int,
             progress: bool) -> dict[str, Any]:  # fmt: skip
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvfabric.rpc.client import Client

    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, enable_prefix_caching=True,
              block_size=BLOCK, max_model_len=4096, kv_transfer_config=KVTransferConfig(
                  kv_connector="KVFabricConnector",
                  kv_connector_module_path="kvfabric.connectors.vllm", kv_role="kv_both",
                  kv_connector_extra_config={"rpc_address": address, "namespace": NS},
                  kv_load_failure_policy="recompute"))  # fmt: skip

    def ttft(tokens: list[int], store: bool = True) -> tuple[float, int, list[int]]:
        extra = None if store else {"kv_transfer_params": {"kvfabric": {"store": False}}}
        params = SamplingParams(temperature=0.0, max_tokens=1, extra_args=extra)
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        return time.perf_counter() - t0, int(out.num_cached_tokens or 0), list(
            out.outputs[0].token_ids
        )

    ttft(_prompt(n_tokens, 999))  # warm-up: first-call costs out of the measurements
    llm.reset_prefix_cache()
    rows: dict[str, list[float]] = {"miss": [], "local": [], "hit": [], "peer": []}
    hit_tokens: list[int] = []
    identical = True
    client = Client(address)
    for p in range(n_prompts):
        tokens = _prompt(n_tokens, p)
        usable = (n_tokens - 1) // BLOCK
        hashes = [bytes(h) for h in chain_hashes(tokens[: usable * BLOCK], BLOCK)]
        rows["miss"].append(ttft(tokens, store=False)[0])
        llm.reset_prefix_cache()
        ttft(tokens)  # computes and stores the blocks; the engine keeps them too
        t_local, _, want = ttft(tokens)
        rows["local"].append(t_local)
        llm.reset_prefix_cache()
        t_hit, cached, got = ttft(tokens)
        rows["hit"].append(t_hit)
        hit_tokens.append(cached)
        identical &= got == want
        llm.reset_prefix_cache()
        client.move(NS, hashes, node_id=peer_id)  # now only node a holds them
        t_peer, _, got = ttft(tokens)
        rows["peer"].append(t_peer)
        identical &= got == want
        llm.reset_prefix_cache()
        if progress:
            print(f"prompt {p}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms"
                                               for k, v in rows.items()), flush=True)  # fmt: skip
    client.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "outputs_identical": identical,
        "external_hit_tokens": min(hit_tokens),
        "ttft_miss_ms": med["miss"] * 1e3, "ttft_local_hit_ms": med["local"] * 1e3,
        "ttft_hit_ms": med["hit"] * 1e3, "ttft_peer_hit_ms": med["peer"] * 1e3,
        "ttft_hit_vs_miss": med["hit"] / med["miss"],
        "ttft_hit_vs_local_hit": med["hit"] / med["local"],
        "ttft_peer_hit_vs_miss": med["peer"] / med["miss"],
    }  # fmt: skip
