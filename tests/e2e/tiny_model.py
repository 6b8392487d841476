"""Build a tiny random-weight Llama plus a WordLevel tokenizer that vLLM (CPU) can load.

``build_tiny_model(path)`` writes ``config.json``, safetensors weights and a
``PreTrainedTokenizerFast`` (WordLevel over ``w0 .. w{vocab-1}``, whitespace
pre-tokenizer) to ``path``. Weights come from a fixed seed, so two builds of
the same arguments are identical. Nothing is downloaded.

Run as a script to build one and (with ``--generate``) load it in vLLM and
generate greedily: ``python -m tests.e2e.tiny_model /tmp/tiny --generate``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def prompt_text(n_words: int, offset: int = 0, vocab: int = 512) -> str:
    """A deterministic prompt of ``n_words`` vocabulary words (each one token)."""
    first = len(SPECIALS)
    return " ".join(f"w{first + (offset + 7 * i) % (vocab - first)}" for i in range(n_words))


def build_tiny_model(
    path: str | os.PathLike[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    max_positions: int = 4096,
    seed: int = 0,
) -> Path:
    """Write the model and tokenizer to ``path`` (created) and return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    first = len(SPECIALS)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(first, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )  # fmt: skip
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,  # the CPU attention backend needs >= 32
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default weights: logits far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


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
