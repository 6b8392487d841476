"""The program-aware policy: evict what no program will read soon, keep what it will.

It sees only the past — inserts, accesses, moves — and the program hints a
framework sends; never the future of a trace. From them it estimates, per
program, *when* the program will next read its context (its estimated next
use, ENU) and pushes out the blocks whose next use is furthest away, the way
the offline optimum (Bélády) does with perfect knowledge:

* **dead** blocks go first, and are dropped rather than demoted: blocks of an
  ended program, branch-private blocks of a joined fork (unless the join
  keeps them), and ephemeral-typed blocks of a program at a join. A dead
  block that is read again is alive again.
* then **expected-dead** blocks, demoted like live ones: the blocks of a
  program in what the programs that ended on this node say is its last step
  (as many steps as the longest of them, once ``MIN_ENDED`` have ended; not
  inside a fork), and the branch-private blocks of an open fork during what
  the forks joined before say is the fork's last step (the program's own
  forks, or every program's until it has joined one), as long as past joins
  kept at most ``KEPT_SHARE_MAX`` of such blocks. The program's end or the
  join will kill them; it says so only after the step, which is when the
  cache needs the room.
* then blocks by type rank (the per-type table: lower rank first; rank 9 is
  durable — system prompts, tool definitions — and goes last);
* within a rank, blocks another node holds a copy of (``on_replicas``: the
  caller — the node service from the directory, the simulator's cluster —
  says how many) before sole copies, and dropped rather than demoted: losing
  a replicated block costs a network fetch, losing a sole copy a recompute.
  A sole copy is demoted, and dropped only from the slowest tier;
* within a rank, programs by ENU, furthest first. A program in a tool call
  is expected back at ``start + expected duration``; a program in a step,
  whose step has read its context already, after its usual idle time between
  steps (its tool calls; inside a fork only the idle between that fork's own
  steps counts, since a join and the next step follow a fork-join stage at
  once); between steps, one typical step gap after its last step; a block of
  no known program after its idle time. In the slowest tier a program under
  a tool-call lease is kept ahead of the others of its rank (demoted, not
  dropped, for the lease's ``expected × slack``); in a faster tier it is the
  first demoted.
* within a program, the least recently read first and, among blocks read
  together, the chain's tail first: losing a tail block costs one block of
  prefill, losing a head block invalidates the rest of the prefix.

Reads promote a block to the fastest tier: the program reading it is active.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvfabric.hints import HintKind, ProgramHint
from kvfabric.tiers.policy import (
    Evictable,
    Policy,
    PolicyContext,
    register_policy,
    take_victims,
)
from kvfabric.tiers.typepolicy import DURABLE_RANK
from kvfabric.types import BlockKey, BlockMeta, Tier

# (dead, expected dead, type rank, copied elsewhere, program)
GroupKey = tuple[bool, bool, int, bool, str | None]

KEPT_SHARE_MAX = 0.5
"""Branch-private blocks are expected dead in a fork's last step only while joins have kept
at most this share of them (a framework that keeps most branches makes them worth keeping)."""

MIN_ENDED = 8
"""Programs that must have ended on the node before a step is taken for a program's last."""


@dataclass(slots=True)
class _Fork:
    """An open fork of a program, as the policy follows it."""

    number: int  # the program's forks are numbered as they open
    forked_at: int  # the insert sequence when it opened: later blocks are branch-private
    prefix: frozenset[BlockKey]
    steps: int = 0  # steps started inside it


@dataclass(slots=True)
class _Program:
    """What the policy remembers of a program from its hints."""

    lease_start: float | None = None
    lease_expected: float = 0.0
    forks: list[_Fork] = field(default_factory=list)  # open, innermost last
    forks_opened: int = 0
    steps_per_fork: float = 0.0  # steps per fork, learned from its joined forks (0: none yet)
    steps: int = 0
    gap: float = 0.0  # typical idle time between a step's end and the next step's start
    last_end: float | None = None
    in_step: bool = False
    # Time from a step's end to the next step's start, tool calls included, learned apart
    # on the main line (index 0) and between two steps of one open fork (1).
    idle: list[float] = field(default_factory=lambda: [0.0, 0.0])
    step_end: tuple[float, int | None] | None = None  # when the last step ended, in which fork

    def fork_id(self) -> int | None:
        """The innermost open fork's number, or None."""
        return self.forks[-1].number if self.forks else None


