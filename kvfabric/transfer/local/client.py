"""The client side of the local channel: map the node's arena, copy blocks in and out.

:class:`LocalClient` holds one mapping of the node's segment and a small
pool of connections to its Unix socket (one per calling thread at a time).
A read is one round trip (READ → lease and offsets), one copy per block out
of the arena that checksums as it copies, and a RELEASE that is not waited
for. A write is RESERVE → one copy+checksum per block into the reserved
slots → COMMIT, which the node verifies before publishing.

:class:`LocalLink` is what :class:`kvfabric.rpc.client.Client` keeps: it
opens the LocalClient on first use and, when the node is not co-located or
refuses (another user, a namespace-limited token, a broken channel), remembers
that for ``retry_s`` seconds so the caller uses the network path meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kvfabric import integrity
from kvfabric.errors import (
    Corrupt,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KVFabricError,
    PermissionDenied,
    Unavailable,
)
from kvfabric.transfer.local import protocol as p
from kvfabric.transfer.local.segment import SegmentId, boot_id, map_segment
from kvfabric.types import BlockHash, BlockType

log = logging.getLogger(__name__)

PUT_PARTS = 4
"""A put is reserved and committed in this many parts, so copying and verifying overlap."""

ELSEWHERE = object()
"""A read's result for a block the node holds outside the arena: read it another way."""


