"""The tiny model of the end-to-end tests (see :mod:`kvfabric.bench.randmodel`).

Run as a script to build one and (with ``--generate``) load it in vLLM and
generate greedily: ``python -m tests.e2e.tiny_model /tmp/tiny --generate``.
"""

from __future__ import annotations

import argparse
import os
import time

from kvfabric.bench.randmodel import build_random_llama as build_tiny_model
from kvfabric.bench.randmodel import prompt_text

__all__ = ["build_tiny_model", "prompt_text"]


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    path = build_tiny_model(args.path)
    print(f"built {path}")
    if not args.generate:
        return
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}  # fmt: skip
    for k, v in env.items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(model=str(path), dtype=args.dtype, enforce_eager=True, enable_prefix_caching=True)
    t1 = time.monotonic()
    out = llm.generate([prompt_text(40)], SamplingParams(temperature=0.0, max_tokens=8))
    t2 = time.monotonic()
    o = out[0].outputs[0]
    print(f"engine start {t1 - t0:.1f} s, generate {t2 - t1:.2f} s")
    print(f"tokens {list(o.token_ids)} text {o.text!r}")


if __name__ == "__main__":
    _main()
