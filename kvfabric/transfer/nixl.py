"""The NIXL block transport: one-sided DRAM reads over UCX, guarded so it never loads by accident.

NIXL is optional (``pip install kvfabric[nixl]``). Nothing here imports it at
module import; :meth:`NixlTransport.probe` and the first
:meth:`~NixlTransport.serve` / :meth:`~NixlTransport.fetch` do, and a machine
without it answers ``usable=False`` with the reason.

Memory: each transport owns one NIXL agent (UCX backend, strict thread
sync, so any number of fetching threads may share it). The serving node
registers its CPU-tier arena with the agent once, in ``serve``; a fetching
node registers its own arena once, on its first ``fetch`` into that store.
Nothing is registered per block. NIXL's own progress thread is off (it
spins a whole core per agent, idle or not); a small thread drives UCX
progress every 5 ms, every 0.1 ms while a peer may be reading our arena
(between a REMOTE answer and its ACK), and a fetching thread progresses its
own READ while it waits.

How a fetch works (the TCP transport's control connection carries the metadata):

1. On each new control connection the client sends a HELLO frame; the server
   answers with its NIXL agent metadata (which describes its registered
   arena), and the client loads it with ``add_remote_agent`` (again only when
   the metadata changed, i.e. the peer restarted).
2. The client sends an ordinary block request with ``FLAG_REMOTE``. The
   server leases the blocks (``store.open_read``); for each block inside its
   registered arena it answers ``REMOTE`` with the block's address, for any
   other (disk tier, GPU staging) ``OK`` with the payload inline, exactly like
   TCP.
3. The client reserves arena slots for the whole batch (``store.open_write``),
   receives the inline payloads, then issues one NIXL ``READ`` from the remote
   addresses into its reserved slots and polls it to completion within the
   deadline (with UCX's CMA transport the read completes inside the post).
4. The client sends ACK; only then does the server end the lease, so the
   slots read from cannot be freed or reused under the transfer. (Hence one
   request in flight per connection: the ACK must follow its own response.)
   A server that never sees the ACK ends the lease when the connection
   closes or its I/O timeout passes; a block reused after that fails its
   checksum below.
5. The client commits, which verifies every checksum exactly as for TCP:
   bytes that changed in flight are dropped and counted as ``corrupt``, never
   published. Any failure before the commit — a NIXL error (the peer died:
   ``NIXL_ERR_REMOTE_DISCONNECT``), a READ still running at the deadline, a
   broken control connection — releases the transfer handle, aborts the
   whole batch's reservation (nothing of it becomes visible) and raises
   :class:`~kvfabric.errors.Unavailable`. Releasing a handle waits for a
   running transfer to stop before the slots are handed back; if NIXL cannot
   stop it within a grace period the error is logged loudly.

What ``make_transport("auto")`` picks (:func:`auto_choice`):

* never NIXL unless :meth:`NixlTransport.probe` is usable: NIXL imports, a
  UCX agent starts, and a 1 MiB DRAM→DRAM READ between two agents of this
  process lands the expected bytes;
* a host with a usable CUDA device: NIXL (RDMA and GPU memory are what it is
  for; TCP cannot do them zero-copy);
* a CPU-only host: TCP (:data:`CPU_ONLY_PREFERS_NIXL`). Measured on the
  reference machine (2 cores, loopback, 64 × 2 MiB between two processes,
  alternating, median of 18 rounds): NIXL 2.35–2.62 GB/s against TCP
  2.06–2.40 GB/s with UCX's defaults — but that READ is CMA, a same-host
  shortcut that two hosts never get; over UCX's TCP transport (what NIXL
  uses between CPU-only hosts without RDMA) NIXL made 0.88 GB/s against
  TCP's 1.58. The transport setting ``nixl`` still forces NIXL.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import logging
import mmap
import os
import socket
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from kvfabric.errors import InvalidArgument, Unavailable
from kvfabric.node.core import NodeStoreCore
from kvfabric.node.leases import ReadLease
from kvfabric.transfer import wire
from kvfabric.transfer.base import FetchResult, Handler, TransportProbe, answer_inline
from kvfabric.transfer.tcp import MiB, TcpTransport
from kvfabric.transfer.wire import Entry, Request, Status
from kvfabric.types import BlockKey, Tier

log = logging.getLogger(__name__)

HELLO_MAGIC = b"KVFN"
ACK_MAGIC = b"KVFA"
_LEN = struct.Struct("<I")
MAX_METADATA_BYTES = 64 << 20
_PROBE_TIMEOUT_S = 30.0
_PROBE_BYTES = 1 << 20
_RELEASE_GRACE_S = 5.0

#: The "auto" choice on hosts without a usable CUDA device (see the module docstring):
#: TCP, which beat NIXL over UCX's TCP transport 1.8× and trailed NIXL's same-host
#: CMA path by ~10 % only.
CPU_ONLY_PREFERS_NIXL = False

_probe_lock = threading.Lock()
_probe_result: TransportProbe | None = None
_live: weakref.WeakSet[NixlTransport] = weakref.WeakSet()  # transports holding an agent


@atexit.register
def _close_live_transports() -> None:
    """Close transports still open at exit: an agent torn down under its progress
    thread during interpreter finalisation aborts the process (std::terminate)."""
    for transport in list(_live):
        with contextlib.suppress(Exception):
            transport.close()


def _api() -> Any:
    """``nixl._api``, imported once; NIXL's INFO chatter (on stdout) is turned down."""
    raise_exceptions = logging.raiseExceptions
    try:
        from nixl import _api
    finally:
        logging.raiseExceptions = raise_exceptions  # NIXL's logging setup flips it globally
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)
    return _api


