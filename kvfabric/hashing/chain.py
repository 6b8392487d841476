"""Canonical chained block hashes over token ids and extra keys.

A block hash names the KV of ``block_size`` consecutive tokens *and* of every
token before them, so two processes that agree on a hash agree on the whole
prefix. The definition is kvfabric's own and never depends on the engine,
the process or ``PYTHONHASHSEED``::

    H(x)  = BLAKE2b(x, digest_size=32, person=b"kvfabric-blk-v1")
    root  = H(b"kvfabric/v1/root")
    h_i   = H(h_{i-1} || u32le(n) || tokens_i as u32le || extras_i)

``extras_i`` is a tag-length-value encoding (see ``docs/hashing.md``): the
cache salt and the LoRA id go into block 0 only (the chain carries them
forward), a multimodal item goes into every block its placeholder span
overlaps. Absent extras encode as nothing, so a plain chain is just tokens.
"""

from __future__ import annotations

import hashlib
import re
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from kvfabric.errors import InvalidArgument
from kvfabric.types import BLOCK_HASH_BYTES, BlockHash, as_block_hash

HASH_PERSON = b"kvfabric-blk-v1"
ROOT_INPUT = b"kvfabric/v1/root"
MIN_BLOCK_SIZE = 1
MAX_BLOCK_SIZE = 65536
MAX_TOKEN_ID = 2**32 - 1
MAX_MM_TOKENS = 2**32 - 1

TAG_CACHE_SALT = 0x01
TAG_LORA_ID = 0x02
TAG_MM_ITEM = 0x03

TokenInput = Sequence[int] | npt.NDArray[Any]
"""Token ids: a list of ints, a 1-D integer numpy array or an ``array('I')``."""

_U32 = struct.Struct("<I")
_ARRAY_U32_OK = array("I").itemsize == 4
_MM_OFFSETS = struct.Struct("<III")
# Constructing a BLAKE2b state with a personalization costs more than hashing a
# 64-byte block; copying a pristine state is about three times cheaper.
_PRISTINE = hashlib.blake2b(digest_size=BLOCK_HASH_BYTES, person=HASH_PERSON)

ROOT_HASH = BlockHash(
    hashlib.blake2b(ROOT_INPUT, digest_size=BLOCK_HASH_BYTES, person=HASH_PERSON).digest()
)
"""The fixed parent of block 0 of every chain."""


