"""Replays a trace against one policy on a simulated cluster and measures what it cost.

For each engine read the runner does what kvfabric does for an engine: find
the longest prefix of the chain held anywhere in the cluster (this node's
tiers first, then the fastest replica on another node, which is copied here),
read it, recompute the rest, and store what was computed and generated. A
recomputed block is one that was computed before — it existed once and the
cache lost it; a block computed for the first time is compulsory and costs
every policy the same.

Program-aware runs get the program's hints (and a fork's fan-out copy of the
shared prefix to the target nodes, as the node service does); the LRU and
Bélády baselines get none — LRU is a store that knows no programs, Bélády
knows the whole future instead.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvfabric.errors import KVFabricError, ResourceExhausted
from kvfabric.hints import HintKind, ProgramHint
from kvfabric.node.core import NodeStoreCore
from kvfabric.sim.belady import BeladyPolicy
from kvfabric.sim.cluster import SimCluster, tier_blocks
from kvfabric.sim.config import SimConfig
from kvfabric.sim.trace import Hint, Read, Trace
from kvfabric.tiers.policy import Policy
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier

log = logging.getLogger(__name__)

NS = "sim"
POLICIES = ("program", "lru", "belady")


@dataclass
class PolicyRun:
    """What one policy cost on one trace (tokens, hits, times, cache use) plus invariants."""

    policy: str
    recomputed_tokens: int = 0
    compulsory_tokens: int = 0
    hit_blocks: int = 0
    remote_hit_blocks: int = 0
    recomputed_blocks: int = 0
    stranded_blocks: int = 0  # read misses of blocks that still existed somewhere (behind a gap)
    completion_s: dict[str, float] = field(default_factory=dict)
    cache_use_by_type: dict[str, float] = field(default_factory=dict)  # share of capacity
    max_fill: float = 0.0  # highest used/capacity seen on any tier
    store_failures: int = 0
    hints_refused: int = 0
    fanout_blocks: int = 0
    bytes_conserved: bool = True
    wall_s: float = 0.0

    @property
    def zero_recompute_hit_rate(self) -> float:
        """The issue's metric: among reads of blocks that exist somewhere in the cluster at
        the moment of the read (any node, any tier), the share served without recompute.

        A block that exists but sits behind a gap — an earlier block of its chain
        exists nowhere — cannot be used (prefix semantics) and counts as a miss.
        """
        chances = self.hit_blocks + self.stranded_blocks
        return self.hit_blocks / chances if chances else 1.0

    @property
    def reuse_hit_rate(self) -> float:
        """Hits among reads of blocks that had been computed before, whether or not they
        still existed (blocks the cluster lost count as misses)."""
        chances = self.hit_blocks + self.recomputed_blocks
        return self.hit_blocks / chances if chances else 1.0

    def percentile(self, q: float) -> float:
        """Program completion time at quantile ``q`` (nearest rank)."""
        xs = sorted(self.completion_s.values())
        if not xs:
            return 0.0
        return xs[min(len(xs) - 1, max(0, round(q * len(xs) + 0.5) - 1))]


def block_key(block: int) -> BlockKey:
    """The canonical-looking 32-byte key of a simulated block."""
    return BlockKey(NS, BlockHash(hashlib.blake2b(block.to_bytes(8, "little"),
                                                  digest_size=32).digest()))  # fmt: skip


def block_data(block: int, size: int) -> bytes:
    """The bytes stored for ``block`` (distinct per block, so the checksums are)."""
    return (block.to_bytes(8, "little") * (size // 8 + 1))[:size]


class Replay:
    """One policy, one trace, one fresh cluster; :meth:`run` returns a :class:`PolicyRun`."""

    def __init__(
        self, trace: Trace, cfg: SimConfig, policy: str, *, record: bool = False,
        capacity_blocks: int | None = None,
    ) -> None:  # fmt: skip
        if policy not in POLICIES:
            from kvfabric.errors import InvalidArgument

            raise InvalidArgument(f"unknown policy {policy!r}; known: {POLICIES}", "policy")
        self.trace, self.cfg, self.policy = trace, cfg, policy
        self.now = 0.0
        self.pos = -1
        self.record = record
        self.decisions: list[tuple[int, int, str, bytes, int]] = []
        self.keys: dict[int, BlockKey] = {b: block_key(b) for b in trace.block_type}
        self.block_of = {k: b for b, k in self.keys.items()}
        total = capacity_blocks or max(3, int(trace.working_set_blocks() * cfg.cache_fraction))
        self.blocks_per_tier = tier_blocks(total, cfg.nodes, cfg.tier_shares)
        self.computed: set[int] = set()
        self.result = PolicyRun(policy)
        self._stall: dict[tuple[str, int], float] = {}
        self._samples = 0

    def _make_policy(self) -> Callable[[], Policy] | None:
        if self.policy != "belady":
            return None
        trace = self.trace
        return lambda: BeladyPolicy(lambda k: trace.next_use(self.block_of[k], self.pos))

    def run(self) -> PolicyRun:
        """Replay every event; the cluster is closed afterwards."""
        start = time.perf_counter()
        per_node = sum(self.blocks_per_tier) * self.cfg.block_bytes
        cluster = SimCluster(
            self.cfg.nodes, self.blocks_per_tier, self.cfg.block_bytes, lambda: self.now,
            self._make_policy(), policy="lru" if self.policy == "belady" else self.policy,
            pin_budget_bytes=per_node // 2, program_pin_budget_bytes=per_node // 4,
            max_block_bytes=max(1024, self.cfg.block_bytes),
        )  # fmt: skip
        self.cluster = cluster
        try:
            for n in cluster.nodes:
                n.register_namespace(NS, self.cfg.block_bytes)
            for pos, ev in enumerate(self.trace.events):
                self.pos, self.now = pos, ev.time
                if isinstance(ev, Read):
                    self._read(cluster.nodes, ev)
                elif self.policy == "program":
                    self._hint(cluster.nodes, ev)
                self._after_event(cluster)
            bb = self.cfg.block_bytes
            self.result.bytes_conserved = all(_conserved(n, bb) for n in cluster.nodes)
        finally:
            cluster.close()
        r = self.result
        for pid, nominal in self.trace.nominal_s.items():
            stall = sum(s for (p, _), s in self._stall.items() if p == pid)
            r.completion_s[pid] = nominal + stall
        cap = sum(self.blocks_per_tier) * self.cfg.nodes * max(1, self._samples)
        r.cache_use_by_type = {t: v / cap for t, v in sorted(r.cache_use_by_type.items())}
        r.wall_s = time.perf_counter() - start
        return r

    # -- events --------------------------------------------------------------------------
    def _read(self, nodes: list[NodeStoreCore], ev: Read) -> None:
        cfg, node, r = self.cfg, nodes[ev.node], self.result
        keys = [self.keys[b] for b in ev.chain]
        local = node.contains(keys)
        here: list[int] = []
        fetched: list[tuple[int, int]] = []  # (chain position, source node)
        cost = 0.0
        matched = 0
        for i, key in enumerate(keys):
            if local[i] is not None:
                here.append(i)
                cost += cfg.load_s(int(local[i] or 0), remote=False)
            else:
                src = _best_replica(nodes, ev.node, key)
                if src is None:
                    break
                fetched.append((i, src[0]))
                cost += cfg.load_s(int(src[1]), remote=True)
            matched += 1
        # Past the first block that exists nowhere, a block still held somewhere is unusable.
        r.stranded_blocks += sum(_exists(nodes, key) for key in keys[matched + 1 :])
        if here:
            bufs = [bytearray(cfg.block_bytes) for _ in here]
            node.get_into([keys[i] for i in here], bufs)
        for i, peer in fetched:
            data = _serve(nodes[peer], keys[i])
            if data is not None:
                self._store(node, [ev.chain[i]], [data])
        r.hit_blocks += matched
        r.remote_hit_blocks += len(fetched)
        missing = list(ev.chain[matched:])
        for b in missing:
            if b in self.computed:
                r.recomputed_blocks += 1
                r.recomputed_tokens += cfg.block_tokens
            else:
                r.compulsory_tokens += cfg.block_tokens
                self.computed.add(b)
        cost += len(missing) * cfg.recompute_s
        self._store(node, missing, None)
        self.computed.update(ev.output)
        self._store(node, list(ev.output), None)
        slot = (ev.program, ev.phase)
        self._stall[slot] = max(self._stall.get(slot, 0.0), cost)

    def _store(self, node: NodeStoreCore, blocks: list[int], datas: list[bytes] | None) -> None:
        """Put blocks with their type and program (runs of equal tags go in one call)."""
        i = 0
        while i < len(blocks):
            tag = self._tag(blocks[i])
            j = i
            while j < len(blocks) and self._tag(blocks[j]) == tag:
                j += 1
            run = blocks[i:j]
            data = datas[i:j] if datas is not None else [block_data(b, self.cfg.block_bytes)
                                                          for b in run]  # fmt: skip
            self._put(node, run, data, tag)
            i = j

    def _put(self, node: NodeStoreCore, run: list[int], data: list[bytes],
             tag: tuple[BlockType, str | None]) -> None:  # fmt: skip
        keys = [self.keys[b] for b in run]
        try:
            for tier in (None, *node.tier_list()[1:]):  # all pinned in the fast tier: go lower
                try:
                    node.put_many(keys, data, block_type=tag[0], program_id=tag[1], tier=tier)
                    return
                except ResourceExhausted:
                    continue
            self.result.store_failures += len(run)
        finally:
            self.cluster.sync_replicas()  # the directory learns of every store at once

    def _tag(self, block: int) -> tuple[BlockType, str | None]:
        return self.trace.block_type[block], self.trace.block_program.get(block)

    def _hint(self, nodes: list[NodeStoreCore], ev: Hint) -> None:
        hashes = tuple(self.keys[b].hash for b in ev.blocks)
        hint = ProgramHint(
            ev.program, ev.kind, NS if hashes else "", hashes, ev.step,
            tuple(f"n{t}" for t in ev.targets), ev.children, ev.expected_s,
        )  # fmt: skip
        if ev.kind == HintKind.FORK and ev.targets:
            self._fanout(nodes, ev)
        for i in dict.fromkeys(ev.nodes):  # once per node, even if two children share one
            try:
                nodes[i].hint(hint)
            except KVFabricError as exc:  # a pin budget: the program goes on without the pin
                self.result.hints_refused += 1
                log.debug("hint %s of %s refused on n%d: %s", ev.kind.value, ev.program, i, exc)
            self.cluster.sync_replicas()  # a hint's moves may drop copies another node counts on

    def _fanout(self, nodes: list[NodeStoreCore], ev: Hint) -> None:
        """Copy the fork's shared prefix to the target nodes before the children start."""
        for t in dict.fromkeys(ev.targets):
            have = nodes[t].contains([self.keys[b] for b in ev.blocks])
            todo = [b for b, tier in zip(ev.blocks, have, strict=True) if tier is None]
            for b in todo:
                src = _best_replica(nodes, t, self.keys[b])
                data = _serve(nodes[src[0]], self.keys[b]) if src is not None else None
                if data is None:
                    break  # copy only a prefix: a block past a gap is of no use
                self._store(nodes[t], [b], [data])
                self.result.fanout_blocks += 1

    def _after_event(self, cluster: SimCluster) -> None:
        r, nodes = self.result, cluster.nodes
        cluster.sync_replicas()
        for i, node in enumerate(nodes):
            changes = cluster.take_changes(i)
            if self.record:
                self.decisions += [(self.pos, i, c.kind.value, c.key.hash, int(c.tier))
                                   for c in changes]  # fmt: skip
            for backend in node.tiers.values():
                r.max_fill = max(r.max_fill, backend.used() / backend.capacity())
        if self.pos % self.cfg.sample_every == 0:
            self._samples += 1
            for node in nodes:
                for name, count in node.stats().blocks_by_type.items():
                    r.cache_use_by_type[name] = r.cache_use_by_type.get(name, 0) + count


