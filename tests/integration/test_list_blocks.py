"""ListBlocks, the Stats additions and per-call telemetry on a real gRPC server (standalone node).

The listing follows the same namespace rules as every other read: a token
limited to some namespaces sees only those (an explicit other namespace is
PERMISSION_DENIED); filters and pages come back exactly; bad arguments are
INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvfabric.config import load_config
from kvfabric.errors import InvalidArgument, NotFound, PermissionDenied
from kvfabric.node.service import NodeStoreService
from kvfabric.rpc.client import Client
from kvfabric.rpc.server import start_server
from kvfabric.types import BlockType, Tier

B = 16 * 1024
ROOT, LIMITED = "root-secret-token", "limited-secret-token"


def h(i: int) -> bytes:
    return hashlib.blake2b(b"ls" + i.to_bytes(4, "little"), digest_size=32).digest()


@contextlib.contextmanager
def node(tmp_path: Path) -> Iterator[tuple[NodeStoreService, str]]:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({LIMITED: ["ns-a"]}))
    cfg = load_config(overrides={
        "data_dir": str(tmp_path / "data"), "cpu_arena_bytes": "1MiB",
        "cpu_slab_bytes": "64KiB", "max_block_bytes": "64KiB", "disk_bytes": "16MiB",
        "cpu_prefault": False, "local_channel": False, "auth_token": ROOT,
        "auth_tokens_file": str(tokens),
    }, env={})  # fmt: skip
    svc = NodeStoreService("n-list", cfg)
    try:
        with start_server(svc, cfg) as server:
            yield svc, server.address
    finally:
        svc.close()


def client(address: str, token: str | None = ROOT) -> Any:
    return Client(address, token=token, data_plane=False, retries=0)


def test_filters_pages_and_what_each_block_says(tmp_path: Path) -> None:
    with node(tmp_path) as (_svc, address), client(address) as c:
        c.put("ns-a", [h(i) for i in range(10)], [bytes([i]) * B for i in range(10)],
              program_id="prog-1")  # fmt: skip
        c.put("ns-b", [h(i) for i in range(3)], [bytes(B)] * 3)
        c.annotate("ns-a", [h(0), h(1)], block_type=BlockType.SYSTEM_PROMPT)
        c.move("ns-a", [h(2), h(3), h(4)], tier=Tier.DISK)
        c.pin("ns-a", [h(0)], "ops")
        c.pin("ns-a", [h(0)], "ops")
        c.pin("ns-a", [h(0)], "bot")

        pages, token = [], ""
        while True:
            page = c.list_blocks(namespace="ns-a", page_size=3, page_token=token)
            pages.append(page.blocks)
            token = page.next_page_token
            if not token:
                break
        listed = [b for p in pages for b in p]
        assert [len(p) for p in pages] == [3, 3, 3, 1]
        assert sorted(b.hash for b in listed) == sorted(h(i) for i in range(10))
        assert [b.hash for b in listed] == sorted(b.hash for b in listed)
        first = next(b for b in listed if b.hash == h(0))
        assert (first.pins, first.pin_owners) == (3, ("bot", "ops"))
        assert first.block_type == BlockType.SYSTEM_PROMPT and first.program_id == "prog-1"
        assert first.size == B and first.tier == Tier.CPU and first.idle_s >= 0

        on_disk = c.list_blocks(namespace="ns-a", tier=Tier.DISK).blocks
        assert {b.hash for b in on_disk} == {h(2), h(3), h(4)}
        typed = c.list_blocks(block_type=BlockType.SYSTEM_PROMPT).blocks
        assert {b.hash for b in typed} == {h(0), h(1)}
        assert len(c.list_blocks(program_id="prog-1", page_size=1000).blocks) == 10
        assert c.list_blocks(program_id="nobody").blocks == ()
        everything = c.list_blocks(page_size=1000)
        assert len(everything.blocks) == 13 and everything.node_id == "n-list"

        stats = c.stats()
        assert stats.namespaces == {"ns-a": B, "ns-b": B}
        assert stats.bytes_by_type == {"GENERIC": 11 * B, "SYSTEM_PROMPT": 2 * B}
        assert stats.counters["pins{op=pin}"] == 3
        assert stats.counters["rpc_calls{method=ListBlocks,code=OK}"] >= 8


def test_namespace_rules_match_the_other_reads(tmp_path: Path) -> None:
    with node(tmp_path) as (_svc, address):
        with client(address) as root:
            root.put("ns-a", [h(1)], [bytes(B)])
            root.put("ns-b", [h(2)], [bytes(B)])
        with client(address, LIMITED) as limited:
            assert {b.namespace for b in limited.list_blocks().blocks} == {"ns-a"}
            with pytest.raises(PermissionDenied):
                limited.list_blocks(namespace="ns-b")
            assert set(limited.stats().namespaces) == {"ns-a"}
        with client(address, None) as anonymous:  # reads are open without auth_reads
            assert len(anonymous.list_blocks().blocks) == 2
            with pytest.raises(NotFound, match="ns-c"):
                anonymous.list_blocks(namespace="ns-c")
            with pytest.raises(InvalidArgument, match="page_token"):
                anonymous.list_blocks(page_token="garbage")
            with pytest.raises(InvalidArgument, match="page_size"):
                anonymous.list_blocks(page_size=5000)
            rejected = anonymous.stats().counters
            assert rejected["rpc_calls{method=ListBlocks,code=INVALID_ARGUMENT}"] == 1
            assert rejected["rpc_calls{method=ListBlocks,code=NOT_FOUND}"] == 1


def test_lookup_counts_hits_by_tier_and_tokens_spared(tmp_path: Path) -> None:
    with node(tmp_path) as (_svc, address), client(address) as c:
        c.put("ns-a", [h(i) for i in range(4)], [bytes(B)] * 4)
        c.move("ns-a", [h(3)], tier=Tier.DISK)
        assert c.lookup("ns-a", [h(0), h(1), h(2), h(3), h(9)], block_tokens=16).matched == 4
        counters = c.stats().counters
        assert counters["hits{op=lookup,tier=CPU}"] == 3
        assert counters["hits{op=lookup,tier=DISK}"] == 1
        assert counters["misses{op=lookup}"] == 1
        assert counters["recompute_avoided_tokens"] == 64
        assert counters["transfer_bytes{transport=grpc,direction=in}"] == 4 * B
