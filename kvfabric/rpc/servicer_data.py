"""The streaming halves of the kvfabric.v1 servicer and the limits on how long calls run.

* :func:`read_put` checks a Put stream chunk by chunk and assembles each block
  into one preallocated buffer; nothing reaches the store until the whole
  stream has arrived and checked out.
* :func:`stream_get` sends a header per requested block and, unless the
  client reads over the data plane, the block's bytes: copied out of a read
  lease into their chunk messages in one hashing pass, and sent only once
  the whole block matches its stored checksum.
* :func:`stream_events` pages through directory events and, when asked,
  follows new ones until the client leaves or the server's cap is reached.

Every function here raises domain errors only; the servicer maps them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from kvfabric import integrity
from kvfabric.config import KVFabricConfig
from kvfabric.errors import DeadlineExceeded, InvalidArgument
from kvfabric.node.service import NodeStoreService
from kvfabric.rpc import convert
from kvfabric.rpc.auth import Grant
from kvfabric.rpc.chunks import encode_field
from kvfabric.rpc.v1 import kvfabric_pb2 as pb
from kvfabric.types import BlockKey, BlockMeta

log = logging.getLogger(__name__)

EVENT_PAGE = 1000
"""Events fetched from the directory per call."""

FOLLOW_POLL_S = 0.2
"""How often a following WatchEvents asks the directory for new events."""

_WATCHDOG_GRACE_S = 0.5
"""Loops that check the time themselves get this long to end a call with a status first."""

_IDLE_WAIT_S = 5.0


class Deadline:
    """When a call must stop: the client's deadline, capped at ``rpc_max_deadline_s``."""

    def __init__(self, time_remaining: float | None, cap_s: float) -> None:
        self.cap_s = cap_s
        self.capped = time_remaining is None or cap_s <= time_remaining
        self.at = time.monotonic() + (cap_s if self.capped else float(time_remaining or 0.0))

    def remaining(self) -> float:
        """Seconds left (never negative)."""
        return max(self.at - time.monotonic(), 0.0)

    def check(self, what: str) -> None:
        """DeadlineExceeded once the time is up."""
        if time.monotonic() >= self.at:
            if self.capped:
                raise DeadlineExceeded(
                    f"{what} ran longer than rpc_max_deadline_s={self.cap_s} s",
                    "rpc_max_deadline_s",
                )
            raise DeadlineExceeded(f"{what} ran past the client's deadline", "deadline")


class Watchdog:
    """One thread that cancels streaming calls still running past their deadline.

    A stream can block inside gRPC where no loop of ours checks the time —
    waiting for a Put chunk the client never sends, or sending a Get chunk the
    client never reads. Cancelling the call wakes it, and frees its worker.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: dict[int, tuple[float, Any]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def watching(self, context: Any, deadline: Deadline) -> Iterator[None]:
        """Cancel ``context``'s call if it is still inside this block after ``deadline``."""
        ident = next(self._ids)
        with self._cond:
            if not self._closed:
                self._calls[ident] = (deadline.at + _WATCHDOG_GRACE_S, context)
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="kvfabric-rpc-watchdog", daemon=True
                    )
                    self._thread.start()
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._calls.pop(ident, None)

    def close(self) -> None:
        """Stop the thread (calls still watched are left to gRPC's own shutdown)."""
        with self._cond:
            self._closed = True
            self._calls.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=_IDLE_WAIT_S)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [(i, ctx) for i, (at, ctx) in self._calls.items() if at <= now]
                for i, _ in due:
                    del self._calls[i]
                if not due:
                    soonest = min((at for at, _ in self._calls.values()), default=now + 60.0)
                    self._cond.wait(timeout=min(max(soonest - now, 0.01), _IDLE_WAIT_S))
                    continue
            for _, ctx in due:
                log.warning("cancelling a streaming call that ran past its deadline")
                try:
                    ctx.cancel()
                except Exception:
                    log.exception("cancelling a call failed")


