"""The interface every node-to-node block transport implements.

A transport moves committed blocks from a peer node's store into the local
store, verifying each block's checksum on arrival (DESIGN.md, data plane).

Lifecycle of a :class:`Transport`:

1. ``serve(store, host, port)`` (optional, at most once) starts serving the
   blocks of the local ``store`` to peers and returns the address peers pass
   to ``fetch``. Serving never copies a block into an intermediate buffer: it
   leases the stored bytes (``store.open_read``) for the time of the send.
2. ``fetch(address, keys, store, timeout_s=...)`` may be called any number of
   times, from any number of threads. It reserves arena slots in the local
   ``store`` (``store.open_write``), lands the bytes straight in them, and
   commits; the commit verifies every checksum, so nothing half-received or
   corrupt ever becomes visible. On a transport failure the whole in-flight
   batch is aborted and :class:`~kvfabric.errors.Unavailable` is raised
   (batches received whole before it stay committed and verified).
3. ``close()`` stops serving, drops pooled connections and releases
   resources (idempotent). The object is unusable afterwards.

``probe()`` answers, without side effects beyond a throwaway check, whether
the transport can run on this machine (used by ``kvfabric doctor`` and by
``make_transport("auto")``).

Below the interface: :class:`BlockServer`, the block server both transports
run. A selector thread accepts connections and parks idle ones; a fixed pool
of ``max_connections`` workers serves requests, so idle persistent
connections never hold a worker (beyond ``max_open`` open connections, new
ones wait in the listen backlog). For a request a worker leases the blocks
(``store.open_read``), hands them to the transport's ``answer`` (TCP:
:func:`answer_inline`, the header section and then the leased buffers by
``sendmsg``, zero-copy from the arena or the LMDB map) and releases the
lease. A malformed request closes that connection with a log line only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvfabric.errors import InvalidArgument, KVFabricError, Unavailable
from kvfabric.node.leases import ReadLease
from kvfabric.transfer import wire
from kvfabric.transfer.wire import Entry, Request, Status
from kvfabric.types import BlockKey

if TYPE_CHECKING:
    from kvfabric.node.core import NodeStoreCore

log = logging.getLogger(__name__)

TRANSPORT_NAMES = ("auto", "tcp", "nixl")
Handler = Callable[[socket.socket], None]
Answer = Callable[[socket.socket, Request, ReadLease], None]


@dataclass(frozen=True, slots=True)
class TransportProbe:
    """Whether a transport can run here, and why (or why not)."""

    usable: bool
    detail: str


@dataclass(frozen=True, slots=True)
class FetchResult:
    """Outcome of one :meth:`Transport.fetch`; every requested key is in exactly one list.

    * ``fetched``: received, verified and now stored locally;
    * ``missing``: the peer does not hold the block;
    * ``corrupt``: arrived with a wrong checksum — dropped and counted locally;
    * ``already_present``: the local store held (or was writing) it already.

    ``bytes`` counts payload bytes received; ``seconds`` is the wall time of the call.
    """

    fetched: tuple[BlockKey, ...] = ()
    missing: tuple[BlockKey, ...] = ()
    corrupt: tuple[BlockKey, ...] = ()
    already_present: tuple[BlockKey, ...] = ()
    bytes: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        """Payload throughput in GB/s (1e9 bytes per second)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class Transport(ABC):
    """A node-to-node block transport (see the module docstring for the lifecycle)."""

    name: str = ""

    @abstractmethod
    def serve(self, store: NodeStoreCore, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving ``store``'s blocks on ``host:port`` (0: any free port).

        Returns the address peers pass to :meth:`fetch`. Raises
        FailedPrecondition if this transport already serves, Unavailable if
        the address cannot be bound.
        """

    @abstractmethod
    def fetch(
        self,
        address: str,
        keys: Sequence[BlockKey],
        store: NodeStoreCore,
        *,
        timeout_s: float,
    ) -> FetchResult:
        """Pull ``keys`` from the peer at ``address`` into the local ``store``.

        Keys the local store holds already are not requested. Bytes land in
        reserved arena slots and are published only after their checksums
        verify. The whole call is bounded by ``timeout_s``. Raises
        Unavailable (field ``address``) when the peer cannot be reached or
        the stream breaks — then nothing of the batch in flight is visible —
        InvalidArgument for bad arguments, NotFound for a namespace the
        local store has not registered.
        """

    @abstractmethod
    def close(self) -> None:
        """Stop serving, close connections and release resources (idempotent)."""

    @classmethod
    @abstractmethod
    def probe(cls) -> TransportProbe:
        """Whether this transport can run on this machine, with the reason."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def validate_timeout(timeout_s: float) -> float:
    """A positive, finite number of seconds."""
    if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise InvalidArgument(f"timeout_s must be a positive number, got {timeout_s!r}",
                              "timeout_s")  # fmt: skip
    return float(timeout_s)


def make_transport(name: str = "auto") -> Transport:
    """The transport called ``name``: "tcp", "nixl", or "auto" (see ``nixl.auto_choice``)."""
    from kvfabric.transfer.nixl import NixlTransport, auto_choice
    from kvfabric.transfer.tcp import TcpTransport

    if name == "tcp":
        return TcpTransport()
    if name == "nixl":
        return NixlTransport()
    if name == "auto":
        return NixlTransport() if auto_choice().usable else TcpTransport()
    raise InvalidArgument(
        f"unknown transport {name!r}; choose one of {', '.join(TRANSPORT_NAMES)}", "transport"
    )


def answer_inline(conn: socket.socket, request: Request, lease: ReadLease) -> None:
    """Send the header section, then every present block's leased bytes, in order."""
    entries: list[Entry] = []
    payloads: list[memoryview] = []
    for rec, buf in zip(lease.records, lease.buffers, strict=True):
        if rec is None or buf is None or len(buf) != rec.size:
            entries.append(wire.MISSING)
            continue
        entries.append(Entry(Status.OK, rec.size, rec.checksum, rec.type, rec.program_id))
        payloads.append(buf)
    wire.send_buffers(conn, [wire.encode_response(entries), *payloads])


class BlockServer:
    """Serves one store's blocks: a selector thread for idle connections, a fixed worker pool."""

    def __init__(
        self, store: NodeStoreCore, host: str, port: int, *, max_connections: int = 16,
        max_open: int = 256, buffer_bytes: int | None = None, idle_timeout_s: float = 60.0,
        io_timeout_s: float = 30.0, answer: Answer = answer_inline,
        extensions: dict[bytes, Handler] | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.idle_timeout_s, self.io_timeout_s = idle_timeout_s, io_timeout_s
        self.max_open = max_open
        self.linger_s = 0.05
        self._answer = answer
        self._handlers: dict[bytes, Handler] = {wire.REQUEST_MAGIC: self._serve_request}
        self._handlers.update(extensions or {})
        try:
            self._listener = socket.create_server((host, port), backlog=128)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {host}:{port}: {exc}", "address") from exc
        wire.tune(self._listener, buffer_bytes)  # accepted sockets inherit the buffer sizes
        self._listener.setblocking(False)
        self.address = wire.format_address(host, self._listener.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._returned: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._parked: dict[socket.socket, float] = {}  # idle connection -> idle since
        self._busy: set[socket.socket] = set()
        self._futures: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_connections, thread_name_prefix="kvfabric-tcp-serve"
        )
        self._loop_thread = threading.Thread(
            target=self._loop, name="kvfabric-tcp-accept", daemon=True
        )
        self._loop_thread.start()

    def _loop(self) -> None:
        sel, listening = self._selector, False
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                try:
                    listening = self._loop_once(listening)
                except Exception:  # keep serving; a persistent fault shows in the log
                    log.exception("block server loop error")
                    self._stop.wait(0.1)
        finally:
            for conn in list(self._parked):
                self._close(conn)
            self._listener.close()
            sel.close()

    def _loop_once(self, listening: bool) -> bool:
        sel = self._selector
        with self._lock:
            room = len(self._parked) + len(self._busy) < self.max_open
        if room != listening:  # beyond max_open, connections wait in the backlog
            if room:
                sel.register(self._listener, selectors.EVENT_READ)
            else:
                sel.unregister(self._listener)
        for key, _ in sel.select(timeout=0.5):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            elif isinstance(key.fileobj, socket.socket):  # a parked connection has a request
                sel.unregister(key.fileobj)
                self._dispatch(key.fileobj)
        while not self._returned.empty():
            self._park(self._returned.get())
        now = time.monotonic()
        with self._lock:
            stale = [c for c, since in self._parked.items() if now - since > self.idle_timeout_s]
        for conn in stale:  # the client's pool reconnects when it needs to
            sel.unregister(conn)
            self._close(conn)
        return room

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._park(conn)

    def _park(self, conn: socket.socket) -> None:
        with self._lock:
            self._parked[conn] = time.monotonic()
        self._selector.register(conn, selectors.EVENT_READ)

    def _dispatch(self, conn: socket.socket) -> None:
        with self._lock:
            self._parked.pop(conn, None)
            self._busy.add(conn)
            fut = self._workers.submit(self._serve, conn)
            self._futures.add(fut)
        fut.add_done_callback(self._forget)

    def _forget(self, fut: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._futures.discard(fut)

    def _close(self, conn: socket.socket) -> None:
        with self._lock:
            self._parked.pop(conn, None)
            self._busy.discard(conn)
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        """Serve requests while they keep coming; then hand the connection back to the loop."""
        peer: object = "?"
        keep = False
        try:
            peer = conn.getpeername()
            while not self._stop.is_set():
                if not self._serve_one(conn):
                    return  # clean close between requests
                # A busy client sends its next request within moments: wait briefly
                # rather than pay a round trip through the selector thread.
                conn.settimeout(self.linger_s)
                try:
                    conn.recv(1, socket.MSG_PEEK)  # the next request (or EOF) is waiting
                except TimeoutError:
                    keep = True
                    return
        except KVFabricError as exc:
            log.warning("closing connection from %s: %s", peer, exc)
        except OSError as exc:
            log.debug("connection from %s ended: %s", peer, exc)
        except Exception:  # a bug must cost one connection, never the server
            log.exception("closing connection from %s after an unexpected error", peer)
        finally:
            if keep and not self._stop.is_set():
                with self._lock:
                    self._busy.discard(conn)
                conn.settimeout(None)
                self._returned.put(conn)
                with contextlib.suppress(OSError):
                    self._wake_w.send(b"\0")
            else:
                self._close(conn)

    def _serve_one(self, conn: socket.socket) -> bool:
        conn.settimeout(self.io_timeout_s)
        magic = memoryview(bytearray(len(wire.REQUEST_MAGIC)))
        first = conn.recv_into(magic)
        if first == 0:
            return False
        wire.recv_into_exact(conn, magic[first:])
        handler = self._handlers.get(bytes(magic))
        if handler is None:
            raise InvalidArgument(f"unknown frame magic {bytes(magic)!r}", "request")
        handler(conn)
        return True

    def _serve_request(self, conn: socket.socket) -> None:
        rest = wire.recv_exact(conn, wire.PREAMBLE.size - len(wire.REQUEST_MAGIC))
        flags, count, body_len = wire.parse_request_preamble(wire.REQUEST_MAGIC + rest)
        request = wire.parse_request_body(wire.recv_exact(conn, body_len), count, flags)
        lease = self.store.open_read(request.keys)
        try:
            self._answer(conn, request, lease)
        finally:
            lease.release()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, cut open connections, and join the threads (bounded)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._loop_thread.join(timeout_s)
        with self._lock:
            busy, futures = list(self._busy), list(self._futures)
        for conn in busy:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a worker blocked in recv/send
        _, pending = concurrent.futures.wait(futures, timeout=timeout_s)
        if pending or self._loop_thread.is_alive():
            log.warning("%d server workers did not stop within %.1f s", len(pending), timeout_s)
        self._workers.shutdown(wait=False, cancel_futures=True)
        while not self._returned.empty():  # handed back after the loop ended
            self._returned.get().close()
        self._wake_r.close()
        self._wake_w.close()
