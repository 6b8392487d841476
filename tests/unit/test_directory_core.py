"""DirectoryCore: write-once claims, reverse index, lookup, event replay, bad input."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfabric.directory import (
    ClaimStatus,
    DirectoryCore,
    Event,
    EventKind,
    InventoryItem,
    decode_event,
)
from kvfabric.errors import (
    Corrupt,
    FailedPrecondition,
    InvalidArgument,
    KVFabricError,
    NotFound,
)
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier

NS = "ns-dir"
ALL = [Tier.GPU, Tier.CPU, Tier.DISK]


def h(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def k(i: int, ns: str = NS) -> BlockKey:
    return BlockKey(ns, BlockHash(h(i)))


def ck(i: int) -> int:
    return 1000 + i  # the checksum of block i's bytes


class Clock:
    """A manual clock for claim deadlines."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_core(nodes: tuple[str, ...] = ("a", "b", "c"), **kw: Any) -> DirectoryCore:
    core = DirectoryCore(**kw)
    for n in nodes:
        core.register_node(n, f"{n}.host:7000", ALL)
    return core


def put(core: DirectoryCore, i: int, node: str, tier: Tier = Tier.CPU) -> None:
    """Claim and commit block ``i`` on ``node``, or add a replica when it is committed."""
    res = core.claim(k(i), node, f"w-{node}", 100)
    if res.status == ClaimStatus.COMMITTED:
        core.add_replica(k(i), node, tier, ck(i))
    else:
        core.commit(k(i), node, f"w-{node}", tier, 100, ck(i))


def check_reverse_index(core: DirectoryCore) -> None:
    """keys_on_node and the node counters agree with the blocks' replicas."""
    blocks = core.state()["blocks"]
    for info in core.nodes():
        held = {key for key, b in blocks.items() if info.node_id in b[4]}
        assert core.keys_on_node(info.node_id) == held
        assert info.blocks == len(held)
        assert info.bytes == sum(blocks[key][0] for key in held)
    assert all(b[4] for b in blocks.values()), "a block without replicas"


# ------------------------------------------------------------------- claims


def test_first_claim_wins_others_pend_and_the_same_writer_is_granted_again() -> None:
    core = make_core()
    first = core.claim(k(1), "a", "w1", 100)
    assert first.status == ClaimStatus.GRANTED and first.holder is not None
    assert [e.kind for e in first.events] == [EventKind.CLAIMED]
    other = core.claim(k(1), "b", "w2", 100)
    assert other.status == ClaimStatus.PENDING and other.holder == first.holder
    assert other.events == ()
    again = core.claim(k(1), "a", "w1", 100)
    assert again.status == ClaimStatus.GRANTED and again.holder is not None
    assert again.holder.writer_id == "w1"


def test_commit_requires_the_callers_claim() -> None:
    core = make_core()
    with pytest.raises(FailedPrecondition) as err:
        core.commit(k(1), "a", "w1", Tier.CPU, 100, ck(1))
    assert err.value.field == "writer_id"
    core.claim(k(1), "a", "w1", 100)
    with pytest.raises(FailedPrecondition) as err:
        core.commit(k(1), "b", "w2", Tier.CPU, 100, ck(1))
    assert err.value.field == "writer_id"
    res = core.commit(k(1), "a", "w1", Tier.CPU, 100, ck(1), BlockType.SYSTEM_PROMPT, "prog")
    assert res.created and [e.kind for e in res.events] == [EventKind.COMMITTED]
    assert core.claim_of(k(1)) is None
    entry = core.entry(k(1))
    assert entry is not None and entry.block_type == BlockType.SYSTEM_PROMPT
    assert entry.program_id == "prog" and [r.node_id for r in entry.replicas] == ["a"]


