"""NodeStoreService: one node's store joined to the cluster, without Ray in it.

This is the class the ``NodeStore`` Ray actor wraps (the shape of Ray's
``util/queue.py``): it owns the node-store core and the data-plane server, and
talks to the directory through a :class:`DirectoryPort`, an object with plain
synchronous methods. Tests drive it with the real directory actor; nothing
here imports Ray.

Write-once-read-anywhere is enforced here: a put claims its keys in the
directory first and stores only what it won; a get that misses locally asks
the directory where the blocks are and pulls them from a peer over the data
plane, keeping a local replica.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvfabric.config import KVFabricConfig
from kvfabric.errors import FailedPrecondition, InvalidArgument, KVFabricError, Unavailable
from kvfabric.hints import HintKind, ProgramHint
from kvfabric.metrics import Telemetry
from kvfabric.node.changes import ChangeKind, NodeChange
from kvfabric.node.core import NodeStoreCore
from kvfabric.node.listing import BlockFilter, BlockPage, list_page
from kvfabric.node.results import MoveResult, NodeStats, PinResult
from kvfabric.tiers.base import BlockRecord
from kvfabric.transfer import make_transport
from kvfabric.types import (
    BLOCK_HASH_BYTES,
    BlockKey,
    BlockType,
    Tier,
    as_block_hash,
    validate_namespace,
)

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class PutOutcome:
    """Per block: stored here, already stored somewhere, or being written by another writer."""

    key: BlockKey
    status: str  # "stored" | "exists" | "pending"


@dataclass
class ClaimedWrite:
    """Arena slots reserved for a co-located writer, its keys claimed in the directory.

    ``slots[j]`` receives the block of hash ``slot_index[j]``; ``outcomes[i]``
    is already decided ("exists" or "pending") for every other hash. Exactly
    one of :meth:`commit` and :meth:`abort` ends it.
    """

    slots: list[memoryview]
    slot_index: list[int]
    outcomes: list[str | None]
    _commit: Callable[[list[int]], list[str]] = field(repr=False)
    _abort: Callable[[], None] = field(repr=False)
    _done: bool = field(default=False, repr=False)

    def commit(self, checksums: list[int]) -> list[str]:
        """Verify each slot against the writer's checksum and publish it; a status per hash
        ("stored", "exists", "pending", or "corrupt" where the bytes did not match)."""
        if self._done:
            raise FailedPrecondition("the reservation was already ended", "reservation")
        self._done = True
        return self._commit(checksums)

    def abort(self) -> None:
        """Release the slots and the claims (idempotent after commit)."""
        if not self._done:
            self._done = True
            self._abort()


class NodeStoreService:
    """A node store that takes part in the cluster."""

    def __init__(
        self,
        node_id: str,
        config: KVFabricConfig,
        directory: DirectoryPort | None = None,
        *,
        host: str = "127.0.0.1",
    ) -> None:
        self.node_id = node_id
        if config.local_channel and not config.cpu_arena_shm_name:
            from kvfabric.transfer.local.segment import remove_stale_segments, segment_name

            remove_stale_segments()
            config = config.replace(cpu_arena_shm_name=segment_name(node_id))
        self.config = config
        self.local: Any = None  # the LocalServer, once start_local() ran
        self.core = NodeStoreCore(config)
        self.telemetry = Telemetry(node_id[:12])
        self.directory = directory
        self.transport = make_transport(config.transport)
        self.address = self.transport.serve(self.core, config.data_host or host)
        self._sync_lock = threading.RLock()  # re-entered when a rejoin happens mid-sync
        self.rpc_address: str | None = None  # set by the shell that serves the gRPC API
        self.ready = directory is None
        if directory is not None:
            self.join()

    # -- membership ---------------------------------------------------------------------
    def join(self) -> None:
        """Register with the directory and reconcile this node's inventory with it."""
        assert self.directory is not None
        self.directory.register_node(self.node_id, self.address, [int(t) for t in self.core.tiers])
        self.resync()

    def resync(self) -> int:
        """Send the full inventory; drop local copies the directory says are wrong."""
        if self.directory is None:
            return 0
        with self._sync_lock:
            self.core.changes.drain()
            inventory = [self._as_change(m) for m in self.core.inventory()]
            bad = self.directory.reconcile(self.node_id, inventory)
        if bad:
            log.warning("dropping %d local blocks that disagree with the directory", len(bad))
            self.core.evict([k for k in bad if not (m := self.core.meta(k)) or not m.pinned])
            self._sync()
        return len(inventory)

    def mark_ready(self) -> None:
        """Called once the directory has pushed what a new node should hold."""
        self.ready = True

    def note_replicas(self, keys: list[BlockKey], elsewhere: list[int]) -> int:
        """From the directory: how many copies of these blocks other nodes hold (for the
        eviction policy); returns how many of the blocks are held here."""
        return self.core.note_replicas(keys, elsewhere)

    def info(self) -> dict[str, Any]:
        """Identity, address, tiers and readiness of this node."""
        return {
            "node_id": self.node_id,
            "address": self.address,
            "transport": self.transport.name,
            "rpc_address": self.rpc_address,
            "tiers": [t.name for t in self.core.tier_list()],
            "ready": self.ready,
        }

    # -- data ---------------------------------------------------------------------------
    def put(
        self,
        namespace: str,
        hashes: Sequence[bytes],
        datas: Sequence[bytes],
        *,
        block_type: BlockType = BlockType.GENERIC,
        program_id: str | None = None,
    ) -> list[PutOutcome]:
        """Store blocks this node computed, claiming each key first (write once)."""
        keys = self._keys(namespace, hashes)
        if len(keys) != len(datas):
            raise InvalidArgument(f"{len(keys)} hashes but {len(datas)} blocks", "datas")
        if keys:
            self._ensure_namespace(namespace, len(datas[0]))
        self.core.check_blocks(keys, datas)  # before any claim: bad input changes nothing
        if self.directory is None:
            results = self.core.put_many(keys, datas, block_type=block_type, program_id=program_id)
            return [PutOutcome(r.key, "stored" if r.stored else "exists") for r in results]
        writer = f"{self.node_id[:16]}:{uuid.uuid4().hex[:16]}"  # one writer per put call
        claims = self.directory.claim_many(
            self.node_id, writer, [(k, len(d)) for k, d in zip(keys, datas, strict=True)]
        )
        won = [i for i, c in enumerate(claims) if c == "granted"]
        outcomes = [PutOutcome(k, "exists" if c == "committed" else "pending")
                    for k, c in zip(keys, claims, strict=True)]  # fmt: skip
        if not won:
            return outcomes
        try:
            results = self.core.put_many(
                [keys[i] for i in won], [datas[i] for i in won],
                block_type=block_type, program_id=program_id,
            )  # fmt: skip
        except BaseException:
            self.directory.abort_many(self.node_id, writer, [keys[i] for i in won])
            raise
        metas = [self.core.meta(r.key) for r in results if r.stored]
        commits = [self._as_change(m) for m in metas if m is not None]
        ok = self.directory.commit_many(self.node_id, writer, commits)
        unstored = [r.key for r in results if not r.stored]
        if unstored:  # stored meanwhile by a local writer: release this writer's claims
            self.directory.abort_many(self.node_id, writer, unstored)
        self._sync()
        position = {k: i for i, k in enumerate(keys)}
        for c, committed in zip(commits, ok, strict=True):
            outcomes[position[c.key]] = PutOutcome(c.key, "stored" if committed else "exists")
        if block_type in self.config.replicated_types:
            self.directory.replicate([c.key for c in commits])
        return outcomes

    def get(self, namespace: str, hashes: Sequence[bytes]) -> list[bytes | None]:
        """The verified bytes of each block, pulled from a peer when not held here."""
        keys = self._keys(namespace, hashes)
        out: list[bytes | None] = [self._local(k) for k in keys]
        missing = [k for k, o in zip(keys, out, strict=True) if o is None]
        if missing and self.directory is not None:
            self.pull_missing(missing)
            for i, k in enumerate(keys):
                if out[i] is None:
                    out[i] = self._local(k)
        return out

    def pull_missing(self, keys: Sequence[BlockKey]) -> int:
        """Fetch ``keys`` from the best replicas elsewhere; returns how many arrived."""
        if self.directory is None or not keys:
            return 0
        locations = self.directory.locate(list(keys), self.node_id)
        todo = {k: [loc for loc in locs if loc[0] != self.node_id]
                for k, locs in zip(keys, locations, strict=True)}  # fmt: skip
        arrived = 0
        for _attempt in range(3):  # next replica on a peer failure or a corrupt copy
            by_peer: dict[str, list[BlockKey]] = {}
            for k, locs in todo.items():
                if locs:
                    _node, address, _tier, size = locs.pop(0)
                    self._ensure_namespace(k.namespace, size)
                    by_peer.setdefault(address, []).append(k)
            if not by_peer:
                break
            failed: set[BlockKey] = set()
            for address, peer_keys in by_peer.items():
                try:
                    started = time.perf_counter()
                    res = self.transport.fetch(
                        address, peer_keys, self.core, timeout_s=self.config.rpc_timeout_s
                    )
                    self._count_transfer(res.fetched, started)
                except (Unavailable, OSError) as exc:
                    log.warning(
                        "fetch of %d blocks from %s failed: %s", len(peer_keys), address, exc
                    )
                    failed.update(peer_keys)
                    continue
                arrived += len(res.fetched)
                failed.update(res.missing)
                failed.update(res.corrupt)
            todo = {k: v for k, v in todo.items() if k in failed}
        self._sync()
        return arrived

    def pull_from(self, address: str, namespace: str, hashes: Sequence[bytes], size: int) -> int:
        """Copy blocks from the peer at ``address`` (used by the replication planner)."""
        keys = self._keys(namespace, hashes)
        self._ensure_namespace(namespace, size)
        started = time.perf_counter()
        res = self.transport.fetch(address, keys, self.core, timeout_s=self.config.rpc_timeout_s)
        self._count_transfer(res.fetched, started)
        self._sync()
        return len(res.fetched) + len(res.already_present)

    def lookup(self, namespace: str, hashes: Sequence[bytes]) -> dict[str, Any]:
        """Longest prefix stored anywhere in the cluster (here only when standalone).

        Returns ``matched`` and, per matched block, ``(node_id, data-plane address, tier)``.
        """
        chain = _chain(namespace, hashes)
        if self.directory is None:
            res = self.core.lookup(namespace, chain)
            matched, tiers = res.matched, [int(t) for t in res.tiers]
            return {"matched": matched,
                    "locations": [(self.node_id, self.address, t) for t in tiers]}  # fmt: skip
        return self.directory.lookup(namespace, chain, self.node_id)

    def lookup_local(self, namespace: str, hashes: Sequence[bytes]) -> tuple[int, list[int]]:
        """Longest prefix held on this node and the tier of each block."""
        res = self.core.lookup(namespace, _chain(namespace, hashes))
        return res.matched, [int(t) for t in res.tiers]

    # -- co-located clients (kvfabric.transfer.local) ------------------------------------
    def start_local(self) -> bool:
        """Serve co-located clients through the shared arena; False when it cannot be."""
        if self.local is None and self.config.local_channel:
            from kvfabric.transfer.local.server import LocalServer

            try:
                self.local = LocalServer(self)
            except KVFabricError as exc:
                log.warning("no local channel: %s", exc)
        return self.local is not None

    def open_put(
        self, namespace: str, hashes: Sequence[bytes], size: int, *,
        block_type: BlockType = BlockType.GENERIC, program_id: str | None = None,
    ) -> ClaimedWrite:  # fmt: skip
        """Reserve arena slots for blocks a co-located writer copies in (write once, like
        :meth:`put`: each key is claimed in the directory first)."""
        keys = self._keys(namespace, hashes)
        if not isinstance(size, int) or isinstance(size, bool):
            raise InvalidArgument("block_bytes must be an integer", "block_bytes")
        self._ensure_namespace(namespace, size)
        known = self.core.namespace(namespace).block_bytes
        if size != known:
            raise InvalidArgument(
                f"block_bytes={size}; namespace {namespace} blocks are {known} bytes",
                "block_bytes",
            )
        outcomes: list[str | None] = [None] * len(keys)
        won, writer = list(range(len(keys))), f"{self.node_id[:16]}:{uuid.uuid4().hex[:16]}"
        if self.directory is not None and keys:
            claims = self.directory.claim_many(self.node_id, writer, [(k, size) for k in keys])
            won = [i for i, c in enumerate(claims) if c == "granted"]
            for i, c in enumerate(claims):
                if c != "granted":
                    outcomes[i] = "exists" if c == "committed" else "pending"
        records = [BlockRecord(keys[i], size, 0, block_type, program_id) for i in won]
        try:
            res = self.core.open_write(records)
        except BaseException:
            self._abort_claims(writer, [keys[i] for i in won])
            raise
        first: dict[BlockKey, int] = {}
        for i in won:
            first.setdefault(keys[i], i)
        slot_index = [first[r.key] for r in res.records]
        for i in set(won) - set(slot_index):
            outcomes[i] = "exists"  # stored or being stored here already, or a repeated hash
        self._abort_claims(writer, res.present)

        def commit(sums: list[int]) -> list[str]:
            results = res.commit(None, sums)
            out = ["exists" if o is None else o for o in outcomes]
            stored = [r.key for r in results if r is not None]
            failed = [r.key for r, got in zip(res.records, results, strict=True) if got is None]
            for k in failed:
                out[first[k]] = "corrupt"
            committed = [True] * len(stored)
            if self.directory is not None:
                changes = [self._as_change(m) for k in stored if (m := self.core.meta(k))]
                committed = self.directory.commit_many(self.node_id, writer, changes)
                stored = [c.key for c in changes]
                self._abort_claims(writer, failed)
            self._sync()
            for k, ok in zip(stored, committed, strict=True):
                out[first[k]] = "stored" if ok else "exists"
            if self.directory is not None and block_type in self.config.replicated_types:
                self.directory.replicate(stored)
            return out

        def abort() -> None:
            res.abort()
            self._abort_claims(writer, [r.key for r in res.records])

        return ClaimedWrite([memoryview(b) for b in res.buffers], slot_index, outcomes,
                            commit, abort)  # fmt: skip

    def _abort_claims(self, writer: str, keys: Sequence[BlockKey]) -> None:
        if self.directory is not None and keys:
            self.directory.abort_many(self.node_id, writer, list(keys))

    # -- control ------------------------------------------------------------------------
    def pin(self, namespace: str, hashes: Sequence[bytes], owner: str,
            ttl_s: float | None = None) -> PinResult:  # fmt: skip
        """Pin the blocks held here."""
        try:
            return self.core.pin(self._keys(namespace, hashes), owner, ttl_s)
        finally:
            self._sync()

    def unpin(self, namespace: str, hashes: Sequence[bytes], owner: str) -> int:
        """Drop ``owner``'s pins."""
        try:
            return self.core.unpin(self._keys(namespace, hashes), owner)
        finally:
            self._sync()

    def evict(self, namespace: str, hashes: Sequence[bytes]) -> int:
        """Remove blocks from this node (refused if any is pinned)."""
        try:
            return self.core.evict(self._keys(namespace, hashes))
        finally:
            self._sync()

    def move(self, namespace: str, hashes: Sequence[bytes], tier: int) -> MoveResult:
        """Move blocks between this node's tiers."""
        try:
            return self.core.move(self._keys(namespace, hashes), _tier(tier))
        finally:
            self._sync()

    def prefetch(
        self, namespace: str, hashes: Sequence[bytes], tier: int | None = None
    ) -> MoveResult:
        """Promote blocks here, pulling from peers what this node does not hold."""
        keys = self._keys(namespace, hashes)
        absent = [k for k, t in zip(keys, self.core.contains(keys), strict=True) if t is None]
        self.pull_missing(absent)
        try:
            return self.core.prefetch(keys, None if tier is None else _tier(tier))
        finally:
            self._sync()

    def move_to_node(self, namespace: str, hashes: Sequence[bytes], node_id: str) -> int:
        """Copy blocks to another node, then drop the local copies that are not pinned."""
        if self.directory is None:
            raise FailedPrecondition(
                "moving to another node needs the cluster directory", "node_id"
            )
        keys = self._keys(namespace, hashes)
        if node_id == self.node_id:
            return 0
        copied = self.directory.fanout(keys, [node_id])
        present = [k for k, t in zip(keys, self.core.contains(keys), strict=True) if t is not None]
        unpinned = [k for k in present if (m := self.core.meta(k)) is not None and not m.pinned]
        self.evict(namespace, [k.hash for k in unpinned])
        return copied

    def annotate(
        self,
        namespace: str,
        hashes: Sequence[bytes],
        *,
        block_type: BlockType | None = None,
        program_id: str | None = None,
        ttl_s: float | None = None,
    ) -> int:
        """Set the type, program and/or TTL of blocks held here; returns how many."""
        try:
            return self.core.annotate(
                self._keys(namespace, hashes), block_type=block_type, program_id=program_id,
                ttl_s=ttl_s,
            )  # fmt: skip
        finally:
            self._sync()

    def hint(self, hint: ProgramHint) -> dict[str, Any]:
        """Apply a program hint: the policy learns it; a fork copies its prefix to the targets."""
        fanout = hint.kind == HintKind.FORK and bool(hint.targets) and bool(hint.hashes)
        if fanout and self.directory is None:  # refused before anything changes
            raise FailedPrecondition("a fork to other nodes needs the cluster directory", "targets")
        try:
            self.core.hint(hint)  # may pin (a fork's prefix) or move blocks (a tool-call lease)
        finally:
            self._sync()
        copied = 0
        if fanout and self.directory is not None:
            keys = [BlockKey(hint.namespace, h) for h in hint.hashes]
            copied = self.directory.fanout(keys, list(hint.targets))
        return {"accepted": True, "copied": copied}

    def events_since(self, seq: int, limit: int = 1000) -> list[Any]:
        """Directory events after ``seq`` (FailedPrecondition when standalone)."""
        if self.directory is None:
            raise FailedPrecondition("events come from the cluster directory; none here", "seq")
        if (
            not isinstance(seq, int)
            or seq < 0
            or not isinstance(limit, int)
            or not 0 < limit <= 10_000
        ):
            raise InvalidArgument("seq must be >= 0 and limit in 1..10000", "seq")
        return self.directory.events_since(seq, limit)

    def stats(self) -> NodeStats:
        """The core's statistics."""
        return self.core.stats()

    def list_blocks(
        self, where: BlockFilter, *, size: int = 0, after: str = "",
        allowed: Callable[[str], bool] = lambda ns: True,
    ) -> BlockPage:  # fmt: skip
        """One page of the blocks held here (NotFound for a namespace this node never saw)."""
        if where.namespace is not None:
            self.core.namespace(where.namespace)
        metas = self.core.inventory(where.namespace)
        return list_page(metas, where, size=size, after=after, allowed=allowed)

    def ping(self) -> str:
        """Liveness check for the directory."""
        return self.node_id

    def close(self) -> None:
        """Stop serving and release the tiers."""
        if self.local is not None:
            self.local.close()
        self.transport.close()
        self.core.close()

    # -- internals ----------------------------------------------------------------------
    def _count_transfer(self, fetched: Sequence[BlockKey], started: float) -> None:
        """Bytes and seconds of one fetch over the data plane, by transport."""
        seconds = time.perf_counter() - started
        size = sum(self.core.namespace(k.namespace).block_bytes for k in fetched)
        name = self.transport.name
        self.telemetry.inc("transfer_bytes", size, transport=name, direction="in")
        self.telemetry.inc("transfer_seconds", seconds, transport=name, direction="in")

    def _sync(self) -> None:
        """Report the core's changes to the directory (in order, under one lock)."""
        if self.directory is None:
            self.core.changes.drain()
            return
        with self._sync_lock:
            changes, lost = self.core.changes.drain()
            if changes:
                self.directory.apply_changes(self.node_id, changes)
        if lost:
            self.resync()

    def _local(self, key: BlockKey) -> bytes | None:
        try:
            return self.core.get(key)
        except KVFabricError:
            return None  # unknown namespace here: a miss

    def _ensure_namespace(self, namespace: str, size: int) -> None:
        try:
            self.core.namespace(namespace)
        except KVFabricError:
            self.core.register_namespace(namespace, size)

    @staticmethod
    def _keys(namespace: str, hashes: Sequence[bytes]) -> list[BlockKey]:
        if isinstance(hashes, (bytes, str)):
            raise InvalidArgument("hashes must be a list of 32-byte hashes", "hashes")
        return [BlockKey(namespace, as_block_hash(h, "hashes")) for h in hashes]

    @staticmethod
    def _as_change(meta: Any) -> NodeChange:
        pins = sum(p.count for p in meta.pins.values())
        return NodeChange(
            ChangeKind.STORED, meta.key, meta.tier, meta.size, meta.checksum, meta.type,
            meta.program_id, pins,
        )  # fmt: skip


def _chain(namespace: str, hashes: Sequence[bytes]) -> list[bytes]:
    """A validated hash chain (the lookup hot path: no per-hash key objects)."""
    validate_namespace(namespace)
    if isinstance(hashes, (bytes, str)):
        raise InvalidArgument("hashes must be a list of 32-byte hashes", "hashes")
    chain = [bytes(h) if isinstance(h, (bytearray, memoryview)) else h for h in hashes]
    if not all(type(h) is bytes and len(h) == BLOCK_HASH_BYTES for h in chain):
        raise InvalidArgument(f"every hash must be {BLOCK_HASH_BYTES} bytes", "hashes")
    return chain


def _tier(value: int) -> Tier:
    try:
        return Tier(int(value))
    except (ValueError, TypeError):
        raise InvalidArgument(
            f"unknown tier {value!r}; tiers are 0 GPU, 1 CPU, 2 DISK", "tier"
        ) from None
