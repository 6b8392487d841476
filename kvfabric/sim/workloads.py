"""The four agentic patterns, each a generator of a :class:`~kvfabric.sim.trace.Trace`.

Every program sends the hints a framework would (start/end, steps, tool
calls with an expected duration that is off by ``tool_estimate_noise``,
fork/join), and its reads follow prefix semantics: each read's chain extends
what the program read before, so a block's identity depends on its prefix as
with real chained hashes. Shared blocks (system prompts, tool definitions,
rubrics) are the same blocks in every program.

* ``tot`` — tree of thought: a shared prefix, ``branching`` children per
  level fanned out to other nodes, each scored, the best ``top_k`` expanded,
  ``depth`` levels.
* ``react`` — ReAct tool loops: tool definitions, ``turns`` thought/action
  steps, each followed by a tool call of lognormal latency and an observation.
* ``swarm`` — hierarchical swarm: an orchestrator plans over a shared
  rubric, ``children`` sub-agents work in parallel over their own context
  (with a tool round), the orchestrator aggregates their results.
* ``workflow`` — multi-agent workflow on a shared transcript: stages in
  sequence, some parallel (fork-join), outputs becoming downstream context,
  a checkpoint after each stage.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from kvfabric.hints import HintKind
from kvfabric.sim.config import SimConfig
from kvfabric.sim.trace import Event, Hint, Read, Trace
from kvfabric.types import BlockType

G, S, T = BlockType.GENERIC, BlockType.SYSTEM_PROMPT, BlockType.TOOL_DEFINITION
R, C = BlockType.REASONING_BRANCH, BlockType.EXECUTION_CHECKPOINT


class _Builder:
    """Block ids, their types and owners, and the merged event list of one trace."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.events: list[Event] = []
        self.types: dict[int, BlockType] = {}
        self.owner: dict[int, str] = {}
        self.nominal: dict[str, float] = {}
        self._shared: dict[str, tuple[int, ...]] = {}

    def blocks(self, n: int, btype: BlockType, program: str | None) -> tuple[int, ...]:
        first = len(self.types)
        ids = tuple(range(first, first + n))
        for b in ids:
            self.types[b] = btype
            if program is not None:
                self.owner[b] = program
        return ids

    def shared(self, name: str, n: int, btype: BlockType) -> tuple[int, ...]:
        if name not in self._shared:
            self._shared[name] = self.blocks(n, btype, None)
        return self._shared[name]

    def tool_latency(self, median_s: float) -> float:
        return median_s * math.exp(self.rng.gauss(0.0, 0.8))


class _Program:
    """Writes one program's events on its own clock, starting at ``t0``."""

    def __init__(self, b: _Builder, pid: str, home: int, t0: float, nodes: tuple[int, ...]):
        self.b, self.pid, self.home, self.t0, self.t = b, pid, home, t0, t0
        self.nodes = nodes  # every node this program's reads run on: its hints go to all
        self.phase = 0
        self.hint(HintKind.PROGRAM_START)

    def hint(self, kind: HintKind, nodes: tuple[int, ...] | None = None, **kw: object) -> None:
        to = self.nodes if nodes is None else nodes
        self.b.events.append(Hint(self.t, self.pid, to, kind, **kw))  # type: ignore[arg-type]

    def fork(self, prefix: tuple[int, ...], nodes: tuple[int, ...]) -> None:
        """A fork goes to the nodes its children run on: they pin the prefix until the join."""
        self.hint(HintKind.FORK, nodes, blocks=prefix, children=len(nodes), targets=nodes[1:])

    def join(self, nodes: tuple[int, ...], keep: tuple[int, ...] = ()) -> None:
        self.hint(HintKind.JOIN, nodes, blocks=keep)

    def mine(self, n: int, btype: BlockType = G) -> tuple[int, ...]:
        return self.b.blocks(n, btype, self.pid)

    def step(self, reads: list[tuple[int, tuple[int, ...], tuple[int, ...]]]) -> None:
        """Reads (node, chain, output) that run in parallel, then their decode time."""
        self.hint(HintKind.STEP_START, step=self.phase)
        for node, chain, out in reads:
            self.b.events.append(Read(self.t, self.pid, node, self.phase, chain, out))
        self.t += max(self.b.cfg.decode_s(len(out)) for _, _, out in reads)
        self.hint(HintKind.STEP_END, step=self.phase)
        self.phase += 1

    def tool(self, median_s: float, context: tuple[int, ...]) -> None:
        latency = self.b.tool_latency(median_s)
        noise = math.exp(self.b.rng.gauss(0.0, self.b.cfg.tool_estimate_noise))
        self.hint(HintKind.TOOL_CALL_START, blocks=context, expected_s=latency * noise)
        self.t += latency
        self.hint(HintKind.TOOL_CALL_END)

    def targets(self, n: int) -> tuple[int, ...]:
        k = self.b.cfg.nodes
        return tuple((self.home + 1 + j) % k for j in range(n))

    def end(self) -> None:
        self.hint(HintKind.PROGRAM_END)
        self.b.nominal[self.pid] = self.t - self.t0


@dataclass(frozen=True)
class TotKnobs:
    """Tree of thought."""

    prefix_blocks: int = 4
    problem_blocks: int = 4
    branching: int = 3
    depth: int = 3
    top_k: int = 1
    thought_blocks: int = 2


@dataclass(frozen=True)
class ReactKnobs:
    """ReAct tool loops."""

    tool_def_blocks: int = 8
    turns: tuple[int, int] = (4, 8)
    tool_median_s: float = 4.0
    observation_blocks: int = 2


