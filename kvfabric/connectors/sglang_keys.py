"""Pure parts of the SGLang HiCache backend: settings, key mapping, page geometry.

Nothing here imports SGLang, torch or gRPC, so it type-checks strictly and is
tested in milliseconds; :mod:`kvfabric.connectors.sglang` binds it to
SGLang's host memory pool and to :class:`kvfabric.Client`.

Keys. SGLang names a page by a hex SHA-256 chain over its token ids
(:func:`sglang_page_keys` reproduces it). The HiCache storage interface hands
a backend only those keys, never the tokens, so a page's kvfabric hashes are
derived from its key: segment ``j`` of page ``key`` is stored under
``BLAKE2b-256(u32le(j) || utf8(key), person=b"kvfabric-sgl-v1")`` in a
namespace that fingerprints the model and the host pool's byte layout.

Segments. A page of SGLang's host pool is not always one contiguous run of
bytes (``page_first`` keeps a page's K and V in two halves of the buffer;
``layer_first`` keeps one run per layer and K/V). Each maximal contiguous run
is stored as its own kvfabric block, so a get lands straight in the pool and
a set reads straight from it (no gather copy). :class:`PageLayout` is where
those runs are, as byte offsets into the pool's buffer.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvfabric.errors import InvalidArgument
from kvfabric.hashing import NamespaceSpec, namespace_id
from kvfabric.types import BlockHash, validate_namespace

KEY_PERSON = b"kvfabric-sgl-v1"
MAX_KEY_CHARS = 1024
MAX_SEGMENTS = 4096
_U32 = struct.Struct("<I")


# -- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StorageSettings:
    """The backend's part of SGLang's ``--hicache-storage-backend-extra-config``.

    ``rpc_address`` is the kvfabric node's gRPC ``host:port``; ``namespace``
    overrides the one derived from the model and pool; ``timeout_s`` bounds
    every call; ``retries`` is how often a read is retried; ``down_s`` is how
    long the backend answers "miss" without calling after the fabric was
    unreachable; ``max_chain`` caps the hashes of one call (the node's
    ``rpc_max_chain``).
    """

    rpc_address: str
    namespace: str | None = None
    token: str | None = None
    timeout_s: float = 5.0
    retries: int = 1
    down_s: float = 5.0
    max_chain: int = 4096

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> StorageSettings:
        """Parse and validate; every error names ``extra_config.<field>``."""
        if extra is None or not isinstance(extra, Mapping):
            raise InvalidArgument(
                "the kvfabric backend needs --hicache-storage-backend-extra-config with "
                "'rpc_address'", "extra_config",
            )  # fmt: skip
        address = extra.get("rpc_address")
        if not isinstance(address, str) or ":" not in address or not address.isprintable():
            raise InvalidArgument(
                f"rpc_address must be a 'host:port' string, got {address!r}",
                "extra_config.rpc_address",
            )
        namespace = extra.get("namespace")
        if namespace is not None:
            namespace = validate_namespace(namespace, "extra_config.namespace")
        token = extra.get("token")
        if token is not None and (not isinstance(token, str) or not token.isprintable()):
            raise InvalidArgument("token must be a printable string", "extra_config.token")
        return cls(
            rpc_address=address, namespace=namespace, token=token or None,
            timeout_s=_number(extra, "timeout_s", 5.0, 0.01, 3600.0),
            retries=int(_number(extra, "retries", 1, 0, 10, integer=True)),
            down_s=_number(extra, "down_s", 5.0, 0.0, 3600.0),
            max_chain=int(_number(extra, "max_chain", 4096, 1, 1 << 20, integer=True)),
        )  # fmt: skip


def _number(
    extra: Mapping[str, Any], name: str, default: float, low: float, high: float, *,
    integer: bool = False,
) -> float:  # fmt: skip
    value = extra.get(name, default)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise InvalidArgument(f"{name} must be {kind} in {low}..{high}, got {value!r}",
                              f"extra_config.{name}")  # fmt: skip
    return float(value)


# -- keys -------------------------------------------------------------------------------------
def check_key(key: object, field: str = "keys") -> str:
    """A page key as SGLang passes it: a non-empty printable string of bounded length."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise InvalidArgument(
            f"{field} must hold non-empty printable strings of at most {MAX_KEY_CHARS} "
            f"characters, got {key!r:.80}", field,
        )  # fmt: skip
    return key


def page_block_hashes(key: str, segments: int) -> list[BlockHash]:
    """The kvfabric hashes of the ``segments`` blocks of SGLang page ``key``, in order."""
    check_key(key, "key")
    if not isinstance(segments, int) or not 0 < segments <= MAX_SEGMENTS:
        raise InvalidArgument(f"segments must be in 1..{MAX_SEGMENTS}", "segments")
    raw = key.encode("utf-8")
    return [
        BlockHash(hashlib.blake2b(_U32.pack(j) + raw, digest_size=32, person=KEY_PERSON).digest())
        for j in range(segments)
    ]


def pages_chain(keys: Sequence[str], segments: int) -> list[BlockHash]:
    """Hashes of all pages, page-major: the chain whose stored prefix ``lookup`` measures."""
    out: list[BlockHash] = []
    for key in keys:
        out.extend(page_block_hashes(key, segments))
    return out


