"""Program hints: what an agent framework tells the store about its program.

A hint names a program and an event in its life (start/end, a step, a tool
call, a fork into children, a join). Policies use hints to keep what the next
step will read and drop what it will not; a fork also asks the directory to
copy the shared prefix to the children's nodes before they start. Hints are
validated here, once, whatever path they came by (gRPC, the vLLM connector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from kvfabric.errors import InvalidArgument
from kvfabric.types import BlockHash, as_block_hash, validate_namespace, validate_program_id

MAX_HINT_HASHES = 65_536
MAX_TARGETS = 1024
MAX_CHILDREN = 1 << 16
MAX_DURATION_S = 7 * 24 * 3600.0


class HintKind(Enum):
    """The program events a framework reports."""

    PROGRAM_START = "program_start"
    PROGRAM_END = "program_end"
    STEP_START = "step_start"
    STEP_END = "step_end"
    TOOL_CALL_START = "tool_call_start"
    TOOL_CALL_END = "tool_call_end"
    FORK = "fork"
    JOIN = "join"


@dataclass(frozen=True, slots=True)
class ProgramHint:
    """One program event; ``hashes`` is the program's (or the fork's shared) prefix chain."""

    program_id: str
    kind: HintKind
    namespace: str = ""
    hashes: tuple[BlockHash, ...] = ()
    step: int = 0
    targets: tuple[str, ...] = ()
    children: int = 0
    expected_duration_s: float | None = None

    def __post_init__(self) -> None:
        if validate_program_id(self.program_id) is None:
            raise InvalidArgument("program_id is required in a hint", "program_id")
        if not isinstance(self.kind, HintKind):
            raise InvalidArgument(f"unknown hint kind {self.kind!r}", "kind")
        if self.hashes:
            validate_namespace(self.namespace)
        if len(self.hashes) > MAX_HINT_HASHES:
            raise InvalidArgument(
                f"{len(self.hashes)} hashes in a hint; the limit is {MAX_HINT_HASHES}", "hashes"
            )
        for h in self.hashes:
            as_block_hash(h, "hashes")
        if not isinstance(self.step, int) or self.step < 0:
            raise InvalidArgument(f"step must be a non-negative int, got {self.step!r}", "step")
        if len(self.targets) > MAX_TARGETS or not all(
            isinstance(t, str) and 0 < len(t) <= 128 for t in self.targets
        ):
            raise InvalidArgument("targets must be up to 1024 node ids", "targets")
        if not isinstance(self.children, int) or not 0 <= self.children <= MAX_CHILDREN:
            raise InvalidArgument(f"children must be in 0..{MAX_CHILDREN}", "children")
        d = self.expected_duration_s
        if d is not None and (not isinstance(d, (int, float)) or math.isnan(d)
                              or not 0 <= d <= MAX_DURATION_S):  # fmt: skip
            raise InvalidArgument(
                f"expected_duration_s must be in [0, {MAX_DURATION_S}] seconds",
                "expected_duration_s",
            )