# -- Put -------------------------------------------------------------------------------
class PutAssembler:
    """Checks the data chunks of one Put and copies them into per-block buffers.

    Chunks must come for block 0, 1, ... in order, each starting where the
    previous one ended; a block's buffer is allocated when its first chunk
    arrives (a truncated stream never allocates the whole call).
    """

    def __init__(self, spec: convert.PutSpec) -> None:
        self.spec = spec
        self.blocks: list[bytearray] = []
        self._index = 0
        self._offset = 0

    def add(self, chunk: pb.BlockData) -> None:
        """Copy one chunk into its block; InvalidArgument if it is not the expected one."""
        n, size = len(self.spec.hashes), self.spec.block_bytes
        if chunk.block_index >= n:
            raise InvalidArgument(
                f"data.block_index={chunk.block_index} is out of range: the header has {n} hashes",
                "data.block_index",
            )
        if chunk.block_index != self._index or chunk.offset != self._offset:
            raise InvalidArgument(
                f"chunk for block {chunk.block_index} at data.offset={chunk.offset} is out of "
                f"order: expected block {self._index} at offset {self._offset}",
                "data.offset",
            )
        if not chunk.data:
            raise InvalidArgument("data.data of a Put chunk must not be empty", "data.data")
        end = self._offset + len(chunk.data)
        if end > size:
            raise InvalidArgument(
                f"chunk of block {self._index} ends at byte {end}, past header.block_bytes={size}",
                "data.data",
            )
        if self._offset == 0:
            self.blocks.append(bytearray(size))
        self.blocks[-1][self._offset : end] = chunk.data
        self._index, self._offset = (self._index + 1, 0) if end == size else (self._index, end)

    def finish(self) -> list[bytearray]:
        """Every block, complete; InvalidArgument if the stream ended early."""
        if self._index != len(self.spec.hashes):
            got = self._index * self.spec.block_bytes + self._offset
            raise InvalidArgument(
                f"the Put stream ended after {got} of {self.spec.total_bytes} bytes", "data"
            )
        return self.blocks


