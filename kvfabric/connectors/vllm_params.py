"""What a request tells kvfabric through vLLM's ``kv_transfer_params`` (pure, no vLLM).

A request carries, under the key ``"kvfabric"`` of its ``kv_transfer_params``
(``SamplingParams(extra_args={"kv_transfer_params": {...}})``, or the
``kv_transfer_params`` field of an OpenAI-server request)::

    {"kvfabric": {
        "program_id": "agent-7",                 # the agent program the request belongs to
        "block_type": "SYSTEM_PROMPT",           # type of blocks no span covers (GENERIC)
        "spans": [{"start": 0, "end": 512, "type": "TOOL_DEFINITION"}, ...],
        "ttl_s": 3600,                           # the saved blocks expire after this
        "store": true,                           # false: read from kvfabric, save nothing
        "events": [{"kind": "tool_call_start", "at": "finish", "step": 3,
                    "expected_duration_s": 2.5},
                   {"kind": "fork", "children": 4, "targets": ["node-b"],
                    "prefix_tokens": 1024}]}}

A block takes the type of the span that holds its first token. ``events``
are program hints (:mod:`kvfabric.hints`); ``at`` says whether the event is
sent when the request is admitted (``"start"``, the default) or when it
finishes (``"finish"``: a tool call starts once the model has written it).
Each event carries the request's block chain (for a fork, the first
``prefix_tokens`` tokens: the shared prefix).

Parameters come from outside the engine, so they are validated here, every
error naming its field (``kv_transfer_params.kvfabric.spans[1].end``); the
connector logs a bad request's error and serves it without hints rather
than fail it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvfabric.errors import InvalidArgument
from kvfabric.hints import MAX_CHILDREN, MAX_DURATION_S, MAX_TARGETS, HintKind
from kvfabric.types import BlockType, validate_program_id

ROOT = "kv_transfer_params.kvfabric"
KEY = "kvfabric"
MAX_SPANS = 1024
MAX_EVENTS = 16
MAX_TTL_S = 30 * 24 * 3600.0
KNOWN_KEYS = frozenset({"program_id", "block_type", "spans", "ttl_s", "events", "store"})
EVENT_KEYS = frozenset(
    {"kind", "at", "step", "expected_duration_s", "children", "targets", "prefix_tokens"}
)


@dataclass(frozen=True, slots=True)
class TypedSpan:
    """Tokens ``[start, end)`` of the request hold content of ``block_type``."""

    start: int
    end: int
    block_type: BlockType


@dataclass(frozen=True, slots=True)
class HintEvent:
    """One program event to report for the request (see :class:`kvfabric.hints.ProgramHint`)."""

    kind: HintKind
    at_finish: bool = False
    step: int = 0
    expected_duration_s: float | None = None
    children: int = 0
    targets: tuple[str, ...] = ()
    prefix_tokens: int | None = None  # None: every full block of the request


@dataclass(frozen=True, slots=True)
class RequestHints:
    """The validated kvfabric parameters of one request."""

    program_id: str | None = None
    block_type: BlockType = BlockType.GENERIC
    spans: tuple[TypedSpan, ...] = ()
    ttl_s: float | None = None
    events: tuple[HintEvent, ...] = ()
    store: bool = True

    def block_types(self, first_block: int, count: int, block_size: int) -> list[BlockType]:
        """The type of blocks ``first_block .. first_block+count-1``."""
        out = []
        for b in range(first_block, first_block + count):
            token = b * block_size
            found = self.block_type
            for s in self.spans:
                if s.start <= token < s.end:
                    found = s.block_type
                    break
            out.append(found)
        return out

    def events_at(self, finish: bool) -> list[HintEvent]:
        """The events sent on admission (``finish`` False) or when the request ends."""
        return [e for e in self.events if e.at_finish == finish]


NO_HINTS = RequestHints()


def parse_request_hints(kv_transfer_params: object) -> RequestHints:
    """The kvfabric part of a request's ``kv_transfer_params`` (NO_HINTS when absent)."""
    if kv_transfer_params is None:
        return NO_HINTS
    if not isinstance(kv_transfer_params, Mapping):
        raise InvalidArgument("kv_transfer_params must be an object", "kv_transfer_params")
    raw = kv_transfer_params.get(KEY)
    if raw is None:
        return NO_HINTS
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{ROOT} must be an object", ROOT)
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown key {unknown[0]!r} in {ROOT}", f"{ROOT}.{unknown[0]}")
    store = raw.get("store", True)
    if not isinstance(store, bool):
        raise InvalidArgument(f"{ROOT}.store must be true or false", f"{ROOT}.store")
    program = raw.get("program_id")
    validate_program_id(program, f"{ROOT}.program_id")
    spans = _list(raw.get("spans", ()), f"{ROOT}.spans", MAX_SPANS)
    events = _list(raw.get("events", ()), f"{ROOT}.events", MAX_EVENTS)
    return RequestHints(
        program_id=program,
        block_type=_block_type(raw.get("block_type", "GENERIC"), f"{ROOT}.block_type"),
        spans=tuple(_span(s, f"{ROOT}.spans[{i}]") for i, s in enumerate(spans)),
        ttl_s=_seconds(raw.get("ttl_s"), f"{ROOT}.ttl_s", MAX_TTL_S, positive=True),
        events=tuple(_event(e, f"{ROOT}.events[{i}]", program) for i, e in enumerate(events)),
        store=store,
    )


