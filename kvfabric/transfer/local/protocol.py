"""The messages of the local channel and their framing (pure: no store, no sockets opened).

A frame is a 4-byte big-endian length and a msgpack array ``[op, *args]``.
Requests and their answers, in order on one connection:

=========  =====================================================  ==========================
op         request                                                answer
=========  =====================================================  ==========================
HELLO      ``[1, version, token]``                                ``[0, {node, segment, ...}]``
READ       ``[2, namespace, [hash...]]``                          ``[0, lease, [[where, offset,
                                                                  size, checksum]...]]``
RELEASE    ``[3, lease, [index of a block that failed...]]``      none
RESERVE    ``[4, namespace, [hash...], block_bytes, type,         ``[0, reservation,
           program_id]``                                          [[state, offset]...]]``
COMMIT     ``[5, reservation, [checksum...]]``                    ``[0, [status...]]``
ABORT      ``[6, reservation]``                                   none
=========  =====================================================  ==========================

A refused request is answered ``[1, code, message, field]`` (``code`` is the
gRPC status name of a :mod:`kvfabric.errors` class). RELEASE and ABORT are
never answered, so a client ends a lease without waiting a round trip; a
server that cannot honour one only logs it.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from enum import IntEnum
from typing import Any, NoReturn

import msgpack  # type: ignore[import-untyped]

from kvfabric import errors
from kvfabric.errors import Corrupt, InvalidArgument, KVFabricError
from kvfabric.transfer import wire

VERSION = 1
MAX_FRAME_BYTES = 4 << 20  # a READ of rpc_max_chain=4096 hashes is ~150 KiB
OK, ERR = 0, 1
_LEN = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class Op(IntEnum):
    """Request kinds."""

    HELLO = 1
    READ = 2
    RELEASE = 3
    RESERVE = 4
    COMMIT = 5
    ABORT = 6


ANSWERED = frozenset({Op.HELLO, Op.READ, Op.RESERVE, Op.COMMIT})


class Where(IntEnum):
    """Where a block of a READ lies."""

    ABSENT = 0  # not stored (anywhere the node could pull it from)
    SHARED = 1  # in the shared arena at ``offset``; leased until RELEASE
    ELSEWHERE = 2  # stored, but not in the arena (GPU or disk tier): read it another way


class Slot(IntEnum):
    """What a RESERVE gave each block."""

    RESERVED = 0  # copy the bytes to ``offset``, then COMMIT
    EXISTS = 1  # stored already: nothing to write
    PENDING = 2  # another writer is storing it now


def socket_name(node_id: str, address: str) -> bytes:
    """The abstract Unix socket name of a node's local channel.

    Derived from what ``Stats`` tells any client (node id and data-plane
    address), so a client needs no extra configuration; hashed to stay well
    inside the 107-byte limit. The leading NUL puts it in Linux's abstract
    namespace: no file to leak when a node crashes.
    """
    digest = hashlib.sha256(f"{node_id}|{address}".encode()).hexdigest()[:32]
    return b"\0kvfabric-local-" + digest.encode()


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (from the kernel)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(raw)[1])


def encode(message: list[Any]) -> bytes:
    """One frame."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def recv_message(sock: socket.socket) -> list[Any] | None:
    """The next frame's array; None on a clean end of stream between frames."""
    head = bytearray(_LEN.size)
    got = sock.recv_into(head)
    if got == 0:
        return None
    wire.recv_into_exact(sock, memoryview(head)[got:])
    (n,) = _LEN.unpack(head)
    if not 0 < n <= MAX_FRAME_BYTES:
        raise InvalidArgument(f"frame of {n} bytes (limit {MAX_FRAME_BYTES})", "frame")
    body = wire.recv_exact(sock, n)
    try:
        message = msgpack.unpackb(bytes(body), raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        kind = type(exc).__name__
        raise InvalidArgument(f"frame is not valid msgpack ({kind})", "frame") from None
    if not isinstance(message, list) or not message:
        raise InvalidArgument("a frame must hold a non-empty array", "frame")
    return message


def error_reply(exc: KVFabricError) -> list[Any]:
    """The answer that refuses a request with ``exc``."""
    return [ERR, exc.code, exc.message, exc.field or ""]





def check_reply(reply: list[Any] | None) -> list[Any]:
    """The fields of an OK answer; the typed error of a refusal; Corrupt if malformed."""
    if reply is None:
        raise errors.Unavailable("the node closed the local channel", "local")
    if reply[0] == OK:
        return reply[1:]
    if reply[0] == ERR and len(reply) == 4 and all(isinstance(x, str) for x in reply[1:]):
        cls = errors.BY_CODE.get(reply[1], KVFabricError)
        raise cls(reply[2], reply[3] or None)
    raise Corrupt("malformed answer on the local channel", "local")


def arg(message: list[Any], i: int, kind: type | tuple[type, ...], name: str) -> Any:
    """Argument ``i`` of a request, checked to be of ``kind``; InvalidArgument naming it."""
    value = message[i] if i < len(message) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidArgument(f"{name} is missing or of the wrong type", name)
    return value


def int_list(value: Any, name: str, count: int, hi: int) -> list[int]:
    """A list of exactly ``count`` ints in ``0..hi-1``; InvalidArgument naming ``name``."""
    if not isinstance(value, list) or len(value) != count:
        raise InvalidArgument(f"{name} must be a list of {count} integers", name)
    if not all(type(v) is int and 0 <= v < hi for v in value):
        raise InvalidArgument(f"every entry of {name} must be an integer in 0..{hi - 1}", name)
    return value


def fail(message: str, field: str) -> NoReturn:
    """Raise Corrupt for an answer that breaks the protocol."""
    raise Corrupt(message, field)
