"""Read blocks from a node's data plane straight into caller buffers, with no local store.

:func:`read_blocks` is what a client that is not a node (the gRPC
:class:`~kvfabric.rpc.client.Client`, a connector) uses after a control-plane
``Get`` told it where the blocks are: it speaks the node-to-node protocol of
:mod:`kvfabric.transfer.wire` to the node's block server, lands each payload
with ``recv_into`` in the caller's buffer (no intermediate copy) and checks
XXH3-64 of the bytes against both the checksum the data-plane header carries
and the one the caller was given by the control plane. A block that is
missing or fails either check is reported False: a miss, whose buffer holds
unspecified bytes.

Connections are persistent: a :class:`BlockReader` keeps a small thread-safe
pool per address (:class:`kvfabric.transfer.wire.ConnectionPool`, the one the
TCP transport uses). A pooled connection that the server closed while idle is
replaced once, transparently, before any byte of the answer arrived. A stream
that breaks or times out raises :class:`~kvfabric.errors.Unavailable` and the
connection is dropped; a malformed answer raises
:class:`~kvfabric.errors.Corrupt`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from kvfabric import integrity
from kvfabric.errors import InvalidArgument, Unavailable
from kvfabric.transfer import wire
from kvfabric.transfer.base import validate_timeout
from kvfabric.transfer.wire import Entry, Status, remaining
from kvfabric.types import BlockKey

log = logging.getLogger(__name__)

MiB = 1 << 20
MAX_BLOCK_BYTES = 4096 * MiB  # the config's own ceiling for max_block_bytes
_SCRATCH_BYTES = MiB


def _noop_connect(sock: socket.socket, address: str, deadline: float) -> None:
    """Plain TCP needs no handshake beyond connect."""


class BlockReader:
    """A data-plane reader with a pool of persistent connections per address; thread-safe.

    ``max_idle_per_peer`` connections per address are kept open between
    calls; ``max_request_bytes`` bounds the bytes one request asks for, and
    ``pipeline_depth`` requests are in flight on a connection, so the server
    streams the next batch while this side verifies the last one; a new
    connection must be up within ``connect_timeout_s``.
    """

    def __init__(
        self,
        *,
        max_idle_per_peer: int = 4,
        buffer_bytes: int | None = 4 * MiB,
        max_request_bytes: int = 64 * MiB,
        pipeline_depth: int = 2,
        connect_timeout_s: float = 1.0,
    ) -> None:
        self.max_request_bytes = max(1, max_request_bytes)
        self.pipeline_depth = max(1, pipeline_depth)
        self.connect_timeout_s = validate_timeout(connect_timeout_s)
        self._pool = wire.ConnectionPool(max_idle_per_peer, buffer_bytes, _noop_connect)

    def read(
        self,
        address: str,
        keys: Sequence[BlockKey],
        dsts: Sequence[Any],
        expected_checksums: Sequence[int],
        *,
        timeout_s: float,
    ) -> list[bool]:
        """Read ``keys`` from the block server at ``address`` into ``dsts``.

        ``dsts[i]`` is a writable buffer of exactly the block's size;
        ``expected_checksums[i]`` is the XXH3-64 the control plane reported.
        Returns, per key, True when the bytes in ``dsts[i]`` are verified and
        False on a miss (absent, wrong size or checksum mismatch). The whole
        call is bounded by ``timeout_s``. Raises InvalidArgument for bad
        arguments, Unavailable when the server cannot be reached, the stream
        breaks or the time runs out, Corrupt for a malformed answer.
        """
        deadline = time.monotonic() + validate_timeout(timeout_s)
        wire.parse_address(address)
        views = _check_args(keys, dsts, expected_checksums)
        if not views:
            return []
        batches = self._batches(views)
        connect_by = min(deadline, time.monotonic() + self.connect_timeout_s)
        return self._pool.call(
            address,
            connect_by,
            lambda conn: self._stream(
                conn, address, keys, views, expected_checksums, batches, deadline
            ),
        )

    def close(self) -> None:
        """Close every pooled connection; later reads fail with FailedPrecondition."""
        self._pool.close()

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _batches(self, views: list[memoryview]) -> list[range]:
        """Consecutive index ranges, each within the key and byte limits of one request."""
        out: list[range] = []
        start, size = 0, 0
        for i, v in enumerate(views):
            if i > start and (size + len(v) > self.max_request_bytes or i - start >= wire.MAX_KEYS):
                out.append(range(start, i))
                start, size = i, 0
            size += len(v)
        out.append(range(start, len(views)))
        return out

    def _stream(
        self,
        conn: socket.socket,
        address: str,
        keys: Sequence[BlockKey],
        views: list[memoryview],
        expected: Sequence[int],
        batches: list[range],
        deadline: float,
    ) -> list[bool]:
        """Every batch on one connection, ``pipeline_depth`` requests ahead of the answers."""
        ok = [False] * len(views)
        sent = 0
        try:
            conn.settimeout(remaining(deadline, address))
            for batch in batches[: self.pipeline_depth]:
                wire.send_buffers(conn, [wire.encode_request([keys[i] for i in batch])])
                sent += 1
        except ConnectionError as exc:
            raise wire.StaleConnection(str(exc)) from exc
        except OSError as exc:
            raise Unavailable(f"data-plane read from {address} failed: {exc}", "address") from exc
        scratch: memoryview | None = None
        for n, batch in enumerate(batches):
            entries = self._read_head(conn, address, batch, views, deadline, first=n == 0)
            try:
                if sent < len(batches):  # the server answers it while this batch lands
                    request = wire.encode_request([keys[i] for i in batches[sent]])
                    wire.send_buffers(conn, [request])
                    sent += 1
                for i, e in zip(batch, entries, strict=True):
                    if e.status != Status.OK:
                        continue
                    conn.settimeout(remaining(deadline, address))
                    dst = views[i]
                    if e.size != len(dst):  # not the block the caller expects: read past it
                        log.warning("%s sent %d bytes for %s; expected %d", address, e.size,
                                    keys[i].short(), len(dst))  # fmt: skip
                        scratch = scratch or memoryview(bytearray(_SCRATCH_BYTES))
                        for off in range(0, e.size, len(scratch)):
                            wire.recv_into_exact(conn, scratch[: min(len(scratch), e.size - off)])
                        continue
                    wire.recv_into_exact(conn, dst)
                    got = integrity.checksum(dst)
                    ok[i] = got == e.checksum == expected[i]
                    if not ok[i]:
                        log.warning("block %s from %s failed its checksum; treated as a miss",
                                    keys[i].short(), address)  # fmt: skip
            except OSError as exc:
                raise Unavailable(
                    f"data-plane read from {address} broke mid-stream: {exc}", "address"
                ) from exc
        return ok

    def _read_head(
        self,
        conn: socket.socket,
        address: str,
        batch: range,
        views: list[memoryview],
        deadline: float,
        *,
        first: bool,
    ) -> list[Entry]:
        """Read and validate one answer's preamble and header section."""
        section = wire.read_response_head(
            conn, address, len(batch), deadline, first=first, what="data-plane read"
        )
        return wire.parse_response_section(section, len(batch), MAX_BLOCK_BYTES)


