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

Invariants: every entry has at least one replica; ``_Node.keys`` is the
reverse index of the replicas, so losing a node costs O(its blocks).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvfabric.directory import model as m
from kvfabric.directory.events import Event, EventKind, pack_snapshot, unpack_snapshot
from kvfabric.directory.model import Claim, ClaimStatus, Location
from kvfabric.errors import Corrupt, FailedPrecondition, InvalidArgument, KVFabricError, NotFound
from kvfabric.types import (
    BlockHash,
    BlockKey,
    BlockType,
    Tier,
    validate_namespace,
    validate_program_id,
)

MAX_BLOCK_BYTES = 1 << 31
MAX_SEQ = (1 << 63) - 1


@dataclass(slots=True)
class _Entry:
    """The index record of one committed block (mutable; never handed out)."""

    key: BlockKey
    size: int
    checksum: int
    block_type: BlockType
    program_id: str | None
    replicas: dict[str, Location]  # node_id -> location; never empty
    best: Location  # min of replicas by (tier, node_id)
    pins: dict[str, int] = field(default_factory=dict)  # node_id -> pins, zeros omitted
    hits: int = 0

    def reselect(self) -> None:
        self.best = min(self.replicas.values(), key=lambda loc: (loc.tier, loc.node_id))


@dataclass(frozen=True, slots=True)
class NodeWarmth:
    """How warm a chain is on one node: its leading ``matched`` blocks are there, in ``tiers``."""

    node_id: str
    address: str
    matched: int
    tiers: tuple[Tier, ...]


