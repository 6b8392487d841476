"""The cluster directory as a node sees it: the port it talks through, and what it reports.

:class:`DirectoryPort` lists the calls a node makes to the directory, as
plain synchronous methods: the Ray shell (:class:`~kvfabric.node.actor.RayDirectoryPort`)
adds timeouts around the directory actor, and tests pass the directory
service itself. :func:`stored_change` is the record a node sends for a block
it holds, in its full inventory and when it commits a write.
"""

from __future__ import annotations

from typing import Any, Protocol

from kvfabric.node.changes import ChangeKind, NodeChange
from kvfabric.types import BlockKey, BlockMeta


class DirectoryPort(Protocol):
    """What a node needs from the directory (synchronous; the shell adds timeouts)."""

    def register_node(self, node_id: str, address: str, tiers: list[int]) -> None: ...
    def claim_many(
        self, node_id: str, writer_id: str, items: list[tuple[BlockKey, int]]
    ) -> list[str]: ...
    def commit_many(
        self, node_id: str, writer_id: str, changes: list[NodeChange]
    ) -> list[bool]: ...
    def abort_many(self, node_id: str, writer_id: str, keys: list[BlockKey]) -> None: ...
    def apply_changes(self, node_id: str, changes: list[NodeChange]) -> None: ...
    def reconcile(self, node_id: str, inventory: list[NodeChange]) -> list[BlockKey]: ...
    def locate(
        self, keys: list[BlockKey], prefer_node: str
    ) -> list[list[tuple[str, str, int, int]]]: ...
    def replicate(self, keys: list[BlockKey]) -> None: ...
    def lookup(
        self, namespace: str, hashes: list[bytes], prefer_node: str | None
    ) -> dict[str, Any]: ...
    def events_since(self, seq: int, limit: int) -> list[Any]: ...
    def fanout(self, keys: list[BlockKey], targets: list[str]) -> int: ...


def stored_change(meta: BlockMeta) -> NodeChange:
    """The STORED change of a block held here, with its pin count."""
    pins = sum(p.count for p in meta.pins.values())
    return NodeChange(
        ChangeKind.STORED, meta.key, meta.tier, meta.size, meta.checksum, meta.type,
        meta.program_id, pins,
    )  # fmt: skip
