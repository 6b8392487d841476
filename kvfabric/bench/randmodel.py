"""A random-weight Llama and a WordLevel tokenizer written locally, for tests and benchmarks.

``build_random_llama(path, ...)`` writes ``config.json``, safetensors weights
and a ``PreTrainedTokenizerFast`` (WordLevel over ``w0 .. w{vocab-1}``,
whitespace pre-tokenizer) to ``path``. Weights come from a fixed seed, so two
builds of the same arguments are identical. Nothing is downloaded: the
machine this runs on may reach no model hub. Needs ``transformers`` and
``tokenizers`` (installed with the ``[vllm]`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def prompt_text(n_words: int, offset: int = 0, vocab: int = 512) -> str:
    """A deterministic prompt of ``n_words`` vocabulary words (each one token)."""
    first = len(SPECIALS)
    return " ".join(f"w{first + (offset + 7 * i) % (vocab - first)}" for i in range(n_words))


def build_random_llama(
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
