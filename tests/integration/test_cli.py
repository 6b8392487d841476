"""The `kvfabric` CLI: through typer's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from typer.testing import CliRunner

from kvfabric.cli.app import app
from kvfabric.hashing import chain_hashes, format_chain

runner = CliRunner()
KVFABRIC = [sys.executable, "-m", "kvfabric.cli.app"]


def test_hash_prints_one_line_per_full_block(tmp_path: Path) -> None:
    res = runner.invoke(app, ["hash", "--block-size", "2", "--tokens", "1,2,3,4,5"])
    assert res.exit_code == 0, res.output
    assert res.output.split() == format_chain(chain_hashes([1, 2, 3, 4, 5], 2))
    f = tmp_path / "ids.txt"
    f.write_text("1 2\n3 4 5\n")
    res2 = runner.invoke(app, ["hash", "--block-size", "2", "--tokens-file", str(f), "--json"])
    assert res2.exit_code == 0
    assert json.loads(res2.output.splitlines()[-1])["hashes"] == res.output.split()
    salted = runner.invoke(
        app, ["hash", "--block-size", "2", "--tokens", "1,2", "--cache-salt", "s"]
    )
    assert salted.output.split() != res.output.split()[:1]


def test_hash_bad_input_exit_codes(tmp_path: Path) -> None:
    bad = runner.invoke(app, ["hash", "--block-size", "2", "--tokens", "1,x,3"])
    assert bad.exit_code == 1 and "tokens" in bad.output
    neg = runner.invoke(app, ["hash", "--block-size", "0", "--tokens", "1,2"])
    assert neg.exit_code == 1 and "block_size" in neg.output
    both = runner.invoke(app, ["hash", "--block-size", "2"])
    assert both.exit_code == 2
    missing = runner.invoke(
        app, ["hash", "--block-size", "2", "--tokens-file", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 1 and "cannot read" in missing.output
    unknown = runner.invoke(app, ["bench", "nosuch"])
    assert unknown.exit_code == 2


def test_doctor_json_as_a_subprocess() -> None:
    out = subprocess.run(
        [*KVFABRIC, "doctor", "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["hash_selftest"]["ok"] and report["hash_selftest"]["checked"] > 5
    assert report["native"]["usable"] and report["tiers"]["disk"]["usable"]
    assert report["tiers"]["gpu"]["usable"] in (True, False)
    assert report["transports"]["tcp"]["usable"]
    assert report["transports"]["auto"]["detail"] == "'auto' picks tcp"  # no NIXL here


def test_up_serves_until_signalled(tmp_path: Path) -> None:
    env = {**os.environ, "KVFABRIC_STATUS_INTERVAL_S": "0.2", "KVFABRIC_CPU_ARENA_BYTES": "64MiB",
           "KVFABRIC_DISK_BYTES": "64MiB"}  # fmt: skip
    proc = subprocess.Popen(
        [*KVFABRIC, "up", "--standalone", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(lines) < 3:
            line = proc.stdout.readline()
            if not line:
                break
            if "node up" in line:
                lines.append(line)
        assert len(lines) >= 3, proc.stderr.read() if proc.stderr else ""
        assert "CPU: 0 blocks" in lines[0] and "DISK" in lines[0]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "data" / "disk").is_dir()


def test_up_starts_a_local_ray_fabric_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="kvf-", dir="/tmp")
    os.makedirs(os.path.join(ray_tmp, "ray"))
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "KVFABRIC_STATUS_INTERVAL_S": "0.5",
           "KVFABRIC_CPU_ARENA_BYTES": "64MiB", "KVFABRIC_DISK_BYTES": "64MiB",
           "KVFABRIC_CPU_PREFAULT": "0"}  # fmt: skip
    proc = subprocess.Popen(
        [*KVFABRIC, "up", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and sum("ready=True" in x for x in seen) < 2:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
        text = "".join(seen)
        assert "fabric up on Ray" in text and "gRPC API at 127.0.0.1:" in text, text
        assert "blocks at 127.0.0.1:" in text, text
        assert "directory seq" in text and "ready=True" in text, text
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_up_rejects_a_bad_config_value(tmp_path: Path) -> None:
    res = runner.invoke(app, ["up", "--data-dir", str(tmp_path), "--cpu-arena-bytes", "lots"])
    assert res.exit_code == 1 and "cpu_arena_bytes" in res.output
