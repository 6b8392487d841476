"""NodeStoreService: one node's store joined to the cluster, without Ray in it.

This is the class the ``NodeStore`` Ray actor wraps (the shape of Ray's
``util/queue.py``): it owns the node-store core and the data-plane server, and
talks to the directory through a :class:`~kvfabric.node.port.DirectoryPort`,
an object with plain synchronous methods. Tests drive it with the real
directory actor; nothing here imports Ray.

Write-once-read-anywhere is enforced by two parts it owns: a put claims its
keys in the directory first and stores only what it won
(:mod:`~kvfabric.node.writeonce`); a get that misses locally asks the
directory where the blocks are and pulls them from a peer over the data plane,
keeping a local replica (:mod:`~kvfabric.node.pulls`). Membership, control
calls, events, and the report of each call's changes to the directory stay here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvfabric.config import KVFabricConfig
from kvfabric.errors import FailedPrecondition, InvalidArgument, KVFabricError
from kvfabric.hints import HintKind, ProgramHint
from kvfabric.metrics import Telemetry
from kvfabric.node.core import NodeStoreCore
from kvfabric.node.listing import BlockFilter, BlockPage, list_page
from kvfabric.node.port import DirectoryPort, stored_change
from kvfabric.node.pulls import PeerPulls
from kvfabric.node.results import MoveResult, NodeStats, PinResult
from kvfabric.node.writeonce import ClaimedWrite, PutOutcome, WriteOnce
from kvfabric.transfer import make_transport
from kvfabric.types import (
    BLOCK_HASH_BYTES,
    BlockKey,
    BlockType,
    Tier,
    as_block_hash,
    validate_namespace,
)

__all__ = ["ClaimedWrite", "DirectoryPort", "NodeStoreService", "PutOutcome"]

log = logging.getLogger(__name__)


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
        # The write-once and peer-pull paths; both report the core's changes via _sync.
        self._writes = WriteOnce(node_id, self.core, directory, config, self._sync)
        self._pulls = PeerPulls(
            node_id, self.core, directory, self.transport, config.rpc_timeout_s,
            ensure_namespace=self._ensure_namespace, count_transfer=self._count_transfer,
            report=self._sync,
        )  # fmt: skip
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
            inventory = [stored_change(m) for m in self.core.inventory()]
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
        return self._writes.put(keys, datas, block_type, program_id)

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
        return self._pulls.pull_missing(keys)

    def pull_from(self, address: str, namespace: str, hashes: Sequence[bytes], size: int) -> int:
        """Copy blocks from the peer at ``address`` (used by the replication planner)."""
        return self._pulls.pull_from(address, self._keys(namespace, hashes), namespace, size)

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
        return self._writes.open(keys, size, block_type, program_id)

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
