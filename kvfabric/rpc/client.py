"""The Python client of a kvfabric node: typed calls over gRPC, bytes over the data plane.

``Client`` is a small facade over the generated stubs. Every call has a
deadline (``timeout_s``, per attempt); every failure surfaces as the typed
:mod:`kvfabric.errors` class of its status code, with the server's message.

Bytes: :meth:`Client.put` streams the caller's buffers in chunks (one copy,
into each message). :meth:`Client.get_into` asks the node for the headers
only (``data_plane=true``), reads each block from the data-plane address in
its header straight into the caller's buffer and verifies its XXH3-64; when
that address cannot be reached (or ``data_plane=False``), the node streams
the bytes in ``BlockData`` chunks instead, verified the same way. A block
that fails its checksum is a miss, never wrong bytes. On the node's own host
(``local=True``, the default) gets and puts go through the node-local data
path instead (:mod:`kvfabric.transfer.local`: one checksumming copy to or
from the node's shared-memory arena); the client finds it by itself, and
uses the network for what it cannot serve (blocks on the GPU or disk tier)
and whenever it is unusable (another host, another user, a namespace-limited
token).

Retries: only calls that read (Lookup, Get, Stats, Health, WatchEvents — the
latter resumes after the last event it delivered) are retried, up to
``retries`` times on UNAVAILABLE or DEADLINE_EXCEEDED with short exponential
backoff; repeating them changes nothing on the node. Put, Move, Pin, Unpin,
Evict, Prefetch, Annotate and Hint are never retried: pins are counted, an
evict or move of a block that a lost answer already moved reports different
counts, a retried put turns STORED into EXISTS, and a hint is an event.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from kvfabric.errors import (
    Corrupt,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from kvfabric.hints import HintKind, ProgramHint
from kvfabric.rpc import client_data as cd
from kvfabric.rpc.chunks import encode_data_chunk
from kvfabric.rpc.client_data import (
    BlockInfo,
    BlockPage,
    Event,
    HintResult,
    Location,
    LookupResult,
    MoveCounts,
    PinCounts,
    PutStatus,
    Stats,
)
from kvfabric.rpc.v1 import kvfabric_pb2 as pb
from kvfabric.rpc.v1 import kvfabric_pb2_grpc as pb_grpc
from kvfabric.transfer.local.client import ELSEWHERE, LocalLink
from kvfabric.transfer.reader import BlockReader
from kvfabric.types import BlockHash, BlockType, Tier, as_block_hash, validate_namespace

__all__ = [
    "BlockInfo", "BlockPage", "Client", "Event", "HintResult", "Location", "LookupResult",
    "MoveCounts", "PinCounts", "PutStatus", "Stats",
]  # fmt: skip

log = logging.getLogger(__name__)

MiB = 1 << 20
T = TypeVar("T")
RETRYABLE = (Unavailable, DeadlineExceeded)
# The local channel failing this way sends the call over the network instead.
LOCAL_UNUSABLE = (Unavailable, Corrupt, FailedPrecondition, PermissionDenied, Unauthenticated)
_PUT = "/kvfabric.v1.KVFabric/Put"
_BACKOFF_S, _BACKOFF_MAX_S = 0.05, 1.0


class Client:
    """A connection to one kvfabric node's gRPC API (thread-safe; a context manager).

    ``target`` is ``"host:port"`` of the node's gRPC server. ``token`` is sent
    as ``authorization: Bearer <token>``. TLS is on when ``tls_root_cert``
    (PEM of the CA that signed the server) or ``client_cert`` (PEM
    ``(certificate_chain, private_key)`` for mutual TLS) is given.
    ``timeout_s`` is the deadline of each attempt of each call (a call may
    override it), so a read-only call ends within ``(retries + 1) * timeout_s``
    plus backoff; ``retries`` is how often such a call is repeated (see the
    module docstring). ``data_plane`` lets gets read bytes from the node's
    data plane; ``max_message_bytes`` bounds one gRPC message both ways;
    ``chunk_bytes`` is the size of the chunks a put streams (and a streamed
    get asks for); ``local`` allows the node-local data path.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_root_cert: bytes | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
        timeout_s: float = 30.0,
        data_plane: bool = True,
        max_message_bytes: int = 64 * MiB,
        retries: int = 3,
        chunk_bytes: int = 4 * MiB,
        local: bool = True,
    ) -> None:
        if not isinstance(target, str) or not target:
            raise InvalidArgument("target must be a 'host:port' string", "target")
        if token is not None and (not isinstance(token, str) or not token.isprintable()):
            raise InvalidArgument("token must be a printable string", "token")
        if not isinstance(max_message_bytes, int) or not 64 * 1024 <= max_message_bytes < 1 << 31:
            raise InvalidArgument("max_message_bytes must be in 64 KiB..2 GiB", "max_message_bytes")
        if not isinstance(retries, int) or not 0 <= retries <= 10:
            raise InvalidArgument(f"retries must be in 0..10, got {retries!r}", "retries")
        if not isinstance(chunk_bytes, int) or not 4096 <= chunk_bytes <= max_message_bytes // 2:
            raise InvalidArgument(
                "chunk_bytes must be in 4 KiB..max_message_bytes/2", "chunk_bytes"
            )
        self.target = target
        self.timeout_s = _check_timeout(timeout_s)
        self.data_plane = bool(data_plane)
        self.retries = retries
        self.chunk_bytes = chunk_bytes
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_root_cert is not None or client_cert is not None:
            key, chain = (client_cert[1], client_cert[0]) if client_cert else (None, None)
            creds = grpc.ssl_channel_credentials(tls_root_cert, key, chain)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.KVFabricStub(self._channel)  # type: ignore[no-untyped-call]
        self._put = self._channel.stream_unary(
            _PUT, request_serializer=None, response_deserializer=pb.PutResponse.FromString
        )
        self._closed = False
        self._reader = BlockReader()
        self._getter = cd.BlockGetter(self._channel, self._metadata, self._reader, chunk_bytes)
        self._local = LocalLink(self._identify, token, self.timeout_s) if local else None

    def _identify(self) -> tuple[str, str]:
        # Not retried: a node that does not answer at once is used over the network.
        r = self._unary(self._stub.Stats, pb.StatsRequest(), None)
        return r.node_id, r.address

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel and the pooled data-plane connections (idempotent).

        Calls made afterwards raise FailedPrecondition.
        """
        self._closed = True
        self._channel.close()
        self._reader.close()
        if self._local is not None:
            self._local.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"the client of {self.target} is closed", "client")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- data -----------------------------------------------------------------------------
    def lookup(
        self, namespace: str, hashes: Sequence[bytes], *, local_only: bool = False,
        timeout_s: float | None = None, block_tokens: int = 0,
    ) -> LookupResult:  # fmt: skip
        """The longest stored prefix of the chain ``hashes`` and where each matched block is.

        ``block_tokens`` (tokens per block, when the caller knows it) lets the
        node count the prompt tokens it spared from recomputation.
        """
        if not isinstance(block_tokens, int) or not 0 <= block_tokens < 1 << 32:
            raise InvalidArgument("block_tokens must be an int in 0..2**32-1", "block_tokens")
        req = pb.LookupRequest(namespace=validate_namespace(namespace), hashes=_hashes(hashes),
                               local_only=bool(local_only),
                               block_tokens=block_tokens)  # fmt: skip
        r = self._unary(self._stub.Lookup, req, timeout_s, retry=True)
        return LookupResult(r.matched, cd.locations_from_pb(r.locations))

    def put(
        self, namespace: str, hashes: Sequence[bytes], blocks: Sequence[Any], *,
        block_type: BlockType = BlockType.GENERIC, program_id: str | None = None,
        timeout_s: float | None = None,
    ) -> list[PutStatus]:  # fmt: skip
        """Store ``blocks`` (bytes-like, all the same size) under ``hashes``; write once.

        Returns per block whether this call stored it, it existed already, or
        another writer is storing it. Never retried (see the module docstring).
        """
        hs = _hashes(hashes)
        header = pb.PutHeader(namespace=validate_namespace(namespace), hashes=hs,
                              block_type=cd.block_type_to_pb(block_type),
                              program_id=_optional_str(program_id, "program_id"))  # fmt: skip
        if isinstance(blocks, (bytes, bytearray, memoryview)):
            raise InvalidArgument("blocks must be a sequence of bytes-like blocks", "blocks")
        views = [_view(b, "blocks") for b in blocks]
        if len(views) != len(header.hashes):
            raise InvalidArgument(f"{len(header.hashes)} hashes but {len(views)} blocks", "blocks")
        if not views:
            return []
        size = len(views[0])
        if size == 0 or any(len(v) != size for v in views):
            raise InvalidArgument("blocks must all have the same, non-zero size", "blocks")
        header.block_bytes = size
        self._check_open()
        link = self._local
        local = link.get() if link is not None else None
        if link is not None and local is not None:
            try:
                done = local.put(header.namespace, hs, views, block_type, program_id or None,
                                 self._timeout(timeout_s))  # fmt: skip
            except LOCAL_UNUSABLE as exc:
                link.broken(exc)
            else:
                return _local_statuses(done)
        chunk = self.chunk_bytes

        def messages() -> Iterator[bytes]:
            yield pb.PutChunk(header=header).SerializeToString()
            for i, v in enumerate(views):
                for off in range(0, size, chunk):
                    yield encode_data_chunk(i, off, v[off : off + chunk])

        r = self._call(lambda t: self._put(messages(), timeout=t, metadata=self._metadata),
                       timeout_s, retry=False)  # fmt: skip
        if len(r.statuses) != len(views):
            raise Corrupt(f"{len(r.statuses)} put statuses for {len(views)} blocks", "statuses")
        return [cd.put_status_from_pb(s) for s in r.statuses]

    def get(
        self, namespace: str, hashes: Sequence[bytes], *, timeout_s: float | None = None
    ) -> list[bytes | None]:
        """The verified bytes of each block, None for a miss (absent or corrupt)."""
        ns, hs = validate_namespace(namespace), _hashes(hashes)
        out = self._retrying(lambda t: self._blocks(ns, hs, None, t), timeout_s, retry=True)
        return [None if o is None else bytes(o) for o in out]

    def get_into(
        self, namespace: str, hashes: Sequence[bytes], dsts: Sequence[Any], *,
        timeout_s: float | None = None,
    ) -> list[bool]:  # fmt: skip
        """Land each block in ``dsts[i]`` (writable, exactly the block's size); True on a hit.

        On a miss (absent or corrupt) ``dsts[i]`` holds unspecified bytes.
        """
        ns, hs = validate_namespace(namespace), _hashes(hashes)
        if len(dsts) != len(hs):
            raise InvalidArgument(f"{len(hs)} hashes but {len(dsts)} buffers", "dsts")
        views = [_view(d, "dsts", writable=True) for d in dsts]
        out = self._retrying(lambda t: self._blocks(ns, hs, views, t), timeout_s, retry=True)
        return [o is not None for o in out]

    def _blocks(
        self, ns: str, hs: list[BlockHash], views: list[memoryview] | None, timeout: float
    ) -> list[Any]:
        """One attempt of a get: the local channel first, the network for what it left."""
        out: list[Any] | None = None
        link = self._local
        local = link.get() if link is not None else None
        if link is not None and local is not None:
            try:
                out = local.read(ns, hs, views, timeout)
            except LOCAL_UNUSABLE as exc:
                link.broken(exc)
        if out is None:
            return self._getter.get(ns, hs, views, timeout, self.data_plane)
        rest = [i for i, o in enumerate(out) if o is ELSEWHERE]
        if rest:
            dsts = None if views is None else [views[i] for i in rest]
            got = self._getter.get(ns, [hs[i] for i in rest], dsts, timeout, self.data_plane)
            for i, g in zip(rest, got, strict=True):
                out[i] = g
        return out

    # -- control --------------------------------------------------------------------------
    def move(
        self, namespace: str, hashes: Sequence[bytes], tier: Tier | None = None,
        node_id: str | None = None, *, timeout_s: float | None = None,
    ) -> MoveCounts:  # fmt: skip
        """Move blocks to another tier of the node, or (``node_id``) to another node."""
        if (tier is None) == (node_id is None):
            raise InvalidArgument("give exactly one of tier and node_id", "tier")
        req = pb.MoveRequest(namespace=validate_namespace(namespace), hashes=_hashes(hashes),
                             tier=cd.tier_to_pb(tier),
                             node_id=_optional_str(node_id, "node_id"))  # fmt: skip
        return _move_counts(self._unary(self._stub.Move, req, timeout_s))

    def pin(
        self, namespace: str, hashes: Sequence[bytes], owner: str, ttl_s: float | None = None,
        *, timeout_s: float | None = None,
    ) -> PinCounts:  # fmt: skip
        """Add one counted pin of ``owner`` to each block (optionally expiring after ``ttl_s``)."""
        req = pb.PinRequest(namespace=validate_namespace(namespace), hashes=_hashes(hashes),
                            owner=_required_str(owner, "owner"), ttl_s=_ttl(ttl_s))  # fmt: skip
        r = self._unary(self._stub.Pin, req, timeout_s)
        return PinCounts(r.pinned, r.missing, r.new_bytes, tuple(r.missing_indexes))

    def unpin(
        self, namespace: str, hashes: Sequence[bytes], owner: str, *,
        timeout_s: float | None = None,
    ) -> int:  # fmt: skip
        """Release ``owner``'s pins of the blocks; returns how many were released."""
        req = pb.UnpinRequest(namespace=validate_namespace(namespace), hashes=_hashes(hashes),
                              owner=_required_str(owner, "owner"))  # fmt: skip
        return int(self._unary(self._stub.Unpin, req, timeout_s).released)

    def evict(
        self, namespace: str, hashes: Sequence[bytes], *, timeout_s: float | None = None
    ) -> int:
        """Remove blocks from the node (FailedPrecondition if one is pinned); returns how many."""
        req = pb.EvictRequest(namespace=validate_namespace(namespace), hashes=_hashes(hashes))
        return int(self._unary(self._stub.Evict, req, timeout_s).evicted)

    def prefetch(
        self, namespace: str, hashes: Sequence[bytes], tier: Tier | None = None, *,
        timeout_s: float | None = None,
    ) -> MoveCounts:  # fmt: skip
        """Promote blocks to ``tier`` (default: the node's fastest), pulling absent ones."""
        req = pb.PrefetchRequest(namespace=validate_namespace(namespace), hashes=_hashes(hashes),
                                 tier=cd.tier_to_pb(tier))  # fmt: skip
        return _move_counts(self._unary(self._stub.Prefetch, req, timeout_s))

    def annotate(
        self, namespace: str, hashes: Sequence[bytes], block_type: BlockType | None = None,
        program_id: str | None = None, ttl_s: float | None = None, *,
        timeout_s: float | None = None,
    ) -> int:  # fmt: skip
        """Set the type, program and/or TTL of blocks (None: unchanged); returns how many."""
        req = pb.AnnotateRequest(
            namespace=validate_namespace(namespace), hashes=_hashes(hashes),
            block_type=cd.block_type_to_pb(block_type),
            program_id=_optional_str(program_id, "program_id"), ttl_s=_ttl(ttl_s),
        )  # fmt: skip
        return int(self._unary(self._stub.Annotate, req, timeout_s).annotated)

    def hint(
        self, program_id: str, kind: HintKind, *, namespace: str = "",
        hashes: Sequence[bytes] = (), step: int = 0, targets: Sequence[str] = (),
        children: int = 0, expected_duration_s: float | None = None,
        timeout_s: float | None = None,
    ) -> HintResult:  # fmt: skip
        """Report a program event (validated like every hint; see :mod:`kvfabric.hints`)."""
        h = ProgramHint(program_id, kind, namespace, tuple(_hashes(hashes)), step,
                        tuple(targets), children, expected_duration_s)  # fmt: skip
        req = pb.HintRequest(program_id=h.program_id, kind=cd.hint_kind_to_pb(h.kind),
                             namespace=h.namespace, hashes=list(h.hashes), step=h.step,
                             targets=list(h.targets), children=h.children,
                             expected_duration_s=h.expected_duration_s or 0.0)  # fmt: skip
        r = self._unary(self._stub.Hint, req, timeout_s)
        return HintResult(r.accepted, r.copied)

    def stats(self, *, timeout_s: float | None = None) -> Stats:
        """The node's tiers, counters and pins."""
        return cd.stats_from_pb(self._unary(self._stub.Stats, pb.StatsRequest(), timeout_s,
                                            retry=True))  # fmt: skip

    def list_blocks(
        self, *, namespace: str | None = None, program_id: str | None = None,
        block_type: BlockType | None = None, tier: Tier | None = None, page_size: int = 0,
        page_token: str = "", timeout_s: float | None = None,
    ) -> BlockPage:  # fmt: skip
        """One page of the blocks this node holds that match every filter given."""
        if not isinstance(page_size, int) or not 0 <= page_size <= 1000:
            raise InvalidArgument(f"page_size must be in 0..1000, got {page_size!r}", "page_size")
        if not isinstance(page_token, str):
            raise InvalidArgument("page_token must be a string", "page_token")
        req = pb.ListBlocksRequest(
            namespace="" if namespace is None else validate_namespace(namespace),
            program_id=_optional_str(program_id, "program_id"),
            block_type=cd.block_type_to_pb(block_type), tier=cd.tier_to_pb(tier),
            page_size=page_size, page_token=page_token,
        )  # fmt: skip
        return cd.block_page_from_pb(self._unary(self._stub.ListBlocks, req, timeout_s,
                                                 retry=True))  # fmt: skip

    def health(self, *, timeout_s: float | None = None) -> bool:
        """True when the node's gRPC health service reports SERVING (False if unreachable)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            r = self._unary(stub.Check, health_pb2.HealthCheckRequest(), timeout_s, retry=True)
        except (Unavailable, DeadlineExceeded, NotFound) as exc:
            log.info("health check of %s failed: %s", self.target, exc)
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    def watch_events(
        self, from_seq: int = 0, follow: bool = False, *, timeout_s: float | None = None
    ) -> Iterator[Event]:
        """Directory events with ``seq > from_seq``, oldest first.

        Without ``follow`` the stream ends after the last stored event; a
        deadline hit before that raises DeadlineExceeded. With ``follow`` it
        keeps delivering new events until ``timeout_s`` passes, then ends.
        Closing the iterator cancels the call. A broken stream is resumed
        after the last delivered event (up to ``retries`` times).
        """
        if not isinstance(from_seq, int) or from_seq < 0:
            raise InvalidArgument("from_seq must be a non-negative int", "from_seq")
        self._check_open()
        return self._watch(from_seq, bool(follow), self._timeout(timeout_s))

    def _watch(self, from_seq: int, follow: bool, timeout: float) -> Iterator[Event]:
        end = time.monotonic() + timeout
        last, failures = from_seq, 0
        while True:
            left = end - time.monotonic() if follow else timeout
            if left <= 0:
                return
            call = self._stub.WatchEvents(pb.WatchEventsRequest(from_seq=last, follow=follow),
                                          timeout=left, metadata=self._metadata)  # fmt: skip
            try:
                for e in call:
                    last, failures = max(last, e.seq), 0
                    yield cd.event_from_pb(e)
                return
            except grpc.RpcError as exc:
                err = cd.error_from_rpc(exc)
                if follow and isinstance(err, DeadlineExceeded):
                    return  # the watch lasted as long as asked
                if not isinstance(err, RETRYABLE) or failures >= self.retries:
                    raise err from exc
                failures += 1
                log.info("event stream from %s broke (%s); resuming after seq %d",
                         self.target, err, last)  # fmt: skip
                time.sleep(_backoff(failures - 1))
            finally:
                call.cancel()

    # -- plumbing -------------------------------------------------------------------------
    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else _check_timeout(timeout_s)

    def _unary(self, method: Any, request: Any, timeout_s: float | None, *,
               retry: bool = False) -> Any:  # fmt: skip
        return self._call(lambda t: method(request, timeout=t, metadata=self._metadata),
                          timeout_s, retry=retry)  # fmt: skip

    def _call(self, fn: Callable[[float], T], timeout_s: float | None, *, retry: bool) -> T:
        """``fn(timeout)`` with gRPC errors mapped to typed ones (and retried if ``retry``)."""

        def typed(t: float) -> T:
            try:
                return fn(t)
            except grpc.RpcError as exc:
                raise cd.error_from_rpc(exc) from exc

        return self._retrying(typed, timeout_s, retry=retry)

    def _retrying(self, fn: Callable[[float], T], timeout_s: float | None, *, retry: bool) -> T:
        self._check_open()
        timeout = self._timeout(timeout_s)
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return fn(timeout)
            except RETRYABLE as exc:
                if attempt + 1 >= attempts:
                    raise
                log.debug("call to %s failed (%s); retry %d of %d", self.target, exc,
                          attempt + 1, self.retries)  # fmt: skip
                time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")


_PUT_STATUSES = {"stored": PutStatus.STORED, "exists": PutStatus.EXISTS,
                 "pending": PutStatus.PENDING}  # fmt: skip


def _local_statuses(done: list[str]) -> list[PutStatus]:
    """Put statuses of a local put; Corrupt if a block changed while it was copied."""
    bad = [i for i, s in enumerate(done) if s not in _PUT_STATUSES]
    if bad:
        raise Corrupt(f"{len(bad)} blocks (first: #{bad[0]}) failed the node's checksum check "
                      "after the copy: not stored (were they modified meanwhile?)", "blocks")
    return [_PUT_STATUSES[s] for s in done]


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: ~50 ms, 100 ms, 200 ms, ... capped at 1 s."""
    return min(_BACKOFF_MAX_S, _BACKOFF_S * (1 << attempt)) * random.uniform(0.5, 1.0)


def _check_timeout(timeout_s: float) -> float:
    if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < 86400 * 365:
        raise InvalidArgument(f"timeout_s must be a positive number, got {timeout_s!r}",
                              "timeout_s")  # fmt: skip
    return float(timeout_s)


def _hashes(hashes: Sequence[bytes]) -> list[BlockHash]:
    if isinstance(hashes, (bytes, bytearray, memoryview, str)):
        raise InvalidArgument("hashes must be a sequence of 32-byte hashes", "hashes")
    return [as_block_hash(h, "hashes") for h in hashes]


def _view(buf: Any, name: str, *, writable: bool = False) -> memoryview:
    try:
        view = memoryview(buf).cast("B")
    except TypeError:
        raise InvalidArgument(f"{name} must hold bytes-like buffers, not {type(buf).__name__}",
                              name) from None  # fmt: skip
    if writable and view.readonly:
        raise InvalidArgument(f"{name} must be writable buffers", name)
    return view


def _required_str(value: str, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 128:
        raise InvalidArgument(f"{name} must be a non-empty string of at most 128 characters", name)
    return value


def _optional_str(value: str | None, name: str) -> str:
    return "" if value is None else _required_str(value, name)


def _ttl(ttl_s: float | None) -> float:
    if ttl_s is None:
        return 0.0
    if not isinstance(ttl_s, (int, float)) or not 0 < ttl_s < float("inf"):
        raise InvalidArgument(f"ttl_s must be a positive number of seconds, got {ttl_s!r}", "ttl_s")
    return float(ttl_s)


def _move_counts(r: Any) -> MoveCounts:
    return MoveCounts(r.moved, r.unchanged, r.missing, r.corrupt)
