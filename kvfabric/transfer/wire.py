"""The binary framing of the node-to-node block protocol (version 1, little-endian).

Request (client → server)::

    preamble  magic "KVFQ" | version u8 | flags u8 | reserved u16 | count u32 | body_len u32
    body      count × ( ns_len u8 | namespace ascii[ns_len] | hash [32] )

Response (server → client), entries in request order::

    preamble  magic "KVFR" | version u8 | flags u8 | reserved u16 | count u32 | section_len u32
    section   count × ( status u8
                        [OK, REMOTE: size u64 | checksum u64 | type u8 | pid_len u16 | pid utf8]
                        [REMOTE: address u64] )
    payloads  for each OK entry, in order: exactly ``size`` bytes

All headers come before all payloads, so a receiver learns every size and
checksum first, reserves arena slots for the whole batch once, and then reads
each payload straight into its slot. ``REMOTE`` entries carry no payload: the
bytes are read one-sidedly (NIXL) from ``address`` in the server's registered
memory. Every field is validated on parse; a bad request raises
InvalidArgument, a bad response raises Corrupt, and a stream that ends early
raises Unavailable — never a bare ``struct.error``.

The rest is the socket plumbing both transports use: exact reads into
caller buffers, vectored zero-copy sends, addresses, socket tuning,
deadlines and a per-peer pool of persistent client connections.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from kvfabric.errors import Corrupt, FailedPrecondition, InvalidArgument, Unavailable
from kvfabric.types import (
    BLOCK_HASH_BYTES,
    MAX_NAMESPACE_CHARS,
    MAX_PROGRAM_ID_CHARS,
    BlockHash,
    BlockKey,
    BlockType,
)

T = TypeVar("T")

VERSION = 1
REQUEST_MAGIC = b"KVFQ"
RESPONSE_MAGIC = b"KVFR"
MAX_KEYS = 4096
MAX_NAMESPACE_BYTES = MAX_NAMESPACE_CHARS
# The store allows 128 *characters*; UTF-8 needs up to 4 bytes for each.
MAX_PROGRAM_ID_BYTES = 4 * MAX_PROGRAM_ID_CHARS
FLAG_REMOTE = 0x01  # the client can read blocks one-sidedly (REMOTE entries allowed)
KNOWN_FLAGS = FLAG_REMOTE

PREAMBLE = struct.Struct("<4sBBHII")
_KEY_MIN = 1 + 1 + BLOCK_HASH_BYTES
_KEY_MAX = 1 + MAX_NAMESPACE_BYTES + BLOCK_HASH_BYTES
_ENTRY_HEAD = struct.Struct("<QQBH")  # size, checksum, type, pid_len
_ADDRESS = struct.Struct("<Q")
_ENTRY_MAX = 1 + _ENTRY_HEAD.size + MAX_PROGRAM_ID_BYTES + _ADDRESS.size
_BLOCK_TYPES = {t.value: t for t in BlockType}


class Status(IntEnum):
    """Per-key answer of the server."""

    OK = 0  # payload follows in the stream
    MISSING = 1  # the server does not hold the block
    REMOTE = 2  # read it from ``address`` in the server's registered memory


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request: the keys asked for and the client's capability flags."""

    keys: tuple[BlockKey, ...]
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Entry:
    """One key's answer; ``size`` and the rest are meaningful for OK and REMOTE only."""

    status: Status
    size: int = 0
    checksum: int = 0
    type: BlockType = BlockType.GENERIC
    program_id: str | None = None
    address: int = 0


MISSING = Entry(Status.MISSING)


# -- requests ------------------------------------------------------------------------------
def encode_request(keys: Sequence[BlockKey], flags: int = 0) -> bytes:
    """The complete request frame for ``keys``."""
    if len(keys) > MAX_KEYS:
        raise InvalidArgument(f"{len(keys)} keys in one request; the limit is {MAX_KEYS}", "keys")
    if flags & ~KNOWN_FLAGS:
        raise InvalidArgument(f"unknown request flags {flags:#x}", "flags")
    parts = []
    for k in keys:
        ns = k.namespace.encode("ascii")
        parts += [bytes((len(ns),)), ns, k.hash]
    body = b"".join(parts)
    return PREAMBLE.pack(REQUEST_MAGIC, VERSION, flags, 0, len(keys), len(body)) + body


