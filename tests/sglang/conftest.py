"""Fixtures of the SGLang backend tests: a real node on loopback, SGLang's own host pools.

These tests need SGLang, which lives in its own environment (``.venv-sglang``,
built by ``make install-sglang``). Where SGLang is not importable (the main
``.venv``) this directory is not collected, unless ``KVFABRIC_REQUIRE_SGLANG``
is set: ``make test`` sets it, so a missing SGLang fails there instead of
skipping silently.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.rpcnode import RpcNode as Node

if importlib.util.find_spec("sglang") is None and not os.environ.get("KVFABRIC_REQUIRE_SGLANG"):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("node"))
    yield n
    n.close()


def storage_config(extra: dict[str, Any] | None, **fields: Any) -> Any:
    """SGLang's HiCacheStorageConfig for a single-rank, non-MLA server."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    values: dict[str, Any] = {
        "tp_rank": 0, "tp_size": 1, "pp_rank": 0, "pp_size": 1, "attn_cp_rank": 0,
        "attn_cp_size": 1, "is_mla_model": False, "enable_storage_metrics": False,
        "is_page_first_layout": True, "model_name": "tiny/llama-test",
        "extra_config": extra,
    }  # fmt: skip
    values.update(fields)
    return HiCacheStorageConfig(**values)


def extra_config(address: str, **more: Any) -> dict[str, Any]:
    """What a user passes as ``--hicache-storage-backend-extra-config``."""
    return {"backend_name": "kvfabric", "module_path": "kvfabric.connectors.sglang",
            "class_name": "KVFabricStorage", "interface_v1": 1, "rpc_address": address,
            "timeout_s": 5.0, **more}  # fmt: skip


PAGE, LAYERS, HEADS, DIM = 16, 2, 2, 8


def make_pool(layout: str = "page_first", *, layers: int = LAYERS, seed: int | None = 0,
              page: int = PAGE, heads: int = HEADS, dim: int = DIM) -> Any:  # fmt: skip
    """SGLang's MHA host pool (and device pool) on the CPU; random bytes unless seed is None."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    tokens = 8 * page
    dev = MHATokenToKVPool(size=tokens, page_size=page, dtype=torch.bfloat16, head_num=heads,
                           head_dim=dim, layer_num=layers, device="cpu",
                           enable_memory_saver=False)  # fmt: skip
    host = MHATokenToKVPoolHost(buffer_info=dev._mha_buffer_info(), host_to_device_ratio=2.0,
                                host_size=0, page_size=page, layout=layout, pin_memory=False,
                                device="cpu", device_capacity_tokens=tokens, start_layer=0,
                                end_layer=layers)  # fmt: skip
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        host.kv_buffer.copy_(torch.randn(host.kv_buffer.shape, generator=g))
    return host


def make_mla_pool(layout: str = "page_first", *, seed: int | None = 0) -> Any:
    """SGLang's MLA host pool (one latent vector per token and layer) on the CPU."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    tokens = 8 * PAGE
    dev = MLATokenToKVPool(size=tokens, page_size=PAGE, dtype=torch.bfloat16, kv_lora_rank=32,
                           qk_rope_head_dim=8, layer_num=LAYERS, device="cpu",
                           enable_memory_saver=False)  # fmt: skip
    host = MLATokenToKVPoolHost(dev._mla_buffer_info(), 2.0, 0, PAGE, layout, pin_memory=False,
                                device="cpu", device_capacity_tokens=tokens, start_layer=0,
                                end_layer=LAYERS, target_layer_num=LAYERS)  # fmt: skip
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        host.kv_buffer.copy_(torch.randn(host.kv_buffer.shape, generator=g))
    return host