def _new_agent(name: str) -> Any:
    """A NIXL agent with the UCX backend and a lock around every call (threads share it).

    NIXL's own progress thread is off: it busy-polls a whole core per agent
    even when idle (measured: ~1 CPU-second per second). :class:`_Pump`
    drives progress instead.
    """
    api = _api()
    config = api.nixl_agent_config(
        enable_prog_thread=False,
        backends=["UCX"],
        sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
    )
    agent = api.nixl_agent(name, config)
    if "UCX" not in agent.backends:
        raise RuntimeError(f"NIXL has no UCX backend plugin (available: {agent.plugin_list})")
    return agent


class _Pump:
    """Drives an agent's UCX progress from a thread: every ``idle_s``, or every ``busy_s``
    while a peer may be reading our memory (transports such as UCX's TCP need the
    target to progress; CMA and RDMA reads do not). Connection set-up needs it too.
    """

    def __init__(self, agent: Any, idle_s: float = 0.005, busy_s: float = 0.0001) -> None:
        self._agent, self._idle_s, self._busy_s = agent, idle_s, busy_s
        self._busy = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvfabric-nixl-progress",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._agent.get_new_notifs()  # progresses the UCX worker
                failures = 0
            except Exception:
                failures += 1
                if failures == 1:
                    log.exception("NIXL progress failed")
            self._wake.wait(self._busy_s if self._busy else self._idle_s)
            self._wake.clear()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Progress eagerly for the duration of the block."""
        with self._lock:
            self._busy += 1
        self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)


def _address_of(buf: memoryview | mmap.mmap) -> int:
    """The virtual address of a host buffer's first byte."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _arena_of(store: NodeStoreCore) -> Any:
    arena = getattr(store.tiers.get(Tier.CPU), "arena", None)
    if arena is None:
        raise Unavailable("the store has no host arena to register with NIXL", "store")
    return arena