def parse_request_preamble(buf: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Validate a request preamble; returns ``(flags, count, body_len)``."""
    if len(buf) != PREAMBLE.size:
        raise InvalidArgument(f"request preamble must be {PREAMBLE.size} bytes", "request")
    magic, version, flags, reserved, count, body_len = PREAMBLE.unpack(buf)
    if magic != REQUEST_MAGIC:
        raise InvalidArgument(f"bad request magic {bytes(magic)!r}", "request")
    if version != VERSION:
        raise InvalidArgument(f"request version {version}; this node speaks {VERSION}", "version")
    if flags & ~KNOWN_FLAGS or reserved:
        raise InvalidArgument(f"unknown request flags {flags:#x}/{reserved:#x}", "flags")
    if count > MAX_KEYS:
        raise InvalidArgument(f"{count} keys in one request; the limit is {MAX_KEYS}", "count")
    if not count * _KEY_MIN <= body_len <= count * _KEY_MAX:
        raise InvalidArgument(
            f"request body of {body_len} bytes cannot hold {count} keys", "body_len"
        )
    return flags, count, body_len


def parse_request_body(body: bytes | bytearray | memoryview, count: int, flags: int) -> Request:
    """Parse ``count`` keys that must fill ``body`` exactly."""
    view = memoryview(body)
    keys: list[BlockKey] = []
    pos = 0
    try:
        for _ in range(count):
            n = view[pos]
            if not 1 <= n <= MAX_NAMESPACE_BYTES or pos + 1 + n + BLOCK_HASH_BYTES > len(view):
                raise InvalidArgument(f"bad namespace length {n} in request", "namespace")
            ns = bytes(view[pos + 1 : pos + 1 + n]).decode("ascii")
            digest = bytes(view[pos + 1 + n : pos + 1 + n + BLOCK_HASH_BYTES])
            keys.append(BlockKey(ns, BlockHash(digest)))  # validates the namespace
            pos += 1 + n + BLOCK_HASH_BYTES
    except IndexError:
        raise InvalidArgument("request body is truncated", "request") from None
    except UnicodeDecodeError:
        raise InvalidArgument("namespace in request is not ASCII", "namespace") from None
    if pos != len(view):
        raise InvalidArgument(f"{len(view) - pos} stray bytes after the request keys", "request")
    return Request(tuple(keys), flags)


def decode_request(frame: bytes | bytearray | memoryview) -> Request:
    """Parse one complete request frame (preamble and body, nothing more)."""
    view = memoryview(frame)
    if len(view) < PREAMBLE.size:
        raise InvalidArgument("request is shorter than its preamble", "request")
    flags, count, body_len = parse_request_preamble(view[: PREAMBLE.size])
    if len(view) != PREAMBLE.size + body_len:
        raise InvalidArgument("request length does not match its body_len", "request")
    return parse_request_body(view[PREAMBLE.size :], count, flags)


# -- responses -----------------------------------------------------------------------------
def encode_response(entries: Sequence[Entry]) -> bytes:
    """Preamble and header section for ``entries`` (payloads are sent after it)."""
    parts: list[bytes] = []
    for e in entries:
        parts.append(bytes((e.status,)))
        if e.status == Status.MISSING:
            continue
        pid = e.program_id.encode("utf-8") if e.program_id else b""
        if len(pid) > MAX_PROGRAM_ID_BYTES:
            raise InvalidArgument(f"program id of {len(pid)} bytes is too long", "program_id")
        parts += [_ENTRY_HEAD.pack(e.size, e.checksum, e.type.value, len(pid)), pid]
        if e.status == Status.REMOTE:
            parts.append(_ADDRESS.pack(e.address))
    section = b"".join(parts)
    return PREAMBLE.pack(RESPONSE_MAGIC, VERSION, 0, 0, len(entries), len(section)) + section


def parse_response_preamble(buf: bytes | bytearray | memoryview, expected_count: int) -> int:
    """Validate a response preamble answering ``expected_count`` keys; returns section_len."""
    if len(buf) != PREAMBLE.size:
        raise Corrupt(f"response preamble must be {PREAMBLE.size} bytes", "response")
    magic, version, flags, reserved, count, section_len = PREAMBLE.unpack(buf)
    if magic != RESPONSE_MAGIC or version != VERSION or flags or reserved:
        raise Corrupt(f"bad response preamble {bytes(buf[:8]).hex()}", "response")
    if count != expected_count:
        raise Corrupt(f"response holds {count} entries for {expected_count} keys", "response")
    if not count <= section_len <= count * _ENTRY_MAX:
        raise Corrupt(f"response section of {section_len} bytes for {count} keys", "response")
    return int(section_len)


def parse_response_section(
    section: bytes | bytearray | memoryview, count: int, max_block_bytes: int, flags: int = 0
) -> list[Entry]:
    """Parse ``count`` entries filling ``section`` exactly; REMOTE only if ``flags`` allow."""
    view = memoryview(section)
    entries: list[Entry] = []
    pos = 0
    try:
        for _ in range(count):
            status = view[pos]
            pos += 1
            if status == Status.MISSING:
                entries.append(MISSING)
                continue
            if status not in (Status.OK, Status.REMOTE) or (
                status == Status.REMOTE and not flags & FLAG_REMOTE
            ):
                raise Corrupt(f"unknown entry status {status} in response", "status")
            size, checksum, type_code, pid_len = _ENTRY_HEAD.unpack_from(view, pos)
            pos += _ENTRY_HEAD.size
            if not 0 < size <= max_block_bytes:
                raise Corrupt(f"block size {size} outside 1..{max_block_bytes}", "size")
            block_type = _BLOCK_TYPES.get(type_code)
            if block_type is None:
                raise Corrupt(f"unknown block type {type_code} in response", "type")
            if pid_len > MAX_PROGRAM_ID_BYTES or pos + pid_len > len(view):
                raise Corrupt(f"program id length {pid_len} in response", "program_id")
            pid = bytes(view[pos : pos + pid_len]).decode("utf-8") if pid_len else None
            if pid is not None and len(pid) > MAX_PROGRAM_ID_CHARS:
                raise Corrupt(f"program id of {len(pid)} characters in response", "program_id")
            pos += pid_len
            address = 0
            if status == Status.REMOTE:
                (address,) = _ADDRESS.unpack_from(view, pos)
                pos += _ADDRESS.size
            entries.append(Entry(Status(status), size, checksum, block_type, pid, address))
    except (IndexError, struct.error):
        raise Corrupt("response header section is truncated", "response") from None
    except UnicodeDecodeError:
        raise Corrupt("program id in response is not UTF-8", "program_id") from None
    if pos != len(view):
        raise Corrupt(f"{len(view) - pos} stray bytes after the response entries", "response")
    return entries


def decode_response_head(
    data: bytes | bytearray | memoryview, expected_count: int, max_block_bytes: int, flags: int = 0
) -> tuple[list[Entry], int]:
    """Parse preamble and section at the start of ``data``; returns entries and payload offset."""
    view = memoryview(data)
    if len(view) < PREAMBLE.size:
        raise Corrupt("response is shorter than its preamble", "response")
    section_len = parse_response_preamble(view[: PREAMBLE.size], expected_count)
    end = PREAMBLE.size + section_len
    if len(view) < end:
        raise Corrupt("response header section is truncated", "response")
    section = view[PREAMBLE.size : end]
    return parse_response_section(section, expected_count, max_block_bytes, flags), end


# -- stream I/O ----------------------------------------------------------------------------
def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; Unavailable if the peer closes first."""
    got, want = 0, len(view)
    while got < want:
        n = sock.recv_into(view[got:], want - got)
        if n == 0:
            raise Unavailable(f"peer closed the stream after {got} of {want} bytes", "address")
        got += n


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly ``n`` bytes from ``sock`` (a fresh buffer)."""
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return buf


_IOV_BATCH = 64  # well under IOV_MAX (1024)


def send_buffers(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> int:
    """Send every buffer in order with as few ``sendmsg`` calls as the kernel allows.

    Zero-copy from the caller's buffers (no join); partial sends resume where
    the kernel stopped. Returns the number of bytes sent.
    """
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = i = 0
    while i < len(pending):
        sent = sock.sendmsg(pending[i : i + _IOV_BATCH])
        total += sent
        while i < len(pending) and sent >= len(pending[i]):
            sent -= len(pending[i])
            i += 1
        if sent:
            pending[i] = pending[i][sent:]
    return total


# -- client plumbing -------------------------------------------------------------------
def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 hosts in brackets); InvalidArgument if malformed."""
    if not isinstance(address, str):
        raise InvalidArgument("address must be a 'host:port' string", "address")
    host, sep, port_s = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise InvalidArgument(f"address {address!r} is not 'host:port'", "address")
    return host, int(port_s)


def format_address(host: str, port: int) -> str:
    """The address string of a listening socket."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tune(sock: socket.socket, buffer_bytes: int | None) -> None:
    """TCP_NODELAY, and fixed kernel buffers when ``buffer_bytes`` is set (else autotuning)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


class ConnectionPool:
    """Idle persistent connections per peer address; thread-safe."""

    def __init__(
        self,
        max_idle: int,
        buffer_bytes: int | None,
        on_connect: Callable[[socket.socket, str, float], None],
    ) -> None:
        self._max_idle = max_idle
        self._buffer_bytes = buffer_bytes
        self._on_connect = on_connect
        self._idle: dict[str, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, address: str, deadline: float) -> tuple[socket.socket, bool]:
        """A connection to ``address`` and whether it was reused from the pool."""
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the transport is closed", "transport")
            idle = self._idle.get(address)
            if idle:
                return idle.pop(), True
        host, port = parse_address(address)
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            family, kind, proto, _, sockaddr = info
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise Unavailable(f"cannot resolve {address}: {exc}", "address") from exc
        try:
            tune(sock, self._buffer_bytes)  # before connect, so the window scale matches
            sock.settimeout(remaining(deadline, address))
            sock.connect(sockaddr)
            self._on_connect(sock, address, deadline)
        except OSError as exc:
            sock.close()
            raise Unavailable(f"cannot connect to {address}: {exc}", "address") from exc
        except BaseException:
            sock.close()
            raise
        return sock, False

    def release(self, address: str, sock: socket.socket) -> None:
        """Return a healthy connection (its stream fully consumed) for reuse."""
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if not self._closed and len(idle) < self._max_idle:
                idle.append(sock)
                return
        sock.close()

    def call(self, address: str, connect_by: float, fn: Callable[[socket.socket], T]) -> T:
        """Run ``fn`` on a pooled connection to ``address``; retry once on a stale one.

        A connection that failed before any response byte arrived
        (:class:`StaleConnection`) is closed and, if it came from the pool, the
        request is repeated once on a fresh connection (nothing was received,
        so nothing repeats). Any other failure closes the connection (its
        stream state is unknown) and propagates.
        """
        for attempt in range(2):
            conn, reused = self.acquire(address, connect_by)
            try:
                result = fn(conn)
            except StaleConnection as exc:
                conn.close()
                if reused and attempt == 0:
                    self.close_idle(address)
                    continue
                raise Unavailable(f"{address} closed the connection: {exc}", "address") from None
            except BaseException:
                conn.close()
                raise
            self.release(address, conn)
            return result
        raise Unavailable(f"{address} closed the connection twice", "address")

    def close_idle(self, address: str) -> None:
        """Close the idle connections to ``address`` (after one of them proved stale)."""
        with self._lock:
            socks = self._idle.pop(address, [])
        for s in socks:
            s.close()

    def close(self) -> None:
        """Close every idle connection; later acquires fail."""
        with self._lock:
            self._closed = True
            socks = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for s in socks:
            s.close()


def remaining(deadline: float, address: str) -> float:
    """Seconds left before ``deadline``; Unavailable once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise Unavailable(f"fetch from {address} timed out", "address")
    return left


class StaleConnection(Exception):
    """A pooled connection failed before any response byte arrived (safe to retry once)."""


def read_response_head(
    conn: socket.socket, address: str, count: int, deadline: float, *, first: bool, what: str
) -> memoryview:
    """Read a response's preamble and return its header section (not yet parsed).

    ``first`` marks the first read on a pooled connection: a failure before any
    byte arrived then raises :class:`StaleConnection` (the caller retries on a
    fresh connection); any other failure is Unavailable naming ``what``.
    """
    head = memoryview(bytearray(PREAMBLE.size))
    got = 0
    try:
        conn.settimeout(remaining(deadline, address))
        got = conn.recv_into(head)
        if got == 0 and first:
            raise StaleConnection("closed before answering")
        recv_into_exact(conn, head[got:])
        section_len = parse_response_preamble(head, count)
        return memoryview(recv_exact(conn, section_len))
    except ConnectionError as exc:
        if first and not got:
            raise StaleConnection(str(exc)) from exc
        raise Unavailable(f"{what} from {address} failed: {exc}", "address") from exc
    except OSError as exc:
        raise Unavailable(f"{what} from {address} failed: {exc}", "address") from exc