@register_policy
class ProgramAwarePolicy(Policy):
    """Online, hint-driven eviction ranking (see the module docstring); the default policy."""

    name = "program"

    def __init__(self) -> None:
        self._ctx = PolicyContext()
        self._seq = 0
        self._metas: dict[BlockKey, BlockMeta] = {}
        self._order: dict[BlockKey, int] = {}  # insert sequence: a chain's tail is newer
        self._where: dict[BlockKey, tuple[Tier, GroupKey]] = {}
        self._groups: dict[Tier, dict[GroupKey, dict[BlockKey, BlockMeta]]] = {t: {} for t in Tier}
        self._dead: set[BlockKey] = set()
        self._by_program: dict[str, set[BlockKey]] = {}
        self._activity: dict[str, float] = {}  # program -> its most recent read or write
        self._programs: dict[str, _Program] = {}
        self._elsewhere: dict[BlockKey, int] = {}  # copies other nodes hold (from the caller)
        self._steps_per_fork = 0.0  # over every program's joined forks (0: none yet)
        self._kept_share: float | None = None  # share of branch-private blocks a join keeps
        self._most_steps = 0  # the most steps a program that ended here took
        self._ended = 0  # programs that ended here

    def bind(self, context: PolicyContext) -> None:
        self._ctx = context

    # -- block events --------------------------------------------------------------------
    def on_insert(self, meta: BlockMeta) -> None:
        self._seq += 1
        self._order[meta.key] = self._seq
        self._metas[meta.key] = meta
        self._track_program(meta)
        self._place(meta)

    def on_access(self, meta: BlockMeta) -> None:
        if meta.key not in self._metas:
            return
        self._note_activity(meta.program_id, meta.last_access)
        if meta.key in self._dead:
            self._dead.discard(meta.key)  # read again: it was not dead after all
            self._place(meta)

    def on_move(self, meta: BlockMeta, old_tier: Tier) -> None:
        if meta.key in self._metas:
            self._place(meta)

    def on_remove(self, meta: BlockMeta) -> None:
        if self._metas.pop(meta.key, None) is None:
            return
        self._untrack_program(meta.key, meta.program_id)
        self._unplace(meta.key)
        self._order.pop(meta.key, None)
        self._dead.discard(meta.key)
        self._elsewhere.pop(meta.key, None)

    def on_replicas(self, meta: BlockMeta, elsewhere: int) -> None:
        if meta.key not in self._metas:
            return
        if elsewhere > 0:
            self._elsewhere[meta.key] = elsewhere
        else:
            self._elsewhere.pop(meta.key, None)
        self._place(meta)

    def on_update(self, meta: BlockMeta) -> None:
        if meta.key not in self._metas:
            return
        where = self._where.get(meta.key)
        self._untrack_program(meta.key, where[1][4] if where is not None else None)
        self._track_program(meta)
        self._place(meta)

    # -- hints ---------------------------------------------------------------------------
    def on_hint(self, hint: object) -> None:
        if not isinstance(hint, ProgramHint):
            return
        pid, now = hint.program_id, self._ctx.clock()
        if hint.kind == HintKind.PROGRAM_START:
            self._programs[pid] = _Program()
            return
        prog = self._programs.get(pid)
        if hint.kind == HintKind.PROGRAM_END:
            gone = self._programs.pop(pid, None)
            if gone is not None:
                self._most_steps = max(self._most_steps, gone.steps)
                self._ended += 1
            self._kill(pid, lambda _key, rank: rank < DURABLE_RANK)
            return
        if prog is None:
            return  # hints of a program started before this policy existed
        keys = frozenset(BlockKey(hint.namespace, h) for h in hint.hashes)
        if hint.kind == HintKind.STEP_START:
            if prog.lease_start is None and prog.last_end is not None:
                gap = max(0.0, now - prog.last_end)
                prog.gap = _ema(prog.gap, gap)
            prog.lease_start = None
            prog.in_step = True
            prog.steps += 1
            if prog.forks:
                prog.forks[-1].steps += 1
            if prog.forks or self._in_last_step(prog):
                self._replace_program(pid)  # expected dead now, maybe
            if prog.step_end is not None:
                ended, fork = prog.step_end
                inside = int(fork is not None and fork == prog.fork_id())
                prog.idle[inside] = _ema(prog.idle[inside], max(0.0, now - ended))
        elif hint.kind == HintKind.STEP_END:
            last = self._in_last_step(prog)
            prog.last_end = now
            prog.in_step = False
            prog.step_end = (now, prog.fork_id())
            if last:
                self._replace_program(pid)  # it goes on after all: live again
        elif hint.kind == HintKind.TOOL_CALL_START:
            prog.lease_start = now
            expected = hint.expected_duration_s
            prog.lease_expected = self._ctx.lease_default_s if expected is None else expected
        elif hint.kind == HintKind.TOOL_CALL_END:
            prog.lease_start = None
            prog.last_end = now  # the program resumes: its next step is due now
        elif hint.kind == HintKind.FORK:
            prog.forks.append(_Fork(prog.forks_opened, self._seq, keys))
            prog.forks_opened += 1
        elif hint.kind == HintKind.JOIN and prog.forks:
            self._join(pid, prog, keys)

    def _join(self, pid: str, prog: _Program, kept: frozenset[BlockKey]) -> None:
        """Close the innermost fork: learn its length and what it kept, kill the rest."""
        fork = prog.forks.pop()
        forked_at, prefix = fork.forked_at, fork.prefix
        prog.steps_per_fork = _ema(prog.steps_per_fork, fork.steps)
        self._steps_per_fork = _ema(self._steps_per_fork, fork.steps)
        branch = [k for k in self._by_program.get(pid, ())
                  if k not in prefix and self._order[k] > forked_at]  # fmt: skip
        if branch:
            share = sum(k in kept for k in branch) / len(branch)
            before = self._kept_share
            self._kept_share = share if before is None else 0.5 * (before + share)
        ephemeral = {t for t, r in self._ctx.types.rules.items() if r.ephemeral}

        def private(key: BlockKey, rank: int) -> bool:
            if key in prefix or key in kept or rank >= DURABLE_RANK:
                return False
            return self._order[key] > forked_at or self._metas[key].type in ephemeral

        self._kill(pid, private)
        self._replace_program(pid)  # what the join kept is no longer expected dead

    def _kill(self, pid: str, doomed: Callable[[BlockKey, int], bool]) -> None:
        types = self._ctx.types
        for key in list(self._by_program.get(pid, ())):
            meta = self._metas[key]
            if key not in self._dead and doomed(key, types.rule(meta.type).rank):
                self._dead.add(key)
                self._place(meta)

    # -- decisions -----------------------------------------------------------------------
    def victims(self, tier: Tier, need_bytes: int, evictable: Evictable) -> list[BlockMeta]:
        now = self._ctx.clock()
        ranked = sorted(
            self._groups[tier].items(), key=lambda kv: self._group_rank(kv[0], kv[1], now)
        )
        order = self._order
        ordered = (
            meta
            for _, blocks in ranked
            for meta in sorted(blocks.values(), key=lambda m: (m.last_access, -order[m.key]))
        )
        return take_victims(ordered, need_bytes, evictable)

    def demotion_target(self, meta: BlockMeta, tiers: Sequence[Tier]) -> Tier | None:
        if meta.key in self._dead or meta.key in self._elsewhere:
            # Nobody will read it, or another node holds a copy (a fetch away): the slower
            # tiers' room is worth more to sole copies, whose loss costs a recompute.
            return None
        return super().demotion_target(meta, tiers)

    def promotion_target(self, meta: BlockMeta, tiers: Sequence[Tier]) -> Tier | None:
        fastest = min(tiers)
        return fastest if meta.tier > fastest and meta.key not in self._dead else None

    def is_dead(self, key: BlockKey) -> bool:
        """Whether ``key`` is ranked dead (dropped first); for tests and reports."""
        return key in self._dead

    def is_expected_dead(self, key: BlockKey) -> bool:
        """Whether ``key`` is ranked expected dead (see _doomed); for tests and reports."""
        where = self._where.get(key)
        return where is not None and where[1][1]

    # -- internals -----------------------------------------------------------------------
    def _group_rank(
        self, gk: GroupKey, blocks: dict[BlockKey, BlockMeta], now: float
    ) -> tuple[int, int, int, float]:
        """Sort key of a group: dead first, then low rank, then furthest estimated next use."""
        dead, doomed, rank, copied, pid = gk
        if dead:
            return (0, 0, 0, 0.0)
        return (1 if doomed else 2, rank, int(not copied), -self._next_use(pid, blocks, now))

    def _next_use(self, pid: str | None, blocks: dict[BlockKey, BlockMeta], now: float) -> float:
        """When the group's program will read again (estimated from hints and the past).

        Without a usable hint the estimate is ``now + idle time``: the longer a
        group has gone unread, the later it is expected back (LRU by program).
        """
        prog = self._programs.get(pid) if pid is not None else None
        if prog is not None and prog.lease_start is not None:
            back = prog.lease_start + prog.lease_expected
            if now <= prog.lease_start + prog.lease_expected * self._ctx.lease_slack:
                return back  # a tool call under lease: back when the tool is expected to end
            return now + (now - prog.lease_start)  # overran its lease: no better than idle
        if prog is not None and prog.in_step:
            # Its step has read its context; the next read comes at its next step, after
            # the program's usual idle time between steps (its tool calls). Inside a fork
            # only the idle between two steps of that fork counts: a fork-join stage is
            # followed by the join and the next step at once, whatever the main line waits.
            return now + prog.idle[int(prog.fork_id() is not None)]
        if prog is not None and prog.last_end is not None:
            due = prog.last_end + prog.gap
            if now - prog.last_end <= self._ctx.lease_default_s:
                return max(now, due)
        if pid is not None:
            last = self._activity.get(pid, now)
        else:
            last = min(m.last_access for m in blocks.values())
        return now + (now - last)

    def _group_key(self, meta: BlockMeta) -> GroupKey:
        rank = self._ctx.types.rule(meta.type).rank
        dead = meta.key in self._dead
        doomed = not dead and rank < DURABLE_RANK and self._doomed(meta)
        return (dead, doomed, rank, meta.key in self._elsewhere, meta.program_id)

    def _in_last_step(self, prog: _Program) -> bool:
        """Whether ``prog`` runs what the programs that ended here say is its last step: as
        many steps as the longest of them (after ``MIN_ENDED`` of them), outside a fork."""
        return (
            prog.in_step
            and not prog.forks
            and self._ended >= MIN_ENDED
            and prog.steps >= self._most_steps
        )

    def _doomed(self, meta: BlockMeta) -> bool:
        """Whether a live block is expected dead: its program runs its last step (see
        :meth:`_in_last_step`), or the block is private to an open fork's branch in what the
        forks joined before say is the fork's last step, where joins have kept few such
        blocks. Learned from the past only; a wrong guess costs a demotion, as the block
        is demoted like any live one."""
        prog = self._programs.get(meta.program_id or "")
        if prog is None:
            return False
        if self._in_last_step(prog):
            return True  # no later step of its program will read it
        if not prog.forks:
            return False
        kept = self._kept_share
        expected = round(prog.steps_per_fork or self._steps_per_fork)
        if kept is None or kept > KEPT_SHARE_MAX or expected < 1:
            return False
        fork = prog.forks[-1]
        if fork.steps < expected:
            return False
        return self._order[meta.key] > fork.forked_at and meta.key not in fork.prefix

    def _replace_program(self, pid: str) -> None:
        """Re-rank a program's blocks after its fork state changed."""
        for key in self._by_program.get(pid, ()):
            self._place(self._metas[key])

    def _place(self, meta: BlockMeta) -> None:
        where = (meta.tier, self._group_key(meta))
        if self._where.get(meta.key) == where:
            return
        self._unplace(meta.key)
        self._groups[where[0]].setdefault(where[1], {})[meta.key] = meta
        self._where[meta.key] = where

    def _unplace(self, key: BlockKey) -> None:
        where = self._where.pop(key, None)
        if where is None:
            return
        groups = self._groups[where[0]]
        group = groups[where[1]]
        del group[key]
        if not group:
            del groups[where[1]]

    def _track_program(self, meta: BlockMeta) -> None:
        if meta.program_id is not None:
            self._by_program.setdefault(meta.program_id, set()).add(meta.key)
            self._note_activity(meta.program_id, meta.last_access)

    def _untrack_program(self, key: BlockKey, pid: str | None) -> None:
        keys = self._by_program.get(pid or "")
        if pid is None or keys is None:
            return
        keys.discard(key)
        if not keys:
            del self._by_program[pid]
            self._activity.pop(pid, None)

    def _note_activity(self, pid: str | None, when: float) -> None:
        if pid is not None and when > self._activity.get(pid, float("-inf")):
            self._activity[pid] = when


def _ema(last: float, sample: float) -> float:
    """The mean of the last estimate and a new sample (the sample alone if there was none)."""
    return sample if last == 0.0 else 0.5 * (last + sample)
