"""The trace a workload produces and the simulator replays: engine reads and program hints.

A trace is fixed before any policy runs, so every policy (and the offline
optimum) sees exactly the same sequence of events; what a policy changes is
what each read finds in the cache, hence its recomputed tokens and how long
each program stalls. Blocks are small ints here; the runner maps them to
canonical block hashes.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvfabric.hints import HintKind
from kvfabric.types import BlockType


@dataclass(frozen=True, slots=True)
class Read:
    """One engine request: prefill ``chain`` (reusing what the cache holds), store ``output``.

    Reads of one program with the same ``phase`` run in parallel: the
    program waits for the slowest of them.
    """

    time: float
    program: str
    node: int
    phase: int
    chain: tuple[int, ...]
    output: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Hint:
    """A program hint, delivered to every node the program runs on (``nodes``)."""

    time: float
    program: str
    nodes: tuple[int, ...]
    kind: HintKind
    blocks: tuple[int, ...] = ()
    step: int = 0
    children: int = 0
    targets: tuple[int, ...] = ()
    expected_s: float | None = None


Event = Read | Hint


@dataclass(slots=True)
class Trace:
    """A replayable workload: events in time order plus what each block is."""

    pattern: str
    events: list[Event]
    block_type: dict[int, BlockType]
    block_program: dict[int, str]
    nominal_s: dict[str, float]  # program -> duration with no cache stalls
    _uses: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.events.sort(key=lambda e: e.time)  # stable: same-time events keep their order
        for pos, ev in enumerate(self.events):
            if isinstance(ev, Read):
                for b in ev.chain:
                    self._uses.setdefault(b, []).append(pos)

    def reads(self) -> Iterable[Read]:
        """The engine reads, in order."""
        return (e for e in self.events if isinstance(e, Read))

    def next_use(self, block: int, after: int) -> float:
        """Position of the first read of ``block`` after event ``after`` (inf: never)."""
        uses = self._uses.get(block)
        if not uses:
            return float("inf")
        i = bisect.bisect_right(uses, after)
        return float(uses[i]) if i < len(uses) else float("inf")

    def prefix(self, n: int) -> Trace:
        """The first ``n`` events as a trace of their own (for the no-future-knowledge test)."""
        return Trace(self.pattern, list(self.events[:n]), self.block_type, self.block_program,
                     self.nominal_s)  # fmt: skip

    def working_set_blocks(self) -> int:
        """Most blocks live at once: created (first written) and still to be read again."""
        first: dict[int, int] = {}
        for pos, ev in enumerate(self.events):
            if isinstance(ev, Read):
                for b in (*ev.chain, *ev.output):
                    first.setdefault(b, pos)
        delta = [0] * (len(self.events) + 2)
        for b, start in first.items():
            uses = self._uses.get(b, [])
            if uses and uses[-1] > start:
                delta[start] += 1
                delta[uses[-1] + 1] -= 1
        live = peak = 0
        for d in delta:
            live += d
            peak = max(peak, live)
        return peak

    def distinct_blocks(self) -> int:
        """Blocks the trace ever reads or writes."""
        return len(self.block_type)