@dataclass(slots=True)
class _Node:
    """A registered node with its reverse indexes (keys it holds, keys it has claimed)."""

    node_id: str
    address: str
    tiers: tuple[Tier, ...]
    keys: set[BlockKey] = field(default_factory=set)
    claims: set[BlockKey] = field(default_factory=set)
    bytes: int = 0


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
        self._ring_size = m.check_int(ring_size, "ring_size", 1, 1 << 24)
        self._clock = clock
        self._lock = threading.Lock()
        self._index: dict[str, dict[bytes, _Entry]] = {}  # namespace -> hash -> entry
        self._nodes: dict[str, _Node] = {}
        self._claims: dict[BlockKey, Claim] = {}
        self._by_type: dict[BlockType, set[BlockKey]] = {t: set() for t in BlockType}
        self._seq = 0
        self._ring: list[Event | None] = [None] * self._ring_size
        self._ring_start = 1  # oldest seq this process applied (the ring holds no older)

    # ------------------------------------------------------------------ nodes

    def register_node(self, node_id: str, address: str, tiers: Sequence[Tier]) -> list[Event]:
        """Add a node or update its address and tiers (NODE_JOINED; none if unchanged)."""
        m.check_id(node_id, "node_id")
        m.check_address(address)
        if isinstance(tiers, (str, bytes)) or not isinstance(tiers, Sequence) or not tiers:
            raise InvalidArgument("tiers must be a non-empty sequence of Tier", "tiers")
        tiers_t = tuple(sorted({m.check_tier(t, "tiers") for t in tiers}))
        with self._lock:
            old = self._nodes.get(node_id)
            if old is not None and old.address == address and old.tiers == tiers_t:
                return []
            ev = Event(self._seq + 1, EventKind.NODE_JOINED, node_id=node_id, address=address,
                       tiers=tiers_t)  # fmt: skip
            self._apply(ev)
            return [ev]

    def remove_node(self, node_id: str) -> list[Event]:
        """Forget a node: release its claims, drop its replicas and every block left with none.

        Uses the node's reverse index, never a scan of the whole index.
        """
        with self._lock:
            node = self._node(node_id)
            out: list[Event] = []
            for key in list(node.claims):
                c = self._claims[key]
                self._emit(out, EventKind.ABORTED, key=key, node_id=c.node_id,
                           writer_id=c.writer_id)  # fmt: skip
            for key in [k for k in node.keys if len(self._get(k).replicas) == 1]:
                self._emit(out, EventKind.BLOCK_REMOVED, key=key)
            self._emit(out, EventKind.NODE_LEFT, node_id=node_id)
            return out

    def nodes(self) -> list[m.NodeInfo]:
        """Every registered node, by node id."""
        with self._lock:
            return [
                m.NodeInfo(n.node_id, n.address, n.tiers, len(n.keys), n.bytes)
                for _, n in sorted(self._nodes.items())
            ]

    def keys_on_node(self, node_id: str) -> set[BlockKey]:
        """A copy of the keys the node holds a replica of."""
        with self._lock:
            return set(self._node(node_id).keys)

    # ----------------------------------------------------------------- claims

    def claim(self, key: BlockKey, node_id: str, writer_id: str, size: int) -> m.ClaimResult:
        """Ask to write ``key``: GRANTED to the first writer (again to the same writer,
        refreshing its deadline), PENDING while another writer's claim is live,
        COMMITTED (with locations) once the key is committed."""
        m.check_key(key)
        m.check_id(writer_id, "writer_id")
        m.check_int(size, "size", 1, self.max_block_bytes)
        with self._lock:
            self._node(node_id)
            entry = self._find(key)
            if entry is not None:
                return m.ClaimResult(ClaimStatus.COMMITTED, key, None, _sorted_locs(entry))
            now = self._clock()
            out: list[Event] = []
            held = self._claims.get(key)
            if held is not None and held.writer_id != writer_id:
                if held.deadline > now:
                    return m.ClaimResult(ClaimStatus.PENDING, key, held)
                self._emit(out, EventKind.ABORTED, key=key, node_id=held.node_id,
                           writer_id=held.writer_id)  # fmt: skip
            self._emit(out, EventKind.CLAIMED, key=key, node_id=node_id, writer_id=writer_id,
                       size=size, deadline=now + self.claim_timeout_s)  # fmt: skip
            return m.ClaimResult(ClaimStatus.GRANTED, key, self._claims[key], (), tuple(out))

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
            self._check_node_tier(self._node(node_id), tier)
            entry = self._find(key)
            out: list[Event] = []
            if entry is not None:
                _check_same(entry, checksum, size)
                self._replica_events(out, entry, node_id, tier)
                return m.CommitResult(key, False, _sorted_locs(entry), tuple(out))
            held = self._claims.get(key)
            if held is None or held.writer_id != writer_id:
                owner = "nobody" if held is None else f"writer {held.writer_id!r}"
                raise FailedPrecondition(
                    f"commit of {key.short()} by writer {writer_id!r}: the claim is held by "
                    f"{owner}; claim the key first",
                    "writer_id",
                )
            self._emit(out, EventKind.COMMITTED, key=key, node_id=node_id, tier=tier, size=size,
                       checksum=checksum, block_type=block_type, program_id=program_id)  # fmt: skip
            return m.CommitResult(key, True, _sorted_locs(self._get(key)), tuple(out))

    def abort(self, key: BlockKey, node_id: str, writer_id: str) -> list[Event]:
        """Release the caller's claim on ``key`` (nothing to do if it holds none)."""
        m.check_key(key)
        m.check_id(writer_id, "writer_id")
        with self._lock:
            self._node(node_id)
            held = self._claims.get(key)
            if held is None:
                return []
            if held.writer_id != writer_id:
                raise FailedPrecondition(
                    f"{key.short()} is claimed by writer {held.writer_id!r}, not {writer_id!r}",
                    "writer_id",
                )
            out: list[Event] = []
            self._emit(out, EventKind.ABORTED, key=key, node_id=held.node_id, writer_id=writer_id)
            return out

    def expire_claims(self) -> list[Event]:
        """Release every claim past its deadline (its writer is presumed dead)."""
        with self._lock:
            now = self._clock()
            out: list[Event] = []
            for c in [c for c in self._claims.values() if c.deadline <= now]:
                self._emit(out, EventKind.ABORTED, key=c.key, node_id=c.node_id,
                           writer_id=c.writer_id)  # fmt: skip
            return out

    def claim_of(self, key: BlockKey) -> Claim | None:
        """The claim in force on ``key``, if any (it may have expired but not been released)."""
        with self._lock:
            return self._claims.get(key)

    # --------------------------------------------------------------- replicas

    def add_replica(self, key: BlockKey, node_id: str, tier: Tier, checksum: int) -> list[Event]:
        """Record a copy of a committed block on ``node_id``, or its move to ``tier`` there."""
        m.check_key(key)
        tier = m.check_tier(tier)
        m.check_int(checksum, "checksum", 0, m.MAX_CHECKSUM)
        with self._lock:
            self._check_node_tier(self._node(node_id), tier)
            entry = self._committed(key)
            _check_same(entry, checksum, entry.size)
            out: list[Event] = []
            self._replica_events(out, entry, node_id, tier)
            return out

    def remove_replica(self, key: BlockKey, node_id: str) -> list[Event]:
        """Forget the copy on ``node_id``; the block goes when its last copy does."""
        m.check_key(key)
        with self._lock:
            self._node(node_id)
            out: list[Event] = []
            self._drop_replica(out, key, node_id)
            return out

    def set_pins(self, key: BlockKey, node_id: str, pins: int) -> list[Event]:
        """Record how many pins the replica on ``node_id`` carries."""
        m.check_key(key)
        m.check_int(pins, "pins", 0, m.MAX_PINS)
        with self._lock:
            self._node(node_id)
            entry = self._committed(key)
            if node_id not in entry.replicas:
                raise NotFound(f"node {node_id!r} holds no replica of {key.short()}", "key")
            out: list[Event] = []
            if entry.pins.get(node_id, 0) != pins:
                self._emit(out, EventKind.PINS_CHANGED, key=key, node_id=node_id, pins=pins)
            return out

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
            node = self._node(node_id)
            out: list[Event] = []
            rejected: list[BlockKey] = []
            seen: set[BlockKey] = set()
            for it in items:
                entry = self._find(it.key)
                if entry is None:
                    self._emit(out, EventKind.COMMITTED, key=it.key, node_id=node_id,
                               tier=it.tier, size=it.size, checksum=it.checksum,
                               block_type=it.block_type, program_id=it.program_id)  # fmt: skip
                    entry = self._get(it.key)
                elif entry.checksum != it.checksum or entry.size != it.size:
                    rejected.append(it.key)
                    seen.discard(it.key)
                    continue
                else:
                    self._replica_events(out, entry, node_id, it.tier)
                seen.add(it.key)
                if entry.pins.get(node_id, 0) != it.pins:
                    self._emit(out, EventKind.PINS_CHANGED, key=it.key, node_id=node_id,
                               pins=it.pins)  # fmt: skip
            for key in node.keys - seen:
                self._drop_replica(out, key, node_id)
            return m.ReconcileResult(tuple(out), tuple(rejected))

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
            if prefer_node is not None and prefer_node not in self._nodes:
                raise NotFound(f"node {prefer_node!r} is not registered", "prefer_node")
            index = self._index.get(namespace)
            if index is None:
                return m.ClusterLookup(0, ())
            locs: list[Location] = []
            for h in chain:
                entry = index.get(h)
                if entry is None:
                    break
                loc = entry.replicas.get(prefer_node) if prefer_node is not None else None
                locs.append(entry.best if loc is None else loc)
                entry.hits += 1
            return m.ClusterLookup(len(locs), tuple(locs))

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
            index = self._index.get(namespace, {})
            tiers: dict[str, list[Tier]] = {n: [] for n in self._nodes}
            warm = set(self._nodes)  # nodes holding every block so far
            for h in chain:
                entry = index.get(h)
                if entry is None or not warm:
                    break
                warm &= entry.replicas.keys()
                for node_id in warm:
                    tiers[node_id].append(entry.replicas[node_id].tier)
            out = [NodeWarmth(n, self._nodes[n].address, len(t), tuple(t))
                   for n, t in tiers.items()]  # fmt: skip
        return sorted(out, key=lambda w: (-w.matched, sum(w.tiers), w.node_id))

    def locate(self, keys: Sequence[BlockKey]) -> list[tuple[Location, ...]]:
        """Every replica of each key, fastest tier first (empty for an unknown key)."""
        ks = [m.check_key(k, "keys") for k in keys]
        with self._lock:
            return [() if (e := self._find(k)) is None else _sorted_locs(e) for k in ks]

    def entry(self, key: BlockKey) -> m.DirEntry | None:
        """A copy of the record of a committed block, or None."""
        m.check_key(key)
        with self._lock:
            e = self._find(key)
            if e is None:
                return None
            reps = tuple(
                m.ReplicaInfo(n, loc.tier, e.pins.get(n, 0))
                for n, loc in sorted(e.replicas.items())
            )
            return m.DirEntry(e.key, e.size, e.checksum, e.block_type, e.program_id, reps, e.hits)

    def replica_count(self, key: BlockKey) -> int:
        """How many nodes hold ``key`` (0 when it is not committed)."""
        with self._lock:
            e = self._find(key)
            return 0 if e is None else len(e.replicas)

    # ---------------------------------------------------------------- hotness

    def record_access(self, keys: Iterable[BlockKey]) -> None:
        """Count one access on each committed key of ``keys`` (unknown keys are ignored)."""
        ks = [m.check_key(k, "keys") for k in keys]
        with self._lock:
            for k in ks:
                e = self._find(k)
                if e is not None:
                    e.hits += 1

    def hot_keys(self, limit: int, types: set[BlockType] | None = None) -> list[BlockKey]:
        """Up to ``limit`` accessed keys, most accessed first (optionally of ``types`` only)."""
        m.check_int(limit, "limit", 0, 1 << 30)
        with self._lock:
            if types is None:
                cands: Iterable[_Entry] = (e for ix in self._index.values() for e in ix.values())
            else:
                cands = (self._get(k) for t in m.check_types(types) for k in self._by_type[t])
            top = heapq.nlargest(limit, (e for e in cands if e.hits), key=lambda e: e.hits)
            return [e.key for e in top]

    def keys_of_type(self, types: set[BlockType]) -> list[BlockKey]:
        """Every committed key of one of ``types``, ordered by namespace and hash."""
        with self._lock:
            keys = [k for t in m.check_types(types) for k in self._by_type[t]]
        return sorted(keys, key=lambda k: (k.namespace, k.hash))

    # ------------------------------------------------------------ event stream

    @property
    def seq(self) -> int:
        """The sequence number of the last applied event (0 before any)."""
        return self._seq

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """Up to ``limit`` events after ``seq`` from the in-memory ring.

        FailedPrecondition (field ``seq``) when the ring no longer holds them
        (or ``seq`` is ahead of this directory): resync from the log or a snapshot.
        """
        m.check_int(seq, "seq", 0, MAX_SEQ)
        m.check_int(limit, "limit", 1, 1 << 30)
        with self._lock:
            oldest = max(self._ring_start, self._seq - self._ring_size + 1)
            if seq > self._seq or seq + 1 < oldest:
                raise FailedPrecondition(
                    f"events after {seq} are not in memory (it holds {oldest}..{self._seq}); "
                    "resync from the log or a snapshot",
                    "seq",
                )
            end = min(self._seq, seq + limit)
            return [e for s in range(seq + 1, end + 1) if (e := self._ring[s % self._ring_size])]

    def apply(self, event: Event) -> None:
        """Apply one event; it must carry sequence number ``seq + 1``."""
        with self._lock:
            self._apply(event)

    # --------------------------------------------------- snapshots and state

    def snapshot(self) -> bytes:
        """The whole index (nodes, blocks, replicas, pins, access counts) at :attr:`seq`,
        deterministically encoded. Pending claims are not included."""
        with self._lock:
            nodes = [[n.node_id, n.address, [int(t) for t in n.tiers]]
                     for _, n in sorted(self._nodes.items())]  # fmt: skip
            blocks = [
                [e.key.namespace, bytes(e.key.hash), e.size, e.checksum, e.block_type.value,
                 e.program_id, e.hits,
                 [[n, int(loc.tier), e.pins.get(n, 0)] for n, loc in sorted(e.replicas.items())]]
                for ns in sorted(self._index)
                for _, e in sorted(self._index[ns].items())
            ]  # fmt: skip
            return pack_snapshot(self._seq, [nodes, blocks])

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
            core._load(snapshot)
        with core._lock:
            for ev in events:
                if ev.seq > core._seq:
                    core._apply(ev)
            core._claims.clear()
            for node in core._nodes.values():
                node.claims.clear()
        return core

    def state(self) -> dict[str, Any]:
        """A canonical, comparable view: seq, nodes, blocks with replicas, tiers and pins.

        Leaves out claims and access counts (neither is durable).
        """
        with self._lock:
            nodes = {n.node_id: (n.address, n.tiers) for n in self._nodes.values()}
            blocks = {
                e.key: (e.size, e.checksum, e.block_type, e.program_id,
                        {n: (loc.tier, e.pins.get(n, 0)) for n, loc in e.replicas.items()})
                for ix in self._index.values() for e in ix.values()
            }  # fmt: skip
            return {"seq": self._seq, "nodes": nodes, "blocks": blocks}

    # ------------------------------------------------------------- internals

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id) if isinstance(node_id, str) else None
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered", "node_id")
        return node

    def _find(self, key: BlockKey) -> _Entry | None:
        index = self._index.get(key.namespace)
        return None if index is None else index.get(key.hash)

    def _get(self, key: BlockKey) -> _Entry:
        entry = self._find(key)
        if entry is None:  # only reachable from a malformed event stream
            raise Corrupt(f"event refers to {key.short()}, which is not committed", "event")
        return entry

    def _committed(self, key: BlockKey) -> _Entry:
        entry = self._find(key)
        if entry is None:
            raise NotFound(f"{key.short()} is not committed", "key")
        return entry

    def _check_node_tier(self, node: _Node, tier: Tier) -> None:
        if tier not in node.tiers:
            names = ", ".join(t.name for t in node.tiers)
            raise InvalidArgument(
                f"node {node.node_id!r} has no {tier.name} tier (it registered {names})", "tier"
            )

    def _emit(self, out: list[Event], kind: EventKind, **fields: Any) -> None:
        ev = Event(self._seq + 1, kind, **fields)
        self._apply(ev)
        out.append(ev)

    def _replica_events(self, out: list[Event], entry: _Entry, node_id: str, tier: Tier) -> None:
        loc = entry.replicas.get(node_id)
        if loc is None or loc.tier != tier:
            self._emit(out, EventKind.REPLICA_ADDED, key=entry.key, node_id=node_id, tier=tier)

    def _drop_replica(self, out: list[Event], key: BlockKey, node_id: str) -> None:
        entry = self._find(key)
        if entry is None or node_id not in entry.replicas:
            return
        if len(entry.replicas) == 1:
            self._emit(out, EventKind.BLOCK_REMOVED, key=key)
        else:
            self._emit(out, EventKind.REPLICA_REMOVED, key=key, node_id=node_id)

    def _apply(self, ev: Event) -> None:
        if ev.seq != self._seq + 1:
            raise FailedPrecondition(f"event seq {ev.seq} does not follow {self._seq}", "seq")
        _APPLY[ev.kind](self, ev)
        self._seq = ev.seq
        self._ring[ev.seq % self._ring_size] = ev

    def _load(self, data: bytes) -> None:
        seq, body = unpack_snapshot(data)
        try:
            nodes, blocks = body
            for node_id, address, tiers in nodes:
                self._nodes[node_id] = _Node(node_id, address, tuple(Tier(t) for t in tiers))
            for ns, digest, size, checksum, btype, pid, hits, reps in blocks:
                key = BlockKey(ns, BlockHash(digest))
                locs = {n: Location(n, self._nodes[n].address, Tier(t)) for n, t, _ in reps}
                best = min(locs.values(), key=lambda loc: (loc.tier, loc.node_id))
                pins = {n: p for n, _, p in reps if p}
                entry = _Entry(key, size, checksum, BlockType(btype), pid, locs, best, pins, hits)
                self._index.setdefault(ns, {})[key.hash] = entry
                self._by_type[entry.block_type].add(key)
                for n in locs:
                    self._nodes[n].keys.add(key)
                    self._nodes[n].bytes += size
        except (TypeError, ValueError, KeyError, KVFabricError) as exc:
            raise Corrupt(
                f"snapshot at seq {seq} has a malformed body: {exc!r}", "snapshot"
            ) from exc
        self._seq = seq
        self._ring_start = seq + 1


