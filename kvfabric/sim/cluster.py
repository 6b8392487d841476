"""The simulated cluster: real node-store cores on small real tiers, one clock.

Each node is a :class:`~kvfabric.node.core.NodeStoreCore` with three real
tiers sized in blocks: a host-memory slab tier standing in for GPU memory
(the simulator models costs; it needs no device), the CPU arena, and an LMDB
disk tier in a temporary directory. LMDB needs headroom for its B-tree, so
the disk tier's *logical* capacity is capped by :class:`CappedTier` while its
bytes really go through LMDB.

The cluster also plays the directory's part for replica counts: it drains
every node's change feed (:meth:`SimCluster.sync_replicas`) and tells each
holder of a key whose copies changed how many other nodes hold it
(``NodeStoreCore.note_replicas``), as the node service does with what the
directory reports.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from kvfabric import integrity
from kvfabric.config import load_config
from kvfabric.errors import ResourceExhausted
from kvfabric.node.changes import ChangeKind, NodeChange
from kvfabric.node.core import NodeStoreCore
from kvfabric.tiers.base import BlockRecord, GetHandle, PutHandle, TierBackend
from kvfabric.tiers.cpu import CpuTier
from kvfabric.tiers.disk import DiskTier
from kvfabric.tiers.policy import Policy
from kvfabric.types import BlockKey, Tier

DISK_MAP_BYTES = 4 << 20


class HbmTier(CpuTier):
    """Host memory registered as the GPU tier: the simulator's stand-in for device memory."""

    tier = Tier.GPU
    config_field = "gpu_bytes"


class CappedTier(TierBackend):
    """A tier whose capacity is ``capacity_bytes`` of block bytes, whatever its backend's is."""

    def __init__(self, inner: TierBackend, capacity_bytes: int) -> None:
        self.inner = inner
        self.tier = inner.tier
        self._capacity = capacity_bytes
        self._published: dict[BlockKey, int] = {}
        self._reserved: dict[int, int] = {}  # id(handle) -> bytes

    def prepare_put(self, records: Sequence[BlockRecord]) -> PutHandle:
        """Reserve within the cap, then in the backend."""
        need = sum(r.size for r in records)
        if need > self._capacity - self.used():
            raise ResourceExhausted(
                f"{self.tier.name} tier: {need} bytes do not fit in the cap of "
                f"{self._capacity} ({self.used()} used)",
                "capacity",
            )
        handle = self.inner.prepare_put(records)
        self._reserved[id(handle)] = need
        return handle

    def complete_put(self, handle: PutHandle) -> None:
        """Publish in the backend; keys already published keep their first copy."""
        self.inner.complete_put(handle)
        self._reserved.pop(id(handle), None)
        for r in handle.records:
            self._published.setdefault(r.key, r.size)

    def abort_put(self, handle: PutHandle) -> None:
        """Release the reservation."""
        self.inner.abort_put(handle)
        self._reserved.pop(id(handle), None)

    def prepare_get(self, keys: Sequence[BlockKey]) -> GetHandle:
        """Lease from the backend."""
        return self.inner.prepare_get(keys)

    def complete_get(self, handle: GetHandle) -> None:
        """End the backend lease."""
        self.inner.complete_get(handle)

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each key is published."""
        return self.inner.contains(keys)

    def remove(self, keys: Sequence[BlockKey]) -> int:
        """Remove from the backend and the cap's count."""
        for k in keys:
            self._published.pop(k, None)
        return self.inner.remove(keys)

    def can_fit(self, sizes: Sequence[int]) -> bool:
        """Whether ``sizes`` fit under the cap (the backend has headroom by construction)."""
        return sum(sizes) <= self._capacity - self.used()

    def capacity(self) -> int:
        """The cap."""
        return self._capacity

    def used(self) -> int:
        """Published plus reserved bytes under the cap."""
        return sum(self._published.values()) + sum(self._reserved.values())

    def write(self, handle: PutHandle, srcs: Sequence[integrity.Buffer]) -> list[int]:
        """Write through the backend."""
        return self.inner.write(handle, srcs)

    def read(self, handle: GetHandle, dsts: Sequence[integrity.Buffer | None]) -> list[int | None]:
        """Read through the backend."""
        return self.inner.read(handle, dsts)

    def close(self) -> None:
        """Close the backend."""
        self.inner.close()


