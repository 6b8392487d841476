"""The node-store core on real tiers (host arena + LMDB): the behaviour users rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvfabric.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvfabric.node.core import NodeStoreCore
from kvfabric.types import BlockType, Tier
from tests.conftest import NS, block, key, make_store

B = 16 * 1024  # block bytes of NS; the CPU tier holds 16 of them


def test_put_get_roundtrip_and_write_once(store: NodeStoreCore) -> None:
    r = store.put(key(1), block(1, B), block_type=BlockType.SYSTEM_PROMPT, program_id="p1")
    assert r.stored and r.tier == Tier.CPU
    again = store.put(key(1), block(2, B))  # different bytes, same key
    assert not again.stored and again.checksum == r.checksum
    assert store.get(key(1)) == block(1, B)
    meta = store.meta(key(1))
    assert meta is not None and meta.type == BlockType.SYSTEM_PROMPT and meta.program_id == "p1"
    assert store.get(key(99)) is None
    assert store.stats().counters.dedup_puts == 1


def test_bad_input_is_typed_and_changes_nothing(store: NodeStoreCore) -> None:
    store.put(key(1), block(1, B))
    with pytest.raises(InvalidArgument) as err:
        store.put(key(2), block(2, B - 1))
    assert err.value.field == "data"
    with pytest.raises(NotFound) as nf:
        store.put(key(3, ns="ns-other"), block(3, B))
    assert nf.value.field == "namespace"
    with pytest.raises(AlreadyExists):
        store.register_namespace(NS, B * 2)
    with pytest.raises(InvalidArgument) as too_big:
        store.register_namespace("ns-big", 1 << 30)
    assert too_big.value.field == "block_bytes"
    with pytest.raises(InvalidArgument):
        store.put_many([key(4), key(5)], [block(4, B)])
    with pytest.raises(InvalidArgument):  # a batch with one bad block stores none of it
        store.put_many([key(6), key(7)], [block(6, B), b"short"])
    assert store.contains([key(1), key(2), key(6), key(7)]) == [Tier.CPU, None, None, None]
    assert store.get(key(1)) == block(1, B)


def test_full_cpu_tier_demotes_to_disk_and_promotes_on_read(store: NodeStoreCore) -> None:
    n = 40
    store.put_many([key(i) for i in range(n)], [block(i, B) for i in range(n)])
    tiers = store.contains([key(i) for i in range(n)])
    assert tiers.count(Tier.CPU) <= 16 and tiers.count(Tier.DISK) == n - tiers.count(Tier.CPU)
    assert tiers[0] == Tier.DISK and tiers[-1] == Tier.CPU  # LRU pushed the oldest down
    cpu = store.tiers[Tier.CPU]
    assert cpu.used() <= cpu.capacity()
    assert store.get(key(0)) == block(0, B)
    assert store.contains([key(0)]) == [Tier.CPU]  # promoted by the LRU policy
    for i in range(n):
        assert store.get(key(i)) == block(i, B)
    stats = store.stats().counters
    assert stats.demotions >= n - 16 and stats.promotions >= 1 and stats.evictions == 0


def test_pinned_blocks_are_never_pushed_out(tmp_path: Path) -> None:
    store = make_store(tmp_path, disk_enabled=False)
    store.register_namespace(NS, B)
    keys = [key(i) for i in range(16)]
    store.put_many(keys, [block(i, B) for i in range(16)])
    assert store.pin(keys, owner="ops").new_bytes == 16 * B
    with pytest.raises(ResourceExhausted, match="pinned"):
        store.put(key(100), block(100, B))
    assert all(t == Tier.CPU for t in store.contains(keys))
    assert store.unpin(keys[:1], owner="ops") == 1
    store.put(key(100), block(100, B))  # now the one unpinned block makes room
    assert store.contains([keys[0]]) == [None]
    assert all(t == Tier.CPU for t in store.contains(keys[1:]))
    store.close()


def test_pin_budget_counted_pins_and_ttl(tmp_path: Path) -> None:
    now = [1000.0]
    store = make_store(tmp_path, pin_budget_bytes=2 * B, clock=lambda: now[0])
    store.register_namespace(NS, B)
    store.put_many([key(i) for i in range(3)], [block(i, B) for i in range(3)])
    with pytest.raises(ResourceExhausted) as err:
        store.pin([key(0), key(1), key(2)], owner="a")
    assert err.value.field == "pin_budget_bytes"
    assert store.stats().pinned_blocks == 0  # all or nothing
    res = store.pin([key(0), key(1), key(55)], owner="a", ttl_s=10)
    assert res.missing == (key(55),) and len(res.pinned) == 2
    store.pin([key(0)], owner="a")  # counted: a second pin by the same owner
    store.pin([key(0)], owner="b")  # shared blocks count once against the budget
    assert store.stats().pinned_bytes == 2 * B
    with pytest.raises(FailedPrecondition):
        store.evict([key(0)])
    assert store.unpin([key(0)], owner="a") == 0  # one of a's two counts left
    now[0] += 11  # a's TTL ends (a re-pinned key(0) without TTL, so key(0) keeps a and b)
    stats = store.stats()
    assert stats.counters.pins_expired == 1 and stats.pinned_blocks == 1
    with pytest.raises(InvalidArgument) as bad:
        store.pin([key(1)], owner="a", ttl_s=-1)
    assert bad.value.field == "ttl_s"
    with pytest.raises(InvalidArgument):
        store.pin([key(1)], owner="")
    store.unpin([key(0)], owner="a", all_counts=True)
    store.unpin([key(0)], owner="b")
    assert store.evict([key(0), key(1)]) == 2
    store.close()


def test_move_and_prefetch_verify_and_report(store: NodeStoreCore) -> None:
    keys = [key(i) for i in range(4)]
    store.put_many(keys, [block(i, B) for i in range(4)])
    res = store.move(keys[:2], Tier.DISK)
    assert set(res.moved) == set(keys[:2])
    assert store.contains(keys) == [Tier.DISK, Tier.DISK, Tier.CPU, Tier.CPU]
    before = store.stats().counters
    pf = store.prefetch([*keys, key(77)])
    assert set(pf.moved) == set(keys[:2]) and set(pf.unchanged) == set(keys[2:])
    after = store.stats().counters
    assert after.promotions - before.promotions == 2 and after.demotions == before.demotions
    assert pf.missing == (key(77),)
    with pytest.raises(FailedPrecondition) as err:
        store.move(keys, Tier.GPU)
    assert err.value.field == "tier"
    for i, k in enumerate(keys):
        assert store.get(k) == block(i, B)


def test_corrupt_cpu_bytes_are_a_miss_never_served(store: NodeStoreCore) -> None:
    store.put_many([key(1), key(2)], [block(1, B), block(2, B)])
    cpu = store.tiers[Tier.CPU]
    off = cpu.slot_offset(key(1))  # type: ignore[attr-defined]
    cpu.arena.view[off + 100] ^= 0xFF  # type: ignore[attr-defined]
    assert store.get(key(1)) is None
    assert store.contains([key(1)]) == [None]
    assert store.stats().counters.checksum_failures == 1
    off2 = cpu.slot_offset(key(2))  # type: ignore[attr-defined]
    cpu.arena.view[off2] ^= 0x01  # type: ignore[attr-defined]
    res = store.move([key(2)], Tier.DISK)
    assert res.corrupt == (key(2),) and store.contains([key(2)]) == [None]
    assert store.put(key(1), block(1, B)).stored  # recomputed bytes can be stored again
    assert store.get(key(1)) == block(1, B)


def test_disk_blocks_survive_a_restart(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.register_namespace(NS, B)
    keys = [key(i) for i in range(6)]
    store.put_many(keys, [block(i, B) for i in range(6)], block_type=BlockType.TOOL_DEFINITION)
    store.move(keys, Tier.DISK)
    store.close()
    again = make_store(tmp_path)
    assert again.contains(keys) == [Tier.DISK] * 6
    assert again.namespace(NS).block_bytes == B
    meta = again.meta(keys[3])
    assert meta is not None and meta.type == BlockType.TOOL_DEFINITION
    assert [again.get(k) for k in keys] == [block(i, B) for i in range(6)]
    again.close()


def test_lookup_longest_prefix(store: NodeStoreCore) -> None:
    chain = [key(i) for i in range(10)]
    store.put_many(chain[:4] + chain[5:7], [block(i, B) for i in (0, 1, 2, 3, 5, 6)])
    store.move([chain[2]], Tier.DISK)
    res = store.lookup(NS, [k.hash for k in chain])
    assert res.matched == 4 and res.tiers == (Tier.CPU, Tier.CPU, Tier.DISK, Tier.CPU)
    assert store.lookup(NS, []).matched == 0
    with pytest.raises(NotFound):
        store.lookup("ns-nope", [chain[0].hash])


def test_everything_pinned_and_no_disk_is_resource_exhausted_not_loss(tmp_path: Path) -> None:
    store = make_store(tmp_path, disk_enabled=False)
    store.register_namespace(NS, B)
    keys = [key(i) for i in range(16)]
    store.put_many(keys, [block(i, B) for i in range(16)])
    store.pin(keys, owner="x")
    with pytest.raises(ResourceExhausted):
        store.put_many([key(50), key(51)], [block(50, B), block(51, B)])
    assert [store.get(k) for k in keys] == [block(i, B) for i in range(16)]
    store.close()


def test_write_reservation_publishes_only_verified_blocks(store: NodeStoreCore) -> None:
    from kvfabric import integrity
    from kvfabric.tiers.base import BlockRecord

    store.put(key(9), block(9, B))
    recs = [BlockRecord(key(i), B, integrity.checksum(block(i, B))) for i in (1, 2, 9)]
    res = store.open_write(recs)
    assert res.present == [key(9)] and [r.key for r in res.records] == [key(1), key(2)]
    assert store.contains([key(1)]) == [None]  # nothing visible before commit
    res.buffers[0][:] = block(1, B)
    res.buffers[1][:] = block(3, B)  # wrong bytes for key(2)
    out = res.commit()
    assert out[0] is not None and out[1] is None
    assert store.get(key(1)) == block(1, B) and store.contains([key(2)]) == [None]
    assert store.stats().counters.checksum_failures == 1
    aborted = store.open_write([BlockRecord(key(4), B, 0)])
    aborted.abort()
    assert store.contains([key(4)]) == [None]
    with pytest.raises(InvalidArgument) as err:
        store.open_write([BlockRecord(key(5), B + 1, 0)])
    assert err.value.field == "size"


def test_read_lease_stays_valid_while_the_block_is_evicted(store: NodeStoreCore) -> None:
    store.put_many([key(1), key(2)], [block(1, B), block(2, B)])
    store.move([key(2)], Tier.DISK)
    with store.open_read([key(1), key(2), key(3)]) as lease:
        assert lease.buffers[2] is None and lease.checksums[2] is None
        store.evict([key(1)])
        store.put_many([key(i) for i in range(10, 30)], [block(i, B) for i in range(10, 30)])
        assert bytes(lease.buffers[0]) == block(1, B)  # type: ignore[arg-type]
        assert bytes(lease.buffers[1]) == block(2, B)  # type: ignore[arg-type]


def test_change_feed_reports_what_the_directory_must_learn(store: NodeStoreCore) -> None:
    from kvfabric.node.changes import ChangeFeed, ChangeKind

    store.changes.drain()
    store.put(key(1), block(1, B))
    store.move([key(1)], Tier.DISK)
    store.pin([key(1)], owner="o")
    store.unpin([key(1)], owner="o")
    store.evict([key(1)])
    changes, lost = store.changes.drain()
    assert [c.kind for c in changes] == [
        ChangeKind.STORED,
        ChangeKind.MOVED,
        ChangeKind.PINS,
        ChangeKind.PINS,
        ChangeKind.DROPPED,
    ]
    assert changes[1].tier == Tier.DISK and changes[2].pins == 1 and changes[3].pins == 0
    assert not lost and store.changes.drain() == ([], False)
    small = ChangeFeed(maxlen=2)
    store.put(key(2), block(2, B))
    meta = store.meta(key(2))
    assert meta is not None
    for _ in range(3):
        small.record(ChangeKind.STORED, meta)
    assert small.drain()[1] is True  # overflow tells the shell to resync


def test_annotate_sets_type_program_and_ttl(tmp_path: Path) -> None:
    now = [0.0]
    store = make_store(tmp_path, clock=lambda: now[0])
    store.register_namespace(NS, B)
    store.put_many([key(1), key(2)], [block(1, B), block(2, B)])
    n = store.annotate([key(1), key(2), key(3)], block_type=BlockType.TOOL_DEFINITION,
                       program_id="agent-7", ttl_s=5)  # fmt: skip
    assert n == 2
    meta = store.meta(key(1))
    assert meta is not None and meta.type == BlockType.TOOL_DEFINITION
    assert meta.program_id == "agent-7"
    store.pin([key(2)], owner="keep")
    now[0] = 6.0
    assert store.contains([key(1), key(2)]) == [None, Tier.CPU]  # TTL over; the pin holds key(2)
    with pytest.raises(InvalidArgument) as err:
        store.annotate([key(2)], ttl_s=-1)
    assert err.value.field == "ttl_s"
    with pytest.raises(InvalidArgument) as err2:
        store.annotate([key(2)], program_id="x" * 500)
    assert err2.value.field == "program_id"
    store.close()


def test_program_hints_are_validated() -> None:
    from kvfabric.hints import HintKind, ProgramHint

    ok = ProgramHint("p1", HintKind.FORK, NS, (key(1).hash,), targets=("n1",), children=3)
    assert ok.children == 3
    for bad, field in (
        (lambda: ProgramHint("", HintKind.STEP_START), "program_id"),
        (lambda: ProgramHint("p", HintKind.FORK, NS, (b"short",)), "hashes"),
        (lambda: ProgramHint("p", HintKind.TOOL_CALL_START, expected_duration_s=-1.0),
         "expected_duration_s"),
        (lambda: ProgramHint("p", HintKind.JOIN, step=-2), "step"),
        (lambda: ProgramHint("p", "fork"), "kind"),  # type: ignore[arg-type]
    ):  # fmt: skip
        with pytest.raises(InvalidArgument) as err:
            bad()
        assert err.value.field == field
