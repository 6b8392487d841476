"""Paged, filtered listing of the blocks a node holds (the ListBlocks RPC, `kvfabric ls`).

Pure: it takes the node store's metadata copies and returns one page. Blocks
are ordered by (namespace, hash); a page token is the last key of the
previous page (``namespace/hex-hash``), so a listing stays consistent while
blocks come and go: a block added behind the cursor is simply not seen, and
none is seen twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvfabric.errors import InvalidArgument
from kvfabric.types import BLOCK_HASH_BYTES, BlockMeta, BlockType, Tier, validate_namespace

DEFAULT_PAGE = 100
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class BlockFilter:
    """Which blocks to list; None means any."""

    namespace: str | None = None
    program_id: str | None = None
    block_type: BlockType | None = None
    tier: Tier | None = None

    def matches(self, meta: BlockMeta) -> bool:
        """True when ``meta`` passes every filter that is set."""
        return (
            (self.namespace is None or meta.key.namespace == self.namespace)
            and (self.program_id is None or meta.program_id == self.program_id)
            and (self.block_type is None or meta.type == self.block_type)
            and (self.tier is None or meta.tier == self.tier)
        )


@dataclass(frozen=True, slots=True)
class BlockPage:
    """One page of a listing; ``next_token`` is empty on the last page."""

    blocks: tuple[BlockMeta, ...]
    next_token: str


def page_size(value: int) -> int:
    """The page size to use: 0 means the default; otherwise 1..MAX_PAGE."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PAGE:
        raise InvalidArgument(f"page_size must be in 0..{MAX_PAGE}, got {value!r}", "page_size")
    return value or DEFAULT_PAGE


def page_token(meta: BlockMeta) -> str:
    """The token that resumes a listing after ``meta``."""
    return f"{meta.key.namespace}/{meta.key.hash.hex()}"


def parse_token(token: str) -> tuple[str, bytes] | None:
    """The (namespace, hash) a token resumes after; None for the empty token."""
    if not token:
        return None
    ns, sep, digest = token.rpartition("/")
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    if not sep or len(raw) != BLOCK_HASH_BYTES:
        raise InvalidArgument(
            "page_token must be the next_page_token of a previous page", "page_token"
        )
    return validate_namespace(ns, "page_token"), raw


def list_page(
    metas: Iterable[BlockMeta],
    where: BlockFilter,
    *,
    size: int = 0,
    after: str = "",
    allowed: Callable[[str], bool] = lambda ns: True,
) -> BlockPage:
    """The page of ``metas`` passing ``where`` (and ``allowed``) that follows ``after``."""
    limit = page_size(size)
    cursor = parse_token(after)
    chosen = sorted(
        (m for m in metas
         if where.matches(m) and allowed(m.key.namespace)
         and (cursor is None or (m.key.namespace, bytes(m.key.hash)) > cursor)),
        key=lambda m: (m.key.namespace, bytes(m.key.hash)),
    )  # fmt: skip
    page = tuple(chosen[:limit])
    more = len(chosen) > limit
    return BlockPage(page, page_token(page[-1]) if more and page else "")
