"""One vLLM engine on the tiny model, driven over stdin/stdout (a test driver).

Run as a subprocess (each engine gets its own process, as in production)::

    python -m tests.e2e._engine MODEL_DIR [--address HOST:PORT] [--load-async MODE]
                                [--events ENDPOINT] [--block-size N]

Without ``--address`` the engine has no connector (the reference). After the
engine is up it prints ``READY``; then it reads one JSON command per line —
``{"tokens": [...], "max_tokens": 16, "params": {...}, "reset": true}`` —
generates greedily for that one prompt (``params`` become the request's
``kv_transfer_params``), resets the engine's own prefix cache when ``reset``
(so a cached token can only come from kvfabric), and prints ``RESULT <json>``
with the generated token ids and ``num_cached_tokens``. EOF ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.inputs import TokensPrompt

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--address")
    ap.add_argument("--load-async", default="auto")
    ap.add_argument("--events")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    kwargs = {}
    if args.address:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVFabricConnector",
            kv_connector_module_path="kvfabric.connectors.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"rpc_address": args.address, "timeout_s": 5.0,
                                       "load_async": args.load_async},
            kv_load_failure_policy="recompute",
        )
    if args.events:
        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=args.events
        )
    # float32: full prefill, local prefix hits and external hits are bit-identical (PITFALLS).
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, enable_prefix_caching=True,
              block_size=args.block_size, **kwargs)  # fmt: skip
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        extra = {"kv_transfer_params": cmd["params"]} if cmd.get("params") else None
        params = SamplingParams(temperature=0.0, max_tokens=int(cmd.get("max_tokens", 16)),
                                ignore_eos=True, extra_args=extra)  # fmt: skip
        out = llm.generate([TokensPrompt(prompt_token_ids=cmd["tokens"])], params,
                           use_tqdm=False)[0]  # fmt: skip
        if cmd.get("reset", True):
            llm.reset_prefix_cache()
        result = {"tokens": list(out.outputs[0].token_ids), "cached": out.num_cached_tokens or 0}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