def test_an_expired_claim_of_a_dead_writer_is_released() -> None:
    clock = Clock()
    core = make_core(claim_timeout_s=10.0, clock=clock)
    core.claim(k(1), "a", "dead", 100)
    core.claim(k(2), "a", "dead", 100)
    clock.t = 9.9
    assert core.claim(k(1), "b", "w2", 100).status == ClaimStatus.PENDING
    assert core.expire_claims() == []
    clock.t = 10.0
    taken = core.claim(k(1), "b", "w2", 100)  # an expired claim is taken over at once
    assert taken.status == ClaimStatus.GRANTED
    assert [e.kind for e in taken.events] == [EventKind.ABORTED, EventKind.CLAIMED]
    expired = core.expire_claims()  # k(2): nobody asked, the sweep releases it
    assert [(e.kind, e.key, e.writer_id) for e in expired] == [(EventKind.ABORTED, k(2), "dead")]
    assert core.claim_of(k(2)) is None
    core.commit(k(1), "b", "w2", Tier.CPU, 100, ck(1))
    # The late writer raced and wrote the same bytes: its commit only adds a replica.
    late = core.commit(k(1), "a", "dead", Tier.DISK, 100, ck(1))
    assert not late.created and [e.kind for e in late.events] == [EventKind.REPLICA_ADDED]
    assert [(loc.node_id, loc.tier) for loc in late.locations] == [
        ("b", Tier.CPU),
        ("a", Tier.DISK),
    ]
    with pytest.raises(FailedPrecondition):
        core.commit(k(2), "a", "dead", Tier.CPU, 100, ck(2))


def test_abort_releases_only_the_callers_claim() -> None:
    core = make_core()
    assert core.abort(k(1), "a", "w1") == []
    core.claim(k(1), "a", "w1", 100)
    with pytest.raises(FailedPrecondition) as err:
        core.abort(k(1), "b", "w2")
    assert err.value.field == "writer_id"
    assert [e.kind for e in core.abort(k(1), "a", "w1")] == [EventKind.ABORTED]
    assert core.claim(k(1), "b", "w2", 100).status == ClaimStatus.GRANTED


