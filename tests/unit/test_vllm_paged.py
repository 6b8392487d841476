"""The connector's view of vLLM's paged KV cache: gather/scatter for both block layouts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", exc_type=ImportError)

from kvfabric.connectors.vllm_worker import PagedKV  # noqa: E402

NUM_BLOCKS = 12


def layers(block_dim: int, n_layers: int = 3) -> list[torch.Tensor]:
    # CPU backend: (blocks, heads, block_size, 2*head); K/V-first GPU backends: (2, blocks, ...)
    shape = (NUM_BLOCKS, 2, 16, 64) if block_dim == 0 else (2, NUM_BLOCKS, 16, 2, 32)
    g = torch.Generator().manual_seed(block_dim)
    return [torch.randn(shape, generator=g) for _ in range(n_layers)]


@pytest.mark.parametrize("block_dim", [0, 1])
def test_gather_then_scatter_moves_exactly_the_named_blocks(block_dim: int) -> None:
    src, dst = layers(block_dim), [torch.zeros_like(t) for t in layers(block_dim)]
    a, b = PagedKV(src, NUM_BLOCKS), PagedKV(dst, NUM_BLOCKS)
    assert a.block_dim == block_dim
    assert a.block_bytes == 3 * (src[0].numel() // NUM_BLOCKS) * 4
    typed, views = a.gather([7, 2, 9])
    assert all(len(v) == a.block_bytes for v in views)
    b.scatter([0, 5, 11], typed)
    for s, d in zip(src, dst, strict=True):
        for i, j in ((7, 0), (2, 5), (9, 11)):
            assert torch.equal(s.select(block_dim, i), d.select(block_dim, j))
        untouched = [k for k in range(NUM_BLOCKS) if k not in (0, 5, 11)]
        assert not d.index_select(block_dim, torch.tensor(untouched)).any()


def test_bytes_written_into_staging_views_land_in_the_cache() -> None:
    cache = layers(0)
    paged = PagedKV(cache, NUM_BLOCKS)
    _, views = paged.gather([3])
    typed, landing = paged.staging(1)
    landing[0][:] = views[0]  # what a client's get_into does
    paged.scatter([4], typed)
    assert all(torch.equal(t[3], t[4]) for t in cache)


def test_unusable_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKV(layers(0), NUM_BLOCKS + 1)
    with pytest.raises(ValueError, match="equal layer shapes"):
        PagedKV([torch.zeros(NUM_BLOCKS, 4), torch.zeros(NUM_BLOCKS, 8)], NUM_BLOCKS)
    with pytest.raises(ValueError, match="no KV cache layers"):
        PagedKV([], NUM_BLOCKS)
