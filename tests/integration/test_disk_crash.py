"""SIGKILL a real disk-tier writer mid-stream; every reported batch must survive whole.

The writer (``_disk_writer.py``) commits batches of 1-16 blocks of 64-512 KiB
and prints ``COMMITTED <n>`` after each ``complete_put``. The test kills it
with SIGKILL at three different moments, reopening the same environment after
each kill, and checks that every reported batch reads back exactly, that no
batch is partly present, and that nothing in the store is corrupt.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import pytest

from kvfabric.integrity import checksum
from kvfabric.tiers.disk import DiskTier

HERE = Path(__file__).resolve().parent
WRITER = HERE / "_disk_writer.py"
MAP_SIZE = 2 << 30
# (batches to see committed first, line that triggers the kill, delay before SIGKILL):
# between two batches, and 1 ms / 2.5 ms into the write transaction of a batch of
# >= 12 blocks (which takes ~5 ms here), so a batch that were not atomic would
# be caught half written.
ROUNDS = [(30, "COMMITTED", 0.0), (45, "PUTTING", 0.001), (60, "PUTTING", 0.0025)]
BIG_BATCH = 12
ROUND_STRIDE = 1_000_000  # batch numbers of round r start at r * ROUND_STRIDE


def _load_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_disk_writer", WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


writer = _load_writer()


def _run_and_kill(path: Path, first: int, threshold: int, trigger: str, delay: float) -> set[int]:
    """Start a writer and SIGKILL it on the first ``trigger`` line after ``threshold``
    committed batches; return every batch it reported committed."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]))
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(path), str(MAP_SIZE), str(first), "25"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    reported: set[int] = set()
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        while True:
            line = proc.stdout.readline()
            assert line, f"writer ended early: {proc.stderr.read()}"
            kind, batch = line.split()
            if kind == "COMMITTED":
                reported.add(int(batch))
            big = kind == "COMMITTED" or writer.batch_size(int(batch)) >= BIG_BATCH
            if kind == trigger and len(reported) >= threshold and big:
                break
        if delay:
            time.sleep(delay)
        assert proc.poll() is None, "the writer must still be writing when it is killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    # Lines printed before the kill were printed after their commit.
    reported.update(int(line.split()[1]) for line in proc.stdout if line.startswith("COMMITTED"))
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return reported


def _verify(path: Path, reported: set[int], attempted_upto: dict[int, int]) -> int:
    """Reopen the store and check it against the reported batches; return blocks checked."""
    tier = DiskTier(path, MAP_SIZE, max_block_bytes=writer.MAX_BLOCK)
    try:
        assert tier.corrupt_found == 0
        present: dict[int, set[int]] = defaultdict(set)
        sizes: dict[int, int] = {}
        for record in tier.inventory():
            batch, index, count = writer.decode_key(record.key)
            assert count == writer.batch_size(batch)
            present[batch].add(index)
            sizes[batch] = count
            expected = writer.block_bytes(batch, index)
            assert record.size == len(expected)
            assert record.checksum == checksum(expected)
            assert tier.read_verified(record.key) == expected
        assert tier.corrupt_found == 0, "inventory found corrupt entries"
        for batch, indexes in present.items():
            assert indexes == set(range(sizes[batch])), f"batch {batch} is only partly present"
        missing = reported - present.keys()
        assert not missing, f"reported batches lost: {sorted(missing)[:10]}"
        unreported = present.keys() - reported
        # At most one batch per kill may have committed without its line being printed.
        for r, upto in attempted_upto.items():
            extra = sorted(b for b in unreported if b // ROUND_STRIDE == r)
            assert len(extra) <= 1 and all(b == upto + 1 for b in extra), extra
        return sum(len(v) for v in present.values())
    finally:
        tier.close()


@pytest.mark.timeout(60)
def test_sigkill_mid_stream_never_loses_or_splits_a_batch(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    started = time.monotonic()
    reported: set[int] = set()
    last_reported: dict[int, int] = {}
    blocks = 0
    for r, (threshold, trigger, delay) in enumerate(ROUNDS):
        got = _run_and_kill(path, r * ROUND_STRIDE, threshold, trigger, delay)
        assert len(got) >= threshold
        reported |= got
        last_reported[r] = max(got)
        blocks = _verify(path, reported, last_reported)
    assert blocks >= sum(writer.batch_size(b) for b in reported)
    assert time.monotonic() - started < 30
