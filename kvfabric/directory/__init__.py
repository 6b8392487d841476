"""The cluster-wide block directory: a pure, event-sourced index and its durable log.

:class:`DirectoryCore` holds the index (no I/O, no Ray); :class:`DirectoryLog`
persists its events and snapshots in LMDB. A Ray actor wraps both.
"""

from kvfabric.directory.events import Event, EventKind, decode_event, encode_event
from kvfabric.directory.index import DirectoryCore
from kvfabric.directory.log import DirectoryLog
from kvfabric.directory.model import (
    Claim,
    ClaimResult,
    ClaimStatus,
    ClusterLookup,
    CommitResult,
    DirEntry,
    InventoryItem,
    Location,
    NodeInfo,
    ReconcileResult,
    ReplicaInfo,
)

__all__ = [
    "Claim",
    "ClaimResult",
    "ClaimStatus",
    "ClusterLookup",
    "CommitResult",
    "DirEntry",
    "DirectoryCore",
    "DirectoryLog",
    "Event",
    "EventKind",
    "InventoryItem",
    "Location",
    "NodeInfo",
    "ReconcileResult",
    "ReplicaInfo",
    "decode_event",
    "encode_event",
]
