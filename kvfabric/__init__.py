"""kvfabric: a distributed, tiered, program-aware KV-cache store for LLM serving.

Importing the package is cheap: it never imports Ray, gRPC, vLLM, SGLang, CuPy
or NIXL; those load lazily where they are used.
"""

from kvfabric.errors import KVFabricError
from kvfabric.types import BlockHash, BlockKey, BlockMeta, BlockType, Tier

__version__ = "0.1.0"

__all__ = [
    "BlockHash",
    "BlockKey",
    "BlockMeta",
    "BlockType",
    "KVFabricError",
    "Tier",
    "__version__",
]