def _best_replica(nodes: list[NodeStoreCore], here: int, key: BlockKey) -> tuple[int, Tier] | None:
    best: tuple[int, Tier] | None = None
    for j, other in enumerate(nodes):
        if j == here:
            continue
        tier = other.contains([key])[0]
        if tier is not None and (best is None or tier < best[1]):
            best = (j, tier)
    return best


def _serve(peer: NodeStoreCore, key: BlockKey) -> bytes | None:
    """A copy of ``key`` as a peer sends it: through its data plane, which counts an access
    but promotes nothing (a copy leaving a node is no reason to move it up there)."""
    with peer.open_read([key]) as lease:
        buf = lease.buffers[0]
        return None if buf is None else bytes(buf)


def _exists(nodes: list[NodeStoreCore], key: BlockKey) -> bool:
    """Whether any node holds ``key`` in any tier."""
    return any(n.contains([key])[0] is not None for n in nodes)


def _conserved(node: NodeStoreCore, block_bytes: int) -> bool:
    """Every block the node lists reads back verified, and the tiers hold exactly those bytes."""
    metas = node.inventory()
    c = node.counters
    if len(metas) != c.puts - c.evictions - c.checksum_failures:
        return False
    per_tier = {t: 0 for t in node.tiers}
    for m in metas:
        per_tier[m.tier] += m.size
    if any(per_tier[t] != b.used() for t, b in node.tiers.items()):
        return False
    bufs = [bytearray(block_bytes) for _ in metas]
    return all(node.get_into([m.key for m in metas], bufs, promote=False))


def run_policy(trace: Trace, cfg: SimConfig, policy: str, **kw: object) -> PolicyRun:
    """Replay ``trace`` with ``policy`` ("program", "lru" or "belady")."""
    return Replay(trace, cfg, policy, **kw).run()  # type: ignore[arg-type]
