"""Test-side handles on real processes: vLLM engines, a standalone kvfabric node, KV events.

Every wait is bounded; a process that dies or hangs fails the test with the
tail of its log instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIRST_WORD = 4  # token ids below are the tokenizer's special tokens
VOCAB = 512


def tokens(n: int, offset: int = 0) -> list[int]:
    """A deterministic prompt of ``n`` ordinary token ids."""
    span = VOCAB - FIRST_WORD
    return [FIRST_WORD + (offset + 7 * i) % span for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Engine:
    """A vLLM engine process (tests/e2e/_engine.py) answering one prompt at a time."""

    def __init__(self, model: Path, log_dir: Path, name: str, *, address: str | None = None,
                 load_async: str = "auto", events: str | None = None,
                 start_timeout_s: float = 300.0) -> None:  # fmt: skip
        self.name = name
        self.log = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "tests.e2e._engine", str(model)]
        if address:
            cmd += ["--address", address, "--load-async", load_async]
        if events:
            cmd += ["--events", events]
        self._logf = self.log.open("w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._logf, text=True)  # fmt: skip
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._expect("READY", start_timeout_s)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _expect(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.01, left))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no {prefix} in {timeout_s} s\n"
                                     + _tail(self.log)) from None  # fmt: skip
            if line is None:
                raise AssertionError(f"{self.name} exited\n" + _tail(self.log))
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def generate(self, prompt: list[int], *, max_tokens: int = 16,
                 params: dict[str, Any] | None = None, reset: bool = True,
                 timeout_s: float = 180.0) -> dict[str, Any]:  # fmt: skip
        """Greedy output of one prompt: {"tokens": [...], "cached": num_cached_tokens}."""
        assert self.proc.stdin is not None
        cmd = {"tokens": prompt, "max_tokens": max_tokens, "params": params, "reset": reset}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._expect("RESULT", timeout_s))
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._logf.close()


class StandaloneNode:
    """A real ``kvfabric up --standalone`` process with its arena in /dev/shm."""

    def __init__(self, data_dir: Path, shm_name: str, **env_overrides: str) -> None:
        env = {**os.environ, "KVFABRIC_RPC_PORT": str(free_port()), "KVFABRIC_TRANSPORT": "tcp",
               "KVFABRIC_CPU_ARENA_BYTES": "256MiB", "KVFABRIC_CPU_PREFAULT": "0",
               "KVFABRIC_CPU_ARENA_SHM_NAME": shm_name, "KVFABRIC_DISK_BYTES": "256MiB",
               "KVFABRIC_STATUS_INTERVAL_S": "30", **env_overrides}  # fmt: skip
        self.shm_path = Path("/dev/shm") / shm_name
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = data_dir / "node.log"
        self._logf = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvfabric.cli.app", "up", "--standalone",
             "--data-dir", str(data_dir)],
            stdout=self._logf, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        self.address = ""
        while time.monotonic() < deadline and not self.address and self.proc.poll() is None:
            for line in _tail(self.log, 100_000).splitlines():
                if "gRPC API at " in line:
                    self.address = line.split("gRPC API at ")[1].split(",")[0].strip()
            time.sleep(0.2)
        assert self.address, "the node did not start\n" + _tail(self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._logf.close()
        self.shm_path.unlink(missing_ok=True)


class EventSubscriber:
    """Collects the KV events an engine publishes over ZMQ (vLLM's KVEventBatch)."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVTIMEO, 200)
        self._sock.connect(endpoint)
        self.events: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self._stop.is_set():
            try:
                _, _, payload = self._sock.recv_multipart()
            except zmq.Again:
                continue
            self.events.extend(decoder.decode(payload).events)

    def wait_for(self, predicate: Any, timeout_s: float = 30.0) -> list[Any]:
        """Events matching ``predicate``, waiting up to ``timeout_s`` for at least one."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [e for e in list(self.events) if predicate(e)]
            if found:
                return found
            time.sleep(0.1)
        return []

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