# ------------------------------------------------------------------ apply handlers
# Each checks what it needs before it mutates, so a malformed event changes nothing.


def _event_node(core: DirectoryCore, ev: Event) -> _Node:
    node = core._nodes.get(ev.node_id)
    if node is None:
        raise Corrupt(f"event {ev.seq} ({ev.kind.name}) names unknown node {ev.node_id!r}", "event")
    return node


def _remove_entry(core: DirectoryCore, entry: _Entry) -> None:
    key = entry.key
    for node_id in entry.replicas:
        node = core._nodes[node_id]
        node.keys.discard(key)
        node.bytes -= entry.size
    index = core._index[key.namespace]
    del index[key.hash]
    if not index:
        del core._index[key.namespace]
    core._by_type[entry.block_type].discard(key)


def _release_claim(core: DirectoryCore, key: BlockKey) -> None:
    held = core._claims.pop(key, None)
    if held is not None and (node := core._nodes.get(held.node_id)) is not None:
        node.claims.discard(key)


def _on_node_joined(core: DirectoryCore, ev: Event) -> None:
    node = core._nodes.get(ev.node_id)
    if node is None:
        core._nodes[ev.node_id] = _Node(ev.node_id, ev.address, ev.tiers)
        return
    node.tiers = ev.tiers
    if node.address != ev.address:
        node.address = ev.address
        for key in node.keys:
            entry = core._get(key)
            tier = entry.replicas[ev.node_id].tier
            entry.replicas[ev.node_id] = Location(ev.node_id, ev.address, tier)
            entry.reselect()


