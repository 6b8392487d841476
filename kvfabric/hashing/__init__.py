"""Canonical block hashes and namespace fingerprints (see ``docs/hashing.md``).

Store keys never come from an engine: every process computes them here, the
same way on every machine and run, and checks that at start-up with
:func:`require_selftest`.
"""

from kvfabric.hashing.chain import (
    MAX_BLOCK_SIZE,
    MAX_TOKEN_ID,
    MIN_BLOCK_SIZE,
    ROOT_HASH,
    ExtraKeys,
    MMItem,
    chain_hashes,
    format_chain,
    parse_token_list,
)
from kvfabric.hashing.namespace import NamespaceSpec, namespace_id
from kvfabric.hashing.selftest import SelfTestResult, require_selftest, run_selftest

__all__ = [
    "MAX_BLOCK_SIZE",
    "MAX_TOKEN_ID",
    "MIN_BLOCK_SIZE",
    "ROOT_HASH",
    "ExtraKeys",
    "MMItem",
    "NamespaceSpec",
    "SelfTestResult",
    "chain_hashes",
    "format_chain",
    "namespace_id",
    "parse_token_list",
    "require_selftest",
    "run_selftest",
]
