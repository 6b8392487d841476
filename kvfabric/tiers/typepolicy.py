"""The per-type policy table: how each semantic block type is cached.

Every :class:`~kvfabric.types.BlockType` has a :class:`TypeRule`:

* ``rank`` (0..9) orders eviction: a block of a lower rank is pushed out
  before one of a higher rank. Rank 9 is *durable*: such blocks are shared
  across programs, are never dropped early when a program ends or joins, and
  are evicted last; system prompts and tool definitions have it by default.
  The other types share rank 3 by default: a chain mixes them (a checkpoint
  sits in the middle of a transcript), and ranking a later block above an
  earlier one of the same chain would keep a block whose prefix is gone.
* ``ephemeral`` blocks are dropped first once the fork that made them is
  joined (unless the join keeps them) or their program ends.
* ``pinned_floor`` is the slowest tier a *pinned* block of the type may be
  moved to (execution checkpoints stay in CPU memory or faster while pinned).
* ``replicated`` types are copied to every node; this flag comes from the
  ``replicate_types`` config field, the one place replication is configured.

The table is written as one config string (``type_policies``), e.g.
``"SYSTEM_PROMPT:rank=9;REASONING_BRANCH:rank=0,ephemeral;EXECUTION_CHECKPOINT:floor=CPU"``.
Types the string does not name keep their defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from kvfabric.errors import ConfigError
from kvfabric.types import BlockType, Tier

MAX_RANK = 9
DURABLE_RANK = MAX_RANK
FIELD = "type_policies"


@dataclass(frozen=True, slots=True)
class TypeRule:
    """How blocks of one semantic type are cached (see the module docstring)."""

    rank: int = 3
    ephemeral: bool = False
    pinned_floor: Tier | None = None
    replicated: bool = False


DEFAULT_RULES: Mapping[BlockType, TypeRule] = {
    BlockType.GENERIC: TypeRule(rank=3),
    BlockType.REASONING_BRANCH: TypeRule(rank=3, ephemeral=True),
    BlockType.EXECUTION_CHECKPOINT: TypeRule(rank=3, pinned_floor=Tier.CPU),
    BlockType.SYSTEM_PROMPT: TypeRule(rank=MAX_RANK),
    BlockType.TOOL_DEFINITION: TypeRule(rank=MAX_RANK),
}

DEFAULT_SPEC = (
    "GENERIC:rank=3;REASONING_BRANCH:rank=3,ephemeral;EXECUTION_CHECKPOINT:rank=3,floor=CPU;"
    "SYSTEM_PROMPT:rank=9;TOOL_DEFINITION:rank=9"
)


@dataclass(frozen=True, slots=True)
class TypeTable:
    """A rule for every block type; build it with :meth:`parse` or :meth:`from_config`."""

    rules: Mapping[BlockType, TypeRule]

    def rule(self, block_type: BlockType) -> TypeRule:
        """The rule of ``block_type``."""
        return self.rules[block_type]

    @classmethod
    def default(cls) -> TypeTable:
        """The built-in table (replication of system prompts and tool definitions on)."""
        return cls.parse(DEFAULT_SPEC, (BlockType.SYSTEM_PROMPT, BlockType.TOOL_DEFINITION))

    @classmethod
    def parse(cls, spec: str, replicated: Iterable[BlockType] = ()) -> TypeTable:
        """Parse a ``TYPE:opt,opt;TYPE:opt`` string; ConfigError names the bad part."""
        if not isinstance(spec, str):
            raise ConfigError(f"config field {FIELD} must be a string", FIELD)
        rules = dict(DEFAULT_RULES)
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            name, sep, opts = part.partition(":")
            name = name.strip()
            if name not in BlockType.__members__:
                raise ConfigError(
                    f"config field {FIELD} names unknown block type {name!r}; known: "
                    f"{', '.join(BlockType.__members__)}",
                    FIELD,
                )
            btype = BlockType[name]
            rule = rules[btype]
            for opt in filter(None, (o.strip() for o in opts.split(","))) if sep else ():
                rule = _apply_option(rule, name, opt)
            rules[btype] = rule
        reps = frozenset(replicated)
        return cls({t: replace(r, replicated=t in reps) for t, r in rules.items()})

    @classmethod
    def from_config(cls, type_policies: str, replicated: Iterable[BlockType]) -> TypeTable:
        """The table a node runs with: ``type_policies`` plus the replicated types."""
        return cls.parse(type_policies, replicated)


def _apply_option(rule: TypeRule, type_name: str, opt: str) -> TypeRule:
    key, eq, value = (s.strip() for s in opt.partition("="))
    if key == "ephemeral" and not eq:
        return replace(rule, ephemeral=True)
    if key == "rank" and eq:
        if not value.isdigit() or not 0 <= int(value) <= MAX_RANK:
            raise ConfigError(
                f"config field {FIELD}: {type_name} rank={value!r} must be an int in 0..{MAX_RANK}",
                FIELD,
            )
        return replace(rule, rank=int(value))
    if key == "floor" and eq:
        if value not in Tier.__members__:
            raise ConfigError(
                f"config field {FIELD}: {type_name} floor={value!r} must be one of "
                f"{', '.join(Tier.__members__)}",
                FIELD,
            )
        return replace(rule, pinned_floor=Tier[value])
    raise ConfigError(
        f"config field {FIELD}: {type_name} has unknown option {opt!r} "
        "(known: rank=N, ephemeral, floor=TIER)",
        FIELD,
    )