def _on_node_left(core: DirectoryCore, ev: Event) -> None:
    node = _event_node(core, ev)
    for key in node.claims:
        core._claims.pop(key, None)
    keys, node.keys = node.keys, set()  # the node goes: no per-key bookkeeping on it
    for key in keys:
        entry = core._get(key)
        del entry.replicas[ev.node_id]
        entry.pins.pop(ev.node_id, None)
        if entry.replicas:
            entry.reselect()
        else:
            _remove_entry(core, entry)
    del core._nodes[ev.node_id]


def _on_claimed(core: DirectoryCore, ev: Event) -> None:
    key = ev.block_key
    node = _event_node(core, ev)
    if core._find(key) is not None:
        raise Corrupt(f"event {ev.seq} claims {key.short()}, which is committed", "event")
    _release_claim(core, key)
    core._claims[key] = Claim(key, ev.node_id, ev.writer_id, ev.size, ev.deadline)
    node.claims.add(key)


def _on_aborted(core: DirectoryCore, ev: Event) -> None:
    held = core._claims.get(ev.block_key)
    if held is not None and held.writer_id == ev.writer_id:  # else: gone already (restart)
        _release_claim(core, ev.block_key)


def _on_committed(core: DirectoryCore, ev: Event) -> None:
    key = ev.block_key
    node = _event_node(core, ev)
    if core._find(key) is not None:
        raise Corrupt(f"event {ev.seq} commits {key.short()} a second time", "event")
    loc = Location(ev.node_id, node.address, ev.tier)
    entry = _Entry(key, ev.size, ev.checksum, ev.block_type, ev.program_id, {ev.node_id: loc}, loc)
    core._index.setdefault(key.namespace, {})[key.hash] = entry
    core._by_type[ev.block_type].add(key)
    node.keys.add(key)
    node.bytes += ev.size
    _release_claim(core, key)