def _is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_utf8(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidArgument(f"{field} is not valid Unicode text: {err}", field) from err


def _optional_name(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(
            f"{field} must be a string or None, got {type(value).__name__}", field
        )
    _check_utf8(value, field)
    # An empty salt or LoRA id means "none", as in vLLM; one hash for both spellings.
    return value or None


@dataclass(frozen=True, slots=True)
class MMItem:
    """One multimodal input: its content hash and its placeholder span in the tokens.

    ``start_token`` is the absolute position of the item's first placeholder
    token in the request's token sequence; the span is ``num_tokens`` long.
    """

    content_hash: str
    start_token: int
    num_tokens: int

    def __post_init__(self) -> None:
        if not isinstance(self.content_hash, str) or not self.content_hash:
            raise InvalidArgument("content_hash must be a non-empty string", "content_hash")
        _check_utf8(self.content_hash, "content_hash")
        if not _is_int(self.start_token) or self.start_token < 0:
            raise InvalidArgument(
                f"start_token must be an integer >= 0, got {self.start_token!r}", "start_token"
            )
        if not _is_int(self.num_tokens) or not 1 <= self.num_tokens <= MAX_MM_TOKENS:
            raise InvalidArgument(
                f"num_tokens must be an integer in 1..{MAX_MM_TOKENS}, got {self.num_tokens!r}",
                "num_tokens",
            )
        object.__setattr__(self, "start_token", int(self.start_token))
        object.__setattr__(self, "num_tokens", int(self.num_tokens))

    @property
    def end_token(self) -> int:
        """One past the last placeholder token of the item."""
        return self.start_token + self.num_tokens


def _as_mm_item(value: object) -> MMItem:
    if isinstance(value, MMItem):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 3:
        try:
            return MMItem(*value)
        except InvalidArgument as err:
            raise InvalidArgument(f"mm_items: {err.message}", "mm_items") from err
    raise InvalidArgument(
        "mm_items must hold MMItem or (content_hash, start_token, num_tokens) tuples, "
        f"got {type(value).__name__}",
        "mm_items",
    )


@dataclass(frozen=True, slots=True)
class ExtraKeys:
    """What besides token ids makes two equal token blocks hold different KV.

    ``cache_salt`` and ``lora_id`` apply to the whole request and are hashed
    into block 0 only; ``mm_items`` are hashed into the blocks they overlap.
    An empty string is the same as ``None``. ``mm_items`` also accepts
    ``(content_hash, start_token, num_tokens)`` tuples and is stored sorted,
    so the order the caller lists items in does not change any hash.
    """

    cache_salt: str | None = None
    lora_id: str | None = None
    mm_items: tuple[MMItem, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_salt", _optional_name(self.cache_salt, "cache_salt"))
        object.__setattr__(self, "lora_id", _optional_name(self.lora_id, "lora_id"))
        if isinstance(self.mm_items, (str, bytes)) or not isinstance(self.mm_items, Iterable):
            raise InvalidArgument(
                f"mm_items must be a sequence of MMItem, got {type(self.mm_items).__name__}",
                "mm_items",
            )
        items = sorted(
            (_as_mm_item(v) for v in self.mm_items),
            key=lambda m: (m.start_token, m.num_tokens, m.content_hash),
        )
        object.__setattr__(self, "mm_items", tuple(items))


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + _U32.pack(len(value)) + value


def _token_bytes(tokens: TokenInput) -> bytes:
    """All token ids as one little-endian uint32 byte string, range-checked."""
    if isinstance(tokens, (list, tuple, range)) and _ARRAY_U32_OK:
        # array('I') converts and range-checks a Python sequence in C, about four
        # times faster than numpy's dtype inference; on any error the numpy path
        # below runs instead, to name the offending token.
        try:
            packed = array("I", tokens)
        except (OverflowError, TypeError):
            pass
        else:
            if sys.byteorder != "little":
                packed.byteswap()
            return packed.tobytes()
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError, OverflowError) as err:
        raise InvalidArgument(f"tokens must be a sequence of integers: {err}", "tokens") from err
    if arr.ndim == 0:
        raise InvalidArgument(
            f"tokens must be a sequence of integers, got {type(tokens).__name__}", "tokens"
        )
    if arr.ndim != 1:
        raise InvalidArgument(f"tokens must be one-dimensional, got {arr.ndim} dims", "tokens")
    if arr.size == 0:
        return b""
    if arr.dtype.kind == "O":
        # numpy falls back to objects for ints beyond 64 bits (or mixed junk).
        raise InvalidArgument(f"tokens must be integers in 0..{MAX_TOKEN_ID}", "tokens")
    if arr.dtype.kind not in "iu":
        raise InvalidArgument(f"tokens must be integers, got dtype {arr.dtype}", "tokens")
    low = arr.dtype.kind == "i" and int(arr.min()) < 0
    if low or (arr.dtype.itemsize > 4 and int(arr.max()) > MAX_TOKEN_ID):
        bad = int(np.flatnonzero((arr < 0) | (arr > MAX_TOKEN_ID))[0])
        raise InvalidArgument(
            f"tokens[{bad}] is {int(arr[bad])}; token ids must be in 0..{MAX_TOKEN_ID}", "tokens"
        )
    return arr.astype("<u4", copy=False).tobytes()


def _check_block_size(block_size: object) -> int:
    if not _is_int(block_size) or not MIN_BLOCK_SIZE <= int(block_size) <= MAX_BLOCK_SIZE:
        raise InvalidArgument(
            f"block_size must be an integer in {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}, "
            f"got {block_size!r}",
            "block_size",
        )
    return int(block_size)


def _block_extras(
    extras: ExtraKeys, n_blocks: int, block_size: int, start: int, first_block: bool
) -> list[bytes]:
    """The canonical extra-key bytes of each of ``n_blocks`` blocks (b"" when none)."""
    if n_blocks == 0:
        return []
    parts: list[list[bytes]] = [[] for _ in range(n_blocks)]
    if first_block:
        if extras.cache_salt is not None:
            parts[0].append(_tlv(TAG_CACHE_SALT, extras.cache_salt.encode("utf-8")))
        if extras.lora_id is not None:
            parts[0].append(_tlv(TAG_LORA_ID, extras.lora_id.encode("utf-8")))
    end = start + n_blocks * block_size
    for item in extras.mm_items:  # already in canonical order
        if item.end_token <= start or item.start_token >= end:
            continue
        first = max(0, (item.start_token - start) // block_size)
        last = min(n_blocks - 1, (item.end_token - 1 - start) // block_size)
        content = item.content_hash.encode("utf-8")
        for j in range(first, last + 1):
            block_start = start + j * block_size
            lo = max(block_start, item.start_token)
            hi = min(block_start + block_size, item.end_token)
            offsets = _MM_OFFSETS.pack(lo - block_start, lo - item.start_token, hi - lo)
            parts[j].append(_tlv(TAG_MM_ITEM, offsets + content))
    return [b"".join(p) for p in parts]


def chain_hashes(
    tokens: TokenInput,
    block_size: int,
    extras: ExtraKeys | None = None,
    parent: BlockHash | None = None,
    *,
    start: int = 0,
) -> list[BlockHash]:
    """The canonical hash of every full block of ``tokens``; a trailing partial block has none.

    With ``parent`` the tokens continue the chain after the block whose hash is
    ``parent``; the cache salt and LoRA id then do not apply (they live in
    block 0, which the parent already covers). ``start`` is the absolute
    position of ``tokens[0]`` in the request (a multiple of ``block_size``,
    0 without a parent); multimodal spans are matched against absolute
    positions, so ``chain_hashes(t[k*bs:], bs, e, parent=h[k-1], start=k*bs)``
    equals ``h[k:]`` for ``h = chain_hashes(t, bs, e)``.
    """
    bs = _check_block_size(block_size)
    if extras is not None and not isinstance(extras, ExtraKeys):
        raise InvalidArgument(
            f"extras must be ExtraKeys or None, got {type(extras).__name__}", "extras"
        )
    prev = ROOT_HASH if parent is None else as_block_hash(parent, "parent")
    if not _is_int(start) or start < 0 or start % bs:
        raise InvalidArgument(
            f"start must be a non-negative multiple of block_size ({bs}), got {start!r}", "start"
        )
    if parent is None and start != 0:
        raise InvalidArgument("start must be 0 when no parent is given", "start")
    data = _token_bytes(tokens)
    n_blocks = len(data) // (4 * bs)
    per_block = (
        None if extras is None else _block_extras(extras, n_blocks, bs, int(start), parent is None)
    )

    header = _U32.pack(bs)
    step = 4 * bs
    view = memoryview(data)
    out: list[BlockHash] = []
    for i in range(n_blocks):
        h = _PRISTINE.copy()
        h.update(prev)
        h.update(header)
        h.update(view[i * step : (i + 1) * step])
        if per_block is not None:
            h.update(per_block[i])
        prev = BlockHash(h.digest())
        out.append(prev)
    return out


def format_chain(hashes: Iterable[BlockHash | bytes]) -> list[str]:
    """Lowercase hex of each hash, one string per block (for the CLI and logs)."""
    return [bytes(h).hex() for h in hashes]


_SEPARATORS = re.compile(r"[,\s]+")


def parse_token_list(text: str) -> list[int]:
    """Parse token ids separated by commas and/or whitespace ("1,2,3" or a file's lines).

    Raises InvalidArgument naming ``tokens`` for anything that is not a
    decimal integer in 0..2**32-1.
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"tokens must be text, got {type(text).__name__}", "tokens")
    out: list[int] = []
    for index, item in enumerate(p for p in _SEPARATORS.split(text.strip()) if p):
        if not (item.isascii() and item.isdigit()):
            raise InvalidArgument(
                f"tokens: item {index} is {item[:32]!r}, not a non-negative integer", "tokens"
            )
        value = int(item)
        if value > MAX_TOKEN_ID:
            raise InvalidArgument(
                f"tokens: item {index} is {value}; the limit is {MAX_TOKEN_ID}", "tokens"
            )
        out.append(value)
    return out