class LocalClient:
    """A co-located client of one node (thread-safe); see the module docstring."""

    def __init__(
        self, node_id: str, address: str, *, token: str | None = None, timeout_s: float = 10.0,
        max_idle: int = 4,
    ) -> None:  # fmt: skip
        self.node_id, self.address = node_id, address
        self._name = p.socket_name(node_id, address)
        self._token = token or ""
        self._timeout_s = timeout_s
        self._max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        sock, info = self._open(time.monotonic() + timeout_s)
        try:
            self.segment = SegmentId(info["segment"], info["size"], info["device"], info["inode"])
            self._parts = max(1, min(PUT_PARTS, int(info["max_leases"])))
            self._map = map_segment(self.segment)
        except (KeyError, TypeError):
            sock.close()
            raise Corrupt("malformed HELLO answer on the local channel", "local") from None
        except BaseException:
            sock.close()
            raise
        self._view = memoryview(self._map)
        self._idle.append(sock)

    # -- connections ---------------------------------------------------------------------
    def _open(self, deadline: float) -> tuple[socket.socket, dict[str, Any]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(self._name)
            if p.peer_uid(sock) != os.getuid():  # a name squatted by another user
                raise PermissionDenied("the local channel belongs to another user", "uid")
            with contextlib.suppress(BrokenPipeError):  # a refusal waits to be read
                sock.sendall(p.encode([p.Op.HELLO, p.VERSION, self._token]))
            (info,) = p.check_reply(p.recv_message(sock))
            if not isinstance(info, dict):
                raise Corrupt("malformed HELLO answer on the local channel", "local")
            if (info.get("node_id"), info.get("address")) != (self.node_id, self.address):
                raise FailedPrecondition("the local channel belongs to another node", "local")
            if info.get("boot_id") != boot_id():
                raise FailedPrecondition("the local channel is on another host", "local")
            return sock, info
        except OSError as exc:
            sock.close()
            raise Unavailable(f"no local channel: {exc}", "local") from None
        except BaseException:
            sock.close()
            raise

    @contextlib.contextmanager
    def _conn(self, deadline: float) -> Iterator[socket.socket]:
        """A connection for one exchange; closed (ending its leases) if the exchange fails."""
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        if sock is None:
            sock, info = self._open(deadline)
            if info.get("inode") != self.segment.inode:
                sock.close()
                raise FailedPrecondition("the node's arena changed", "segment")
        ok = False
        try:
            sock.settimeout(_left(deadline))
            yield sock
            ok = True
        except OSError as exc:
            raise Unavailable(f"the local channel broke: {exc}", "local") from None
        finally:
            with self._lock:
                if ok and len(self._idle) < self._max_idle:
                    self._idle.append(sock)
                    sock = None
            if sock is not None:
                sock.close()

    def close(self) -> None:
        """Close the connections (the node ends their leases) and unmap the arena."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()
        with contextlib.suppress(BufferError, ValueError):
            self._view.release()
            self._map.close()

    # -- blocks --------------------------------------------------------------------------
    def read(
        self, namespace: str, hashes: Sequence[BlockHash], dsts: Sequence[Any] | None,
        timeout_s: float,
    ) -> list[Any]:  # fmt: skip
        """Per hash: the verified buffer (``dsts[i]`` or a new bytearray), None for a
        miss (absent, or its bytes failed their checksum), or :data:`ELSEWHERE`."""
        deadline = time.monotonic() + timeout_s
        with self._conn(deadline) as sock:
            sock.sendall(p.encode([p.Op.READ, namespace, list(hashes)]))
            lease, entries = p.check_reply(p.recv_message(sock))
            bad: list[int] = []
            try:
                out, bad = self._copy_out(entries, len(hashes), dsts)
            finally:  # never wait for the node to confirm: it answers nothing
                sock.sendall(p.encode([p.Op.RELEASE, lease, bad]))
        return out

    def _copy_out(
        self, entries: Any, n: int, dsts: Sequence[Any] | None
    ) -> tuple[list[Any], list[int]]:
        if not isinstance(entries, list) or len(entries) != n:
            p.fail("READ answered the wrong number of blocks", "local")
        out: list[Any] = [None] * n
        idx, outs, srcs, sums = [], [], [], []
        for i, e in enumerate(entries):
            if not (isinstance(e, list) and len(e) == 4 and all(type(v) is int for v in e)):
                p.fail("malformed READ entry", "local")
            where, off, size, checksum = e
            if where == p.Where.ELSEWHERE:
                out[i] = ELSEWHERE
            elif where == p.Where.SHARED:
                if not (size > 0 and off >= 0 and off + size <= len(self._view)):
                    p.fail(f"block {i} lies outside the arena", "local")
                dst = bytearray(size) if dsts is None else dsts[i]
                if len(dst) != size:
                    raise InvalidArgument(f"dsts[{i}] holds {len(dst)} bytes; the block has "
                                          f"{size}", "dsts")  # fmt: skip
                idx.append(i)
                outs.append(dst)
                srcs.append(self._view[off : off + size])
                sums.append(checksum)
        got = integrity.copy_many_with_checksum(outs, srcs) if idx else []
        bad = []
        for i, dst, want, have in zip(idx, outs, sums, got, strict=True):
            if have == want:
                out[i] = dst
            else:
                log.warning("block %d failed its checksum in the shared arena; a miss", i)
                bad.append(i)
        return out, bad

    def put(
        self, namespace: str, hashes: Sequence[BlockHash], blocks: Sequence[memoryview],
        block_type: BlockType, program_id: str | None, timeout_s: float,
    ) -> list[str]:  # fmt: skip
        """Store ``blocks`` (equal sizes); a status per hash: stored, exists, pending, corrupt.

        The batch is reserved in up to :data:`PUT_PARTS` parts (never more than
        the node lets one connection hold), all requested
        at once; each part is committed as soon as it is copied, so the node
        verifies one part while this side copies the next (two processes, two
        cores). Any failure closes the connection, which aborts every part
        not yet committed.
        """
        deadline = time.monotonic() + timeout_s
        size, step = len(blocks[0]), -(-len(hashes) // self._parts)
        parts = [(a, min(a + step, len(hashes))) for a in range(0, len(hashes), step)]
        status: list[str] = []
        with self._conn(deadline) as sock:
            for a, b in parts:
                sock.sendall(p.encode([p.Op.RESERVE, namespace, list(hashes[a:b]), size,
                                       block_type.name, program_id or ""]))  # fmt: skip
            answers = [p.check_reply(p.recv_message(sock)) for _ in parts]
            committed = []
            for (a, b), (ident, entries) in zip(parts, answers, strict=True):
                todo, slots = self._slots(entries, b - a, size, status)
                if todo:
                    srcs = [blocks[a + i] for i in todo]
                    sums = integrity.copy_many_with_checksum(slots, srcs)
                    sock.sendall(p.encode([p.Op.COMMIT, ident, sums]))
                    committed.append((a, b))
            for a, b in committed:
                (done,) = p.check_reply(p.recv_message(sock))
                if not isinstance(done, list) or len(done) != b - a:
                    p.fail("COMMIT answered the wrong number of blocks", "local")
                status[a:b] = [str(s) for s in done]
        return status

    def _slots(
        self, entries: Any, n: int, size: int, status: list[str]
    ) -> tuple[list[int], list[memoryview]]:
        """The reserved slots of one RESERVE answer; appends the other blocks' statuses."""
        if not isinstance(entries, list) or len(entries) != n:
            p.fail("RESERVE answered the wrong number of blocks", "local")
        todo, slots = [], []
        for i, e in enumerate(entries):
            if not (isinstance(e, list) and len(e) == 2 and all(type(v) is int for v in e)):
                p.fail("malformed RESERVE entry", "local")
            status.append({p.Slot.EXISTS: "exists", p.Slot.PENDING: "pending"}.get(e[0], ""))
            if e[0] == p.Slot.RESERVED:
                if not 0 <= e[1] <= len(self._view) - size:
                    p.fail(f"slot of block {i} lies outside the arena", "local")
                todo.append(i)
                slots.append(self._view[e[1] : e[1] + size])
        return todo, slots


class LocalLink:
    """The local channel of one gRPC client, opened lazily; None while unusable.

    ``identify`` returns the node's id and data-plane address (its ``Stats``).
    """

    def __init__(
        self, identify: Callable[[], tuple[str, str]], token: str | None, timeout_s: float,
        retry_s: float = 30.0,
    ) -> None:  # fmt: skip
        self._identify, self._token, self._timeout_s = identify, token, timeout_s
        self._retry_s = retry_s
        self._client: LocalClient | None = None
        self._down_until = 0.0
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def get(self) -> LocalClient | None:
        """The open LocalClient, opening it if it is time to try; None when unusable."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not share the parent's sockets
                self._client, self._down_until, self._pid = None, 0.0, os.getpid()
            if self._client is not None or time.monotonic() < self._down_until:
                return self._client
            try:
                node_id, address = self._identify()
                self._client = LocalClient(node_id, address, token=self._token,
                                           timeout_s=self._timeout_s)  # fmt: skip
            except KVFabricError as exc:  # not co-located, refused, or the node is unreachable
                log.debug("no local channel (%s); using the network for %.0f s", exc,
                          self._retry_s)  # fmt: skip
                self._down_until = time.monotonic() + self._retry_s
            return self._client

    def broken(self, exc: KVFabricError) -> None:
        """Drop the LocalClient after ``exc``; the network is used for ``retry_s`` seconds."""
        log.warning("local channel unusable (%s); using the network for %.0f s", exc,
                    self._retry_s)  # fmt: skip
        with self._lock:
            client, self._client = self._client, None
            self._down_until = time.monotonic() + self._retry_s
        if client is not None:
            client.close()

    def close(self) -> None:
        """Close the LocalClient, if open."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the local channel call ran out of time", "timeout_s")
    return left
