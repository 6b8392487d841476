"""The simulator: its invariants on real cores, no future knowledge, the trace, the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvfabric.errors import InvalidArgument
from kvfabric.hints import HintKind
from kvfabric.sim import PATTERNS, POLICIES, SimConfig, generate, run_policy
from kvfabric.sim.runner import Replay
from kvfabric.sim.trace import Hint, Read

TINY = SimConfig(nodes=2, programs=6, arrival_s=0.5)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_every_policy_keeps_the_invariants(pattern: str) -> None:
    trace = generate(pattern, TINY)
    runs = {p: run_policy(trace, TINY, p) for p in POLICIES}
    for name, r in runs.items():
        assert r.bytes_conserved, name  # every listed block reads back; tiers hold just those
        assert 0 < r.max_fill <= 1.0, name  # a tier never holds more than its capacity
        assert r.store_failures == 0, name
        assert set(r.completion_s) == set(trace.nominal_s)
        assert all(r.completion_s[p] >= trace.nominal_s[p] for p in trace.nominal_s)
    compulsory = {r.compulsory_tokens for r in runs.values()}
    assert len(compulsory) == 1  # the same trace: first computations cost every policy the same
    assert runs["belady"].recomputed_tokens <= runs["lru"].recomputed_tokens


@pytest.mark.parametrize("pattern", ["react", "tot"])
def test_program_aware_decisions_use_no_future_knowledge(pattern: str) -> None:
    trace = generate(pattern, TINY)
    cache = max(3, trace.working_set_blocks() // 2)
    full = Replay(trace, TINY, "program", record=True, capacity_blocks=cache)
    full.run()
    assert full.decisions
    for cut in (len(trace.events) // 3, 2 * len(trace.events) // 3):
        part = Replay(trace.prefix(cut), TINY, "program", record=True, capacity_blocks=cache)
        part.run()
        assert part.decisions == [d for d in full.decisions if d[0] < cut]


def test_the_no_future_check_can_fail_belady_reads_the_future() -> None:
    trace = generate("react", TINY)
    cache = max(3, trace.working_set_blocks() // 2)
    full = Replay(trace, TINY, "belady", record=True, capacity_blocks=cache)
    full.run()
    differs = False
    for cut in range(10, len(trace.events), 10):
        part = Replay(trace.prefix(cut), TINY, "belady", record=True, capacity_blocks=cache)
        part.run()
        if part.decisions != [d for d in full.decisions if d[0] < cut]:
            differs = True
            break
    assert differs


def test_trace_follows_prefix_semantics_and_knows_next_uses() -> None:
    trace = generate("react", TINY)
    reads = [e for e in trace.events if isinstance(e, Read)]
    by_program: dict[str, list[Read]] = {}
    for r in reads:
        by_program.setdefault(r.program, []).append(r)
    for steps in by_program.values():
        for a, b in itertools.pairwise(steps):
            assert b.chain[: len(a.chain) + len(a.output)] == a.chain + a.output
    first = reads[0].chain[0]
    positions = [i for i, e in enumerate(trace.events)
                 if isinstance(e, Read) and first in e.chain]  # fmt: skip
    assert trace.next_use(first, -1) == positions[0]
    assert trace.next_use(first, positions[-1]) == float("inf")
    kinds = [e.kind for e in trace.events if isinstance(e, Hint) and e.program == "react-0"]
    assert kinds[0] == HintKind.PROGRAM_START and kinds[-1] == HintKind.PROGRAM_END
    assert HintKind.TOOL_CALL_START in kinds
    assert 0 < trace.working_set_blocks() <= trace.distinct_blocks()
    assert generate("react", TINY).events == trace.events  # seeded: the same trace again


def test_bad_settings_are_typed_errors() -> None:
    for change in ({"nodes": 0}, {"cache_fraction": 0.0}, {"tier_shares": (0.5, 0.0, 0.5)},
                   {"prefill_tokens_per_s": -1.0}, {"arrival_s": float("nan")}):  # fmt: skip
        with pytest.raises(InvalidArgument):
            TINY.with_(**change)
    with pytest.raises(InvalidArgument) as err:
        TINY.with_(bogus=1)
    assert err.value.field == "bogus"
    with pytest.raises(InvalidArgument) as err:
        generate("chess", TINY)
    assert err.value.field == "pattern"


def test_cli_json_last_line_and_plots(tmp_path: Path) -> None:
    from kvfabric.cli.app import app

    res = CliRunner().invoke(app, ["sim", "swarm", "--quick", "--seed", "3", "--json",
                                   "--plot", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert list(out) == ["swarm"]
    swarm = out["swarm"]
    for key in ("recompute_vs_belady", "recompute_vs_lru", "zero_recompute_hit_rate",
                "pct_p50_speedup_vs_lru"):  # fmt: skip
        assert key in swarm
    assert swarm["seed"] == 3 and set(swarm["policies"]) == set(POLICIES)
    assert {p.name for p in tmp_path.iterdir()} >= {"recompute.png", "cache_use.png"}
    bad = CliRunner().invoke(app, ["sim", "chess"])
    assert bad.exit_code == 2
