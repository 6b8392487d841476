"""The vLLM connector with the real CPU engine, a tiny random model, and a real node.

Each engine runs in its own process (tests/e2e/_engine.py); the kvfabric node
is a real `kvfabric up --standalone` process serving gRPC on 127.0.0.1.
Outputs are greedy and float32, so "identical" means token for token.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", exc_type=ImportError)

from kvfabric.rpc.client import Client
from tests.e2e.tiny_model import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_engine(model: Path, mode: str, address: str) -> list[dict[str, Any]]:
    """One engine process; returns per prompt {"tokens": [...], "cached": n}."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.e2e._engine", str(model), mode, address],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    result: list[dict[str, Any]] = json.loads(lines[-1][len("RESULT ") :])
    return result


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("node")
    env = {**os.environ, "KVFABRIC_RPC_PORT": str(_free_port()), "KVFABRIC_TRANSPORT": "tcp",
           "KVFABRIC_CPU_ARENA_BYTES": "256MiB", "KVFABRIC_CPU_PREFAULT": "0",
           "KVFABRIC_DISK_BYTES": "256MiB", "KVFABRIC_STATUS_INTERVAL_S": "30"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvfabric.cli.app", "up", "--standalone", "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        address = ""
        while time.monotonic() < deadline and not address:
            line = proc.stdout.readline()
            if not line:
                break
            if "gRPC API at " in line:
                address = line.split("gRPC API at ")[1].split(",")[0].strip()
        assert address, "the node did not start"
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def base(model: Path) -> list[dict[str, Any]]:
    """The engine's own output without any connector: the reference."""
    return run_engine(model, "none", "")


def test_identical_output_with_and_without_the_connector_and_external_hits(
    model: Path, node: str, base: list[dict[str, Any]]
) -> None:
    first = run_engine(model, "fabric", node)
    assert [r["tokens"] for r in first] == [r["tokens"] for r in base]
    assert first[0]["cached"] == 0  # nothing stored yet
    assert first[1]["cached"] >= 256  # the shared prefix came back from kvfabric
    second = run_engine(model, "fabric", node)  # a new engine process sharing the fabric
    assert [r["tokens"] for r in second] == [r["tokens"] for r in base]
    assert second[0]["cached"] >= 256 and second[1]["cached"] >= 256
    with Client(node) as c:
        stats = c.stats()
    assert (
        stats.blocks_by_type.get("SYSTEM_PROMPT", 0) > 0
    )  # the request's type hint reached the store


def test_engine_keeps_serving_when_the_fabric_is_unreachable(
    model: Path, base: list[dict[str, Any]]
) -> None:
    lost = run_engine(model, "fabric", f"127.0.0.1:{_free_port()}")  # nobody listens there
    assert [r["tokens"] for r in lost] == [r["tokens"] for r in base]
    assert all(r["cached"] == 0 for r in lost)