def test_eight_concurrent_writers_of_one_key_commit_exactly_once() -> None:
    nodes = tuple(f"n{i}" for i in range(8))
    core = make_core(nodes)
    barrier = threading.Barrier(8)
    first: dict[str, ClaimStatus] = {}
    final: dict[str, Any] = {}

    def writer(node: str) -> None:
        barrier.wait()
        res = core.claim(k(7), node, f"w-{node}", 4096)
        first[node] = res.status
        if res.status == ClaimStatus.GRANTED:
            core.commit(k(7), node, f"w-{node}", Tier.GPU, 4096, ck(7))
        for _ in range(100_000):  # wait for the winner's commit
            res = core.claim(k(7), node, f"w-{node}", 4096)
            if res.status == ClaimStatus.COMMITTED:
                break
        final[node] = res

    threads = [threading.Thread(target=writer, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(s.value for s in first.values()).count("granted") == 1
    winner = next(n for n, s in first.items() if s == ClaimStatus.GRANTED)
    assert all(r.status == ClaimStatus.COMMITTED for r in final.values())
    assert all([loc.node_id for loc in r.locations] == [winner] for r in final.values())
    entry = core.entry(k(7))
    assert entry is not None and entry.checksum == ck(7)
    commits = [e for e in core.events_since(0) if e.kind == EventKind.COMMITTED]
    assert len(commits) == 1


def test_a_committed_block_never_changes() -> None:
    core = make_core()
    put(core, 1, "a")
    before, seq = core.state(), core.seq
    res = core.claim(k(1), "b", "w2", 100)  # claiming a committed key only reports it
    assert res.status == ClaimStatus.COMMITTED and res.events == () and res.holder is None
    assert [loc.node_id for loc in res.locations] == ["a"]
    with pytest.raises(Corrupt) as err:
        core.commit(k(1), "b", "w2", Tier.CPU, 100, ck(1) + 1)
    assert err.value.field == "checksum"
    with pytest.raises(Corrupt) as err:
        core.add_replica(k(1), "b", Tier.CPU, ck(1) + 1)
    assert err.value.field == "checksum"
    assert core.state() == before and core.seq == seq


# -------------------------------------------------------- replicas and nodes


def test_remove_node_uses_the_reverse_index_not_a_scan() -> None:
    core = make_core(("a", "b", "gone"))
    others = [InventoryItem(k(i), Tier.DISK, 100, ck(i)) for i in range(20_000)]
    core.reconcile("b", others)
    for i in range(19_950, 20_050):  # 50 shared with "b", 50 only on "gone"
        put(core, i, "gone", Tier.GPU)
    core.claim(k(90_000), "gone", "w-gone", 100)

    class NoScan(dict[bytes, Any]):
        def _scan(self, *_: Any) -> Any:
            raise AssertionError("remove_node scanned the whole index")

        __iter__ = keys = values = items = _scan

    core._state.index[NS] = NoScan(core._state.index[NS])
    events = core.remove_node("gone")
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.ABORTED) == 1 and kinds.count(EventKind.BLOCK_REMOVED) == 50
    assert kinds[-1] == EventKind.NODE_LEFT
    assert [n.node_id for n in core.nodes()] == ["a", "b"]
    assert core.replica_count(k(19_999)) == 1 and core.replica_count(k(20_000)) == 0
    assert core.claim_of(k(90_000)) is None
    assert len(core.keys_on_node("b")) == 20_000
    with pytest.raises(NotFound):
        core.keys_on_node("gone")


def test_replicas_move_tiers_pin_and_the_last_removal_drops_the_block() -> None:
    core = make_core()
    put(core, 1, "a", Tier.DISK)
    put(core, 1, "b", Tier.CPU)
    assert core.add_replica(k(1), "b", Tier.CPU, ck(1)) == []  # already there
    assert [e.kind for e in core.add_replica(k(1), "a", Tier.GPU, ck(1))] == [
        EventKind.REPLICA_ADDED
    ]
    assert [e.kind for e in core.set_pins(k(1), "a", 2)] == [EventKind.PINS_CHANGED]
    entry = core.entry(k(1))
    assert entry is not None
    assert [(r.node_id, r.tier, r.pins) for r in entry.replicas] == [
        ("a", Tier.GPU, 2),
        ("b", Tier.CPU, 0),
    ]
    assert [e.kind for e in core.remove_replica(k(1), "a")] == [EventKind.REPLICA_REMOVED]
    assert core.remove_replica(k(1), "a") == []
    assert [e.kind for e in core.remove_replica(k(1), "b")] == [EventKind.BLOCK_REMOVED]
    assert core.entry(k(1)) is None and core.keys_on_node("b") == set()
    check_reverse_index(core)


def test_reregistering_updates_the_address_of_every_location() -> None:
    core = make_core()
    put(core, 1, "a")
    core.register_node("a", "new.host:1", ALL)
    assert core.register_node("a", "new.host:1", ALL) == []
    assert core.lookup(NS, [h(1)]).locations[0].address == "new.host:1"
    assert core.locate([k(1)])[0][0].address == "new.host:1"


def test_reconcile_adds_updates_removes_and_rejects() -> None:
    core = make_core()
    put(core, 1, "a", Tier.CPU)  # a moves it to DISK
    put(core, 2, "a")  # a lost it
    put(core, 3, "b")  # a reports other bytes: rejected
    put(core, 4, "a")
    put(core, 4, "b")  # a lost it, b keeps it
    inventory = [
        InventoryItem(k(1), Tier.DISK, 100, ck(1)),
        InventoryItem(k(3), Tier.CPU, 100, ck(3) + 1),
        InventoryItem(k(5), Tier.GPU, 100, ck(5), BlockType.TOOL_DEFINITION, "p", pins=1),
    ]
    res = core.reconcile("a", inventory)
    assert res.rejected == (k(3),)
    assert core.keys_on_node("a") == {k(1), k(5)}
    assert core.locate([k(1)])[0][0].tier == Tier.DISK
    assert core.entry(k(2)) is None and core.replica_count(k(4)) == 1
    assert core.replica_count(k(3)) == 1
    e5 = core.entry(k(5))
    assert (
        e5 is not None and e5.replicas[0].pins == 1 and e5.block_type == BlockType.TOOL_DEFINITION
    )
    assert core.reconcile("a", inventory).events == ()  # idempotent
    check_reverse_index(core)


# -------------------------------------------------------------------- lookup


def test_lookup_prefers_the_local_node_then_the_faster_tier() -> None:
    core = make_core()
    put(core, 0, "a", Tier.DISK)
    put(core, 0, "b", Tier.GPU)
    put(core, 1, "b", Tier.CPU)
    put(core, 1, "c", Tier.CPU)
    put(core, 3, "a")  # after the gap at 2: not matched
    local = core.lookup(NS, [h(0), h(1), h(2), h(3)], prefer_node="a")
    assert local.matched == 2
    assert [(loc.node_id, loc.tier) for loc in local.locations] == [
        ("a", Tier.DISK),
        ("b", Tier.CPU),
    ]
    anywhere = core.lookup(NS, [h(0), h(1)])
    assert [(loc.node_id, loc.tier) for loc in anywhere.locations] == [
        ("b", Tier.GPU),
        ("b", Tier.CPU),
    ]
    assert core.lookup("other-ns", [h(0)]).matched == 0
    entry = core.entry(k(0))
    assert entry is not None and entry.hits == 2  # lookups count hits on matched blocks


layout = st.lists(
    st.dictionaries(st.sampled_from(["n0", "n1", "n2", "n3"]), st.sampled_from(ALL), max_size=4),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(layout, st.one_of(st.none(), st.sampled_from(["n0", "n1", "n2", "n3"])))
def test_lookup_equals_a_brute_force_scan(
    blocks: list[dict[str, Tier]], prefer: str | None
) -> None:
    core = make_core(("n0", "n1", "n2", "n3"))
    for node in ("n0", "n1", "n2", "n3"):
        items = [
            InventoryItem(k(i), t, 100, ck(i))
            for i, b in enumerate(blocks)
            if (t := b.get(node)) is not None
        ]
        core.reconcile(node, items)
    matched = next((i for i, b in enumerate(blocks) if not b), len(blocks))
    want = []
    for b in blocks[:matched]:
        node = prefer if prefer in b else min(b, key=lambda n: (b[n], n))
        want.append((node, f"{node}.host:7000", b[node]))
    got = core.lookup(NS, [h(i) for i in range(len(blocks))], prefer_node=prefer)
    assert got.matched == matched
    assert [(loc.node_id, loc.address, loc.tier) for loc in got.locations] == want


# -------------------------------------------------------- events and replay

NODES = ["a", "b", "c"]
node_st = st.sampled_from(NODES)
key_st = st.integers(0, 5)
tier_st = st.sampled_from(ALL)
op_st = st.one_of(
    st.tuples(st.just("register"), node_st, st.integers(0, 1),
              st.sampled_from([ALL, [Tier.CPU, Tier.DISK]])),
    st.tuples(st.just("remove_node"), node_st, st.integers(0, 3)),
    st.tuples(st.just("put"), key_st, node_st, tier_st, st.booleans()),
    st.tuples(st.just("claim"), key_st, node_st, st.sampled_from(["w0", "w1"])),
    st.tuples(st.just("commit"), key_st, node_st, st.sampled_from(["w0", "w1"]), tier_st,
              st.booleans()),
    st.tuples(st.just("abort"), key_st, node_st, st.sampled_from(["w0", "w1"])),
    st.tuples(st.just("add_replica"), key_st, node_st, tier_st, st.booleans()),
    st.tuples(st.just("remove_replica"), key_st, node_st),
    st.tuples(st.just("set_pins"), key_st, node_st, st.integers(0, 3)),
    st.tuples(st.just("reconcile"), node_st,
              st.lists(st.tuples(key_st, tier_st, st.booleans(), st.integers(0, 2)), max_size=4)),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 20.0])),
)  # fmt: skip


