"""KVFabricStorage against SGLang's real interface, its host pools and a real node."""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage
from sglang.srt.mem_cache.storage import StorageBackendFactory

from kvfabric.connectors.sglang import KVFabricStorage
from kvfabric.connectors.sglang_keys import page_block_hashes
from kvfabric.errors import FailedPrecondition, InvalidArgument
from kvfabric.rpc.client import Client, PutStatus
from tests.sglang.conftest import (
    LAYERS,
    PAGE,
    Node,
    extra_config,
    make_mla_pool,
    make_pool,
    storage_config,
)

pytestmark = pytest.mark.timeout(120)


def backend(address: str, pool: Any, *, config: dict[str, Any] | None = None,
            **more: Any) -> KVFabricStorage:  # fmt: skip
    """Built the way SGLang builds it: the factory's 'dynamic' path, then registration."""
    cfg = storage_config(extra_config(address, **more), **(config or {}))
    b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    assert isinstance(b, KVFabricStorage) and isinstance(b, HiCacheStorage)
    b.register_mem_pool_host(pool)
    return b


def indices(pages: list[int]) -> torch.Tensor:
    """Host-pool token indices of whole pages, as SGLang's cache controller passes them."""
    return torch.tensor([p * PAGE + t for p in pages for t in range(PAGE)], dtype=torch.int64)


def page_bytes(pool: Any, page: int) -> bytes:
    return pool.get_data_page(page * PAGE, flat=True).view(torch.uint8).numpy().tobytes()


def keys(tag: str, n: int) -> list[str]:
    return [f"{tag}-{i:04d}" + "ab" * 20 for i in range(n)]


@pytest.mark.parametrize(
    ("layout", "segments"),
    [("page_first", 2), ("layer_first", 2 * LAYERS), ("page_first_direct", 2), ("page_head", 2)],
)
def test_v1_round_trip_lands_pages_in_the_host_pool(node: Node, layout: str, segments: int) -> None:
    src, dst = make_pool(layout, seed=1), make_pool(layout, seed=None)
    writer, reader = backend(node.address, src), backend(node.address, dst)
    assert writer.namespace == reader.namespace and writer.page is not None
    assert writer.page.segments == segments
    ks = keys(f"rt-{layout}", 3)
    assert writer.batch_set_v1(ks, indices([1, 4, 2])) == [True] * 3
    assert writer.batch_exists(ks) == 3 and reader.exists(ks[2])
    assert reader.batch_get_v1(ks, indices([0, 5, 3])) == [True] * 3
    for s, d in ((1, 0), (4, 5), (2, 3)):
        assert page_bytes(dst, d) == page_bytes(src, s)
    assert page_bytes(dst, 1) != page_bytes(src, 1)  # untouched page stays as it was
    # Writing the same pages again is a success (write once: they exist).
    assert writer.batch_set_v1(ks[:1], indices([1])) == [True]


@pytest.mark.parametrize(("layout", "segments"), [("page_first", 1), ("layer_first", LAYERS)])
def test_mla_pages_are_shared_by_every_tp_rank(node: Node, layout: str, segments: int) -> None:
    src, dst = make_mla_pool(layout, seed=21), make_mla_pool(layout, seed=None)
    mla = {"is_mla_model": True, "tp_size": 2}
    writer = backend(node.address, src, config={**mla, "tp_rank": 1})
    reader = backend(node.address, dst, config={**mla, "tp_rank": 0})
    assert writer.namespace == reader.namespace and reader.page is not None
    assert reader.page.segments == segments
    ks = keys(f"mla-{layout}", 2)
    assert writer.batch_set_v1(ks, indices([3, 4])) == [True, True]
    assert reader.batch_get_v1(ks, indices([0, 1])) == [True, True]
    assert page_bytes(dst, 0) == page_bytes(src, 3) and page_bytes(dst, 1) == page_bytes(src, 4)
    # MHA ranks hold different heads: their namespaces differ, so they never mix.
    mha = [backend(node.address, make_pool(seed=None), config={"tp_size": 2, "tp_rank": r})
           for r in (0, 1)]  # fmt: skip
    assert mha[0].namespace != mha[1].namespace


def test_legacy_flat_pages_and_v1_share_the_same_blocks(node: Node) -> None:
    src, dst = make_pool(seed=2), make_pool(seed=None)
    a, b = backend(node.address, src), backend(node.address, dst)
    ks = keys("legacy", 2)
    flat = [src.get_data_page(p * PAGE, flat=True) for p in (3, 6)]
    assert a.batch_set(ks, flat) is True
    assert b.batch_get_v1(ks, indices([0, 1])) == [True, True]
    assert page_bytes(dst, 0) == page_bytes(src, 3) and page_bytes(dst, 1) == page_bytes(src, 6)
    k2 = keys("legacy-v1", 1)[0]
    assert a.batch_set_v1([k2], indices([5])) == [True]
    got = b.get(k2)  # no target: the backend allocates a flat page
    assert got is not None and torch.equal(got, src.get_data_page(5 * PAGE, flat=True))
    target = dst.get_dummy_flat_data_page()
    assert b.get(k2, target) is target and torch.equal(target, got)
    assert b.batch_get([k2, "never-written"])[1] is None
    assert a.set("single-" + k2, flat[0]) and b.exists("single-" + k2)


