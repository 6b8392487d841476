"""Program-aware decisions on a real node-store core: leases, forks, joins, budgets, bad hints.

Every test drives a real NodeStoreCore on small real tiers (a host slab tier
registered as the GPU tier, the CPU arena, LMDB) with a manual clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvfabric.config import load_config
from kvfabric.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvfabric.hints import HintKind, ProgramHint
from kvfabric.node.core import NodeStoreCore
from kvfabric.sim.cluster import SimCluster
from kvfabric.tiers.program import ProgramAwarePolicy
from kvfabric.types import BlockHash, BlockKey, BlockType, Tier

NS = "ns-prog"
B = 256


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def h(i: int) -> BlockHash:
    return BlockHash(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest())


def k(i: int) -> BlockKey:
    return BlockKey(NS, h(i))


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    clusters: list[SimCluster] = []

    def build(gpu: int, cpu: int, disk: int, **cfg: Any) -> tuple[NodeStoreCore, Clock]:
        clock = Clock()
        cluster = SimCluster(1, [gpu, cpu, disk], B, clock, **cfg)
        clusters.append(cluster)
        core = cluster.nodes[0]
        core.register_namespace(NS, B)
        return core, clock

    yield build
    for c in clusters:
        c.close()


def put(core: NodeStoreCore, ids: range | list[int], program: str | None = None,
        btype: BlockType = BlockType.GENERIC) -> None:  # fmt: skip
    core.put_many([k(i) for i in ids], [bytes([i % 256]) * B for i in ids],
                  block_type=btype, program_id=program)  # fmt: skip


def hint(core: NodeStoreCore, pid: str, kind: HintKind, ids: range | list[int] = (),  # type: ignore[assignment]
         **kw: Any) -> None:  # fmt: skip
    hashes = tuple(h(i) for i in ids)
    core.hint(ProgramHint(pid, kind, NS if hashes else "", hashes, **kw))


def tiers(core: NodeStoreCore, ids: range | list[int]) -> list[Tier | None]:
    return core.contains([k(i) for i in ids])


def snapshot(core: NodeStoreCore) -> tuple[Any, ...]:
    inv = sorted((m.key.hash, m.tier, tuple(sorted(m.pins))) for m in core.inventory())
    return (inv, core.pins.total_pinned_bytes(), len(core.programs))


def test_program_policy_is_the_default(make: Any) -> None:
    assert load_config(env={}).policy == "program"
    core, _ = make(2, 2, 2)
    assert isinstance(core.policy, ProgramAwarePolicy)


def test_tool_call_start_demotes_not_evicts_and_end_prefetches(make: Any) -> None:
    core, clock = make(4, 8, 8)
    hint(core, "p", HintKind.PROGRAM_START)
    put(core, range(4), "p")
    assert tiers(core, range(4)) == [Tier.GPU] * 4
    hint(core, "p", HintKind.TOOL_CALL_START, range(4), expected_duration_s=5.0)
    assert tiers(core, range(4)) == [Tier.CPU] * 4  # out of device memory, still here
    clock.t = 1.0
    put(core, range(10, 14), "q")  # another program computes in the freed GPU tier
    assert tiers(core, range(10, 14)) == [Tier.GPU] * 4
    assert core.counters.evictions == 0
    clock.t = 5.0
    hint(core, "p", HintKind.TOOL_CALL_END)
    assert tiers(core, range(4)) == [Tier.GPU] * 4  # back before the next step reads it


def test_on_host_memory_a_leased_context_goes_down_first_and_is_not_dropped(make: Any) -> None:
    core, clock = make(0, 4, 8)  # a CPU-only node: the lease is lazy
    hint(core, "p", HintKind.PROGRAM_START)
    hint(core, "q", HintKind.PROGRAM_START)
    put(core, range(2), "p")
    clock.t = 1.0
    put(core, range(10, 12), "q")
    hint(core, "p", HintKind.TOOL_CALL_START, range(2), expected_duration_s=30.0)
    assert tiers(core, range(2)) == [Tier.CPU] * 2  # no GPU tier: nothing moves yet
    clock.t = 2.0
    put(core, range(12, 14), "q")  # the CPU tier is full: make room
    assert tiers(core, range(2)) == [Tier.DISK] * 2  # p's context went down, not away
    assert tiers(core, range(10, 14)) == [Tier.CPU] * 4  # while q, which is running, stays
    assert core.counters.evictions == 0


def test_fork_pins_the_prefix_until_join_and_join_releases_branches_first(make: Any) -> None:
    core, clock = make(0, 8, 0)
    for pid in ("p", "o"):
        hint(core, pid, HintKind.PROGRAM_START)
    put(core, range(3), "p")
    hint(core, "p", HintKind.FORK, range(3), children=2)
    assert all(m.pinned for m in map(core.meta, [k(i) for i in range(3)]) if m)
    with pytest.raises(FailedPrecondition):
        core.evict([k(0)])
    assert core.pins.program_pinned_bytes("p") == 3 * B
    clock.t = 1.0
    put(core, [10, 11], "p", BlockType.REASONING_BRANCH)  # branch A (kept)
    put(core, [20, 21], "p", BlockType.REASONING_BRANCH)  # branch B (abandoned)
    clock.t = 2.0
    put(core, [30], "o")
    hint(core, "p", HintKind.JOIN, [0, 1, 2, 10, 11])
    assert core.pins.program_pinned_bytes("p") == 0
    assert not any(m.pinned for m in map(core.meta, [k(i) for i in range(3)]) if m)
    policy = core.policy
    assert isinstance(policy, ProgramAwarePolicy)
    assert [policy.is_dead(k(i)) for i in (10, 11, 20, 21, 0, 30)] == [False] * 2 + [True] * 2 + [
        False
    ] * 2
    clock.t = 3.0
    put(core, [40, 41], "o")  # the tier is full: the abandoned branch goes first
    assert tiers(core, [20, 21]) == [None, None]
    assert None not in tiers(core, [0, 1, 2, 10, 11, 30, 40, 41])


def test_program_end_makes_its_blocks_dead_but_not_durable_ones(make: Any) -> None:
    core, _ = make(0, 6, 0)
    hint(core, "p", HintKind.PROGRAM_START)
    put(core, [1, 2], "p")
    put(core, [3], "p", BlockType.SYSTEM_PROMPT)
    hint(core, "p", HintKind.PROGRAM_END)
    policy = core.policy
    assert isinstance(policy, ProgramAwarePolicy)
    assert [policy.is_dead(k(i)) for i in (1, 2, 3)] == [True, True, False]
    core.get(k(1))  # read again after all: alive
    assert not policy.is_dead(k(1))
    with pytest.raises(NotFound):  # the program is gone
        hint(core, "p", HintKind.STEP_START)


def test_pin_budgets_per_program_are_enforced(make: Any) -> None:
    core, _ = make(0, 8, 0, program_pin_budget_bytes=2 * B)
    hint(core, "p", HintKind.PROGRAM_START)
    put(core, range(3), "p")
    before = snapshot(core)
    with pytest.raises(ResourceExhausted) as err:
        hint(core, "p", HintKind.FORK, range(3), children=2)
    assert err.value.field == "program_pin_budget_bytes"
    assert snapshot(core) == before
    with pytest.raises(FailedPrecondition):  # the refused fork was never opened
        hint(core, "p", HintKind.JOIN)
    hint(core, "p", HintKind.FORK, range(2), children=2)  # within the budget
    with pytest.raises(ResourceExhausted):  # an explicit pin for the program counts too
        core.pin([k(2)], "ops", program_id="p")
    core.pin([k(2)], "ops")  # a pin for no program is bounded by the namespace budget only
    assert core.pins.program_pinned_bytes("p") == 2 * B


def test_bad_hints_are_typed_errors_that_change_nothing(make: Any) -> None:
    core, _ = make(2, 4, 4)
    hint(core, "p", HintKind.PROGRAM_START)
    put(core, range(3), "p")
    before = snapshot(core)
    cases: list[tuple[type[Exception], str, Any]] = [
        (NotFound, "program_id", lambda: hint(core, "ghost", HintKind.STEP_START)),
        (NotFound, "program_id", lambda: hint(core, "ghost", HintKind.FORK, range(3), children=1)),
        (FailedPrecondition, "kind", lambda: hint(core, "p", HintKind.JOIN)),
        (FailedPrecondition, "kind", lambda: hint(core, "p", HintKind.TOOL_CALL_END)),
        (AlreadyExists, "program_id", lambda: hint(core, "p", HintKind.PROGRAM_START)),
        (InvalidArgument, "expected_duration_s",
         lambda: hint(core, "p", HintKind.TOOL_CALL_START, range(3), expected_duration_s=-1.0)),
        (InvalidArgument, "children", lambda: hint(core, "p", HintKind.FORK, range(3))),
        (InvalidArgument, "hint", lambda: core.hint("fork")),  # type: ignore[arg-type]
    ]  # fmt: skip
    for exc, field, call in cases:
        with pytest.raises(exc) as err:
            call()
        assert err.value.field == field  # type: ignore[attr-defined]
        assert snapshot(core) == before
    program = core.programs.get("p")
    assert program is not None and program.lease is None and not program.forks


def test_pinned_checkpoint_never_goes_below_cpu(make: Any) -> None:
    core, _ = make(2, 4, 4)
    put(core, [1], None, BlockType.EXECUTION_CHECKPOINT)
    core.pin([k(1)], "runner")
    with pytest.raises(FailedPrecondition) as err:
        core.move([k(1)], Tier.DISK)
    assert err.value.field == "tier"
    assert core.move([k(1)], Tier.CPU).moved == (k(1),)  # CPU is allowed
    core.unpin([k(1)], "runner")
    assert core.move([k(1)], Tier.DISK).moved == (k(1),)


def test_a_cascade_never_pushes_out_the_block_it_makes_room_for(make: Any) -> None:
    core, clock = make(1, 1, 1, policy="lru")
    for i in range(3):
        clock.t = float(i)
        put(core, [i])
    assert tiers(core, range(3)) == [Tier.DISK, Tier.CPU, Tier.GPU]
    assert core.get(k(0)) is not None  # LRU promotes the disk hit to CPU: CPU pushes 1 down,
    # and the only block on disk is 0 itself, which must not be the victim
    indexed = {t: 0 for t in core.tiers}
    for m in core.inventory():
        indexed[m.tier] += m.size
    assert indexed == {t: b.used() for t, b in core.tiers.items()}
    assert core.get(k(0)) is not None


def test_a_block_copied_elsewhere_is_dropped_first_and_a_sole_copy_demoted(make: Any) -> None:
    core, _ = make(0, 2, 4)
    hint(core, "p", HintKind.PROGRAM_START)
    put(core, [0, 1], "p")  # the CPU tier is full
    assert core.note_replicas([k(0), k(99)], [1, 0]) == 1  # 99 is not stored here: skipped
    put(core, [2], "p")
    assert tiers(core, [0, 1, 2]) == [None, Tier.CPU, Tier.CPU]  # a fetch away: dropped
    assert core.counters.evictions == 1
    core.note_replicas([k(1)], [1])
    core.note_replicas([k(1)], [0])  # the other copy went: sole again
    put(core, [3], "p")
    assert core.counters.evictions == 1  # a sole copy is demoted, never dropped for room
    assert sorted(map(str, tiers(core, [1, 2, 3]))) == sorted(map(str, [Tier.CPU, Tier.CPU,
                                                                        Tier.DISK]))  # fmt: skip


def test_bad_replica_counts_are_typed_errors_and_change_nothing(make: Any) -> None:
    core, _ = make(0, 2, 4)
    put(core, [0, 1], "p")
    cases = [
        ([k(0)], [1, 2], "elsewhere"),
        ([k(0), k(1)], [1, -1], "elsewhere"),
        ([k(0), k(1)], [1, True], "elsewhere"),
        ([k(0), "x"], [1, 1], "keys"),
    ]
    for keys, counts, field in cases:
        with pytest.raises(InvalidArgument) as err:
            core.note_replicas(keys, counts)  # type: ignore[arg-type]
        assert err.value.field == field
    put(core, [2], "p")  # had block 0 been marked copied elsewhere, it would be dropped
    assert core.counters.evictions == 0


def test_tool_call_start_demotes_only_into_free_room(make: Any) -> None:
    core, clock = make(2, 2, 4)
    for pid in ("p", "q"):
        hint(core, pid, HintKind.PROGRAM_START)
    put(core, [10, 11], "q")
    clock.t = 1.0
    put(core, [0, 1], "p")  # q's blocks went down to the CPU tier, which is now full
    assert tiers(core, [0, 1, 10, 11]) == [Tier.GPU] * 2 + [Tier.CPU] * 2
    hint(core, "p", HintKind.TOOL_CALL_START, [0, 1], expected_duration_s=30.0)
    assert tiers(core, [0, 1]) == [Tier.GPU] * 2  # no free room below: pushing q out would cost
    assert core.counters.demotions == 2
    clock.t = 2.0
    put(core, [12], "q")  # q computes: the leased context is the first to leave the GPU tier
    assert tiers(core, [12]) == [Tier.GPU]
    assert Tier.CPU in tiers(core, [0, 1])
    assert core.counters.evictions == 0


def _step(core: NodeStoreCore, pid: str, kind: HintKind, step: int) -> None:
    hint(core, pid, kind, step=step)


def test_a_running_step_whose_program_waits_between_steps_goes_first(make: Any) -> None:
    core, clock = make(4, 4, 0)
    for pid in ("loop", "tools"):
        hint(core, pid, HintKind.PROGRAM_START)
    _step(core, "loop", HintKind.STEP_START, 0)
    put(core, [10, 11], "loop")  # its group is the older one: it went first before
    _step(core, "tools", HintKind.STEP_START, 0)
    put(core, [0, 1], "tools")
    clock.t = 1.0
    _step(core, "tools", HintKind.STEP_END, 0)
    hint(core, "tools", HintKind.TOOL_CALL_START, expected_duration_s=10.0)
    clock.t = 11.0
    hint(core, "tools", HintKind.TOOL_CALL_END)
    _step(core, "tools", HintKind.STEP_START, 1)  # learned: ~10 s between its steps
    assert tiers(core, [0, 1, 10, 11]) == [Tier.GPU] * 4
    put(core, [20, 21])  # room for two blocks
    # Both programs are in a step, which has read its context already; "tools" reads
    # it again only after its next tool call, so its blocks go down first.
    assert tiers(core, [0, 1]) == [Tier.CPU] * 2
    assert tiers(core, [10, 11]) == [Tier.GPU] * 2


def test_inside_a_fork_only_the_forks_own_idle_time_counts(make: Any) -> None:
    core, clock = make(4, 4, 0)
    for pid in ("main", "other"):
        hint(core, pid, HintKind.PROGRAM_START)
    _step(core, "other", HintKind.STEP_START, 0)
    put(core, [10, 11], "other")
    _step(core, "main", HintKind.STEP_START, 0)
    clock.t = 1.0
    _step(core, "main", HintKind.STEP_END, 0)
    hint(core, "main", HintKind.TOOL_CALL_START, expected_duration_s=10.0)
    clock.t = 11.0
    hint(core, "main", HintKind.TOOL_CALL_END)  # the main line waits ~10 s between steps
    hint(core, "main", HintKind.FORK, children=2)
    _step(core, "main", HintKind.STEP_START, 1)  # a fork-join stage: the join follows it
    put(core, [0, 1], "main")
    put(core, [20, 21])
    assert tiers(core, [0, 1]) == [Tier.GPU] * 2  # no idle seen inside this fork: due now
    assert tiers(core, [10, 11]) == [Tier.CPU] * 2  # the older group of a tie goes first


def _fork_stage(core: NodeStoreCore, pid: str, step: int, branch: list[int],
                keep: list[int] | None = None) -> None:  # fmt: skip
    """FORK over block 0, a step writing ``branch``; unless keep is None its end and JOIN."""
    hint(core, pid, HintKind.FORK, [0], children=2)
    _step(core, pid, HintKind.STEP_START, step)
    put(core, branch, pid)
    if keep is not None:
        _step(core, pid, HintKind.STEP_END, step)
        hint(core, pid, HintKind.JOIN, keep)


@pytest.mark.parametrize("kept_before", [False, True])
def test_a_forks_branch_goes_first_in_what_past_forks_say_is_its_last_step(
    make: Any, kept_before: bool
) -> None:
    core, clock = make(7, 8, 0)
    for pid in ("w", "other"):
        hint(core, pid, HintKind.PROGRAM_START)
    _step(core, "other", HintKind.STEP_START, 0)
    put(core, [10, 11], "other")  # the older group: in a tie it is pushed out first
    put(core, [0], "w")
    clock.t = 1.0
    _fork_stage(core, "w", 0, [1, 2], keep=[1, 2] if kept_before else [])  # forks: 1 step
    clock.t = 2.0
    _fork_stage(core, "w", 1, [3, 4])  # running the fork's first step: its last, by the past
    put(core, [20, 21, 22, 23])  # room for four blocks
    if kept_before:  # the past join kept its branch: no guess, a tie as before
        assert tiers(core, [10, 11, 1, 2]) == [Tier.CPU] * 4
        assert tiers(core, [3, 4]) == [Tier.GPU] * 2
    else:  # dead blocks are dropped, the expected-dead branch demoted, the rest stays
        assert tiers(core, [1, 2]) == [None, None]
        assert tiers(core, [3, 4]) == [Tier.CPU] * 2
        assert tiers(core, [10, 11]) == [Tier.GPU] * 2
        hint(core, "w", HintKind.JOIN, [3, 4])  # kept after all: live, never dead
        assert not any(core.policy.is_dead(k(i)) for i in (3, 4))


def test_only_the_step_past_forks_say_is_the_last_one_expects_its_branch_dead(make: Any) -> None:
    core, _ = make(8, 8, 0)
    hint(core, "w", HintKind.PROGRAM_START)
    put(core, [0], "w")
    for fork, blocks in enumerate(([1, 2], [3, 4])):  # forks of two steps, joined bare
        hint(core, "w", HintKind.FORK, [0], children=2)
        for step, b in enumerate(blocks):
            _step(core, "w", HintKind.STEP_START, 2 * fork + step)
            put(core, [b], "w")
            _step(core, "w", HintKind.STEP_END, 2 * fork + step)
        hint(core, "w", HintKind.JOIN)
    hint(core, "w", HintKind.FORK, [0], children=2)
    _step(core, "w", HintKind.STEP_START, 4)
    put(core, [5], "w")
    assert not core.policy.is_expected_dead(k(5))  # a second step is to come
    _step(core, "w", HintKind.STEP_END, 4)
    _step(core, "w", HintKind.STEP_START, 5)
    put(core, [6], "w")
    assert core.policy.is_expected_dead(k(5)) and core.policy.is_expected_dead(k(6))
    assert not core.policy.is_expected_dead(k(0))  # the fork's prefix is not the branch's
    hint(core, "w", HintKind.JOIN, [5, 6])
    assert not core.policy.is_expected_dead(k(5))


def test_a_program_in_what_ended_programs_say_is_its_last_step_expects_its_context_dead(
    make: Any,
) -> None:
    from kvfabric.tiers.program import MIN_ENDED

    core, _ = make(8, 8, 0)

    def steps(pid: str, n: int) -> None:
        for step in range(n):
            _step(core, pid, HintKind.STEP_START, step)
            _step(core, pid, HintKind.STEP_END, step)

    for i in range(MIN_ENDED):  # programs of three steps end here
        hint(core, f"done-{i}", HintKind.PROGRAM_START)
        steps(f"done-{i}", 3)
        hint(core, f"done-{i}", HintKind.PROGRAM_END)
    hint(core, "p", HintKind.PROGRAM_START)
    put(core, [0, 1], "p")
    put(core, [9], "p", BlockType.SYSTEM_PROMPT)  # durable: never expected dead
    steps("p", 2)
    assert not core.policy.is_expected_dead(k(0))
    _step(core, "p", HintKind.STEP_START, 2)  # its third step: the last, judging by the past
    assert core.policy.is_expected_dead(k(0)) and core.policy.is_expected_dead(k(1))
    assert not core.policy.is_expected_dead(k(9))
    _step(core, "p", HintKind.STEP_END, 2)  # it goes on after all
    assert not core.policy.is_expected_dead(k(0))


def test_before_enough_programs_ended_no_step_is_taken_for_the_last(make: Any) -> None:
    from kvfabric.tiers.program import MIN_ENDED

    core, _ = make(8, 8, 0)
    for i in range(MIN_ENDED - 1):
        hint(core, f"done-{i}", HintKind.PROGRAM_START)
        hint(core, f"done-{i}", HintKind.PROGRAM_END)  # zero steps each
    hint(core, "p", HintKind.PROGRAM_START)
    put(core, [0], "p")
    _step(core, "p", HintKind.STEP_START, 0)
    assert not core.policy.is_expected_dead(k(0))
