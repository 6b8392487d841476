"""The pure parts of the backend: page geometry, key mapping, namespaces (no node, no pools)."""

from __future__ import annotations

import hashlib

import pytest

from kvfabric.connectors.sglang_keys import (
    PageLayout,
    PoolFacts,
    check_key,
    contiguous_runs,
    derive_namespace,
    page_block_hashes,
    pages_chain,
)
from kvfabric.errors import InvalidArgument


def test_contiguous_runs_follow_flatten_order() -> None:
    # page_first MHA page: (2, page, layers, heads, dim) inside a buffer of 40 tokens.
    shape, size = (2, 4, 3, 2, 8), 40
    strides = (size * 48, 48, 16, 8, 1)
    run = 4 * 48 * 2  # bytes of one page's K (or V)
    assert contiguous_runs(shape, strides, 4 * 48, 2) == [(run, run), (size * 96 + run, run)]
    # layer_first: one run per (K/V, layer).
    runs = contiguous_runs((2, 3, 4, 2, 8), (3 * size * 16, size * 16, 16, 8, 1), 0, 1)
    assert [o for o, _ in runs] == [(kv * 3 + la) * size * 16 for kv in range(2) for la in range(3)]
    assert {n for _, n in runs} == {4 * 16}
    # Size-1 dimensions never split a run; a dense view is one run.
    assert contiguous_runs((1, 4, 1, 8), (999, 8, 5, 1), 8, 4) == [(32, 128)]


def test_page_layout_is_regular_or_refused() -> None:
    page0, page1 = [(0, 64), (1000, 64)], [(64, 64), (1064, 64)]
    layout = PageLayout.derive(page0, page1, page_size=4, pages=10, buffer_bytes=2000)
    assert layout.segments == 2 and layout.page_bytes == 128
    assert layout.spans(3) == [(192, 256), (1192, 1256)]
    with pytest.raises(InvalidArgument, match="equal contiguous"):
        PageLayout.derive([(0, 64), (100, 32)], [(64, 64), (164, 32)], 4, 10, 2000)
    with pytest.raises(InvalidArgument, match="evenly strided"):
        PageLayout.derive(page0, [(64, 64), (1100, 64)], 4, 10, 2000)
    with pytest.raises(InvalidArgument, match="past its buffer"):
        PageLayout.derive(page0, page1, 4, 20, 2000)


def test_page_hashes_are_fixed_per_key_and_segment() -> None:
    key = "5d85718ec594b982c252d0279e5966ffca33a5eaf2a455038d3ab331fde70cea"
    hs = page_block_hashes(key, 2)
    expected = hashlib.blake2b(b"\x01\x00\x00\x00" + key.encode(), digest_size=32,
                               person=b"kvfabric-sgl-v1").digest()  # fmt: skip
    assert hs[1] == expected and len(set(hs)) == 2 and all(len(h) == 32 for h in hs)
    assert page_block_hashes(key, 3)[:2] == hs
    assert pages_chain([key, "other"], 2) == hs + page_block_hashes("other", 2)
    for bad in ("", "a\nb", "x" * 1025, b"bytes"):
        with pytest.raises(InvalidArgument):
            check_key(bad)
    with pytest.raises(InvalidArgument):
        page_block_hashes(key, 0)


def test_namespace_separates_layout_shard_and_geometry() -> None:
    page = PageLayout(16, 1024, (0, 50_000), 512)
    base = PoolFacts(model="m", dtype="bfloat16", pool_class="MHATokenToKVPoolHost",
                     layout="page_first", page_size=16, layers=(0, 2), tp=(0, 1))  # fmt: skip
    ns = derive_namespace(base, page)
    assert ns.startswith("ns-") and derive_namespace(base, page) == ns
    others = {
        derive_namespace(PoolFacts("m", "float16", base.pool_class, "page_first", 16, (0, 2),
                                   (0, 1)), page),
        derive_namespace(PoolFacts("m", "bfloat16", base.pool_class, "layer_first", 16, (0, 2),
                                   (0, 1)), page),
        derive_namespace(PoolFacts("m", "bfloat16", base.pool_class, "page_first", 16, (0, 2),
                                   (1, 2)), page),
        derive_namespace(PoolFacts("m", "bfloat16", base.pool_class, "page_first", 16, (0, 2),
                                   (0, 1), pp=(1, 2)), page),
        derive_namespace(base, PageLayout(16, 1024, (0, 50_000), 256)),
    }  # fmt: skip
    assert len(others) == 5 and ns not in others