def test_page_written_by_sglang_reads_through_the_python_client(node: Node) -> None:
    pool = make_pool(seed=3)
    b = backend(node.address, pool)
    key = keys("to-client", 1)[0]
    assert b.batch_set_v1([key], indices([2])) == [True]
    assert b.namespace is not None and b.page is not None
    with Client(node.address, timeout_s=10) as client:
        got = client.get(b.namespace, page_block_hashes(key, b.page.segments))
    assert all(g is not None for g in got)
    assert b"".join(g for g in got if g is not None) == page_bytes(pool, 2)


def test_page_put_by_the_python_client_loads_into_sglang(node: Node) -> None:
    pool = make_pool(seed=None)
    b = backend(node.address, pool)
    assert b.namespace is not None and b.page is not None
    key = keys("from-client", 1)[0]
    segs = [np.random.default_rng(i).integers(0, 256, b.page.segment_bytes, dtype=np.uint8)
            for i in range(b.page.segments)]  # fmt: skip
    with Client(node.address, timeout_s=10) as client:
        hashes = page_block_hashes(key, b.page.segments)
        assert client.put(b.namespace, hashes, segs) == [PutStatus.STORED] * b.page.segments
    assert b.batch_exists([key]) == 1
    assert b.batch_get_v1([key], indices([7])) == [True]
    assert page_bytes(pool, 7) == b"".join(s.tobytes() for s in segs)


def test_missing_pages_are_misses_and_exists_counts_the_leading_run(node: Node) -> None:
    pool = make_pool(seed=4)
    b = backend(node.address, pool)
    ks = keys("gap", 4)
    assert b.batch_set_v1([ks[0], ks[1], ks[3]], indices([0, 1, 3])) == [True] * 3
    assert b.batch_exists(ks) == 2 and b.batch_exists(ks[2:]) == 0
    assert not b.exists(ks[2]) and b.exists(ks[3])
    assert b.batch_get_v1(ks, indices([4, 5, 6, 7])) == [True, True, False, True]
    assert b.get(ks[2]) is None and b.batch_exists([]) == 0
    assert b.batch_get_v1([], indices([])) == []
    # A fresh namespace the node has never seen is a miss too, not an error.
    other = backend(node.address, make_pool(seed=None), namespace="ns-sglang-empty")
    assert other.batch_exists(ks) == 0 and other.batch_get_v1(ks[:1], indices([0])) == [False]


def test_calls_split_at_max_chain(node: Node) -> None:
    src, dst = make_pool(seed=5), make_pool(seed=None)
    a = backend(node.address, src, max_chain=3)  # 2 segments a page: one page a call
    ks = keys("chunked", 5)
    assert a.batch_set_v1(ks, indices([0, 1, 2, 3, 4])) == [True] * 5
    assert a.batch_exists(ks) == 5
    b = backend(node.address, dst, max_chain=4)
    assert b.batch_get_v1(ks, indices([4, 3, 2, 1, 0])) == [True] * 5
    assert [page_bytes(dst, 4 - i) for i in range(5)] == [page_bytes(src, i) for i in range(5)]


def test_wrong_sizes_and_bad_arguments_raise_typed_errors(node: Node) -> None:
    pool = make_pool(seed=6)
    b = backend(node.address, pool)
    k = keys("bad", 2)
    with pytest.raises(InvalidArgument) as e:
        b.set(k[0], torch.zeros(7, dtype=torch.bfloat16))
    assert e.value.field == "values"
    with pytest.raises(InvalidArgument) as e:
        b.get(k[0], torch.zeros(3, dtype=torch.bfloat16))
    assert e.value.field == "target_locations"
    with pytest.raises(InvalidArgument) as e:
        b.batch_set_v1(k, indices([0]))  # one page of indices for two keys
    assert e.value.field == "host_indices"
    with pytest.raises(InvalidArgument, match="start of a pool page"):
        b.batch_get_v1(k[:1], indices([0]) + 3)
    with pytest.raises(InvalidArgument) as e:
        b.batch_exists([k[0], 42])  # type: ignore[list-item]
    assert e.value.field == "keys"
    unbound = KVFabricStorage(storage_config(extra_config(node.address)))
    with pytest.raises(FailedPrecondition):
        unbound.batch_exists(k)
    unbound.close()


