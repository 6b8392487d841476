"""The NIXL transport between two real node stores in two processes (UCX over loopback).

Node A runs in a spawned process (its own NIXL agent), serving its store
over NIXL and, for comparison, over TCP; node B is this process. UCX is
kept on the loopback device; its READ between the processes goes by CMA.
Skipped where nixl is not installed or its self-test fails (with the reason).
"""

from __future__ import annotations

import os

# Before NIXL/UCX load here or in the spawned node (which inherits the environment).
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

import pytest

pytest.importorskip("nixl", exc_type=ImportError)  # absent or broken: skip, with the reason

import contextlib
import importlib.util
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import kvfabric.transfer.nixl as nixl_module
from kvfabric.errors import Unavailable
from kvfabric.node.core import NodeStoreCore
from kvfabric.node.leases import ReadLease
from kvfabric.tiers.gpu import cuda_usable
from kvfabric.transfer import make_transport
from kvfabric.transfer.nixl import CPU_ONLY_PREFERS_NIXL, NixlTransport, auto_choice
from kvfabric.transfer.tcp import TcpTransport
from kvfabric.transfer.wire import Request
from kvfabric.types import Tier
from tests.conftest import NS, block, key, make_store

pytestmark = pytest.mark.timeout(60)

_PROBE = NixlTransport.probe()
if not _PROBE.usable:
    pytest.skip(f"NIXL is installed but not usable: {_PROBE.detail}", allow_module_level=True)

SIZE = 2 << 20  # 2 MiB blocks
CFG: dict[str, Any] = {"cpu_arena_bytes": "160MiB", "cpu_slab_bytes": "16MiB",
                       "max_block_bytes": "4MiB", "cpu_prefault": True}  # fmt: skip
WAIT_S = 30.0  # every wait on the other process is bounded by this