def _descs(rows: list[tuple[int, int]]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """An N×3 (address, length, device 0) descriptor array."""
    out = np.zeros((len(rows), 3), dtype=np.uint64)
    if rows:
        out[:, :2] = rows
    return out


def _nixl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nixl")
    except PackageNotFoundError:
        return "?"


class NixlTransport(TcpTransport):
    """Blocks read one-sidedly with NIXL (UCX) between registered host arenas.

    Falls back to inline TCP payloads, on the same connection, for blocks
    outside the server's arena. Usable only where :meth:`probe` says so.
    ``max_request_bytes`` is the size of one READ (capped at half the local
    CPU tier); requests are not pipelined (see the module docstring).
    """

    name = "nixl"
    request_flags = wire.FLAG_REMOTE

    def __init__(self, *, max_request_bytes: int = 64 * MiB, **tcp_options: Any) -> None:
        tcp_options.pop("pipeline_depth", None)
        super().__init__(max_request_bytes=max_request_bytes, pipeline_depth=1, **tcp_options)
        self._agent: Any = None
        self._pump: _Pump | None = None
        self._nixl_lock = threading.Lock()
        self._registered: dict[int, tuple[int, int, Any]] = {}  # id(arena) -> base, size, descs
        self._served: tuple[int, int] | None = None
        self._peers: dict[str, tuple[bytes, str]] = {}  # address -> metadata digest, agent name
        self._stuck: list[Any] = []  # transfer handles NIXL refused to release
        self._closed = False

    @classmethod
    def probe(cls) -> TransportProbe:
        """Import NIXL, start a UCX agent and READ 1 MiB DRAM→DRAM between two agents.

        Runs once per process (cached), in a thread bounded by 30 s.
        """
        global _probe_result
        with _probe_lock:
            if _probe_result is None:
                _probe_result = _run_probe()
            return _probe_result

    # -- agent and registrations -----------------------------------------------------------
    def _ensure_agent(self) -> Any:
        with self._nixl_lock:
            if self._closed:
                raise Unavailable("the NIXL transport is closed", "transport")
            if self._agent is None:
                probe = self.probe()
                if not probe.usable:
                    raise Unavailable(f"NIXL is not usable here: {probe.detail}", "transport")
                try:
                    self._agent = _new_agent(f"kvfabric-{os.getpid()}-{uuid.uuid4().hex[:12]}")
                except Exception as exc:
                    raise Unavailable(f"cannot start a NIXL agent: {exc}", "transport") from exc
                self._pump = _Pump(self._agent)
                _live.add(self)
            return self._agent

    def _register(self, store: NodeStoreCore) -> tuple[int, int]:
        """Register ``store``'s arena with the agent (once); returns its base and size."""
        agent = self._ensure_agent()
        arena = _arena_of(store)
        base, size = _address_of(arena.view), int(arena.size)
        with self._nixl_lock:
            known = self._registered.get(id(arena))
            if known is not None and known[:2] == (base, size):
                return base, size
            if known is not None:  # a new arena reusing a dead one's id
                with contextlib.suppress(Exception):
                    agent.deregister_memory(known[2])
            try:
                descs = agent.register_memory([(base, size, 0, "kvfabric-arena")], "DRAM")
            except Exception as exc:
                raise Unavailable(f"NIXL cannot register the arena: {exc}", "transport") from exc
            self._registered[id(arena)] = (base, size, descs)
        log.info("registered a %d-byte host arena with NIXL", size)
        return base, size

    def serve(self, store: NodeStoreCore, host: str = "127.0.0.1", port: int = 0) -> str:
        """Register ``store``'s arena, then serve metadata and blocks on ``host:port``."""
        self._served = self._register(store)
        return super().serve(store, host, port)

    def fetch(
        self,
        address: str,
        keys: Sequence[BlockKey],
        store: NodeStoreCore,
        *,
        timeout_s: float,
    ) -> FetchResult:
        """Like TCP's fetch; blocks in the peer's arena move by one NIXL READ per batch."""
        self._register(store)  # the READ lands in this store's reserved slots
        return super().fetch(address, keys, store, timeout_s=timeout_s)

    def close(self) -> None:
        """Stop serving, drop connections, deregister memory and forget peers (idempotent)."""
        super().close()
        with self._nixl_lock:
            self._closed = True
            agent, self._agent = self._agent, None
            pump, self._pump = self._pump, None
            _live.discard(self)
            regs, peers = list(self._registered.values()), list(self._peers.values())
            self._registered.clear()
            self._peers.clear()
        if pump is not None:
            pump.stop()
        if agent is None:
            return
        for _, name in peers:
            with contextlib.suppress(Exception):
                agent.remove_remote_agent(name)
        for _, _, descs in regs:
            with contextlib.suppress(Exception):
                agent.deregister_memory(descs)

    # -- server side -----------------------------------------------------------------------
    def _extensions(self) -> dict[bytes, Handler]:
        return {HELLO_MAGIC: self._serve_hello}

    def _serve_hello(self, conn: socket.socket) -> None:
        (n,) = _LEN.unpack(wire.recv_exact(conn, _LEN.size))
        if n > MAX_METADATA_BYTES:
            raise InvalidArgument(f"hello of {n} bytes is too large", "hello")
        wire.recv_exact(conn, n)  # the client's metadata: not needed for client-side READs
        metadata = bytes(self._ensure_agent().get_agent_metadata())
        wire.send_buffers(conn, [HELLO_MAGIC, _LEN.pack(len(metadata)), metadata])

    def _answer(self, conn: socket.socket, request: Request, lease: ReadLease) -> None:
        if not request.flags & wire.FLAG_REMOTE or self._served is None:
            answer_inline(conn, request, lease)
            return
        base, size = self._served
        entries: list[Entry] = []
        payloads: list[memoryview] = []
        for rec, buf in zip(lease.records, lease.buffers, strict=True):
            if rec is None or buf is None or len(buf) != rec.size:
                entries.append(wire.MISSING)
                continue
            addr = _address_of(buf)
            if base <= addr and addr + rec.size <= base + size:
                entries.append(Entry(Status.REMOTE, rec.size, rec.checksum, rec.type,
                                     rec.program_id, addr))  # fmt: skip
            else:
                entries.append(Entry(Status.OK, rec.size, rec.checksum, rec.type, rec.program_id))
                payloads.append(buf)
        if not any(e.status == Status.REMOTE for e in entries):
            wire.send_buffers(conn, [wire.encode_response(entries), *payloads])
            return
        # The lease (ended by our caller) must outlive the client's READ: wait for its ACK.
        pump = self._pump
        with pump.busy() if pump is not None else contextlib.nullcontext():
            wire.send_buffers(conn, [wire.encode_response(entries), *payloads])
            if bytes(wire.recv_exact(conn, len(ACK_MAGIC))) != ACK_MAGIC:
                raise InvalidArgument("expected ACK after a remote read", "request")

    # -- client side -----------------------------------------------------------------------
    def _on_connect(self, sock: socket.socket, address: str, deadline: float) -> None:
        agent = self._ensure_agent()
        sock.settimeout(wire.remaining(deadline, address))
        try:
            wire.send_buffers(sock, [HELLO_MAGIC, _LEN.pack(0)])
            head = wire.recv_exact(sock, len(HELLO_MAGIC) + _LEN.size)
        except (Unavailable, ConnectionError):
            raise Unavailable(f"{address} does not serve NIXL metadata", "address") from None
        (n,) = _LEN.unpack_from(head, len(HELLO_MAGIC))
        if bytes(head[: len(HELLO_MAGIC)]) != HELLO_MAGIC or n > MAX_METADATA_BYTES:
            raise Unavailable(f"{address} sent a bad NIXL hello", "address")
        metadata = bytes(wire.recv_exact(sock, n))
        digest = hashlib.blake2b(metadata, digest_size=16).digest()
        with self._nixl_lock:
            known = self._peers.get(address)
            if known is not None and known[0] == digest:
                return
            if known is not None:  # the peer restarted with a new agent
                with contextlib.suppress(Exception):
                    agent.remove_remote_agent(known[1])
            try:
                name = agent.add_remote_agent(metadata)
            except Exception as exc:
                raise Unavailable(f"cannot load NIXL metadata of {address}: {exc}",
                                  "address") from exc  # fmt: skip
            name = name.decode() if isinstance(name, bytes) else str(name)
            self._peers[address] = (digest, name)

    def _forget_peer(self, address: str) -> None:
        """Drop a peer whose agent failed, so the next connection loads it afresh."""
        with self._nixl_lock:
            known = self._peers.pop(address, None)
            agent = self._agent
        if known is not None and agent is not None:
            with contextlib.suppress(Exception):
                agent.remove_remote_agent(known[1])
        self._pool.close_idle(address)

    def _land_remote(
        self, conn: socket.socket, address: str, entries: list[Entry],
        pairs: list[tuple[Entry, memoryview]], deadline: float,
    ) -> int:  # fmt: skip
        if not any(e.status == Status.REMOTE for e in entries):
            return 0
        try:
            if pairs:
                self._read(address, pairs, deadline)
        except BaseException:
            with contextlib.suppress(OSError):  # let a live server end its lease now
                conn.settimeout(0.5)
                wire.send_buffers(conn, [ACK_MAGIC])
            raise
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        wire.send_buffers(conn, [ACK_MAGIC])  # lets the server end its lease
        return sum(e.size for e, _ in pairs)

    def _read(self, address: str, pairs: list[tuple[Entry, memoryview]], deadline: float) -> None:
        """One NIXL READ of every remote block into its slot; Unavailable unless it completes."""
        agent = self._ensure_agent()
        with self._nixl_lock:
            known = self._peers.get(address)
        if known is None:
            raise Unavailable(f"no NIXL metadata for {address}", "address")
        local = agent.get_xfer_descs(_descs([(_address_of(d), e.size) for e, d in pairs]), "DRAM")
        remote = agent.get_xfer_descs(_descs([(e.address, e.size) for e, _ in pairs]), "DRAM")
        handle: Any = None
        state, error = "ERR", None
        try:
            handle = agent.initialize_xfer("READ", local, remote, known[1], b"")
            state = agent.transfer(handle)
            pause = 5e-5
            while state == "PROC" and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
                state = agent.check_xfer_state(handle)
        except Exception as exc:  # nixlRemoteDisconnectError and friends
            error = exc
        finally:
            if handle is not None:
                self._release(agent, handle, deadline)
        what = f"NIXL READ of {len(pairs)} blocks from {address}"
        if error is not None:
            self._forget_peer(address)
            raise Unavailable(f"{what} failed: {type(error).__name__}: {error}", "address")
        if state != "DONE":
            raise Unavailable(f"{what} {'timed out' if state == 'PROC' else 'failed'}", "address")

    def _release(self, agent: Any, handle: Any, deadline: float) -> None:
        """Release a transfer handle; a running transfer must stop before its slots are freed."""
        stop = max(deadline, time.monotonic()) + _RELEASE_GRACE_S
        while True:
            try:
                agent.release_xfer_handle(handle)
                return
            except Exception as exc:  # cannot cancel yet: wait (bounded) for it to finish
                if time.monotonic() > stop:
                    self._stuck.append(handle)  # never finalised under a live transfer
                    log.error("a NIXL transfer could not be stopped (%s); its slots are "
                              "released anyway, checksums guard reuse", exc)  # fmt: skip
                    return
                time.sleep(0.01)
                with contextlib.suppress(Exception):
                    agent.check_xfer_state(handle)


def auto_choice() -> TransportProbe:
    """Whether ``make_transport("auto")`` should pick NIXL here, with the reason."""
    probe = NixlTransport.probe()
    if not probe.usable:
        return TransportProbe(False, f"NIXL is not usable: {probe.detail}")
    from kvfabric.tiers.gpu import cuda_usable

    if cuda_usable():
        return TransportProbe(True, "CUDA host and NIXL works: NIXL")
    if CPU_ONLY_PREFERS_NIXL:
        return TransportProbe(True, "CPU-only host: NIXL (CPU_ONLY_PREFERS_NIXL is set)")
    return TransportProbe(
        False, "CPU-only host: TCP (NIXL over UCX's TCP measured 1.8x slower; see transfer.nixl)"
    )


def _dram_self_test() -> str:
    """READ 1 MiB between two fresh agents of this process; returns a description."""
    tag = uuid.uuid4().hex[:8]
    server, client = _new_agent(f"kvfabric-probe-a-{tag}"), _new_agent(f"kvfabric-probe-b-{tag}")
    src, dst = mmap.mmap(-1, _PROBE_BYTES), mmap.mmap(-1, _PROBE_BYTES)
    pattern = hashlib.blake2b(tag.encode(), digest_size=64).digest()
    src[:] = pattern * (_PROBE_BYTES // len(pattern))
    a, b = _address_of(src), _address_of(dst)
    cleanups: list[Callable[[], Any]] = []
    try:
        reg = server.register_memory([(a, _PROBE_BYTES, 0, "probe")], "DRAM")
        cleanups.append(lambda: server.deregister_memory(reg))
        reg_b = client.register_memory([(b, _PROBE_BYTES, 0, "probe")], "DRAM")
        cleanups.append(lambda: client.deregister_memory(reg_b))
        peer = client.add_remote_agent(server.get_agent_metadata())
        peer = peer.decode() if isinstance(peer, bytes) else str(peer)
        cleanups.append(lambda: client.remove_remote_agent(peer))
        local = client.get_xfer_descs(_descs([(b, _PROBE_BYTES)]), "DRAM")
        remote = client.get_xfer_descs(_descs([(a, _PROBE_BYTES)]), "DRAM")
        handle = client.initialize_xfer("READ", local, remote, peer, b"")
        try:
            deadline = time.monotonic() + 10.0
            state = client.transfer(handle)
            while state == "PROC" and time.monotonic() < deadline:
                server.get_new_notifs()  # neither agent has a progress thread
                time.sleep(0.0005)
                state = client.check_xfer_state(handle)
            backend = client.query_xfer_backend(handle)
        finally:
            client.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"DRAM READ self-test ended in state {state}")
        if dst[:] != src[:]:
            raise RuntimeError("DRAM READ self-test landed wrong bytes")
        return f"1 MiB DRAM READ between two agents verified ({backend})"
    finally:
        for undo in reversed(cleanups):
            with contextlib.suppress(Exception):
                undo()
        src.close()
        dst.close()


def _run_probe() -> TransportProbe:
    if importlib.util.find_spec("nixl") is None:
        return TransportProbe(False, "nixl is not installed (pip install 'kvfabric[nixl]')")
    outcome: list[TransportProbe] = []

    def attempt() -> None:
        try:
            detail = _dram_self_test()
            outcome.append(TransportProbe(True, f"NIXL {_nixl_version()}, UCX backend: {detail}"))
        except Exception as exc:  # ImportError, missing plugin, UCX failure: the finding itself
            outcome.append(TransportProbe(False, f"{type(exc).__name__}: {exc}"))

    worker = threading.Thread(target=attempt, name="kvfabric-nixl-probe", daemon=True)
    worker.start()
    worker.join(_PROBE_TIMEOUT_S)
    if not outcome:
        return TransportProbe(False, f"the NIXL self-test took over {_PROBE_TIMEOUT_S:.0f} s")
    return outcome[0]
