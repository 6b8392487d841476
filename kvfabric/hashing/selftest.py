"""Golden-value self-test of the canonical hashes.

Block hashes are store keys shared by every process of the cluster: a
process whose hashing differs in a single bit would silently miss every
block (or, worse, write under keys no one else reads). Start-up code and
``kvfabric doctor`` therefore compare this build's hashes with vectors fixed
in ``kvfabric/hashing/golden.json`` and refuse to run on any mismatch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from kvfabric.errors import FailedPrecondition, KVFabricError
from kvfabric.hashing.chain import ROOT_HASH, ExtraKeys, MMItem, chain_hashes, format_chain
from kvfabric.hashing.namespace import NamespaceSpec, namespace_id
from kvfabric.types import BlockHash

GOLDEN_RESOURCE = "golden.json"
GOLDEN_FORMAT = 1


@dataclass(frozen=True, slots=True)
class SelfTestResult:
    """Outcome of :func:`run_selftest`: ``checked`` vectors, one message per failure."""

    ok: bool
    checked: int
    failures: list[str] = field(default_factory=list)


def load_golden(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The golden vectors: the packaged file, or ``path`` when given."""
    if path is None:
        text = resources.files("kvfabric.hashing").joinpath(GOLDEN_RESOURCE).read_text("utf-8")
    else:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != GOLDEN_FORMAT:
        raise ValueError(f"golden vectors must be a JSON object with format {GOLDEN_FORMAT}")
    return data


def extras_from_json(raw: dict[str, Any] | None) -> ExtraKeys | None:
    """Build the ExtraKeys of a golden case (``None`` when the case has none)."""
    if raw is None:
        return None
    return ExtraKeys(
        cache_salt=raw.get("cache_salt"),
        lora_id=raw.get("lora_id"),
        mm_items=tuple(MMItem(h, s, n) for h, s, n in raw.get("mm_items", [])),
    )


def compute_chain_case(case: dict[str, Any]) -> list[str]:
    """The hex hashes this build computes for one golden chain case."""
    parent = case.get("parent")
    return format_chain(
        chain_hashes(
            case["tokens"],
            case["block_size"],
            extras_from_json(case.get("extras")),
            None if parent is None else BlockHash(bytes.fromhex(parent)),
            start=case.get("start", 0),
        )
    )


def compute_namespace_case(case: dict[str, Any]) -> str:
    """The namespace id this build computes for one golden namespace case."""
    return namespace_id(NamespaceSpec(**case["spec"]))


def _first_difference(got: list[str], want: list[str]) -> str:
    if len(got) != len(want):
        return f"{len(got)} hashes, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w:
            return f"block {i} is {g[:16]}…, expected {w[:16]}…"
    return "no difference"


def run_selftest(path: str | os.PathLike[str] | None = None) -> SelfTestResult:
    """Compare this build's hashes with the golden vectors; never raises."""
    try:
        golden = load_golden(path)
    except (OSError, ValueError, KeyError) as err:
        return SelfTestResult(False, 0, [f"cannot read golden hash vectors: {err}"])
    failures: list[str] = []
    checked = 1
    if ROOT_HASH.hex() != golden.get("root"):
        failures.append(f"root hash is {ROOT_HASH.hex()}, expected {golden.get('root')}")
    for case in golden.get("chains", []):
        checked += 1
        name = case.get("name", "?")
        try:
            got = compute_chain_case(case)
        except (KVFabricError, KeyError, TypeError, ValueError) as err:
            failures.append(f"chain {name!r}: raised {type(err).__name__}: {err}")
            continue
        if got != case.get("hashes"):
            failures.append(f"chain {name!r}: {_first_difference(got, case.get('hashes', []))}")
    for case in golden.get("namespaces", []):
        checked += 1
        name = case.get("name", "?")
        try:
            got_id = compute_namespace_case(case)
        except (KVFabricError, KeyError, TypeError, ValueError) as err:
            failures.append(f"namespace {name!r}: raised {type(err).__name__}: {err}")
            continue
        if got_id != case.get("id"):
            failures.append(f"namespace {name!r}: id is {got_id}, expected {case.get('id')}")
    return SelfTestResult(not failures, checked, failures)


def require_selftest(path: str | os.PathLike[str] | None = None) -> SelfTestResult:
    """Run the self-test and raise FailedPrecondition when any vector disagrees."""
    result = run_selftest(path)
    if not result.ok:
        shown = "; ".join(result.failures[:5])
        more = f" (and {len(result.failures) - 5} more)" if len(result.failures) > 5 else ""
        raise FailedPrecondition(
            "block-hash self-test failed: this build computes different canonical hashes "
            "than the golden vectors, so it would not find blocks other processes store; "
            f"refusing to start. {len(result.failures)} of {result.checked} vectors differ: "
            f"{shown}{more}"
        )
    return result
