"""The node side of the local channel: a Unix socket served from the NodeStore process.

One thread accepts; each connection gets its own thread (at most
``local_max_connections``), which answers that client's messages in order
and owns its :class:`~kvfabric.transfer.local.sessions.HoldTable`. Between
two messages the thread waits only until the oldest lease or reservation
times out; when the client goes away — a clean close or a killed process,
which the kernel reports as the end of the stream — everything it held is
released or aborted, so no arena slot and no block stays pinned by it.

Who may connect: only processes of the node's own user (``SO_PEERCRED``), and
when auth is on, only with a token valid for every namespace (see the package
docstring for why).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from kvfabric.errors import (
    FailedPrecondition,
    InvalidArgument,
    KVFabricError,
    PermissionDenied,
    Unauthenticated,
)
from kvfabric.rpc.auth import Authorizer
from kvfabric.transfer.local import protocol as p
from kvfabric.transfer.local.segment import boot_id, describe, hold
from kvfabric.transfer.local.sessions import HoldTable, Kind
from kvfabric.types import (
    BlockKey,
    BlockType,
    Tier,
    as_block_hash,
    validate_namespace,
    validate_program_id,
)

if TYPE_CHECKING:
    from kvfabric.node.service import NodeStoreService

log = logging.getLogger(__name__)

_IO_TIMEOUT_S = 30.0  # the rest of a frame once its first byte arrived


def _address(buf: Any) -> int:
    return int(np.frombuffer(buf, np.uint8).ctypes.data)


class LocalServer:
    """Serves ``service``'s co-located clients; ``close()`` ends it and every session."""

    def __init__(self, service: NodeStoreService) -> None:
        config = service.config
        arena = getattr(service.core.tiers[Tier.CPU], "arena", None)
        if arena is None or not arena.shm_path:
            raise FailedPrecondition(
                "the CPU arena is private memory; set local_channel or cpu_arena_shm_name",
                "cpu_arena_shm_name",
            )
        self.service = service
        self.segment = describe(arena.shm_path, arena.size)
        self._held_fd = hold(arena.shm_path)  # no cleaner removes a served segment
        self._base, self._size = _address(arena.view), arena.size
        self._auth = Authorizer.from_config(config)
        self._max_chain = config.rpc_max_chain
        self._max_connections = config.local_max_connections
        self.max_leases = config.local_max_leases
        self.lease_timeout_s = config.local_lease_timeout_s
        self.name = p.socket_name(service.node_id, service.address)
        self._hello = {
            "node_id": service.node_id, "address": service.address, "segment": self.segment.name,
            "size": self.segment.size, "device": self.segment.device,
            "inode": self.segment.inode, "boot_id": boot_id(),
        }  # fmt: skip
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.name)
        except OSError as exc:
            self._listener.close()
            os.close(self._held_fd)
            raise FailedPrecondition(
                f"cannot bind the local channel ({exc.strerror}): another node with the same "
                "id and data-plane address runs on this host", "local_channel",
            ) from None  # fmt: skip
        self._listener.listen(128)
        self._lock = threading.Lock()
        self._sessions: dict[socket.socket, _Session] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="kvfabric-local-accept",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        log.info("local channel of node %s serving segment /dev/shm/%s",
                 service.node_id, self.segment.name)  # fmt: skip

    # -- connections ---------------------------------------------------------------------
    def _accept_loop(self) -> None:
        self._listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._stop.is_set():
                    log.exception("local channel accept failed")
                    self._stop.wait(0.1)
                continue
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        refusal: KVFabricError | None = None
        if p.peer_uid(conn) != os.getuid():
            refusal = PermissionDenied("the local channel serves only the node's own user", "uid")
        with self._lock:
            if refusal is None and len(self._sessions) >= self._max_connections:
                refusal = FailedPrecondition(
                    f"{len(self._sessions)} local clients are connected "
                    f"(local_max_connections={self._max_connections})", "local_max_connections",
                )  # fmt: skip
            if refusal is None:
                session = _Session(self, conn)
                self._sessions[conn] = session
        if refusal is not None:
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)
                conn.sendall(p.encode(p.error_reply(refusal)))
            conn.close()
            return
        threading.Thread(target=self._run, args=(session,), name="kvfabric-local-session",
                         daemon=True).start()  # fmt: skip

    def _run(self, session: _Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.pop(session.conn, None)
            session.conn.close()

    def held(self) -> int:
        """Leases and reservations open right now, over every connection."""
        with self._lock:
            return sum(len(s.holds) for s in self._sessions.values())

    def connections(self) -> int:
        """Clients connected right now."""
        with self._lock:
            return len(self._sessions)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, end every session (releasing what it held), join the threads."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout_s)
        self._listener.close()
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            with contextlib.suppress(OSError):
                s.conn.shutdown(socket.SHUT_RDWR)  # wakes its thread, which ends its holds
        deadline = time.monotonic() + timeout_s
        while self.connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.close(self._held_fd)

    # -- requests ------------------------------------------------------------------------
    def authorize(self, token: str) -> None:
        """Refuse a client whose grant is narrower than the whole arena it would map."""
        if not self._auth.enabled:
            return
        if not token:
            raise Unauthenticated("this node's local channel needs a bearer token", "token")
        grant = self._auth.authorize([("authorization", f"Bearer {token}")], mutating=True)
        if grant.namespaces is not None:
            raise PermissionDenied(
                "a client maps the whole arena: the local channel needs a token valid for "
                "every namespace", "token",
            )  # fmt: skip

    def hello(self) -> dict[str, Any]:
        """What a client needs to map the arena and check it reached the right node."""
        return dict(self._hello, max_leases=self.max_leases, lease_timeout_s=self.lease_timeout_s)

    def offset(self, buf: Any) -> int | None:
        """Offset of ``buf`` in the arena; None when it lies elsewhere (GPU copy, disk)."""
        off = _address(buf) - self._base
        return off if off >= 0 and off + len(buf) <= self._size else None

    def keys(self, message: list[Any], i: int) -> tuple[str, list[BlockKey]]:
        """The namespace and keys of a request (arguments ``i`` and ``i + 1``)."""
        ns = validate_namespace(p.arg(message, i, str, "namespace"))
        raw = p.arg(message, i + 1, list, "hashes")
        if len(raw) > self._max_chain:
            raise InvalidArgument(f"{len(raw)} hashes in one request (rpc_max_chain="
                                  f"{self._max_chain})", "hashes")  # fmt: skip
        return ns, [BlockKey(ns, as_block_hash(h, "hashes")) for h in raw]


class _Session:
    """One connected client: its messages, in order, and what it holds."""

    def __init__(self, server: LocalServer, conn: socket.socket) -> None:
        self.server, self.conn = server, conn
        self.svc = server.service
        self.holds: HoldTable[Any] = HoldTable(server.max_leases, server.lease_timeout_s)
        self._greeted = False

    def run(self) -> None:
        try:
            while self._next():
                pass
        except (OSError, KVFabricError) as exc:
            log.debug("local client left: %s", exc)
        except Exception:
            log.exception("local channel session failed")
        finally:
            try:
                ended = self.holds.end_all()
            except Exception:
                log.exception("ending a local client's leases and reservations failed")
                ended = 0
            if ended:
                log.info("local client went away holding %d leases/reservations: released",
                         ended)  # fmt: skip

    def _next(self) -> bool:
        """Serve one message; False when the client has gone."""
        while True:
            due = self.holds.next_deadline()
            self.conn.settimeout(None if due is None else max(due - time.monotonic(), 0.001))
            try:
                if not self.conn.recv(1, socket.MSG_PEEK):
                    return False
                break
            except TimeoutError:
                if self.holds.expire():
                    log.warning(
                        "a local client kept a lease or reservation past "
                        "local_lease_timeout_s=%s s: released",
                        self.server.lease_timeout_s,
                    )
        self.conn.settimeout(_IO_TIMEOUT_S)
        message = p.recv_message(self.conn)
        if message is None:
            return False
        op = message[0]
        if type(op) is not int:
            raise InvalidArgument("a message must start with an op number", "op")
        answered = op in p.ANSWERED
        try:
            reply = self._dispatch(op, message)
        except KVFabricError as exc:
            if not answered:
                log.info("local client message %s refused: %s", op, exc)
                return True
            reply = p.error_reply(exc)
        if answered:
            self.conn.sendall(p.encode(reply))
        return True

    def _dispatch(self, op: Any, m: list[Any]) -> list[Any]:
        if op == p.Op.HELLO:
            if p.arg(m, 1, int, "version") != p.VERSION:
                raise FailedPrecondition(f"local channel version {m[1]} (node speaks "
                                         f"{p.VERSION})", "version")  # fmt: skip
            self.server.authorize(p.arg(m, 2, str, "token"))
            self._greeted = True
            return [p.OK, self.server.hello()]
        if not self._greeted:
            raise Unauthenticated("the first message must be HELLO", "op")
        if op == p.Op.READ:
            return self._read(m)
        if op == p.Op.RELEASE:
            self._release(m)
        elif op == p.Op.RESERVE:
            return self._reserve(m)
        elif op == p.Op.COMMIT:
            return self._commit(m)
        elif op == p.Op.ABORT:
            claimed = self.holds.take(Kind.RESERVATION, p.arg(m, 1, int, "reservation"))
            if claimed is not None:
                claimed.abort()
        else:
            raise InvalidArgument(f"unknown op {op!r}", "op")
        return []

    def _read(self, m: list[Any]) -> list[Any]:
        _, keys = self.server.keys(m, 1)
        core = self.svc.core
        absent = [k for k, t in zip(keys, core.contains(keys), strict=True) if t is None]
        if absent:
            self.svc.pull_missing(absent)  # a read on any node returns the cluster's blocks
        lease = core.open_read(keys)
        entries = []
        for buf, want in zip(lease.buffers, lease.checksums, strict=True):
            off = None if buf is None or want is None else self.server.offset(buf)
            if buf is None or want is None:
                entries.append([p.Where.ABSENT, 0, 0, 0])
            elif off is None:
                entries.append([p.Where.ELSEWHERE, 0, 0, 0])
            else:
                entries.append([p.Where.SHARED, off, len(buf), want])
        ident = self.holds.add(Kind.LEASE, (lease, keys), lease.release)
        return [p.OK, ident, entries]

    def _release(self, m: list[Any]) -> None:
        held = self.holds.take(Kind.LEASE, p.arg(m, 1, int, "lease"))
        if held is None:
            return  # timed out already
        lease, keys = held
        lease.release()
        bad = p.arg(m, 2, list, "bad")
        if not all(type(i) is int and 0 <= i < len(keys) for i in bad):
            raise InvalidArgument("bad must list block indices of the lease", "bad")
        for i in sorted(set(bad)):
            meta = self.svc.core.meta(keys[i])
            if meta is not None:  # a verified read drops a corrupt block and counts it
                self.svc.core.get_into([keys[i]], [bytearray(meta.size)], promote=False)

    def _reserve(self, m: list[Any]) -> list[Any]:
        ns, keys = self.server.keys(m, 1)
        size = p.arg(m, 3, int, "block_bytes")
        type_name = p.arg(m, 4, str, "block_type")
        if type_name not in BlockType.__members__:
            raise InvalidArgument(f"unknown block_type {type_name!r}", "block_type")
        program_id = validate_program_id(p.arg(m, 5, str, "program_id") or None)
        claimed = self.svc.open_put(
            ns, [k.hash for k in keys], size, block_type=BlockType[type_name], program_id=program_id
        )
        entries = [[p.Slot.EXISTS if s == "exists" else p.Slot.PENDING, 0]
                   for s in claimed.outcomes]  # fmt: skip
        for i, buf in zip(claimed.slot_index, claimed.slots, strict=True):
            off = self.server.offset(buf)
            if off is None:
                claimed.abort()
                raise FailedPrecondition("a reserved slot lies outside the shared arena", "arena")
            entries[i] = [p.Slot.RESERVED, off]
        ident = self.holds.add(Kind.RESERVATION, claimed, claimed.abort) if claimed.slots else 0
        return [p.OK, ident, entries]

    def _commit(self, m: list[Any]) -> list[Any]:
        claimed = self.holds.take(Kind.RESERVATION, p.arg(m, 1, int, "reservation"))
        if claimed is None:
            raise FailedPrecondition(
                "the reservation is unknown or timed out "
                "(local_lease_timeout_s); nothing was stored",
                "reservation",
            )
        try:
            sums = p.int_list(m[2] if len(m) > 2 else None, "checksums", len(claimed.slots),
                              1 << 64)  # fmt: skip
        except KVFabricError:
            claimed.abort()
            raise
        return [p.OK, claimed.commit(sums)]
