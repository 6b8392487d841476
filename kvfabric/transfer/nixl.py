"""The NIXL block transport: one-sided DRAM reads over UCX, guarded so it never loads by accident.

NIXL is optional. Nothing here imports it at module import; :meth:`probe`
and the first :meth:`NixlTransport.serve` / :meth:`~NixlTransport.fetch`
do, and a machine without it answers ``usable=False`` with the reason.

How a fetch works (the TCP transport's control path carries the metadata):

1. On each new control connection the client sends a HELLO frame; the server
   answers with its NIXL agent metadata (which includes its registered host
   arena), and the client loads it with ``add_remote_agent``.
2. The client sends an ordinary block request with ``FLAG_REMOTE``. The
   server leases the blocks; for each block inside its registered arena it
   answers ``REMOTE`` with the block's address, for any other (disk tier,
   GPU staging) ``OK`` with the payload inline, exactly like TCP.
3. The client reserves arena slots for the whole batch (its own arena is
   registered too), receives the inline payloads, then issues one NIXL
   ``READ`` from the remote addresses into its slots and polls it to
   completion within the deadline.
4. The client sends ACK; only then does the server end the lease, so the
   slots it read from could not be reused under the transfer.
5. The client commits, which verifies every checksum exactly as for TCP:
   bytes that changed in flight are dropped and counted, never published.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvfabric.errors import InvalidArgument, Unavailable
from kvfabric.node.core import NodeStoreCore
from kvfabric.node.leases import ReadLease
from kvfabric.transfer import wire
from kvfabric.transfer.base import FetchResult, Handler, TransportProbe, answer_inline
from kvfabric.transfer.tcp import TcpTransport
from kvfabric.transfer.wire import Entry, Request, Status
from kvfabric.types import BlockKey, Tier

log = logging.getLogger(__name__)

HELLO_MAGIC = b"KVFN"
ACK_MAGIC = b"KVFA"
_LEN = struct.Struct("<I")
MAX_METADATA_BYTES = 64 << 20
_PROBE_TIMEOUT_S = 30.0
_probe_lock = threading.Lock()
_probe_result: TransportProbe | None = None


def _new_agent(name: str) -> Any:
    """A NIXL agent with the UCX backend (NIXL's own prints kept out of stdout)."""
    from nixl._api import nixl_agent, nixl_agent_config

    with contextlib.redirect_stdout(io.StringIO()):
        return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def _address_of(buf: memoryview) -> int:
    """The virtual address of a host buffer's first byte."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _arena_region(store: NodeStoreCore) -> tuple[int, int]:
    """Base address and size of ``store``'s CPU-tier arena."""
    arena = getattr(store.tiers.get(Tier.CPU), "arena", None)
    if arena is None:
        raise Unavailable("the store has no host arena to register with NIXL", "store")
    return _address_of(arena.view), int(arena.size)


class NixlTransport(TcpTransport):
    """Blocks read one-sidedly with NIXL (UCX) between registered host arenas.

    Falls back to inline TCP payloads, on the same connection, for blocks
    outside the server's arena. Usable only where :meth:`probe` says so.
    """

    name = "nixl"
    request_flags = wire.FLAG_REMOTE

    def __init__(self, **tcp_options: Any) -> None:
        super().__init__(**tcp_options)
        self._agent: Any = None
        self._nixl_lock = threading.Lock()
        self._registered: dict[int, tuple[int, int, Any]] = {}  # id(store) -> base, size, descs
        self._served: tuple[int, int] | None = None
        self._peers: dict[str, tuple[bytes, str]] = {}  # address -> metadata digest, agent name
        self._conn_peer: dict[int, str] = {}  # id(socket) -> agent name

    @classmethod
    def probe(cls) -> TransportProbe:
        """Import NIXL and create a throwaway agent (once per process, bounded in time)."""
        global _probe_result
        with _probe_lock:
            if _probe_result is None:
                _probe_result = _run_probe()
            return _probe_result

    # -- agent and registrations -----------------------------------------------------------
    def _ensure_agent(self) -> Any:
        with self._nixl_lock:
            if self._agent is None:
                probe = self.probe()
                if not probe.usable:
                    raise Unavailable(f"NIXL is not usable here: {probe.detail}", "transport")
                self._agent = _new_agent(f"kvfabric-{uuid.uuid4().hex[:12]}")
            return self._agent

    def _register(self, store: NodeStoreCore) -> tuple[int, int]:
        agent = self._ensure_agent()
        with self._nixl_lock:
            known = self._registered.get(id(store))
            if known is None:
                base, size = _arena_region(store)
                descs = agent.register_memory([(base, size, 0, "kvfabric-arena")], "DRAM")
                known = self._registered[id(store)] = (base, size, descs)
                log.info("registered a %d-byte host arena with NIXL", size)
            return known[0], known[1]

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
        """Stop serving, drop connections, deregister memory and forget peers."""
        super().close()
        with self._nixl_lock:
            agent, self._agent = self._agent, None
            regs, peers = list(self._registered.values()), list(self._peers.values())
            self._registered.clear()
            self._peers.clear()
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
        wire.send_buffers(conn, [wire.encode_response(entries), *payloads])
        # The lease (held by our caller) must outlive the client's READ: wait for its ACK.
        remote = any(e.status == Status.REMOTE for e in entries)
        if remote and bytes(wire.recv_exact(conn, len(ACK_MAGIC))) != ACK_MAGIC:
            raise InvalidArgument("expected ACK after a remote read", "request")

    # -- client side -----------------------------------------------------------------------
    def _on_connect(self, sock: socket.socket, address: str, deadline: float) -> None:
        agent = self._ensure_agent()
        sock.settimeout(wire.remaining(deadline, address))
        try:
            wire.send_buffers(sock, [HELLO_MAGIC, _LEN.pack(0)])
            head = wire.recv_exact(sock, len(HELLO_MAGIC) + _LEN.size)
        except Unavailable:
            raise Unavailable(f"{address} does not serve NIXL metadata", "address") from None
        (n,) = _LEN.unpack_from(head, len(HELLO_MAGIC))
        if bytes(head[: len(HELLO_MAGIC)]) != HELLO_MAGIC or n > MAX_METADATA_BYTES:
            raise Unavailable(f"{address} sent a bad NIXL hello", "address")
        metadata = bytes(wire.recv_exact(sock, n))
        digest = hashlib.blake2b(metadata, digest_size=16).digest()
        with self._nixl_lock:
            known = self._peers.get(address)
            if known is None or known[0] != digest:
                if known is not None:  # the peer restarted with a new agent
                    with contextlib.suppress(Exception):
                        agent.remove_remote_agent(known[1])
                known = self._peers[address] = (digest, str(agent.add_remote_agent(metadata)))
            self._conn_peer[id(sock)] = known[1]

    def _land_remote(
        self, conn: socket.socket, address: str, entries: list[Entry],
        pairs: list[tuple[Entry, memoryview]], deadline: float,
    ) -> int:  # fmt: skip
        if not any(e.status == Status.REMOTE for e in entries):
            return 0
        try:
            if pairs:
                self._read(self._conn_peer[id(conn)], address, pairs, deadline)
        finally:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            wire.send_buffers(conn, [ACK_MAGIC])  # lets the server end its lease
        return sum(e.size for e, _ in pairs)

    def _read(
        self, peer: str, address: str, pairs: list[tuple[Entry, memoryview]], deadline: float
    ) -> None:
        agent = self._ensure_agent()
        local = agent.get_xfer_descs([(_address_of(d), e.size, 0) for e, d in pairs], "DRAM")
        remote = agent.get_xfer_descs([(e.address, e.size, 0) for e, _ in pairs], "DRAM")
        handle = agent.initialize_xfer("READ", local, remote, peer, b"")
        state = "ERR"
        try:
            state = agent.transfer(handle)
            pause = 0.0002
            while state == "PROC" and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
                state = agent.check_xfer_state(handle)
        finally:
            self._release(agent, handle, deadline)
        if state != "DONE":
            why = "timed out" if state == "PROC" else "failed"
            raise Unavailable(f"NIXL READ of {len(pairs)} blocks from {address} {why}", "address")

    @staticmethod
    def _release(agent: Any, handle: Any, deadline: float) -> None:
        """Release a transfer handle; one still running must finish before its slots are freed."""
        stop = max(deadline, time.monotonic()) + 5.0
        while True:
            try:
                agent.release_xfer_handle(handle)
                return
            except Exception as exc:  # cannot cancel yet: wait (bounded) for it to finish
                if time.monotonic() > stop:
                    log.error("NIXL transfer handle could not be released: %s", exc)
                    raise Unavailable("a NIXL transfer could not be cancelled", "address") from exc
                time.sleep(0.01)


def _run_probe() -> TransportProbe:
    if importlib.util.find_spec("nixl") is None:
        return TransportProbe(False, "nixl is not installed")
    outcome: list[TransportProbe] = []

    def attempt() -> None:
        try:
            _new_agent(f"kvfabric-probe-{uuid.uuid4().hex[:8]}")
            outcome.append(TransportProbe(True, "NIXL agent with the UCX backend created"))
        except Exception as exc:  # ImportError, missing plugin, UCX failure: the finding itself
            outcome.append(TransportProbe(False, f"{type(exc).__name__}: {exc}"))

    worker = threading.Thread(target=attempt, name="kvfabric-nixl-probe", daemon=True)
    worker.start()
    worker.join(_PROBE_TIMEOUT_S)
    if not outcome:
        return TransportProbe(False, f"creating a NIXL agent took over {_PROBE_TIMEOUT_S:.0f} s")
    return outcome[0]
