"""Invariants of the node store under random operation sequences (hypothesis).

* a tier never holds more than its capacity;
* a pinned block is never evicted, demoted or lost;
* committed bytes never change: every hit returns the first bytes put;
* lookup equals a brute-force longest-prefix scan.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfabric.errors import FailedPrecondition, ResourceExhausted
from kvfabric.types import Tier
from tests.conftest import NS, block, key, make_store

B = 16 * 1024
KEYS = 20

op = st.one_of(
    st.tuples(st.just("put"), st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=6),
              st.integers(0, 3)),
    st.tuples(st.just("get"), st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=6)),
    st.tuples(st.just("pin"), st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=4)),
    st.tuples(st.just("unpin"), st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=4)),
    st.tuples(st.just("evict"), st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=4)),
    st.tuples(st.just("move"), st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=4),
              st.sampled_from([Tier.CPU, Tier.DISK])),
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=40), st.booleans())
def test_random_operations_keep_the_invariants(ops: list[tuple], with_disk: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = make_store(
            Path(d), disk_enabled=with_disk, disk_bytes="2MiB", cpu_arena_bytes="128KiB",
            pin_budget_bytes=4 * B,
        )  # fmt: skip
        store.register_namespace(NS, B)
        first: dict[int, bytes] = {}  # the bytes of a key's first successful put
        pinned: set[int] = set()
        pinned_tier: dict[int, Tier | None] = {}  # only an explicit move changes these
        for o in ops:
            name, ids = o[0], o[1]
            try:
                if name == "put":
                    version = o[2]  # later puts of a key carry other bytes
                    datas = [block(i * 10 + version, B) for i in ids]
                    results = store.put_many([key(i) for i in ids], datas)
                    for i, data, r in zip(ids, datas, results, strict=True):
                        if r.stored:
                            first[i] = data
                elif name == "get":
                    for i in ids:
                        got = store.get(key(i))
                        assert got is None or got == first[i]
                elif name == "pin":
                    res = store.pin([key(i) for i in ids], owner="t")
                    pinned.update(i for i in ids if key(i) in res.pinned)
                elif name == "unpin":
                    store.unpin([key(i) for i in ids], owner="t", all_counts=True)
                    pinned.difference_update(ids)
                    for i in ids:
                        pinned_tier.pop(i, None)
                elif name == "evict":
                    store.evict([key(i) for i in ids])
                    assert not pinned & set(ids)
                else:
                    store.move([key(i) for i in ids], o[2])
            except (ResourceExhausted, FailedPrecondition):
                pass
            for backend in store.tiers.values():
                assert backend.used() <= backend.capacity()
            present = store.contains([key(i) for i in range(KEYS)])
            assert all(present[i] is not None for i in pinned), "a pinned block was lost"
            for i in pinned:
                if name != "move" and i in pinned_tier:
                    assert present[i] == pinned_tier[i], "a pinned block was pushed down"
                pinned_tier[i] = present[i]
            for i, tier in enumerate(present):
                if tier is None:
                    first.pop(i, None)
            stats = store.stats()
            assert stats.pinned_blocks == len(pinned)
            assert stats.pinned_bytes <= 4 * B
        chain = [key(i) for i in range(KEYS)]
        expected = 0
        while expected < KEYS and store.contains([chain[expected]])[0] is not None:
            expected += 1
        assert store.lookup(NS, [k.hash for k in chain]).matched == expected
        for i, data in first.items():
            assert store.get(key(i)) == data
        store.close()