def run_op(core: DirectoryCore, clock: Clock, op: tuple[Any, ...]) -> None:
    name, *a = op

    def good(i: int, ok: bool) -> int:
        return ck(i) if ok else ck(i) + 1

    if name == "register":
        core.register_node(a[0], f"{a[0]}:{a[1]}", a[2])
    elif name == "remove_node":
        if a[1] == 0:  # rarer than the other operations
            core.remove_node(a[0])
    elif name == "put":
        status = core.claim(k(a[0]), a[1], "w-put", 100).status
        if status == ClaimStatus.GRANTED:
            try:
                core.commit(k(a[0]), a[1], "w-put", a[2], 100, good(a[0], a[3]))
            except KVFabricError:
                core.abort(k(a[0]), a[1], "w-put")  # a refused writer releases its claim
        elif status == ClaimStatus.COMMITTED:
            core.add_replica(k(a[0]), a[1], a[2], good(a[0], a[3]))
    elif name == "claim":
        core.claim(k(a[0]), a[1], a[2], 100)
    elif name == "commit":
        core.commit(k(a[0]), a[1], a[2], a[3], 100, good(a[0], a[4]))
    elif name == "abort":
        core.abort(k(a[0]), a[1], a[2])
    elif name == "add_replica":
        core.add_replica(k(a[0]), a[1], a[2], good(a[0], a[3]))
    elif name == "remove_replica":
        core.remove_replica(k(a[0]), a[1])
    elif name == "set_pins":
        core.set_pins(k(a[0]), a[1], a[2])
    elif name == "reconcile":
        items = [InventoryItem(k(i), t, 100, good(i, ok), pins=p) for i, t, ok, p in a[1]]
        core.reconcile(a[0], items)
    else:
        clock.t += a[0]
        core.expire_claims()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, min_size=5, max_size=60), st.data())
