"""Which blocks an admin command acts on: a prompt, token ids, or hashes, as a canonical chain.

Exactly one source is given:

* ``--text-file F --tokenizer DIR --block-size N``: the text is tokenized with
  the model's own tokenizer, loaded from a local directory (never
  downloaded), with its special tokens added the way an engine adds them to
  a prompt (``--no-special-tokens`` to leave them out);
* ``--token-ids F --block-size N``: token ids separated by commas or
  whitespace;
* ``--hashes F``: one 64-hex-character block hash per line, as ``kvfabric
  hash`` prints them (blank lines and ``#`` comments are skipped).

Token sources are hashed with :func:`kvfabric.hashing.chain_hashes` (full
blocks only; ``--cache-salt`` and ``--lora-id`` as the engine used them).
Everything is read and checked before any call reaches the fabric: a bad
file is one :class:`~kvfabric.errors.InvalidArgument` naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from kvfabric.errors import InvalidArgument
from kvfabric.hashing import ExtraKeys, chain_hashes, parse_token_list
from kvfabric.types import BLOCK_HASH_BYTES, validate_namespace

MAX_INPUT_BYTES = 64 << 20
"""Largest text, token or hash file read (a prompt of millions of tokens fits)."""

TextFileOpt = Annotated[Path | None, typer.Option("--text-file", help="prompt text to tokenize")]
TokenizerOpt = Annotated[
    Path | None, typer.Option("--tokenizer", help="local directory of the model's tokenizer")
]
TokenIdsOpt = Annotated[Path | None, typer.Option("--token-ids", help="file of token ids")]
HashesOpt = Annotated[Path | None, typer.Option("--hashes", help="file of hex block hashes")]
BlockSizeOpt = Annotated[
    int | None, typer.Option("--block-size", help="tokens per block (the engine's block size)")
]
SaltOpt = Annotated[str | None, typer.Option("--cache-salt", help="cache salt of the request")]
LoraOpt = Annotated[str | None, typer.Option("--lora-id", help="LoRA adapter id")]
SpecialOpt = Annotated[
    bool, typer.Option("--special-tokens/--no-special-tokens",
                       help="add the tokenizer's special tokens (BOS) like an engine does")
]  # fmt: skip


@dataclass(frozen=True)
class ChainSource:
    """The options that name the blocks (as given on the command line)."""

    text_file: Path | None = None
    tokenizer: Path | None = None
    token_ids: Path | None = None
    hashes: Path | None = None
    block_size: int | None = None
    cache_salt: str | None = None
    lora_id: str | None = None
    special_tokens: bool = True

    def usage_problem(self) -> str | None:
        """Why the combination of options is unusable (a usage error), or None."""
        given = [n for n, v in (("--text-file", self.text_file), ("--token-ids", self.token_ids),
                                ("--hashes", self.hashes)) if v is not None]  # fmt: skip
        if len(given) != 1:
            return "give exactly one of --text-file, --token-ids or --hashes"
        if self.text_file is not None and self.tokenizer is None:
            return "--text-file needs --tokenizer DIR"
        if self.hashes is None and self.block_size is None:
            return f"{given[0]} needs --block-size N (the engine's tokens per block)"
        return None


@dataclass(frozen=True)
class Chain:
    """A namespace and the canonical hashes of its blocks, in prefix order."""

    namespace: str
    hashes: tuple[bytes, ...]
    tokens: int | None  # tokens read (None for a hash file)


def _read(path: Path, what: str) -> str:
    try:
        size = os.stat(path).st_size
        if size > MAX_INPUT_BYTES:
            raise InvalidArgument(
                f"{what} {path} is {size} bytes; the limit is {MAX_INPUT_BYTES}", what.lstrip("-")
            )
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}",
                              what.lstrip("-")) from None  # fmt: skip
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} {path} is not UTF-8 text", what.lstrip("-")) from None


def parse_hashes(text: str, source: str = "--hashes") -> list[bytes]:
    """Block hashes from text, one hex hash per line; InvalidArgument naming the line."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            raw = bytes.fromhex(item)
        except ValueError:
            raw = b""
        if len(raw) != BLOCK_HASH_BYTES:
            raise InvalidArgument(
                f"{source} line {number}: {item[:20]!r} is not a {2 * BLOCK_HASH_BYTES}-character "
                "hex block hash",
                "hashes",
            )
        out.append(raw)
    if not out:
        raise InvalidArgument(f"{source} holds no block hashes", "hashes")
    return out


def tokenize(text: str, tokenizer_dir: Path, special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` with the tokenizer saved in ``tokenizer_dir`` (offline)."""
    if not tokenizer_dir.is_dir():
        raise InvalidArgument(f"tokenizer directory {tokenizer_dir} does not exist", "tokenizer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        ids = tok(text, add_special_tokens=special_tokens)["input_ids"]
    except ImportError:
        raise InvalidArgument("--tokenizer needs the `transformers` package", "tokenizer") from None
    except Exception as exc:  # transformers raises many kinds for a bad directory
        raise InvalidArgument(
            f"cannot load a tokenizer from {tokenizer_dir}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
            "tokenizer",
        ) from None
    return [int(i) for i in ids]


def read_chain(namespace: str, src: ChainSource) -> Chain:
    """Read and hash the blocks ``src`` names (call ``usage_problem`` first)."""
    validate_namespace(namespace)
    if src.hashes is not None:
        return Chain(namespace, tuple(parse_hashes(_read(src.hashes, "--hashes"))), None)
    assert src.block_size is not None  # usage_problem() ruled this out
    if src.text_file is not None:
        assert src.tokenizer is not None
        text = _read(src.text_file, "--text-file")
        ids = tokenize(text, src.tokenizer, src.special_tokens)
    else:
        assert src.token_ids is not None
        try:
            ids = parse_token_list(_read(src.token_ids, "--token-ids"))
        except InvalidArgument as exc:
            raise InvalidArgument(f"--token-ids {src.token_ids}: {exc.message}",
                                  "tokens") from None  # fmt: skip
    extras = ExtraKeys(cache_salt=src.cache_salt, lora_id=src.lora_id)
    hashes = chain_hashes(ids, src.block_size, extras)
    if not hashes:
        raise InvalidArgument(
            f"{len(ids)} tokens make no full block of {src.block_size} tokens", "block_size"
        )
    return Chain(namespace, tuple(bytes(h) for h in hashes), len(ids))


def prepare(namespace: str, src: ChainSource) -> Chain:
    """The chain of a block command, or the exit its bad input deserves (2 usage, 1 bad data)."""
    from kvfabric.cli.render import failure, usage

    problem = src.usage_problem()
    if problem is not None:
        raise usage(problem)
    try:
        return read_chain(namespace, src)
    except InvalidArgument as exc:
        raise failure(exc) from None
