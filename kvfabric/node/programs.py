"""ProgramTable: the life of each agent program a node hears about, and what its hints ask.

A framework reports program events as :class:`~kvfabric.hints.ProgramHint`s.
This table checks each one against the program's state and turns it into a
:class:`HintPlan` — which blocks to pin or unpin, demote or prefetch — that
the node-store core carries out. Planning changes nothing; only
:meth:`HintPlan.commit` does, so a hint that is refused (an unknown program, a
join without a fork, a tool call that never started) leaves no trace.

Lifecycle per program::

    PROGRAM_START ─► STEP_START/STEP_END … ─► PROGRAM_END
                      TOOL_CALL_START ─► TOOL_CALL_END      (a lease on the context)
                      FORK ─► … ─► JOIN                    (nested forks stack)

* A fork pins its shared prefix (owner ``fork:<n>@<program>``) until its join
  or the program's end; the pin counts against the program's pin budget and
  carries ``program_pin_ttl_s`` so a program that dies silently cannot hold
  it for ever.
* A tool call's lease names the context (the hint's hashes) to move out of
  the fastest tier while the tool runs and to prefetch back when it ends. A
  STEP_START during a tool call ends it (the result arrived; the end hint may
  have been lost).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from kvfabric.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvfabric.hints import HintKind, ProgramHint
from kvfabric.types import BlockKey


@dataclass(slots=True)
class Lease:
    """An open tool call: the context to keep warm, and until when it is expected back."""

    keys: tuple[BlockKey, ...]
    started_at: float
    expected_s: float


@dataclass(slots=True)
class Fork:
    """An open fork: its shared prefix is pinned by ``owner`` until the join."""

    owner: str
    prefix: tuple[BlockKey, ...]
    children: int


@dataclass(slots=True)
class ProgramState:
    """What the node knows of one running program."""

    program_id: str
    started_at: float
    step: int = 0
    lease: Lease | None = None
    forks: list[Fork] = field(default_factory=list)
    forks_made: int = 0


@dataclass(frozen=True, slots=True)
class HintPlan:
    """What one accepted hint asks of the store; ``commit`` applies the table's change."""

    hint: ProgramHint
    pin_keys: tuple[BlockKey, ...] = ()
    pin_owner: str | None = None
    unpins: tuple[tuple[str, tuple[BlockKey, ...]], ...] = ()  # (owner, keys it pins)
    demote_keys: tuple[BlockKey, ...] = ()
    prefetch_keys: tuple[BlockKey, ...] = ()
    commit: Callable[[], None] = lambda: None


def owner_for(program_id: str, what: str) -> str:
    """A pin owner name for a program (bounded length whatever the program id is)."""
    tag = program_id if len(program_id) <= 64 else hashlib.sha256(program_id.encode()).hexdigest()
    return f"{what}@{tag}"


class ProgramTable:
    """Program states of one node, keyed by program id (at most ``max_programs``)."""

    def __init__(self, max_programs: int, lease_default_s: float) -> None:
        self.max_programs = max_programs
        self.lease_default_s = lease_default_s
        self._programs: dict[str, ProgramState] = {}

    def __len__(self) -> int:
        return len(self._programs)

    def get(self, program_id: str) -> ProgramState | None:
        """The state of a running program, or None."""
        return self._programs.get(program_id)

    def plan(self, hint: ProgramHint, now: float) -> HintPlan:
        """Check ``hint`` against the program's state and say what it asks; changes nothing."""
        if not isinstance(hint, ProgramHint):
            raise InvalidArgument(f"hint must be a ProgramHint, got {type(hint).__name__}", "hint")
        pid = hint.program_id
        keys = tuple(BlockKey(hint.namespace, h) for h in hint.hashes)
        if hint.kind == HintKind.PROGRAM_START:
            if pid in self._programs:
                raise AlreadyExists(f"program {pid!r} is already running", "program_id")
            if len(self._programs) >= self.max_programs:
                raise ResourceExhausted(
                    f"{len(self._programs)} programs are running; max_programs="
                    f"{self.max_programs}",
                    "max_programs",
                )
            fresh = ProgramState(pid, now)
            return HintPlan(hint, commit=lambda: self._programs.__setitem__(pid, fresh))
        state = self._programs.get(pid)
        if state is None:
            raise NotFound(
                f"unknown program {pid!r}: send program_start before its other hints",
                "program_id",
            )
        if hint.kind == HintKind.PROGRAM_END:
            unpins = tuple((f.owner, f.prefix) for f in state.forks)
            return HintPlan(hint, unpins=unpins, commit=lambda: self._end(pid))
        if hint.kind in (HintKind.STEP_START, HintKind.STEP_END):
            return self._plan_step(hint, state)
        if hint.kind == HintKind.TOOL_CALL_START:
            return self._plan_tool_start(hint, state, keys, now)
        if hint.kind == HintKind.TOOL_CALL_END:
            lease = state.lease
            if lease is None:
                raise FailedPrecondition(
                    f"tool_call_end for program {pid!r} without a tool_call_start", "kind"
                )
            back = keys or lease.keys
            return HintPlan(hint, prefetch_keys=back, commit=lambda: _end_lease(state))
        if hint.kind == HintKind.FORK:
            return self._plan_fork(hint, state, keys)
        # JOIN
        if not state.forks:
            raise FailedPrecondition(f"join for program {pid!r} without an open fork", "kind")
        top = state.forks[-1]
        return HintPlan(hint, unpins=((top.owner, top.prefix),), commit=lambda: _pop_fork(state))

    def _end(self, program_id: str) -> None:
        self._programs.pop(program_id, None)

    def _plan_step(self, hint: ProgramHint, state: ProgramState) -> HintPlan:
        lease = state.lease if hint.kind == HintKind.STEP_START else None
        back = lease.keys if lease is not None else ()

        def commit() -> None:
            state.step = max(state.step, hint.step)
            if hint.kind == HintKind.STEP_START:
                _end_lease(state)  # the tool result arrived even if its end hint did not

        return HintPlan(hint, prefetch_keys=back, commit=commit)

    def _plan_tool_start(
        self, hint: ProgramHint, state: ProgramState, keys: tuple[BlockKey, ...], now: float
    ) -> HintPlan:
        if state.lease is not None:
            raise FailedPrecondition(
                f"program {state.program_id!r} already has a tool call running; end it first",
                "kind",
            )
        expected = hint.expected_duration_s
        lease = Lease(keys, now, self.lease_default_s if expected is None else float(expected))
        return HintPlan(hint, demote_keys=keys,
                        commit=lambda: setattr(state, "lease", lease))  # fmt: skip

    def _plan_fork(
        self, hint: ProgramHint, state: ProgramState, keys: tuple[BlockKey, ...]
    ) -> HintPlan:
        if hint.children < 1:
            raise InvalidArgument("a fork needs children >= 1", "children")
        owner = owner_for(state.program_id, f"fork:{state.forks_made}")
        fork = Fork(owner, keys, hint.children)

        def commit() -> None:
            state.forks.append(fork)
            state.forks_made += 1

        return HintPlan(hint, pin_keys=keys, pin_owner=owner if keys else None, commit=commit)


def _end_lease(state: ProgramState) -> None:
    state.lease = None


def _pop_fork(state: ProgramState) -> None:
    state.forks.pop()
