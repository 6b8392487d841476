"""kvfabric: a distributed, tiered, program-aware KV-cache store for LLM serving.

Importing the package is cheap: it never imports Ray, gRPC, vLLM, SGLang, CuPy
or NIXL; those load lazily where they are used.
"""

from typing import TYPE_CHECKING

from kvfabric.errors import KVFabricError
from kvfabric.types import BlockHash, BlockKey, BlockMeta, BlockType, Tier

if TYPE_CHECKING:
    from kvfabric.rpc.client import Client

__version__ = "0.1.0"

__all__ = [
    "BlockHash",
    "BlockKey",
    "BlockMeta",
    "BlockType",
    "Client",
    "KVFabricError",
    "Tier",
    "__version__",
]


if not TYPE_CHECKING:  # hidden from mypy, which would resolve every missing name through it

    def __getattr__(name: str) -> object:
        """Lazy exports: ``kvfabric.Client`` imports gRPC only when first used."""
        if name == "Client":
            from kvfabric.rpc.client import Client

            return Client
        raise AttributeError(f"module 'kvfabric' has no attribute {name!r}")