# -- node A, in its own process ---------------------------------------------------------------
class _DieOnAck:
    """Socket stand-in: sends pass through; waiting for the client's ACK kills the process."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def sendmsg(self, *args: Any) -> int:
        return int(self._sock.sendmsg(*args))

    def recv_into(self, *args: Any) -> int:
        os.kill(os.getpid(), signal.SIGKILL)  # the response is out; the client is reading
        raise AssertionError("unreachable")


class _DyingNixl(NixlTransport):
    """Serves normally until ``die`` is set; then dies right after its next REMOTE answer."""

    die = False

    def _answer(self, conn: Any, request: Request, lease: ReadLease) -> None:
        super()._answer(_DieOnAck(conn) if self.die else conn, request, lease)


def _serve_node(pipe: Connection, data_dir: str) -> None:
    """Node A: a store served over NIXL and TCP, driven by commands on ``pipe``."""
    store = make_store(Path(data_dir), disk_bytes="64MiB", **CFG)
    store.register_namespace(NS, SIZE)
    nixl, tcp = _DyingNixl(), TcpTransport()
    try:
        pipe.send((nixl.serve(store), tcp.serve(store)))
        while pipe.poll(120):  # a forgotten node exits on its own
            cmd, arg = pipe.recv()
            if cmd == "put":
                store.put_many([key(i) for i in arg], [block(i, SIZE) for i in arg])
                pipe.send(len(arg))
            elif cmd == "corrupt":  # bit rot in the sender's arena
                cpu = store.tiers[Tier.CPU]
                off = cpu.slot_offset(key(arg))
                assert off is not None
                cpu.arena.view[off + 100] ^= 0xFF
                pipe.send(off)
            elif cmd == "evict":  # CPU-tier bytes in use before and after the eviction
                before = cpu_used(store)
                store.evict([key(i) for i in arg])
                pipe.send((before, cpu_used(store)))
            elif cmd == "used":
                pipe.send(cpu_used(store))
            elif cmd == "to_disk":
                pipe.send(len(store.move([key(i) for i in arg], Tier.DISK).moved))
            elif cmd == "die":
                nixl.die = True
                pipe.send(True)
            else:
                break
    finally:
        nixl.close()
        tcp.close()
        store.close()


class Node:
    """Handle on a node process: its addresses and a bounded command channel."""

    def __init__(self, data_dir: Path) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process holding UCX state
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_node, args=(child, str(data_dir)), daemon=True)
        self.proc.start()
        child.close()
        if not self.pipe.poll(WAIT_S):
            self.stop()
            raise RuntimeError("node A did not start")
        self.nixl, self.tcp = self.pipe.recv()

    def call(self, cmd: str, arg: Any = None) -> Any:
        self.pipe.send((cmd, arg))
        if not self.pipe.poll(WAIT_S):
            raise TimeoutError(f"node A did not answer {cmd!r}")
        return self.pipe.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.pipe.send(("stop", None))
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.pipe.close()


@pytest.fixture(scope="module")
def node_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(tmp_path_factory.mktemp("node-a"))
    node.call("put", list(range(64)))
    yield node
    node.stop()


@pytest.fixture
def b(tmp_path: Path) -> Iterator[NodeStoreCore]:
    store = make_store(tmp_path / "b", disk_enabled=False, **CFG)
    store.register_namespace(NS, SIZE)
    yield store
    store.close()


@pytest.fixture
def client() -> Iterator[NixlTransport]:
    transport = NixlTransport()
    yield transport
    transport.close()


def cpu_used(store: NodeStoreCore) -> int:
    return next(t.used_bytes for t in store.stats().tiers if t.tier == Tier.CPU)


# -- tests ----------------------------------------------------------------------------------
def test_probe_and_auto_choice() -> None:
    assert _PROBE.usable and "DRAM READ" in _PROBE.detail
    choice = auto_choice()
    assert choice.usable == (cuda_usable() or CPU_ONLY_PREFERS_NIXL) and choice.detail
    chosen = make_transport("auto")
    try:
        assert chosen.name == ("nixl" if choice.usable else "tcp")
    finally:
        chosen.close()


def test_without_nixl_probe_says_why_and_auto_picks_tcp(
    monkeypatch: pytest.MonkeyPatch, b: NodeStoreCore
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "nixl" else real_find_spec(name, *args)

    monkeypatch.setattr(nixl_module, "_probe_result", None)  # forget the cached answer
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    probe = NixlTransport.probe()
    assert not probe.usable and "not installed" in probe.detail
    assert not auto_choice().usable and make_transport("auto").name == "tcp"
    nixl = NixlTransport()
    try:
        with pytest.raises(Unavailable, match="NIXL is not usable"):
            nixl.serve(b)
        with pytest.raises(Unavailable, match="NIXL is not usable"):
            nixl.fetch("127.0.0.1:9", [key(1)], b, timeout_s=1)
    finally:
        nixl.close()


def test_fetch_lands_identical_bytes_and_reports_missing(
    node_a: Node, b: NodeStoreCore, client: NixlTransport
) -> None:
    b.put(key(0), block(0, SIZE))
    wanted = [key(i) for i in range(6)] + [key(1000), key(1001)]
    r = client.fetch(node_a.nixl, wanted, b, timeout_s=20)
    assert set(r.fetched) == {key(i) for i in range(1, 6)}
    assert r.missing == (key(1000), key(1001)) and r.already_present == (key(0),)
    assert r.corrupt == () and r.bytes == 5 * SIZE
    for i in range(6):
        assert b.get(key(i)) == block(i, SIZE)
    meta = b.meta(key(3))
    assert meta is not None and meta.tier == Tier.CPU
    again = client.fetch(node_a.nixl, [key(i) for i in range(6)], b, timeout_s=20)
    assert again.fetched == () and len(again.already_present) == 6


def test_corrupt_slot_on_the_server_is_counted_and_never_stored(
    node_a: Node, b: NodeStoreCore, client: NixlTransport
) -> None:
    node_a.call("put", [100, 101])
    node_a.call("corrupt", 100)
    r = client.fetch(node_a.nixl, [key(100), key(101)], b, timeout_s=20)
    assert r.corrupt == (key(100),) and r.fetched == (key(101),)
    assert b.contains([key(100)]) == [None] and b.get(key(101)) == block(101, SIZE)
    assert b.stats().counters.checksum_failures == 1


def test_server_holds_its_lease_until_the_read_is_done(node_a: Node, b: NodeStoreCore) -> None:
    node_a.call("put", [400])
    during: list[tuple[int, int]] = []

    class Spy(NixlTransport):
        def _read(self, address: str, pairs: list[Any], deadline: float) -> None:
            during.append(node_a.call("evict", [400]))  # A drops the block under the READ
            super()._read(address, pairs, deadline)

    spy = Spy()
    try:
        r = spy.fetch(node_a.nixl, [key(400)], b, timeout_s=20)
    finally:
        spy.close()
    assert r.fetched == (key(400),) and b.get(key(400)) == block(400, SIZE)
    ((before, after_evict),) = during
    assert after_evict == before  # the leased slot outlived its eviction
    stop = time.monotonic() + 5
    while node_a.call("used") == before and time.monotonic() < stop:
        time.sleep(0.01)  # the ACK ended the lease; the slot is freed then
    assert node_a.call("used") < before


def test_disk_blocks_come_inline_next_to_remote_ones(
    node_a: Node, b: NodeStoreCore, client: NixlTransport
) -> None:
    node_a.call("put", [200, 201, 202])
    assert node_a.call("to_disk", [200, 201]) == 2
    keys = [key(200), key(202), key(201)]
    r = client.fetch(node_a.nixl, keys, b, timeout_s=20)
    assert set(r.fetched) == set(keys) and r.bytes == 3 * SIZE
    assert [b.get(k) for k in keys] == [block(i, SIZE) for i in (200, 202, 201)]


def test_many_batches_and_concurrent_fetches(node_a: Node, b: NodeStoreCore) -> None:
    keys = [key(i) for i in range(16)]
    client = NixlTransport(max_request_bytes=3 * SIZE)  # six READs per full fetch
    results: list[Any] = []
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:  # overlapping key sets: every key is wanted by several threads
            results.append(client.fetch(node_a.nixl, keys[offset:] + keys[:offset], b,
                                        timeout_s=20))  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(4 * i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        client.close()
    assert not errors and len(results) == 3
    fetched = [k for r in results for k in r.fetched]
    assert sorted(fetched, key=lambda k: k.hash) == sorted(keys, key=lambda k: k.hash)
    assert [b.get(k) for k in keys] == [block(i, SIZE) for i in range(16)]


def test_tcp_and_nixl_peers_interoperate(node_a: Node, b: NodeStoreCore) -> None:
    with TcpTransport() as tcp:  # a TCP client of a NIXL server gets every block inline
        assert tcp.fetch(node_a.nixl, [key(7)], b, timeout_s=20).fetched == (key(7),)
    nixl = NixlTransport()
    try:  # a NIXL client of a plain TCP server is refused cleanly
        with pytest.raises(Unavailable, match="does not serve NIXL metadata"):
            nixl.fetch(node_a.tcp, [key(8)], b, timeout_s=5)
    finally:
        nixl.close()
    assert b.contains([key(8)]) == [None]


def test_server_killed_mid_transfer_leaves_nothing_visible(
    tmp_path: Path, b: NodeStoreCore, client: NixlTransport
) -> None:
    node = Node(tmp_path / "doomed")
    try:
        keys = [key(i) for i in range(300, 316)]  # 32 MiB: one batch, one READ
        node.call("put", [300 + i for i in range(16)])
        warm = client.fetch(node.nixl, keys[:1], b, timeout_s=20)  # connection and agent up
        assert warm.fetched == (keys[0],)
        used = cpu_used(b)
        node.call("die")  # dies right after sending its next REMOTE answer
        start = time.monotonic()
        with pytest.raises(Unavailable) as err:
            client.fetch(node.nixl, keys, b, timeout_s=10)
        assert err.value.field == "address"
        assert time.monotonic() - start < 10
        node.proc.join(10)
        assert node.proc.exitcode == -signal.SIGKILL
        assert b.contains(keys[1:]) == [None] * 15
        assert cpu_used(b) == used  # the reserved slots went back
        assert b.get(keys[0]) == block(300, SIZE)
    finally:
        node.stop()


def test_throughput_of_2mib_blocks_next_to_tcp(node_a: Node, b: NodeStoreCore) -> None:
    keys = [key(i) for i in range(64)]
    rates: dict[str, float] = {}
    for name, address, transport in (("nixl", node_a.nixl, NixlTransport()),
                                     ("tcp", node_a.tcp, TcpTransport())):  # fmt: skip
        best = 0.0
        try:
            for _ in range(3):
                b.evict(keys)
                r = transport.fetch(address, keys, b, timeout_s=30)
                assert len(r.fetched) == 64 and r.bytes == 64 * SIZE and r.corrupt == ()
                best = max(best, r.gbps)
        finally:
            transport.close()
        rates[name] = best
        assert b.get(keys[17]) == block(17, SIZE) and b.get(keys[63]) == block(63, SIZE)
    print(f"\n64 x 2 MiB between two processes: NIXL (UCX READ) {rates['nixl']:.2f} GB/s | "
          f"TCP transport {rates['tcp']:.2f} GB/s (ratio {rates['nixl'] / rates['tcp']:.2f}) | "
          f"auto on this host: {auto_choice().detail}")  # fmt: skip