def sglang_page_keys(
    tokens: Sequence[int], page_size: int, prior_key: str | None = None
) -> list[str]:
    """SGLang's storage keys of the full pages of ``tokens`` (its ``get_hash_str``).

    ``key_i = SHA-256(key_{i-1} as 32 bytes || token ids as u32le)``, the first
    page without a parent unless ``prior_key`` continues a chain. Only token
    ids below 2**32 are covered (SGLang switches to a wide encoding above).
    """
    if not isinstance(page_size, int) or page_size <= 0:
        raise InvalidArgument(f"page_size must be a positive int, got {page_size!r}", "page_size")
    prior = b"" if prior_key is None else _hex_digest(prior_key)
    keys = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        page = tokens[start : start + page_size]
        if any(not isinstance(t, int) or not 0 <= t < 1 << 32 for t in page):
            raise InvalidArgument("token ids must be ints in 0..2**32-1", "tokens")
        prior = hashlib.sha256(prior + struct.pack(f"<{page_size}I", *page)).digest()
        keys.append(prior.hex())
    return keys


def _hex_digest(key: str) -> bytes:
    try:
        raw = bytes.fromhex(key)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise InvalidArgument("prior_key must be a 64-character hex SHA-256", "prior_key")
    return raw


# -- page geometry ----------------------------------------------------------------------------
def contiguous_runs(
    shape: Sequence[int], strides: Sequence[int], offset: int, itemsize: int
) -> list[tuple[int, int]]:
    """``(byte_offset, nbytes)`` of each maximal contiguous run of a strided view, in order.

    ``strides`` and ``offset`` count elements; the runs are listed in the
    view's row-major (``flatten``) order, so their concatenation is the view.
    """
    dims = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    if any(n <= 0 for n, _ in dims) or itemsize <= 0:
        raise InvalidArgument("a page view must be non-empty", "mem_pool_host")
    run, k = 1, len(dims)
    while k > 0 and dims[k - 1][1] == run:  # dims k.. are one dense block
        run *= dims[k - 1][0]
        k -= 1
    outer = dims[:k]
    out = []
    for flat in range(math.prod(n for n, _ in outer)):
        pos, rest = offset, flat
        for n, s in reversed(outer):
            pos += (rest % n) * s
            rest //= n
        out.append((pos * itemsize, run * itemsize))
    return out


@dataclass(frozen=True, slots=True)
class PageLayout:
    """Where page ``p``'s segments lie in the host pool's buffer.

    Segment ``j`` of page ``p`` is bytes ``[p * page_stride + offsets[j],
    + segment_bytes)``; all segments have the same size (one namespace holds
    one block size).
    """

    page_size: int
    page_stride: int
    offsets: tuple[int, ...]
    segment_bytes: int

    @property
    def segments(self) -> int:
        """Blocks per page."""
        return len(self.offsets)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (all its segments)."""
        return self.segment_bytes * len(self.offsets)

    def spans(self, page: int) -> list[tuple[int, int]]:
        """``(start, stop)`` byte ranges of page ``page``'s segments."""
        base = page * self.page_stride
        return [(base + o, base + o + self.segment_bytes) for o in self.offsets]

    @classmethod
    def derive(
        cls, page0: list[tuple[int, int]], page1: list[tuple[int, int]], page_size: int,
        pages: int, buffer_bytes: int,
    ) -> PageLayout:  # fmt: skip
        """From the runs of pages 0 and 1; InvalidArgument if pages are not regular."""
        sizes = {n for _, n in page0}
        if not page0 or len(page0) > MAX_SEGMENTS or len(sizes) != 1 or len(page1) != len(page0):
            raise InvalidArgument(
                f"host pool pages must split into at most {MAX_SEGMENTS} equal contiguous "
                f"runs; got sizes {sorted(sizes)[:4]} in {len(page0)} runs", "mem_pool_host",
            )  # fmt: skip
        stride = page1[0][0] - page0[0][0]
        if stride <= 0 or any(b - a != stride or m != n for (a, n), (b, m)
                              in zip(page0, page1, strict=True)):  # fmt: skip
            raise InvalidArgument("host pool pages are not evenly strided", "mem_pool_host")
        layout = cls(page_size, stride, tuple(o for o, _ in page0), sizes.pop())
        if pages <= 0 or max(layout.spans(pages - 1))[1] > buffer_bytes:
            raise InvalidArgument("host pool pages run past its buffer", "mem_pool_host")
        return layout


@dataclass(frozen=True, slots=True)
class PoolFacts:
    """What makes one SGLang host pool's page bytes compatible with another's."""

    model: str
    dtype: str
    pool_class: str
    layout: str
    page_size: int
    layers: tuple[int, int]
    tp: tuple[int, int]
    pp: tuple[int, int] = (0, 1)
    cp: tuple[int, int] = (0, 1)


def derive_namespace(facts: PoolFacts, page: PageLayout) -> str:
    """The namespace id of a pool: model, dtype, pool layout and geometry, shard."""
    layout = (f"sglang-hicache:{facts.pool_class}:{facts.layout}:"
              f"{page.segments}x{page.segment_bytes}")  # fmt: skip
    group = f"layers{facts.layers[0]}-{facts.layers[1]}:pp{facts.pp[0]}/{facts.pp[1]}"
    if facts.cp[1] > 1:
        group += f":cp{facts.cp[0]}/{facts.cp[1]}"
    spec = NamespaceSpec(facts.model, facts.page_size, dtype=facts.dtype, kv_layout=layout,
                         tp_rank=facts.tp[0], tp_size=facts.tp[1], layer_group=group)  # fmt: skip
    return namespace_id(spec)
