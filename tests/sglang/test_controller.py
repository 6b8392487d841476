"""The backend under SGLang's own HiCacheController: backup, hit query and prefetch threads.

SGLang's server cannot run a model on this machine's CPU (see docs/sglang.md),
so these tests drive the cache controller a server would run: it loads the
backend through the 'dynamic' option, picks the zero-copy v1 path, hashes
token ids into page keys, and moves pages between its host pool and kvfabric
on its own threads.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from sglang.srt.managers.cache_controller import HiCacheController
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.utils import get_storage_hash_str
from sglang.srt.runtime_context import get_parallel

from kvfabric.connectors.sglang import KVFabricStorage
from kvfabric.connectors.sglang_keys import pages_chain, sglang_page_keys
from kvfabric.rpc.client import Client
from tests.sglang.conftest import HEADS, LAYERS, PAGE, Node, extra_config, make_pool

pytestmark = pytest.mark.timeout(180)
WAIT_S = 60.0


@contextmanager
def controller(address: str, host: Any) -> Iterator[HiCacheController]:
    """A single-rank controller with the kvfabric backend attached (and its threads stopped)."""
    tokens = 8 * PAGE
    dev = MHATokenToKVPool(size=tokens, page_size=PAGE, dtype=torch.bfloat16, head_num=HEADS,
                           head_dim=host.head_dim, layer_num=LAYERS, device="cpu",
                           enable_memory_saver=False)  # fmt: skip
    extra = extra_config(address, timeout_s=3.0)
    alloc = PagedTokenToKVPoolAllocator(tokens, PAGE, torch.bfloat16, "cpu", dev, need_sort=False)
    # What a server publishes at start-up: one rank, no parallelism.
    with get_parallel().override(attn_dcp_size=1, attn_dcp_rank=0, tp_rank=0, tp_size=1,
                                 pp_rank=0, pp_size=1):  # fmt: skip
        cc = HiCacheController(alloc, host, PAGE, tp_group=None,
                               load_cache_event=threading.Event(), storage_backend="dynamic",
                               model_name="tiny/llama-test", write_policy="write_through",
                               storage_backend_extra_config=extra)  # fmt: skip
    try:
        yield cc
    finally:
        cc.detach_storage_backend()


def page_bytes(pool: Any, token_index: int) -> bytes:
    return pool.get_data_page(token_index, flat=True).view(torch.uint8).numpy().tobytes()


def prompt(n_pages: int, salt: int) -> list[int]:
    return [(salt * 7919 + 31 * i) % 50_000 for i in range(n_pages * PAGE)]


def prefetch(cc: HiCacheController, rid: str, tokens: list[int], host: Any) -> tuple[Any, int]:
    """What the scheduler does: query hits, allocate host pages for them, wait for the load."""
    cc.prefetch(rid, tokens)
    op = cc.prefetch_hit_queue.get(timeout=WAIT_S)
    if not op.storage_hit_count:
        return op, 0
    op.host_indices = host.alloc(op.storage_hit_count)
    cc.prefetch_buffer.put(op)
    loaded = 0
    while True:
        ack = cc.ack_prefetch_queue.get(timeout=WAIT_S)
        if ack.completed_req:
            return op, loaded
        loaded = max(loaded, ack.completed_tokens or 0)


def test_sglang_page_keys_match_sglang_hashing() -> None:
    tokens = [*prompt(5, 3), 7, 8, 9]  # a trailing partial page gets no key
    keys = get_storage_hash_str(tokens, None, page_size=PAGE)
    assert sglang_page_keys(tokens, PAGE) == keys[:5]
    # Continuing a chain from a parent key, as SGLang does for a node's children.
    more = get_storage_hash_str(tokens[2 * PAGE : 5 * PAGE], keys[1], page_size=PAGE)
    assert sglang_page_keys(tokens[2 * PAGE : 5 * PAGE], PAGE, prior_key=keys[1]) == more


def test_backup_then_prefetch_in_another_server(node: Node) -> None:
    writer_pool, reader_pool = make_pool(seed=11), make_pool(seed=None)
    tokens = prompt(3, 1)
    keys = get_storage_hash_str(tokens, None, page_size=PAGE)
    with controller(node.address, writer_pool) as cc:
        backend = cc.storage_backend
        assert isinstance(backend, KVFabricStorage)
        assert cc.page_set_func == cc._page_set_zero_copy  # interface_v1 picked zero copy
        src = writer_pool.alloc(3 * PAGE)
        cc.write_storage(src, tokens, hash_value=keys)
        done = cc.ack_backup_queue.get(timeout=WAIT_S)
        assert done.completed_tokens == 3 * PAGE
        namespace, segments = backend.namespace, backend.page.segments
    with controller(node.address, reader_pool) as cc:
        op, loaded = prefetch(cc, "req-1", [*tokens, 1, 2, 3], reader_pool)
        assert op.storage_hit_count == 3 * PAGE and loaded == 3 * PAGE
        for p in range(3):
            s, d = int(src[p * PAGE]), int(op.host_indices[p * PAGE])
            assert page_bytes(reader_pool, d) == page_bytes(writer_pool, s)
        # A prompt that diverges after page 1 hits the shared first page only.
        other = tokens[:PAGE] + prompt(2, 99)
        op2, loaded2 = prefetch(cc, "req-2", other, reader_pool)
        assert op2.storage_hit_count == PAGE and loaded2 == PAGE
    # The same pages, addressed by token ids from kvfabric's own client.
    with Client(node.address, timeout_s=10) as client:
        got = client.get(namespace, pages_chain(sglang_page_keys(tokens, PAGE), segments))
    page0 = b"".join(g for g in got[:segments] if g is not None)
    assert page0 == page_bytes(writer_pool, int(src[0]))


def test_unreachable_fabric_leaves_the_controller_serving() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    pool = make_pool(seed=12)
    tokens = prompt(2, 5)
    with controller(dead, pool) as cc:
        cc.write_storage(pool.alloc(2 * PAGE), tokens,
                         hash_value=get_storage_hash_str(tokens, None, page_size=PAGE))  # fmt: skip
        assert cc.ack_backup_queue.get(timeout=WAIT_S).completed_tokens == 0
        op, loaded = prefetch(cc, "req-dead", tokens, pool)
        assert op.storage_hit_count == 0 and loaded == 0
        # Still alive: its threads take the next request.
        assert all(t.is_alive() for t in (cc.prefetch_thread, cc.backup_thread))
        with pytest.raises(queue.Empty):
            cc.ack_backup_queue.get_nowait()