@dataclass(frozen=True)
class SwarmKnobs:
    """Hierarchical swarm."""

    rubric_blocks: int = 6
    children: int = 4
    child_blocks: int = 3
    tool_median_s: float = 2.0


@dataclass(frozen=True)
class WorkflowKnobs:
    """Multi-agent workflow."""

    stages: int = 5
    max_parallel: int = 3
    output_blocks: int = 3
    tool_probability: float = 0.4
    tool_median_s: float = 3.0


def _tot(p: _Program, k: TotKnobs) -> None:
    chain = p.b.shared("tot-sys", k.prefix_blocks, S) + p.mine(k.problem_blocks)
    out = p.mine(1)
    p.step([(p.home, chain, out)])
    frontier = [chain + out]
    for _level in range(k.depth):
        kept: list[tuple[int, ...]] = []
        for parent in frontier:
            nodes = (p.home, *p.targets(k.branching - 1))
            p.fork(parent, nodes)
            thoughts = [parent + p.mine(k.thought_blocks, R) for _ in range(k.branching)]
            p.step([(n, parent, th[len(parent):]) for n, th in zip(nodes, thoughts, strict=True)])
            scored = [th + p.mine(1, R) for th in thoughts]
            p.step([(n, th, sc[len(th):]) for n, th, sc in zip(nodes, thoughts, scored,
                                                               strict=True)])  # fmt: skip
            best = p.b.rng.sample(scored, min(k.top_k, len(scored)))
            p.join(nodes, tuple(b for chain_ in best for b in chain_))
            kept += best
        frontier = kept[: k.top_k]
    p.step([(p.home, frontier[0], p.mine(2))])


def _react(p: _Program, k: ReactKnobs) -> None:
    ctx = p.b.shared("react-sys", 2, S) + p.b.shared("react-tools", k.tool_def_blocks, T)
    ctx += p.mine(2)
    turns = p.b.rng.randint(*k.turns)
    for turn in range(turns):
        out = p.mine(1)
        p.step([(p.home, ctx, out)])
        ctx += out
        if turn < turns - 1:
            p.tool(k.tool_median_s, ctx)
            ctx += p.mine(k.observation_blocks)


def _swarm(p: _Program, k: SwarmKnobs) -> None:
    prefix = p.b.shared("swarm-sys", 2, S) + p.b.shared("swarm-rubric", k.rubric_blocks, S)
    prefix += p.mine(3)
    plan = p.mine(1)
    p.step([(p.home, prefix, plan)])
    prefix += plan
    nodes = (p.home, *p.targets(k.children - 1))
    p.fork(prefix, nodes)
    ctxs = [prefix + p.mine(k.child_blocks) for _ in nodes]
    outs = [p.mine(2) for _ in nodes]
    p.step([(n, c, o) for n, c, o in zip(nodes, ctxs, outs, strict=True)])
    p.tool(k.tool_median_s, prefix)
    ctxs = [c + o + p.mine(1) for c, o in zip(ctxs, outs, strict=True)]
    p.step([(n, c, p.mine(1)) for n, c in zip(nodes, ctxs, strict=True)])
    p.join(nodes)
    p.step([(p.home, prefix + p.mine(len(nodes)), p.mine(2))])


def _workflow(p: _Program, k: WorkflowKnobs) -> None:
    chain = p.b.shared("wf-sys", 3, S) + p.mine(3)
    for _stage in range(k.stages):
        width = p.b.rng.randint(1, k.max_parallel)
        if width == 1:
            instr, out = p.mine(1), p.mine(k.output_blocks - 1) + p.mine(1, C)
            p.step([(p.home, chain + instr, out)])
            chain += instr + out
        else:
            nodes = (p.home, *p.targets(width - 1))
            p.fork(chain, nodes)
            p.step([(n, chain + p.mine(1), p.mine(k.output_blocks)) for n in nodes])
            p.join(nodes)
            chain += p.mine(k.output_blocks * width - 1) + p.mine(1, C)  # merged results
        if p.b.rng.random() < k.tool_probability:
            p.tool(k.tool_median_s, chain)
    p.step([(p.home, chain, p.mine(2))])


Knobs = TotKnobs | ReactKnobs | SwarmKnobs | WorkflowKnobs
PATTERNS: dict[str, tuple[type, Callable[..., None]]] = {
    "tot": (TotKnobs, _tot),
    "react": (ReactKnobs, _react),
    "swarm": (SwarmKnobs, _swarm),
    "workflow": (WorkflowKnobs, _workflow),
}


def generate(pattern: str, cfg: SimConfig, knobs: Knobs | None = None) -> Trace:
    """The trace of ``cfg.programs`` programs of ``pattern`` arriving as a Poisson process."""
    if pattern not in PATTERNS:
        from kvfabric.errors import InvalidArgument

        raise InvalidArgument(
            f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}", "pattern"
        )
    knob_cls, write = PATTERNS[pattern]
    k = knobs if knobs is not None else knob_cls()
    b = _Builder(cfg)
    t0 = 0.0
    every = tuple(range(cfg.nodes))
    for i in range(cfg.programs):
        t0 += b.rng.expovariate(1.0 / cfg.arrival_s) if cfg.arrival_s > 0 else 0.0
        home = i % cfg.nodes
        prog = _Program(b, f"{pattern}-{i}", home, t0, every)
        write(prog, k)
        prog.end()
    return Trace(pattern, b.events, b.types, b.owner, b.nominal)
