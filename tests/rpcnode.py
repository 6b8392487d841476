"""A real standalone node store with its gRPC server on 127.0.0.1, and test data for it.

Shared by the gRPC client, local-channel and SGLang backend tests (the last
run in their own venv, so this module imports nothing beyond kvfabric).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from kvfabric.config import KVFabricConfig, load_config
from kvfabric.node.service import NodeStoreService
from kvfabric.rpc.server import RpcServer, start_server

SMALL_NODE = {
    "cpu_arena_bytes": "48MiB", "cpu_slab_bytes": "4MiB", "max_block_bytes": "4MiB",
    "disk_bytes": "64MiB", "cpu_prefault": False, "transport": "tcp",
    "rpc_host": "127.0.0.1", "rpc_port": 0,
}  # fmt: skip


def node_config(tmp: Path, **overrides: Any) -> KVFabricConfig:
    """A small node's config with its data under ``tmp``; ``overrides`` are config fields."""
    return load_config(overrides={"data_dir": str(tmp), **SMALL_NODE, **overrides}, env={})


class RpcNode:
    """A standalone node store serving gRPC on an ephemeral port of 127.0.0.1."""

    def __init__(self, tmp: Path, directory: Any = None, node_id: str = "n-test",
                 **overrides: Any) -> None:  # fmt: skip
        self.config = node_config(tmp, **overrides)
        self.service = NodeStoreService(node_id=node_id, config=self.config, directory=directory)
        self.server: RpcServer = start_server(self.service, self.config)
        self.address: str = self.server.address

    def close(self) -> None:
        self.server.stop(0.5)
        self.service.close()


def hashes(n: int, salt: str) -> list[bytes]:
    """``n`` distinct 32-byte block hashes."""
    return [hashlib.blake2b(f"{salt}{i}".encode(), digest_size=32).digest() for i in range(n)]


def random_blocks(n: int, size: int, salt: str) -> list[bytes]:
    """``n`` blocks of random bytes, the same for the same ``salt``."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4]))
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(n)]