def _on_replica_added(core: DirectoryCore, ev: Event) -> None:
    entry = core._get(ev.block_key)
    node = _event_node(core, ev)
    old = entry.replicas.get(ev.node_id)
    entry.replicas[ev.node_id] = Location(ev.node_id, node.address, ev.tier)
    if old is None:
        node.keys.add(entry.key)
        node.bytes += entry.size
    entry.reselect()


def _on_replica_removed(core: DirectoryCore, ev: Event) -> None:
    entry = core._get(ev.block_key)
    node = _event_node(core, ev)
    if ev.node_id not in entry.replicas:
        raise Corrupt(f"event {ev.seq} removes a replica that does not exist", "event")
    if len(entry.replicas) == 1:
        _remove_entry(core, entry)
        return
    del entry.replicas[ev.node_id]
    entry.pins.pop(ev.node_id, None)
    node.keys.discard(entry.key)
    node.bytes -= entry.size
    entry.reselect()


def _on_block_removed(core: DirectoryCore, ev: Event) -> None:
    _remove_entry(core, core._get(ev.block_key))


def _on_pins_changed(core: DirectoryCore, ev: Event) -> None:
    entry = core._get(ev.block_key)
    if ev.node_id not in entry.replicas:
        raise Corrupt(f"event {ev.seq} pins a replica that does not exist", "event")
    if ev.pins:
        entry.pins[ev.node_id] = ev.pins
    else:
        entry.pins.pop(ev.node_id, None)


