"""Shared test helpers: small node stores on real tiers in temporary directories."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from kvfabric.config import load_config
from kvfabric.node.core import NodeStoreCore
from kvfabric.types import BlockHash, BlockKey

NS = "ns-test"


def make_store(data_dir: Path, **overrides: Any) -> NodeStoreCore:
    """A node store with small tiers; ``overrides`` are config fields."""
    values: dict[str, Any] = {
        "data_dir": str(data_dir),
        "cpu_arena_bytes": "256KiB",
        "cpu_slab_bytes": "64KiB",
        "max_block_bytes": "64KiB",
        "disk_bytes": "16MiB",
        "cpu_prefault": False,
    }
    values.update(overrides)
    clock = values.pop("clock", None)
    cfg = load_config(overrides=values, env={})
    return NodeStoreCore(cfg, clock=clock) if clock else NodeStoreCore(cfg)


def key(i: int, ns: str = NS) -> BlockKey:
    """A deterministic block key."""
    return BlockKey(
        ns, BlockHash(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest())
    )


def block(i: int, size: int) -> bytes:
    """Deterministic block content for index ``i``."""
    seed = hashlib.blake2b(b"content" + i.to_bytes(8, "little"), digest_size=32).digest()
    return (seed * (size // 32 + 1))[:size]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStoreCore]:
    s = make_store(tmp_path)
    s.register_namespace(NS, 16 * 1024)
    yield s
    s.close()


def fake_server(behave: Callable[[socket.socket], None]) -> tuple[str, threading.Thread]:
    """A one-connection data-plane peer that reads a request and then does as told."""
    from kvfabric.transfer import wire

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10.0)

    def run() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(10.0)
            _, _, body_len = wire.parse_request_preamble(wire.recv_exact(conn, 16))
            wire.recv_exact(conn, body_len)
            behave(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"127.0.0.1:{listener.getsockname()[1]}", thread
