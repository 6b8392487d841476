"""A tiny local tokenizer for the CLI tests (no model, no download, no vLLM import).

A ``tokenizers`` WordLevel vocabulary over ``w0 .. w{vocab-1}`` with a
whitespace pre-tokenizer and a post-processor that puts ``<s>`` (id 1) first,
the way Llama-family tokenizers add BOS, saved as a ``PreTrainedTokenizerFast``
directory. So ``"w10 w11"`` tokenizes to ``[1, 10, 11]`` with special tokens
and ``[10, 11]`` without.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
BOS = 1


def build_tokenizer(path: Path, vocab_size: int = 512) -> Path:
    """Write the tokenizer files to ``path`` and return it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return path


def words(ids: list[int]) -> str:
    """The text whose tokens (without BOS) are ``ids``."""
    return " ".join(f"w{i}" for i in ids)