def tier_blocks(total_blocks: int, nodes: int, shares: Sequence[float]) -> list[int]:
    """Blocks per tier (GPU, CPU, disk) of one node, for a cluster cache of ``total_blocks``."""
    per_node = max(3, total_blocks // nodes)
    sizes = [math.floor(per_node * s) for s in shares]
    sizes[1] = max(2, sizes[1] + per_node - sum(sizes))  # rounding goes to the CPU tier
    return sizes


class SimCluster:
    """``nodes`` node stores sharing the simulated clock; closes and deletes its tiers."""

    def __init__(
        self,
        nodes: int,
        blocks_per_tier: Sequence[int],
        block_bytes: int,
        clock: Callable[[], float],
        make_policy: Callable[[], Policy] | None = None,
        **config: object,
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kvfabric-sim-"))
        self.block_bytes = block_bytes
        self.nodes: list[NodeStoreCore] = []
        self.drained: list[list[NodeChange]] = [[] for _ in range(nodes)]
        self._holders: dict[BlockKey, dict[int, None]] = {}  # key -> nodes holding it
        try:
            for i in range(nodes):
                self.nodes.append(self._node(i, blocks_per_tier, clock, make_policy, config))
        except BaseException:
            self.close()
            raise

    def _node(
        self,
        i: int,
        blocks: Sequence[int],
        clock: Callable[[], float],
        make_policy: Callable[[], Policy] | None,
        overrides: dict[str, object],
    ) -> NodeStoreCore:
        bb = self.block_bytes
        cfg = load_config(
            overrides={"data_dir": str(self.root / f"n{i}"), "cpu_prefault": False, **overrides},
            env={},
        )
        tiers: dict[Tier, TierBackend] = {}
        if blocks[0] > 0:
            tiers[Tier.GPU] = HbmTier(blocks[0] * bb, bb, prefault=False)
        tiers[Tier.CPU] = CpuTier(blocks[1] * bb, bb, prefault=False)
        if blocks[2] > 0:
            disk = DiskTier(  # a scratch tier: no fsync needed
                self.root / f"n{i}" / "disk", DISK_MAP_BYTES, max_block_bytes=bb,
                sync_interval_s=3600.0,
            )  # fmt: skip
            tiers[Tier.DISK] = CappedTier(disk, blocks[2] * bb)
        policy = make_policy() if make_policy is not None else None
        return NodeStoreCore(cfg, tiers=tiers, clock=clock, selftest=False, policy=policy)

    def sync_replicas(self) -> None:
        """Drain the change feeds (kept in ``drained``) and report changed replica counts."""
        changed: dict[BlockKey, None] = {}  # insertion-ordered: the same order every run
        for i, node in enumerate(self.nodes):
            changes, _ = node.changes.drain()
            self.drained[i] += changes
            for c in changes:
                if c.kind == ChangeKind.STORED:
                    self._holders.setdefault(c.key, {})[i] = None
                elif c.kind == ChangeKind.DROPPED:
                    self._holders.get(c.key, {}).pop(i, None)
                else:
                    continue
                changed[c.key] = None
        tell: dict[int, tuple[list[BlockKey], list[int]]] = {}
        for key in changed:
            held = self._holders.get(key, {})
            if not held:
                self._holders.pop(key, None)
            for i in held:
                keys, counts = tell.setdefault(i, ([], []))
                keys.append(key)
                counts.append(len(held) - 1)
        for i, (keys, counts) in tell.items():
            self.nodes[i].note_replicas(keys, counts)

    def take_changes(self, i: int) -> list[NodeChange]:
        """The changes of node ``i`` drained since the last call."""
        out, self.drained[i] = self.drained[i], []
        return out

    def capacity_blocks(self) -> int:
        """Blocks the whole cluster can hold."""
        return sum(t.capacity() // self.block_bytes for n in self.nodes for t in n.tiers.values())

    def close(self) -> None:
        """Release every tier and delete the temporary directory."""
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.root, ignore_errors=True)
