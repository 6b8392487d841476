"""DirectoryCore: the cluster-wide block index, pure and event-sourced.

Public methods validate their input, build events, apply them with
:meth:`DirectoryCore.apply` (the only code that mutates the index) and return
them so the caller can append them to the :class:`~kvfabric.directory.log.DirectoryLog`.
A snapshot plus the events after it rebuilds the index exactly; a method that
raises has applied nothing.

Write-once: the first claim of a key wins; other writers get PENDING until the
claim is committed, aborted or expired; a committed block never changes.

Not durable on purpose: pending claims (a snapshot omits them and
:meth:`DirectoryCore.restore` drops them: writers retry after a directory
restart) and access counts (a plain counter on each entry, outside the event
stream; a snapshot carries them as they were when it was taken).

Invariants: every entry has at least one replica; a node's ``keys`` is the
reverse index of the replicas, so losing a node costs O(its blocks).

:class:`DirectoryCore` is the facade: it owns the lock, checks the arguments
and calls one module per concept, all working on one
:class:`~kvfabric.directory.state.IndexState`:

* :mod:`~kvfabric.directory.state`: the records (blocks, nodes, claims, event ring);
* :mod:`~kvfabric.directory.apply`: event application, the only mutator;
* :mod:`~kvfabric.directory.claims`: the write-once claim, commit and abort;
* :mod:`~kvfabric.directory.replicas`: node membership and replicas;
* :mod:`~kvfabric.directory.queries`: lookups, warmth, listings, access counts;
* :mod:`~kvfabric.directory.snapshot`: snapshot encoding and rebuild.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kvfabric.directory import claims, queries, replicas
from kvfabric.directory import model as m
from kvfabric.directory.apply import apply_event
from kvfabric.directory.events import Event
from kvfabric.directory.model import Claim, Location
from kvfabric.directory.queries import NodeWarmth
from kvfabric.directory.snapshot import canonical_state, encode_snapshot, load_snapshot
from kvfabric.directory.state import IndexState
from kvfabric.errors import InvalidArgument
from kvfabric.types import BlockKey, BlockType, Tier, validate_namespace, validate_program_id

__all__ = ["MAX_BLOCK_BYTES", "MAX_SEQ", "DirectoryCore", "NodeWarmth"]

MAX_BLOCK_BYTES = 1 << 31
MAX_SEQ = (1 << 63) - 1


class DirectoryCore:
    """The directory's index, claims and event stream (no I/O; a Ray actor wraps it).

    Thread-safe: every public method holds one lock. ``clock`` gives claim
    deadlines; ``ring_size`` bounds the in-memory event history served by
    :meth:`events_since`.
    """

    def __init__(
        self,
        claim_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_chain: int = 100_000,
        *,
        ring_size: int = 100_000,
        max_block_bytes: int = MAX_BLOCK_BYTES,
    ) -> None:
        if not isinstance(claim_timeout_s, (int, float)) or not claim_timeout_s > 0:
            raise InvalidArgument(
                f"claim_timeout_s must be a number > 0, got {claim_timeout_s!r}", "claim_timeout_s"
            )
        self.claim_timeout_s = float(claim_timeout_s)
        self.max_chain = m.check_int(max_chain, "max_chain", 1, 1 << 30)
        self.max_block_bytes = m.check_int(max_block_bytes, "max_block_bytes", 1, 1 << 40)
        ring_size = m.check_int(ring_size, "ring_size", 1, 1 << 24)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = IndexState(ring_size)

    # ------------------------------------------------------------------ nodes

    def register_node(self, node_id: str, address: str, tiers: Sequence[Tier]) -> list[Event]:
        """Add a node or update its address and tiers (NODE_JOINED; none if unchanged)."""
        m.check_id(node_id, "node_id")
        m.check_address(address)
        if isinstance(tiers, (str, bytes)) or not isinstance(tiers, Sequence) or not tiers:
            raise InvalidArgument("tiers must be a non-empty sequence of Tier", "tiers")
        tiers_t = tuple(sorted({m.check_tier(t, "tiers") for t in tiers}))
        with self._lock:
            return replicas.join_node(self._state, node_id, address, tiers_t)

    def remove_node(self, node_id: str) -> list[Event]:
        """Forget a node: release its claims, drop its replicas and every block left with none.

        Uses the node's reverse index, never a scan of the whole index.
        """
        with self._lock:
            return replicas.remove_node(self._state, node_id)

    def nodes(self) -> list[m.NodeInfo]:
        """Every registered node, by node id."""
        with self._lock:
            return queries.node_infos(self._state)

    def keys_on_node(self, node_id: str) -> set[BlockKey]:
        """A copy of the keys the node holds a replica of."""
        with self._lock:
            return set(self._state.node(node_id).keys)

    # ----------------------------------------------------------------- claims

    def claim(self, key: BlockKey, node_id: str, writer_id: str, size: int) -> m.ClaimResult:
        """Ask to write ``key``: GRANTED to the first writer (again to the same writer,
        refreshing its deadline), PENDING while another writer's claim is live,
        COMMITTED (with locations) once the key is committed."""
        m.check_key(key)
        m.check_id(writer_id, "writer_id")
        m.check_int(size, "size", 1, self.max_block_bytes)
        with self._lock:
            return claims.claim(
                self._state, key, node_id, writer_id, size, self._clock, self.claim_timeout_s
            )

    def commit(
        self,
        key: BlockKey,
        node_id: str,
        writer_id: str,
        tier: Tier,
        size: int,
        checksum: int,
        block_type: BlockType = BlockType.GENERIC,
        program_id: str | None = None,
    ) -> m.CommitResult:
        """Publish a claimed block stored on ``node_id``.

        Needs the caller's claim (FailedPrecondition on ``writer_id``) unless
        the key is committed already: then a matching checksum adds a replica
        and a different one raises Corrupt (field ``checksum``) and changes nothing.
        """
        m.check_key(key)
        m.check_id(writer_id, "writer_id")
        tier = m.check_tier(tier)
        m.check_int(size, "size", 1, self.max_block_bytes)
        m.check_int(checksum, "checksum", 0, m.MAX_CHECKSUM)
        m.check_block_type(block_type)
        validate_program_id(program_id)
        with self._lock:
            return claims.commit(
                self._state, key, node_id, writer_id, tier, size, checksum, block_type, program_id
            )

    def abort(self, key: BlockKey, node_id: str, writer_id: str) -> list[Event]:
        """Release the caller's claim on ``key`` (nothing to do if it holds none)."""
        m.check_key(key)
        m.check_id(writer_id, "writer_id")
        with self._lock:
            return claims.abort(self._state, key, node_id, writer_id)

    def expire_claims(self) -> list[Event]:
        """Release every claim past its deadline (its writer is presumed dead)."""
        with self._lock:
            return claims.expire(self._state, self._clock())

    def claim_of(self, key: BlockKey) -> Claim | None:
        """The claim in force on ``key``, if any (it may have expired but not been released)."""
        with self._lock:
            return self._state.claims.get(key)

    # --------------------------------------------------------------- replicas

    def add_replica(self, key: BlockKey, node_id: str, tier: Tier, checksum: int) -> list[Event]:
        """Record a copy of a committed block on ``node_id``, or its move to ``tier`` there."""
        m.check_key(key)
        tier = m.check_tier(tier)
        m.check_int(checksum, "checksum", 0, m.MAX_CHECKSUM)
        with self._lock:
            return replicas.add_replica(self._state, key, node_id, tier, checksum)

    def remove_replica(self, key: BlockKey, node_id: str) -> list[Event]:
        """Forget the copy on ``node_id``; the block goes when its last copy does."""
        m.check_key(key)
        with self._lock:
            return replicas.remove_replica(self._state, key, node_id)

    def set_pins(self, key: BlockKey, node_id: str, pins: int) -> list[Event]:
        """Record how many pins the replica on ``node_id`` carries."""
        m.check_key(key)
        m.check_int(pins, "pins", 0, m.MAX_PINS)
        with self._lock:
            return replicas.set_pins(self._state, key, node_id, pins)

    def reconcile(self, node_id: str, inventory: Sequence[m.InventoryItem]) -> m.ReconcileResult:
        """Make the node's replicas equal its reported inventory.

        Unknown keys are committed, tiers and pins updated, replicas the node
        no longer reports removed. An item whose checksum (or size) differs
        from the committed block is not added and is returned in ``rejected``.
        Claims are left alone (they expire).
        """
        items = list(inventory)
        for it in items:
            m.check_item(it, self.max_block_bytes)
        with self._lock:
            return replicas.reconcile(self._state, node_id, items)

    # ----------------------------------------------------------------- lookup

    def lookup(
        self, namespace: str, hashes: Sequence[bytes], prefer_node: str | None = None
    ) -> m.ClusterLookup:
        """The longest committed prefix of ``hashes`` and the best replica of each block:
        one on ``prefer_node`` if any, else the fastest tier elsewhere (ties: node id).
        Counts one access on each matched block."""
        validate_namespace(namespace)
        chain = m.check_chain(hashes, self.max_chain)
        if prefer_node is not None:
            m.check_id(prefer_node, "prefer_node")
        with self._lock:
            return queries.lookup(self._state, namespace, chain, prefer_node)

    def warmth(self, namespace: str, hashes: Sequence[bytes]) -> list[NodeWarmth]:
        """For every registered node, how many leading blocks of ``hashes`` it holds and where.

        The KV-warmth routing helper: a router sends a request to the node with
        the longest (then fastest) warm prefix. Best first: most blocks, then
        fewest blocks off the fastest tier, then node id. Costs O(chain x
        replicas): only the replicas of the chain's blocks are visited. Counts
        no access (asking where to route is not a read).
        """
        validate_namespace(namespace)
        chain = m.check_chain(hashes, self.max_chain)
        with self._lock:
            rows = queries.warmth(self._state, namespace, chain)
        return queries.best_warm_first(rows)

    def locate(self, keys: Sequence[BlockKey]) -> list[tuple[Location, ...]]:
        """Every replica of each key, fastest tier first (empty for an unknown key)."""
        ks = [m.check_key(k, "keys") for k in keys]
        with self._lock:
            return queries.locate(self._state, ks)

    def entry(self, key: BlockKey) -> m.DirEntry | None:
        """A copy of the record of a committed block, or None."""
        m.check_key(key)
        with self._lock:
            return queries.entry_info(self._state, key)

    def replica_count(self, key: BlockKey) -> int:
        """How many nodes hold ``key`` (0 when it is not committed)."""
        with self._lock:
            e = self._state.find(key)
            return 0 if e is None else len(e.replicas)

    # ---------------------------------------------------------------- hotness

    def record_access(self, keys: Iterable[BlockKey]) -> None:
        """Count one access on each committed key of ``keys`` (unknown keys are ignored)."""
        ks = [m.check_key(k, "keys") for k in keys]
        with self._lock:
            queries.record_access(self._state, ks)

    def hot_keys(self, limit: int, types: set[BlockType] | None = None) -> list[BlockKey]:
        """Up to ``limit`` accessed keys, most accessed first (optionally of ``types`` only)."""
        m.check_int(limit, "limit", 0, 1 << 30)
        with self._lock:
            return queries.hot_keys(self._state, limit, types)

    def keys_of_type(self, types: set[BlockType]) -> list[BlockKey]:
        """Every committed key of one of ``types``, ordered by namespace and hash."""
        with self._lock:
            keys = queries.keys_of_type(self._state, types)
        return sorted(keys, key=lambda k: (k.namespace, k.hash))

    # ------------------------------------------------------------ event stream

    @property
    def seq(self) -> int:
        """The sequence number of the last applied event (0 before any)."""
        return self._state.seq

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """Up to ``limit`` events after ``seq`` from the in-memory ring.

        FailedPrecondition (field ``seq``) when the ring no longer holds them
        (or ``seq`` is ahead of this directory): resync from the log or a snapshot.
        """
        m.check_int(seq, "seq", 0, MAX_SEQ)
        m.check_int(limit, "limit", 1, 1 << 30)
        with self._lock:
            return self._state.ring.since(seq, limit, self._state.seq)

    def apply(self, event: Event) -> None:
        """Apply one event; it must carry sequence number ``seq + 1``."""
        with self._lock:
            apply_event(self._state, event)

    # --------------------------------------------------- snapshots and state

    def snapshot(self) -> bytes:
        """The whole index (nodes, blocks, replicas, pins, access counts) at :attr:`seq`,
        deterministically encoded. Pending claims are not included."""
        with self._lock:
            return encode_snapshot(self._state)

    @classmethod
    def restore(
        cls, snapshot: bytes | None, events: Iterable[Event], **kwargs: Any
    ) -> DirectoryCore:
        """A core rebuilt from a snapshot (or none) and the events after it.

        Events at or below the snapshot's seq are skipped; claims replayed from
        the events are dropped at the end (writers retry after a restart).
        """
        core = cls(**kwargs)
        if snapshot is not None:
            load_snapshot(core._state, snapshot)
        with core._lock:
            for ev in events:
                if ev.seq > core._state.seq:
                    apply_event(core._state, ev)
            claims.forget_all(core._state)
        return core

    def state(self) -> dict[str, Any]:
        """A canonical, comparable view: seq, nodes, blocks with replicas, tiers and pins.

        Leaves out claims and access counts (neither is durable).
        """
        with self._lock:
            return canonical_state(self._state)
