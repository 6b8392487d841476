"""The TCP block transport: leased arena bytes stream straight into reserved arena slots.

Serving runs :class:`~kvfabric.transfer.base.BlockServer` with
:func:`~kvfabric.transfer.base.answer_inline`. Fetching uses persistent
connections per peer. A fetch asks only for the keys the local store lacks,
in batches that fit its CPU tier, pipelining the next request while a batch
streams in. Per batch it reads the header section, reserves every slot at
once (``store.open_write``), ``recv_into``s each payload into its slot and
commits (which verifies every checksum). A failure mid-stream aborts that
batch — none of it becomes visible — drops the connection and raises
Unavailable; batches received whole before it stay committed.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvfabric.errors import Corrupt, FailedPrecondition, InvalidArgument, Unavailable
from kvfabric.node.core import NodeStoreCore
from kvfabric.node.leases import ReadLease
from kvfabric.tiers.base import BlockRecord
from kvfabric.transfer import base, wire
from kvfabric.transfer.base import (
    BlockServer,
    FetchResult,
    Handler,
    Transport,
    TransportProbe,
    answer_inline,
)
from kvfabric.transfer.wire import Entry, Request, Status, remaining
from kvfabric.types import BlockKey, Tier

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass
class _Tally:
    fetched: list[BlockKey] = field(default_factory=list)
    missing: list[BlockKey] = field(default_factory=list)
    corrupt: list[BlockKey] = field(default_factory=list)
    present: list[BlockKey] = field(default_factory=list)
    bytes: int = 0


class TcpTransport(Transport):
    """Blocks over plain TCP streams; always available, the fallback to NIXL.

    ``buffer_bytes`` fixes the kernel socket buffers (None keeps Linux's
    autotuning); ``max_request_bytes`` bounds one batch (also capped at half
    the local CPU tier, so a batch always fits its reservation);
    ``pipeline_depth`` requests are in flight per connection.
    """

    name = "tcp"
    request_flags = 0

    def __init__(
        self, *, max_connections: int = 16, max_open: int = 256, max_idle_per_peer: int = 4,
        buffer_bytes: int | None = 4 * MiB, max_request_bytes: int = 8 * MiB,
        pipeline_depth: int = 2, idle_timeout_s: float = 60.0, io_timeout_s: float = 30.0,
    ) -> None:  # fmt: skip
        self.max_connections, self.max_open = max_connections, max_open
        self.buffer_bytes, self.max_request_bytes = buffer_bytes, max_request_bytes
        self.pipeline_depth = max(1, pipeline_depth)
        self.idle_timeout_s, self.io_timeout_s = idle_timeout_s, io_timeout_s
        self._server: BlockServer | None = None
        self._pool = wire.ConnectionPool(max_idle_per_peer, buffer_bytes, self._on_connect)

    @classmethod
    def probe(cls) -> TransportProbe:
        """TCP needs nothing beyond the standard library."""
        return TransportProbe(True, "plain TCP sockets, always available")

    def serve(self, store: NodeStoreCore, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the block server for ``store``; returns ``"host:port"``."""
        if self._server is not None:
            raise FailedPrecondition(f"already serving on {self._server.address}", "transport")
        self._server = BlockServer(
            store, host, port, max_connections=self.max_connections, max_open=self.max_open,
            buffer_bytes=self.buffer_bytes, idle_timeout_s=self.idle_timeout_s,
            io_timeout_s=self.io_timeout_s, answer=self._answer, extensions=self._extensions(),
        )  # fmt: skip
        log.info("%s transport serving on %s", self.name, self._server.address)
        return self._server.address

    def close(self) -> None:
        """Stop the server (joining its threads, bounded) and drop pooled connections."""
        if self._server is not None:
            self._server.close()
        self._pool.close()

    def fetch(
        self, address: str, keys: Sequence[BlockKey], store: NodeStoreCore, *, timeout_s: float
    ) -> FetchResult:
        """Pull the blocks of ``keys`` the local ``store`` lacks (see :meth:`Transport.fetch`)."""
        start = time.perf_counter()
        deadline = time.monotonic() + base.validate_timeout(timeout_s)
        wire.parse_address(address)
        for k in keys:
            if not isinstance(k, BlockKey):
                raise InvalidArgument(f"keys must be BlockKeys, not {type(k).__name__}", "keys")
            store.namespace(k.namespace)  # NotFound before anything moves
        wanted = list(dict.fromkeys(keys))
        tally = _Tally()
        todo: list[BlockKey] = []
        for k, tier in zip(wanted, store.contains(wanted), strict=True):
            (tally.present if tier is not None else todo).append(k)
        batches = self._batches(todo, store)
        if batches:
            self._pool.call(
                address,
                deadline,
                lambda conn: self._stream(conn, address, batches, store, deadline, tally),
            )
        result = FetchResult(
            tuple(tally.fetched), tuple(tally.missing), tuple(tally.corrupt),
            tuple(tally.present), tally.bytes, time.perf_counter() - start,
        )  # fmt: skip
        log.debug("fetched %d blocks (%d bytes, %d corrupt) from %s in %.4f s",
                  len(result.fetched), result.bytes, len(result.corrupt), address,
                  result.seconds)  # fmt: skip
        return result

    def _batches(self, keys: list[BlockKey], store: NodeStoreCore) -> list[list[BlockKey]]:
        limit = max(1, min(self.max_request_bytes, store.tiers[Tier.CPU].capacity() // 2))
        batches: list[list[BlockKey]] = [[]]
        size = 0
        for k in keys:
            n = store.namespace(k.namespace).block_bytes
            if batches[-1] and (size + n > limit or len(batches[-1]) >= wire.MAX_KEYS):
                batches.append([])
                size = 0
            batches[-1].append(k)
            size += n
        return [b for b in batches if b]

    def _stream(
        self, conn: socket.socket, address: str, batches: list[list[BlockKey]],
        store: NodeStoreCore, deadline: float, tally: _Tally,
    ) -> None:  # fmt: skip
        """Fetch every batch on one connection, ``pipeline_depth`` requests ahead."""
        sent = 0
        try:
            conn.settimeout(remaining(deadline, address))
            for batch in batches[: self.pipeline_depth]:
                wire.send_buffers(conn, [wire.encode_request(batch, self.request_flags)])
                sent += 1
        except ConnectionError as exc:
            raise wire.StaleConnection(str(exc)) from exc
        except OSError as exc:
            raise Unavailable(f"fetch from {address} failed: {exc}", "address") from exc
        for i, batch in enumerate(batches):
            entries = self._read_head(conn, address, batch, store, deadline, first=i == 0)
            records: list[BlockRecord] = []
            for k, e in zip(batch, entries, strict=True):
                if e.status == Status.MISSING:
                    tally.missing.append(k)
                elif e.size != (want := store.namespace(k.namespace).block_bytes):
                    raise Corrupt(f"{address} sent {e.size} bytes for {k.short()}; namespace "
                                  f"blocks are {want} bytes", "size")  # fmt: skip
                else:
                    records.append(BlockRecord(k, e.size, e.checksum, e.type, e.program_id))
            reservation = store.open_write(records)
            try:
                received = self._receive(conn, address, batch, entries, reservation.records,
                                         reservation.buffers, deadline)  # fmt: skip
                if sent < len(batches):  # keep the peer streaming while this batch commits
                    request = wire.encode_request(batches[sent], self.request_flags)
                    wire.send_buffers(conn, [request])
                    sent += 1
            except OSError as exc:
                reservation.abort()
                raise Unavailable(f"fetch from {address} broke mid-stream: {exc}",
                                  "address") from exc  # fmt: skip
            except BaseException:
                reservation.abort()
                raise
            for rec, put in zip(reservation.records, reservation.commit(), strict=True):
                (tally.fetched if put is not None else tally.corrupt).append(rec.key)
            tally.present += reservation.present
            tally.bytes += received

    def _read_head(
        self, conn: socket.socket, address: str, batch: list[BlockKey], store: NodeStoreCore,
        deadline: float, *, first: bool,
    ) -> list[Entry]:  # fmt: skip
        """Read and validate one response's preamble and header section."""
        section = wire.read_response_head(
            conn, address, len(batch), deadline, first=first, what="fetch"
        )
        max_block = store.config.max_block_bytes
        return wire.parse_response_section(section, len(batch), max_block, self.request_flags)

    def _receive(
        self, conn: socket.socket, address: str, batch: list[BlockKey], entries: list[Entry],
        records: list[BlockRecord], buffers: list[memoryview], deadline: float,
    ) -> int:  # fmt: skip
        """Land every inline payload in its slot (or read past it); then the remote ones."""
        slots = {r.key: b for r, b in zip(records, buffers, strict=True)}
        scratch: memoryview | None = None
        remote: list[tuple[Entry, memoryview]] = []
        received = 0
        for k, e in zip(batch, entries, strict=True):
            dst = slots.get(k)
            if e.status == Status.REMOTE and dst is not None:
                remote.append((e, dst))
            if e.status != Status.OK:
                continue
            conn.settimeout(remaining(deadline, address))
            if dst is not None:
                wire.recv_into_exact(conn, dst)
            else:  # stored locally meanwhile: read past it
                scratch = scratch if scratch is not None else memoryview(bytearray(MiB))
                for off in range(0, e.size, len(scratch)):
                    wire.recv_into_exact(conn, scratch[: min(len(scratch), e.size - off)])
            received += e.size
        return received + self._land_remote(conn, address, entries, remote, deadline)

    # -- hooks for transports that extend the TCP control path (NIXL) ----------------------
    def _answer(self, conn: socket.socket, request: Request, lease: ReadLease) -> None:
        answer_inline(conn, request, lease)

    def _extensions(self) -> dict[bytes, Handler]:
        return {}

    def _on_connect(self, sock: socket.socket, address: str, deadline: float) -> None:
        """Called once per new client connection (a handshake may go here)."""

    def _land_remote(
        self, conn: socket.socket, address: str, entries: list[Entry],
        pairs: list[tuple[Entry, memoryview]], deadline: float,
    ) -> int:  # fmt: skip
        """Read REMOTE entries into their slots; plain TCP never asks for any."""
        if pairs:
            raise Corrupt(f"{address} answered with remote entries to a TCP fetch", "status")
        return 0