_APPLY: dict[EventKind, Callable[[DirectoryCore, Event], None]] = {
    EventKind.NODE_JOINED: _on_node_joined,
    EventKind.NODE_LEFT: _on_node_left,
    EventKind.CLAIMED: _on_claimed,
    EventKind.ABORTED: _on_aborted,
    EventKind.COMMITTED: _on_committed,
    EventKind.REPLICA_ADDED: _on_replica_added,
    EventKind.REPLICA_REMOVED: _on_replica_removed,
    EventKind.BLOCK_REMOVED: _on_block_removed,
    EventKind.PINS_CHANGED: _on_pins_changed,
}


def _sorted_locs(entry: _Entry) -> tuple[Location, ...]:
    return tuple(sorted(entry.replicas.values(), key=lambda loc: (loc.tier, loc.node_id)))


def _check_same(entry: _Entry, checksum: int, size: int) -> None:
    """A committed block never changes: a different checksum or size is refused."""
    if checksum != entry.checksum:
        raise Corrupt(
            f"{entry.key.short()} is committed with checksum {entry.checksum:#x}, "
            f"not {checksum:#x}; a committed block never changes",
            "checksum",
        )
    if size != entry.size:
        raise Corrupt(
            f"{entry.key.short()} is committed with {entry.size} bytes, not {size}", "size"
        )