def _list(value: object, where: str, limit: int) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise InvalidArgument(f"{where} must be a list", where)
    if len(value) > limit:
        raise InvalidArgument(f"{where} has {len(value)} entries; the limit is {limit}", where)
    return value


def _int(value: object, where: str, low: int = 0, high: int = 1 << 31) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{where} must be an integer in {low}..{high}, got {value!r}", where)
    return value


def _seconds(value: object, where: str, limit: float, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or math.isnan(float(value)) or not 0 <= float(value) <= limit:  # type: ignore[arg-type]
        raise InvalidArgument(f"{where} must be a number of seconds in [0, {limit}]", where)
    if positive and float(value) == 0:  # type: ignore[arg-type]
        raise InvalidArgument(f"{where} must be > 0", where)
    return float(value)  # type: ignore[arg-type]


def _block_type(value: object, where: str) -> BlockType:
    name = value.upper() if isinstance(value, str) else ""
    if name not in BlockType.__members__:
        known = ", ".join(BlockType.__members__)
        raise InvalidArgument(f"{where} must be one of {known}, got {value!r}", where)
    return BlockType[name]


def _span(value: object, where: str) -> TypedSpan:
    if not isinstance(value, Mapping) or set(value) != {"start", "end", "type"}:
        raise InvalidArgument(f"{where} must be {{start, end, type}}", where)
    start = _int(value["start"], f"{where}.start")
    end = _int(value["end"], f"{where}.end")
    if end <= start:
        raise InvalidArgument(f"{where}.end must be greater than start", f"{where}.end")
    return TypedSpan(start, end, _block_type(value["type"], f"{where}.type"))


def _event(value: object, where: str, program: str | None) -> HintEvent:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{where} must be an object", where)
    unknown = sorted(set(value) - EVENT_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown key {unknown[0]!r} in {where}", f"{where}.{unknown[0]}")
    if program is None:
        raise InvalidArgument(f"{where} needs {ROOT}.program_id", f"{ROOT}.program_id")
    kind_name = value.get("kind")
    kinds = {k.value: k for k in HintKind}
    if kind_name not in kinds:
        raise InvalidArgument(f"{where}.kind must be one of {', '.join(kinds)}", f"{where}.kind")
    at = value.get("at", "start")
    if at not in ("start", "finish"):
        raise InvalidArgument(f"{where}.at must be 'start' or 'finish'", f"{where}.at")
    targets = _list(value.get("targets", ()), f"{where}.targets", MAX_TARGETS)
    if not all(isinstance(t, str) and 0 < len(t) <= 128 for t in targets):
        raise InvalidArgument(f"{where}.targets must be node ids", f"{where}.targets")
    prefix = value.get("prefix_tokens")
    return HintEvent(
        kind=kinds[kind_name],
        at_finish=at == "finish",
        step=_int(value.get("step", 0), f"{where}.step"),
        expected_duration_s=_seconds(
            value.get("expected_duration_s"), f"{where}.expected_duration_s", MAX_DURATION_S
        ),
        children=_int(value.get("children", 0), f"{where}.children", 0, MAX_CHILDREN),
        targets=tuple(targets),
        prefix_tokens=None if prefix is None else _int(prefix, f"{where}.prefix_tokens", 1),
    )