def test_restore_from_any_snapshot_plus_later_events_equals_the_live_core(
    ops: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    clock = Clock()
    core = DirectoryCore(claim_timeout_s=10.0, clock=clock)
    snapshots = [core.snapshot()]
    for n in NODES:
        core.register_node(n, f"{n}:0", ALL)
    for op in ops:
        before, seq = core.state(), core.seq
        try:
            run_op(core, clock, op)
        except KVFabricError:
            assert core.state() == before and core.seq == seq, f"{op} failed half-way"
        snapshots.append(core.snapshot())
    check_reverse_index(core)
    events = [decode_event(e.to_bytes()) for e in core.events_since(0, limit=100_000)]
    assert events == core.events_since(0, limit=100_000)
    assert [e.seq for e in events] == list(range(1, core.seq + 1))
    i = data.draw(st.integers(0, len(snapshots) - 1), label="snapshot")
    restored = DirectoryCore.restore(snapshots[i], events)
    assert restored.state() == core.state()
    assert restored.snapshot() == core.snapshot()
    check_reverse_index(restored)
    assert DirectoryCore.restore(None, events).state() == core.state()


def test_restore_drops_pending_claims() -> None:
    core = make_core()
    core.claim(k(1), "a", "w1", 100)
    restored = DirectoryCore.restore(core.snapshot(), core.events_since(0))
    assert restored.claim_of(k(1)) is None and restored.state() == core.state()
    assert restored.claim(k(1), "b", "w2", 100).status == ClaimStatus.GRANTED


def test_events_since_serves_the_ring_and_asks_to_resync_beyond_it() -> None:
    core = make_core(ring_size=8)  # 3 events so far
    for i in range(10):
        put(core, i, "a")  # 2 events each
    assert core.seq == 23
    assert [e.seq for e in core.events_since(20)] == [21, 22, 23]
    assert [e.seq for e in core.events_since(15, limit=2)] == [16, 17]
    assert core.events_since(23) == []
    for bad in (14, 0, 24):
        with pytest.raises(FailedPrecondition) as err:
            core.events_since(bad)
        assert err.value.field == "seq"
    with pytest.raises(FailedPrecondition):
        core.apply(Event(99, EventKind.NODE_LEFT, node_id="a"))


def test_events_round_trip_and_garbage_is_corrupt() -> None:
    core = make_core()
    put(core, 1, "a")
    core.set_pins(k(1), "a", 3)
    core.claim(k(2), "a", "w", 10)
    core.abort(k(2), "a", "w")
    put(core, 1, "b")
    core.remove_replica(k(1), "b")
    core.remove_node("a")
    events = core.events_since(0)
    assert {e.kind for e in events} == set(EventKind)
    assert [Event.from_bytes(e.to_bytes()) for e in events] == events
    for raw in (b"", b"\xc1", b"\x93\x01\x01\x63", events[3].to_bytes()[:-3]):
        with pytest.raises(Corrupt):
            decode_event(raw)


def test_hotness_counts_and_types() -> None:
    core = make_core()
    for i in range(4):
        core.claim(k(i), "a", "w", 100)
        core.commit(k(i), "a", "w", Tier.CPU, 100, ck(i), BlockType(i % 2))
    core.record_access([k(3), k(3), k(3), k(9)])
    core.lookup(NS, [h(0), h(1)])
    core.lookup(NS, [h(0)])
    assert core.hot_keys(10) == [k(3), k(0), k(1)]
    assert core.hot_keys(1, {BlockType.GENERIC}) == [k(0)]
    assert set(core.keys_of_type({BlockType.SYSTEM_PROMPT})) == {k(1), k(3)}


# ------------------------------------------------------------------ bad input

IA, NF, C = InvalidArgument, NotFound, Tier.CPU
BAD: list[tuple[str, Callable[[DirectoryCore], Any], type[KVFabricError], str]] = [
    ("unknown node", lambda c: c.claim(k(3), "zz", "w", 100), NF, "node_id"),
    ("unknown node commit", lambda c: c.commit(k(2), "zz", "w", C, 1, 1), NF, "node_id"),
    ("unknown node remove", lambda c: c.remove_node("zz"), NF, "node_id"),
    ("unknown prefer", lambda c: c.lookup(NS, [h(1)], "zz"), NF, "prefer_node"),
    ("size 0", lambda c: c.claim(k(3), "a", "w", 0), IA, "size"),
    ("size oversized", lambda c: c.claim(k(3), "a", "w", 1 << 40), IA, "size"),
    ("size str", lambda c: c.claim(k(3), "a", "w", "100"), IA, "size"),
    ("size bool", lambda c: c.claim(k(3), "a", "w", True), IA, "size"),
    ("key bytes", lambda c: c.claim(h(3), "a", "w", 100), IA, "key"),
    ("writer empty", lambda c: c.claim(k(3), "a", "", 100), IA, "writer_id"),
    ("tier 7", lambda c: c.commit(k(2), "a", "w", 7, 100, 1), IA, "tier"),
    ("tier str", lambda c: c.commit(k(2), "a", "w", "GPU", 100, 1), IA, "tier"),
    ("tier absent", lambda c: c.commit(k(2), "cpu-only", "w", Tier.GPU, 100, 1),
     IA, "tier"),
    ("checksum neg", lambda c: c.commit(k(2), "a", "w", C, 100, -1), IA, "checksum"),
    ("checksum big", lambda c: c.add_replica(k(1), "b", C, 1 << 64), IA, "checksum"),
    ("block type", lambda c: c.commit(k(2), "a", "w", C, 100, 1, 3), IA, "block_type"),
    ("program id", lambda c: c.commit(k(2), "a", "w", C, 100, 1, BlockType.GENERIC, ""),
     IA, "program_id"),
    ("short hash", lambda c: c.lookup(NS, [h(1), h(2)[:31]]), IA, "hashes"),
    ("str hash", lambda c: c.lookup(NS, [h(1), "x" * 32]), IA, "hashes"),
    ("chain bytes", lambda c: c.lookup(NS, h(1)), IA, "hashes"),
    ("chain too long", lambda c: c.lookup(NS, [h(i) for i in range(17)]), IA, "hashes"),
    ("namespace", lambda c: c.lookup("a/b", [h(1)]), IA, "namespace"),
    ("no tiers", lambda c: c.register_node("d", "d:1", []), IA, "tiers"),
    ("tier 5", lambda c: c.register_node("d", "d:1", [5]), IA, "tiers"),
    ("address", lambda c: c.register_node("d", "", ALL), IA, "address"),
    ("node id", lambda c: c.register_node("d" * 200, "d:1", ALL), IA, "node_id"),
    ("pins", lambda c: c.set_pins(k(1), "a", -1), IA, "pins"),
    ("pins no replica", lambda c: c.set_pins(k(1), "b", 1), NF, "key"),
    ("replica uncommitted", lambda c: c.add_replica(k(2), "a", C, 1), NF, "key"),
    ("inventory item", lambda c: c.reconcile("b", [InventoryItem(k(5), C, 100, 5),
                                                    InventoryItem(k(6), 9, 100, 6)]),
     IA, "tier"),
    ("events seq", lambda c: c.events_since(-1), IA, "seq"),
    ("events limit", lambda c: c.events_since(0, 0), IA, "limit"),
    ("hot limit", lambda c: c.hot_keys(-1), IA, "limit"),
    ("types", lambda c: c.keys_of_type({"x"}), IA, "types"),  # type: ignore[arg-type]
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_a_typed_error_and_changes_nothing(case: tuple[Any, ...]) -> None:
    _, call, error, field = case
    core = make_core(("a", "b"), max_chain=16)
    core.register_node("cpu-only", "c:1", [Tier.CPU])
    put(core, 1, "a")
    core.claim(k(2), "a", "w", 100)
    before, seq, claim = core.state(), core.seq, core.claim_of(k(2))
    with pytest.raises(error) as err:
        call(core)
    assert err.value.field == field
    assert core.state() == before and core.seq == seq and core.claim_of(k(2)) == claim
