"""DirectoryService: the directory core made durable and able to act on nodes.

The ``Directory`` Ray actor wraps this class. Every call that changes the
index applies events to :class:`DirectoryCore` and appends them to the LMDB
:class:`DirectoryLog` under one lock, so the log order is the apply order. On
start the service restores the index from the log's snapshot and events;
nodes then re-send their inventories (``reconcile``), which repairs anything
the log could not know (blocks dropped while the directory was down).

Replication is carried out through a :class:`NodeCaller`, which the Ray shell
implements with actor handles; copy tasks come from the pure planner.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from kvfabric.config import KVFabricConfig
from kvfabric.directory.events import Event, EventKind
from kvfabric.directory.index import DirectoryCore
from kvfabric.directory.log import DirectoryLog
from kvfabric.directory.model import ClaimStatus, InventoryItem
from kvfabric.directory.planner import CopyTask, plan_copies, plan_join, plan_type_replication
from kvfabric.errors import KVFabricError, NotFound
from kvfabric.metrics import Telemetry
from kvfabric.node.changes import ChangeKind, NodeChange
from kvfabric.types import BlockKey, Tier

log = logging.getLogger(__name__)


REPLICA_KINDS = frozenset({EventKind.COMMITTED, EventKind.REPLICA_ADDED, EventKind.REPLICA_REMOVED})
REPLICA_UPDATE_LIMIT = 10_000
ReplicaCounts = tuple[list[BlockKey], list[int]]  # keys a node holds, copies elsewhere of each


class NodeCaller(Protocol):
    """How the directory reaches a node store (the Ray shell adds timeouts)."""

    def pull_from(
        self, target_node: str, address: str, namespace: str, hashes: list[bytes], size: int
    ) -> int: ...


class DirectoryService:
    """Durable directory index with claims, lookups, reconciliation and replication."""

    def __init__(self, config: KVFabricConfig, nodes: NodeCaller | None = None) -> None:
        self.config = config
        self.nodes = nodes
        self.log = DirectoryLog(
            config.directory_path, snapshot_every=config.directory_snapshot_every
        )
        snapshot, events = self.log.load()
        self.core = DirectoryCore.restore(snapshot, events, claim_timeout_s=config.claim_timeout_s)
        self._lock = threading.RLock()
        self._replica_seq = -1  # last event replica_updates() has looked at (-1: not yet)
        self.telemetry = Telemetry("directory")
        log.info(
            "directory restored at seq %d with %d nodes", self.core.seq, len(self.core.nodes())
        )

    def _persist(self, events: Sequence[Event]) -> None:
        for ev in events:
            self.telemetry.inc("directory_events", kind=ev.kind.name)
        if events:
            self.log.append(list(events))
            self.log.maybe_snapshot(self.core)

    # -- membership ---------------------------------------------------------------------
    def register_node(self, node_id: str, address: str, tiers: list[int]) -> None:
        """A node store (re)joins: remember how to reach it."""
        with self._lock:
            self._persist(self.core.register_node(node_id, address, [Tier(t) for t in tiers]))

    def remove_node(self, node_id: str) -> int:
        """A node is gone: drop its replicas (reverse index) and its claims."""
        with self._lock:
            try:
                events = self.core.remove_node(node_id)
            except NotFound:
                return 0
            self._persist(events)
            return len(events)

    def node_ids(self) -> list[str]:
        """Registered nodes."""
        return [n.node_id for n in self.core.nodes()]

    # -- writes -------------------------------------------------------------------------
    def claim_many(
        self, node_id: str, writer_id: str, items: list[tuple[BlockKey, int]]
    ) -> list[str]:
        """Claim each key for a writer: 'granted', 'pending' (another writer) or 'committed'."""
        out: list[str] = []
        with self._lock:
            for key, size in items:
                res = self.core.claim(key, node_id, writer_id, size)
                self._persist(res.events)
                out.append(res.status.value)
        return out

    def commit_many(self, node_id: str, writer_id: str, changes: list[NodeChange]) -> list[bool]:
        """Commit blocks a writer stored; False where it lost (already committed elsewhere)."""
        out: list[bool] = []
        with self._lock:
            for c in changes:
                try:
                    res = self.core.commit(
                        c.key, node_id, writer_id, c.tier, c.size, c.checksum, c.type, c.program_id
                    )
                except KVFabricError as exc:
                    log.warning("commit of %s refused: %s", c.key.short(), exc)
                    out.append(False)
                    continue
                self._persist(res.events)
                out.append(res.created)
        return out

    def abort_many(self, node_id: str, writer_id: str, keys: list[BlockKey]) -> None:
        """Release claims a writer will not commit."""
        with self._lock:
            for key in keys:
                # Not this writer's claim any more (expired, committed): nothing to release.
                with contextlib.suppress(KVFabricError):
                    self._persist(self.core.abort(key, node_id, writer_id))

    def apply_changes(self, node_id: str, changes: list[NodeChange]) -> None:
        """Follow what happened on a node: new replicas, tier moves, drops, pins."""
        with self._lock:
            for c in changes:
                try:
                    self._persist(self._apply_change(node_id, c))
                except KVFabricError as exc:
                    log.warning("change %s of %s from %s ignored: %s",
                                c.kind.value, c.key.short(), node_id, exc)  # fmt: skip

    def _apply_change(self, node_id: str, c: NodeChange) -> Sequence[Event]:
        if c.kind == ChangeKind.DROPPED:
            return self.core.remove_replica(c.key, node_id)
        entry = self.core.entry(c.key)
        if entry is None:
            if c.kind != ChangeKind.STORED:
                return ()
            # Stored here without a claim of ours (e.g. a standalone put): claim and commit.
            res = self.core.claim(c.key, node_id, f"{node_id}:adopt", c.size)
            if res.status != ClaimStatus.GRANTED:
                return res.events  # a writer holds it; its commit will register the block
            done = self.core.commit(c.key, node_id, f"{node_id}:adopt", c.tier, c.size,
                                    c.checksum, c.type, c.program_id)  # fmt: skip
            return (*res.events, *done.events)
        events = list(self.core.add_replica(c.key, node_id, c.tier, c.checksum))
        if c.kind == ChangeKind.PINS:
            events += self.core.set_pins(c.key, node_id, c.pins)
        return events

    def reconcile(self, node_id: str, inventory: list[NodeChange]) -> list[BlockKey]:
        """Make the index agree with a node's inventory; returns keys the node must drop."""
        items = [InventoryItem(c.key, c.tier, c.size, c.checksum, c.type, c.program_id, c.pins)
                 for c in inventory]  # fmt: skip
        with self._lock:
            res = self.core.reconcile(node_id, items)
            self._persist(res.events)
        return list(res.rejected)

    def tick(self) -> None:
        """Periodic work: release claims of dead writers, snapshot the log."""
        with self._lock:
            self._persist(self.core.expire_claims())
        self.log.sync()

    # -- reads --------------------------------------------------------------------------
    def locate(
        self, keys: list[BlockKey], prefer_node: str
    ) -> list[list[tuple[str, str, int, int]]]:
        """Every replica of each key, best first: (node, address, tier, size)."""
        out: list[list[tuple[str, str, int, int]]] = []
        for key, locs in zip(keys, self.core.locate(keys), strict=True):
            entry = self.core.entry(key)
            size = entry.size if entry is not None else 0
            ranked = sorted(locs, key=lambda loc: (loc.node_id != prefer_node, int(loc.tier),
                                                  loc.node_id))  # fmt: skip
            out.append([(loc.node_id, loc.address, int(loc.tier), size) for loc in ranked])
        return out

    def lookup(
        self, namespace: str, hashes: list[bytes], prefer_node: str | None = None
    ) -> dict[str, Any]:
        """Longest committed prefix of a chain with the best replica of each block."""
        res = self.core.lookup(namespace, hashes, prefer_node)
        return {
            "matched": res.matched,
            "locations": [(loc.node_id, loc.address, int(loc.tier)) for loc in res.locations],
        }

    def replica_updates(self, limit: int = REPLICA_UPDATE_LIMIT) -> dict[str, ReplicaCounts]:
        """Per node, the keys it holds whose replica set changed since the last call, each with
        how many copies other nodes hold (what a node's policy weighs: losing a copied block
        costs a fetch, losing the sole copy a recompute). At most ``limit`` events are read
        per call; the rest wait for the next one."""
        with self._lock:
            if self._replica_seq < 0:  # first call: start from now, not the whole history
                self._replica_seq = self.seq()
                return {}
            events = self.events_since(self._replica_seq, limit)
            if events:
                self._replica_seq = events[-1].seq
            changed = (e.key for e in events if e.kind in REPLICA_KINDS and e.key is not None)
            keys = list(dict.fromkeys(changed))
            out: dict[str, ReplicaCounts] = {}
            for key, locs in zip(keys, self.core.locate(keys), strict=True):
                holders = {loc.node_id for loc in locs}
                for node in holders:
                    got = out.setdefault(node, ([], []))
                    got[0].append(key)
                    got[1].append(len(holders) - 1)
            return out

    def warmth(self, namespace: str, hashes: list[bytes]) -> list[dict[str, Any]]:
        """Per node, the leading blocks of the chain it holds and their tiers; best first."""
        return [
            {"node_id": w.node_id, "address": w.address, "matched": w.matched,
             "tiers": [int(t) for t in w.tiers]}
            for w in self.core.warmth(namespace, hashes)
        ]  # fmt: skip

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """Events after ``seq`` (from memory, or from the durable log if older)."""
        try:
            return self.core.events_since(seq, limit)
        except KVFabricError:
            return self.log.events_since(seq, limit)

    def state(self) -> dict[str, Any]:
        """The canonical index state (tests compare it across restarts)."""
        return self.core.state()

    def seq(self) -> int:
        """Last applied event sequence number."""
        return self.core.seq

    def record_metrics(self) -> None:
        """Set the directory's gauges (called by the metrics exporter)."""
        nodes = self.core.nodes()
        self.telemetry.set("directory_seq", self.core.seq)
        self.telemetry.set("directory_nodes", len(nodes))
        self.telemetry.set("directory_replicas", sum(n.blocks for n in nodes))

    # -- replication --------------------------------------------------------------------
    def replicate(self, keys: list[BlockKey]) -> int:
        """Copy blocks of the replicated types to every node lacking them."""
        with self._lock:
            tasks = plan_type_replication(self.core, keys, self.config.replicated_types)
        return self._run(tasks)

    def prepare_join(self, node_id: str) -> int:
        """Push replicated types and the hottest blocks to a node that just joined."""
        with self._lock:
            tasks = plan_join(
                self.core, node_id, self.config.replicated_types, self.config.join_push_blocks
            )
        return self._run(tasks)

    def fanout(self, keys: list[BlockKey], targets: list[str]) -> int:
        """Copy a shared prefix to the target nodes of a fork before the children start."""
        known = set(self.node_ids())
        for t in targets:
            if t not in known:
                raise NotFound(f"unknown node {t!r}", "targets")
        with self._lock:
            tasks = plan_copies(self.core, keys, targets)
        return self._run(tasks)

    def _run(self, tasks: list[CopyTask]) -> int:
        """Carry out copy tasks (outside the lock: nodes call back with their changes)."""
        if self.nodes is None:
            return 0
        copied = 0
        for t in tasks:
            try:
                copied += self.nodes.pull_from(
                    t.target_node, t.source_address, t.namespace, [k.hash for k in t.keys], t.size
                )
            except KVFabricError as exc:
                log.warning("copy of %d blocks to %s failed: %s", len(t.keys), t.target_node, exc)
        return copied

    def close(self) -> None:
        """Flush and close the log."""
        self.log.sync()
        self.log.close()
