"""The node store's change feed: what the cluster directory must learn.

Every block stored, moved between tiers, dropped, or whose pins changed is
recorded as a :class:`NodeChange`. The Ray shell drains the feed after each
call and reports it to the directory. The feed is bounded: if nobody drains it
(a standalone node) the oldest changes are discarded and ``overflowed`` tells
the shell to send a full inventory instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from kvfabric.types import BlockKey, BlockMeta, BlockType, Tier


class ChangeKind(Enum):
    """What happened to a block on this node."""

    STORED = "stored"
    MOVED = "moved"
    DROPPED = "dropped"
    PINS = "pins"
    ANNOTATED = "annotated"


@dataclass(frozen=True, slots=True)
class NodeChange:
    """One change of one block on this node (all fields a directory entry needs)."""

    kind: ChangeKind
    key: BlockKey
    tier: Tier
    size: int
    checksum: int
    type: BlockType
    program_id: str | None
    pins: int


class ChangeFeed:
    """A bounded FIFO of :class:`NodeChange` records."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self._queue: deque[NodeChange] = deque(maxlen=maxlen)
        self.overflowed = False

    def record(self, kind: ChangeKind, meta: BlockMeta) -> None:
        """Append the change of ``meta`` (called with the store's lock held)."""
        if len(self._queue) == self._queue.maxlen:
            self.overflowed = True
        self._queue.append(
            NodeChange(kind, meta.key, meta.tier, meta.size, meta.checksum, meta.type,
                       meta.program_id, sum(p.count for p in meta.pins.values()))
        )  # fmt: skip

    def drain(self) -> tuple[list[NodeChange], bool]:
        """Everything recorded so far, and whether some was lost to overflow."""
        out = list(self._queue)
        self._queue.clear()
        lost, self.overflowed = self.overflowed, False
        return out, lost