def _check_args(
    keys: Sequence[BlockKey], dsts: Sequence[Any], expected: Sequence[int]
) -> list[memoryview]:
    """Validate the parallel sequences; returns byte views of the destinations."""
    if not len(keys) == len(dsts) == len(expected):
        raise InvalidArgument(
            f"{len(keys)} keys, {len(dsts)} buffers and {len(expected)} checksums differ", "dsts"
        )
    views: list[memoryview] = []
    for k, d, c in zip(keys, dsts, expected, strict=True):
        if not isinstance(k, BlockKey):
            raise InvalidArgument(f"keys must be BlockKeys, not {type(k).__name__}", "keys")
        if not isinstance(c, int) or not 0 <= c < 1 << 64:
            raise InvalidArgument("expected_checksums must be unsigned 64-bit ints", "checksums")
        try:
            view = memoryview(d).cast("B")
        except TypeError:
            raise InvalidArgument(
                f"dsts must be writable buffers, not {type(d).__name__}", "dsts"
            ) from None
        if view.readonly or not 0 < len(view) <= MAX_BLOCK_BYTES:
            raise InvalidArgument("dsts must be writable, non-empty buffers", "dsts")
        views.append(view)
    return views


_default: BlockReader | None = None
_default_lock = threading.Lock()


def default_reader() -> BlockReader:
    """The process-wide reader behind :func:`read_blocks` (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = BlockReader()
        return _default


def read_blocks(
    address: str,
    keys: Sequence[BlockKey],
    dsts: Sequence[Any],
    expected_checksums: Sequence[int],
    *,
    timeout_s: float,
) -> list[bool]:
    """Read blocks from ``address`` into ``dsts`` with the process-wide pool.

    See :meth:`BlockReader.read`: True where ``dsts[i]`` holds the verified
    block, False for a miss (absent or corrupt; the buffer is then
    unspecified). Raises Unavailable on a broken stream or a timeout.
    """
    return default_reader().read(address, keys, dsts, expected_checksums, timeout_s=timeout_s)
