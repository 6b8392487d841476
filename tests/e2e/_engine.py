"""Runs one vLLM engine on the tiny model and prints its greedy outputs (a test driver).

Run as a subprocess (each engine gets its own process, as in production):
``python -m tests.e2e._engine MODEL_DIR MODE RPC_ADDRESS`` where MODE is
``none`` (no connector) or ``fabric`` (the kvfabric connector). Prompts are
submitted one at a time and the engine's own prefix cache is reset between
them, so a cached token can only come from kvfabric. The last line printed is
``RESULT <json>``: per prompt, the generated token ids and num_cached_tokens.
"""

from __future__ import annotations

import json
import os
import sys

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from tests.e2e.tiny_model import prompt_text

    model, mode, address = sys.argv[1], sys.argv[2], sys.argv[3]
    kwargs = {}
    if mode == "fabric":
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVFabricConnector",
            kv_connector_module_path="kvfabric.connectors.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"rpc_address": address},
            kv_load_failure_policy="recompute",
        )
    # float32: full prefill, local prefix hits and external hits are bit-identical (PITFALLS).
    llm = LLM(model=model, dtype="float32", enforce_eager=True, enable_prefix_caching=True,
              **kwargs)  # fmt: skip
    hint = {"kv_transfer_params": {"kvfabric_block_type": "SYSTEM_PROMPT",
                                   "kvfabric_program_id": "e2e"}}  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=16, extra_args=hint)
    results = []
    for prompt in (prompt_text(300, 1), prompt_text(300, 1) + " " + prompt_text(40, 77)):
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        results.append({"tokens": list(out.outputs[0].token_ids), "cached": out.num_cached_tokens})
        llm.reset_prefix_cache()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
