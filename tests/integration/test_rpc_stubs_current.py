"""The checked-in gRPC stubs are exactly what `make proto` generates from the contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = "proto/kvfabric/rpc/v1/kvfabric.proto"
GENERATED = ("kvfabric_pb2.py", "kvfabric_pb2.pyi", "kvfabric_pb2_grpc.py")


def test_checked_in_stubs_match_a_fresh_protoc_run(tmp_path: Path) -> None:
    # The same command as `make proto`, writing into a temporary tree instead.
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iproto",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        PROTO,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    stale = []
    for name in GENERATED:
        fresh = (tmp_path / "kvfabric/rpc/v1" / name).read_bytes()
        checked_in = (ROOT / "kvfabric/rpc/v1" / name).read_bytes()
        if fresh != checked_in:
            stale.append(name)
    if stale:
        pytest.fail(f"stale generated stubs {stale}: run `make proto` and commit the result")
