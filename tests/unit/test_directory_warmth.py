"""DirectoryCore.warmth: per node, how many leading blocks of a chain it holds, and where."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfabric.directory import DirectoryCore, InventoryItem
from kvfabric.errors import InvalidArgument
from kvfabric.types import BlockHash, BlockKey, Tier

NS = "ns-warm"
NODES = ("n0", "n1", "n2")
ALL = [Tier.GPU, Tier.CPU, Tier.DISK]


def h(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def core_with(layout: list[dict[str, Tier]]) -> DirectoryCore:
    """Block i of the chain lives on the nodes (and tiers) of ``layout[i]``."""
    core = DirectoryCore()
    for n in NODES:
        core.register_node(n, f"{n}.host:7000", ALL)
        items = [InventoryItem(BlockKey(NS, BlockHash(h(i))), t, 100, 1000 + i)
                 for i, where in enumerate(layout) if (t := where.get(n)) is not None]  # fmt: skip
        core.reconcile(n, items)
    return core


def test_warmth_counts_leading_blocks_per_node_best_first() -> None:
    core = core_with([
        {"n0": Tier.DISK, "n1": Tier.GPU},
        {"n0": Tier.CPU, "n1": Tier.GPU},
        {"n0": Tier.CPU},
        {"n1": Tier.GPU, "n2": Tier.GPU},  # n1 holds block 3 but not block 2: not leading
    ])  # fmt: skip
    warm = core.warmth(NS, [h(i) for i in range(4)])
    assert [(w.node_id, w.matched, w.tiers) for w in warm] == [
        ("n0", 3, (Tier.DISK, Tier.CPU, Tier.CPU)),
        ("n1", 2, (Tier.GPU, Tier.GPU)),
        ("n2", 0, ()),
    ]
    assert warm[0].address == "n0.host:7000"
    same_length = core.warmth(NS, [h(0), h(1)])  # a tie on length goes to the faster tiers
    assert [w.node_id for w in same_length] == ["n1", "n0", "n2"]
    entry = core.entry(BlockKey(NS, BlockHash(h(0))))
    assert entry is not None and entry.hits == 0  # routing questions are not reads


def test_warmth_of_unknown_namespace_and_bad_input() -> None:
    core = core_with([{"n0": Tier.CPU}])
    assert [w.matched for w in core.warmth("ns-none", [h(0)])] == [0, 0, 0]
    with pytest.raises(InvalidArgument) as err:
        core.warmth(NS, [b"short"])
    assert err.value.field == "hashes"
    with pytest.raises(InvalidArgument) as err:
        core.warmth("bad/ns", [h(0)])
    assert err.value.field == "namespace"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(NODES), st.sampled_from(ALL), max_size=3),
                max_size=10))  # fmt: skip
def test_warmth_equals_a_brute_force_scan(layout: list[dict[str, Tier]]) -> None:
    core = core_with(layout)
    chain = [h(i) for i in range(len(layout))]
    got = {w.node_id: (w.matched, w.tiers) for w in core.warmth(NS, chain)}
    for n in NODES:
        tiers: list[Tier] = []
        for where in layout:
            if n not in where:
                break
            tiers.append(where[n])
        assert got[n] == (len(tiers), tuple(tiers))