def read_put(
    chunks: Iterator[pb.PutChunk], config: KVFabricConfig, grant: Grant, deadline: Deadline
) -> tuple[convert.PutSpec, list[bytearray]]:
    """Read a whole Put stream: its validated header and the assembled blocks."""
    first = next(chunks, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message of a Put must be a header", "header")
    spec = convert.put_spec(first.header, config)
    grant.require(spec.namespace)
    assembler = PutAssembler(spec)
    # Bounded: every accepted chunk carries at least one byte of spec.total_bytes.
    for chunk in chunks:
        deadline.check("Put")
        part = chunk.WhichOneof("part")
        if part != "data":
            raise InvalidArgument(
                "a Put carries exactly one header, as its first message"
                if part == "header"
                else "a Put message must carry a header or data",
                "header" if part == "header" else "data",
            )
        assembler.add(chunk.data)
    deadline.check("Put")  # a stream the watchdog cut short ends here, not as "too short"
    return spec, assembler.finish()


# -- Get -------------------------------------------------------------------------------
def stream_get(
    service: NodeStoreService,
    config: KVFabricConfig,
    request: pb.GetRequest,
    keys: list[BlockKey],
    deadline: Deadline,
) -> Iterator[pb.GetChunk | bytes]:
    """A header per key in order; each found block's bytes follow unless ``data_plane``.

    With ``data_plane`` and ``batch_headers`` every header goes in one message:
    a message per block costs a trip through Python gRPC each, ~15 % of a
    128-block data-plane get (docs/benchmarks.md, rpc).
    """
    absent = [k for k, t in zip(keys, service.core.contains(keys), strict=True) if t is None]
    if absent:
        service.pull_missing(absent)  # a Get on any node returns the cluster's blocks
    size = convert.chunk_bytes(request.chunk_bytes, config)
    if request.data_plane:
        deadline.check("Get")
        headers = (_plane_header(service, i, key) for i, key in enumerate(keys))
        if request.batch_headers:
            yield pb.GetChunk(headers=[c.header for c in headers])
        else:
            yield from headers
        return
    for i, key in enumerate(keys):
        deadline.check("Get")
        yield from _stream_block(service, i, key, size, deadline, request.inline_headers)


def _plane_header(service: NodeStoreService, index: int, key: BlockKey) -> pb.GetChunk:
    """The header of a block the client reads over the data plane (or a miss)."""
    meta = service.core.meta(key)
    if meta is None:
        return _missing(index)
    return _header(service, index, meta.size, meta.checksum, int(meta.tier))


class _Encoded(NamedTuple):
    """One block read for a streamed Get: its messages and both checksums."""

    chunks: list[bytes]
    size: int
    digest: int  # of the bytes just read
    stored: int  # the checksum the store holds for the block


def _stream_block(
    service: NodeStoreService, index: int, key: BlockKey, size: int, deadline: Deadline,
    inline: bool,
) -> Iterator[pb.GetChunk | bytes]:  # fmt: skip
    meta = service.core.meta(key)
    block = None if meta is None else _read_encoded(service, index, key, size, meta, inline)
    if meta is None or block is None:
        yield _missing(index)
        return
    if block.digest != block.stored:
        # A verified read drops the block and counts it; never serve bad bytes.
        service.core.get_into([key], [bytearray(meta.size)], promote=False)
        yield _missing(index)
        return
    if not inline:
        yield _header(service, index, block.size, block.stored, int(meta.tier))
    for chunk in block.chunks:
        deadline.check("Get")
        yield chunk


def _read_encoded(
    service: NodeStoreService, index: int, key: BlockKey, size: int, meta: BlockMeta,
    inline: bool,
) -> _Encoded | None:  # fmt: skip
    """The block's Get messages in chunks of ``size``; None if it is not here.

    The one pass over the bytes: they are copied into the pre-encoded messages
    (see rpc/chunks.py) and hashed on the way, so the caller verifies the whole
    block before sending its first chunk, and no lease is held while the
    client reads. With ``inline`` the first message also carries the block's
    header (``GetChunk.block_header``): one message per block fewer, which
    in Python gRPC costs about as much as a chunk's bytes (docs/data-path.md).
    """
    lease = service.core.open_read([key])
    try:
        buf, stored = lease.buffers[0], lease.checksums[0]
        if buf is None or stored is None:
            return None
        view = memoryview(buf).cast("B")
        trailer = b""
        if inline:
            header = _header(service, index, len(view), stored, int(meta.tier)).header
            trailer = encode_field(3, header.SerializeToString())
        chunks, digest = integrity.encode_chunks_with_checksum(index, view, size, trailer)
        return _Encoded(chunks, len(view), digest, stored)
    finally:
        lease.release()


def _missing(index: int) -> pb.GetChunk:
    return pb.GetChunk(header=pb.GetHeader(block_index=index, found=False))


def _header(
    service: NodeStoreService, index: int, size: int, checksum: int, tier: int
) -> pb.GetChunk:
    where = convert.location(service.node_id, service.address, tier)
    return pb.GetChunk(
        header=pb.GetHeader(
            block_index=index, found=True, size=size, checksum=checksum, location=where
        )
    )


# -- WatchEvents -----------------------------------------------------------------------
def stream_events(
    service: NodeStoreService,
    request: pb.WatchEventsRequest,
    grant: Grant,
    is_active: Callable[[], bool],
    deadline: Deadline,
) -> Iterator[pb.Event]:
    """Events after ``from_seq``; with ``follow``, new ones until the client cancels.

    A caller whose token is limited to some namespaces sees only their block
    events (and node events).
    """
    seq = request.from_seq
    while True:
        events = service.events_since(seq, EVENT_PAGE)
        for event in events:
            seq = event.seq
            if event.key is None or grant.allows(event.key.namespace):
                yield convert.event_to_proto(event)
        if len(events) >= EVENT_PAGE:
            deadline.check("WatchEvents")
            continue
        if not request.follow or not is_active():
            return
        if deadline.remaining() <= 0:
            if not deadline.capped:
                return  # the client's own deadline: gRPC ends the call
            raise DeadlineExceeded(
                f"WatchEvents follows for at most rpc_max_deadline_s={deadline.cap_s} s; "
                f"resume from seq {seq}",
                "rpc_max_deadline_s",
            )
        time.sleep(min(FOLLOW_POLL_S, deadline.remaining()))