def test_same_namespace_with_another_page_size_is_a_miss_not_corruption(node: Node) -> None:
    small = backend(node.address, make_pool(seed=7), namespace="ns-sglang-shared")
    big = backend(node.address, make_pool(seed=8, layers=3), namespace="ns-sglang-shared")
    k = keys("shared", 1)
    assert small.batch_set_v1(k, indices([1])) == [True]
    # The node holds this namespace's blocks at the small size: the big pool's
    # writes are refused and its reads miss; neither disturbs the stored page.
    assert big.batch_set_v1(keys("shared-big", 1), indices([1])) == [False]
    assert big.batch_get_v1(k, indices([2])) == [False]
    assert small.batch_exists(k) == 1


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_fabric_is_a_miss_and_stays_fast() -> None:
    pool = make_pool(seed=9)
    ks = keys("down", 2)
    refused = backend(_closed_port(), pool, timeout_s=2.0)
    assert refused.batch_exists(ks) == 0
    assert refused.batch_get_v1(ks, indices([2, 3])) == [False] * 2
    refused.close()
    # A peer that takes the connection and never answers: every call would wait out its
    # deadline, so after the first one the backend must stop calling for down_s.
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        b = backend(f"127.0.0.1:{silent.getsockname()[1]}", pool, timeout_s=0.5, retries=0,
                    down_s=60.0)  # fmt: skip
        t0 = time.monotonic()
        assert b.batch_exists(ks) == 0
        first = time.monotonic() - t0
        t1 = time.monotonic()
        assert b.batch_set_v1(ks, indices([0, 1])) == [False, False]
        assert b.batch_get_v1(ks, indices([2, 3])) == [False, False]
        assert b.get(ks[0]) is None and b.batch_set(ks, [pool.get_data_page(0)] * 2) is False
        later = time.monotonic() - t1
        b.close()
    assert 0.4 < first < 5.0 and later < 1.0  # four calls would take >= 2 s if attempted


def test_settings_errors_name_the_field(node: Node) -> None:
    pool = make_pool(seed=None)
    for extra, field in (
        ({"rpc_address": "nohost"}, "extra_config.rpc_address"),
        ({"rpc_address": "127.0.0.1:1", "timeout_s": -1}, "extra_config.timeout_s"),
        ({"rpc_address": "127.0.0.1:1", "retries": 1.5}, "extra_config.retries"),
        ({"rpc_address": "127.0.0.1:1", "namespace": "a/b"}, "extra_config.namespace"),
    ):
        cfg = storage_config({**extra_config(node.address), **extra})
        with pytest.raises(InvalidArgument) as e:
            StorageBackendFactory.create_backend("dynamic", cfg, pool)
        assert e.value.field == field, extra
    with pytest.raises(InvalidArgument) as e:
        KVFabricStorage(storage_config(None))
    assert e.value.field == "extra_config"
    nameless = KVFabricStorage(storage_config(extra_config(node.address), model_name=None))
    with pytest.raises(InvalidArgument) as e:
        nameless.register_mem_pool_host(pool)
    assert e.value.field == "extra_config.namespace"
    nameless.close()


def test_an_sglang_that_keys_pages_differently_is_refused(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sglang.srt.mem_cache.utils as sglang_utils

    real = sglang_utils.get_storage_hash_str
    pool = make_pool(seed=None)
    assert backend(node.address, pool).namespace is not None  # this SGLang passes the check
    # Fault injection: an SGLang build whose page keys are another function of the tokens.
    def reversed_keys(key: Any, prior: str | None = None, page_size: int | None = None) -> Any:
        return [h[::-1] for h in real(key, prior, page_size)]

    monkeypatch.setattr(sglang_utils, "get_storage_hash_str", reversed_keys)
    with pytest.raises(FailedPrecondition) as e:
        backend(node.address, pool)
    assert e.value.field == "sglang"


def test_pages_written_on_one_node_are_found_and_loaded_through_another(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from kvfabric.config import load_config
    from kvfabric.directory.service import DirectoryService

    base = tmp_path_factory.mktemp("cluster")
    directory = DirectoryService(load_config(overrides={"data_dir": str(base / "dir")}, env={}))
    node_a = Node(base / "a", directory=directory, node_id="n-a")
    node_b = Node(base / "b", directory=directory, node_id="n-b")
    try:
        src, dst = make_pool(seed=13), make_pool(seed=None)
        a, b = backend(node_a.address, src), backend(node_b.address, dst)
        ks = keys("cross-node", 3)
        assert a.batch_set_v1(ks, indices([0, 1, 2])) == [True] * 3
        # Server B's node holds none of them; its lookup asks the directory.
        assert b.batch_exists(ks) == 3
        assert b.batch_get_v1(ks, indices([5, 6, 7])) == [True] * 3
        assert [page_bytes(dst, p) for p in (5, 6, 7)] == [page_bytes(src, p) for p in (0, 1, 2)]
    finally:
        node_b.close()
        node_a.close()
        directory.close()
