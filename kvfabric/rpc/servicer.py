"""KVFabricServicer: the kvfabric.v1 gRPC API as a thin shell over NodeStoreService.

Each method authorizes the caller (:mod:`kvfabric.rpc.auth`), validates and
converts the request (:mod:`kvfabric.rpc.convert`), calls the node store, and
converts the result back. A :class:`~kvfabric.errors.KVFabricError` becomes
``context.abort(StatusCode[err.code], message)`` with a message that names
the field (also sent as trailing metadata ``kvfabric-field``); any other
exception is logged here and answered with a generic INTERNAL status, so no
internals leak to the caller.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar, cast

import grpc

from kvfabric import metrics
from kvfabric.config import KVFabricConfig
from kvfabric.errors import DeadlineExceeded, InvalidArgument, KVFabricError
from kvfabric.node.listing import BlockFilter
from kvfabric.node.pins import validate_owner
from kvfabric.node.service import NodeStoreService
from kvfabric.rpc import convert, servicer_data
from kvfabric.rpc.auth import Authorizer, Grant
from kvfabric.rpc.v1 import kvfabric_pb2 as pb
from kvfabric.rpc.v1 import kvfabric_pb2_grpc as pb_grpc
from kvfabric.types import BlockHash, BlockKey, Tier, validate_program_id

log = logging.getLogger(__name__)

FIELD_METADATA_KEY = "kvfabric-field"
"""Trailing metadata naming the request field a refused call was refused for."""

_MAX_NODE_ID_CHARS = 128
_TIER_NAMES = tuple(t.name for t in sorted(Tier))  # domain tier number -> name

Req = TypeVar("Req")
Resp = TypeVar("Resp")
_Impl = Callable[["KVFabricServicer", Req, Any, Grant], Resp]
_Handler = Callable[["KVFabricServicer", Req, Any], Resp]


def _fail(context: Any, method: str, exc: Exception) -> NoReturn:
    """Abort the call with the status ``exc`` maps to (context.abort raises)."""
    if isinstance(exc, KVFabricError):
        code = getattr(grpc.StatusCode, exc.code, None)
        if code is None or exc.code in ("UNKNOWN", "OK"):
            code = grpc.StatusCode.INTERNAL
        message = exc.message
        if exc.field and exc.field not in message:
            message = f"{exc.field}: {message}"
        log.debug("%s refused: %s %s", method, exc.code, message)
        if exc.field:
            context.set_trailing_metadata(((FIELD_METADATA_KEY, exc.field),))
        context.abort(code, message)
    if not context.is_active():
        log.debug("%s ended: the client went away (%s)", method, type(exc).__name__)
        context.abort(grpc.StatusCode.CANCELLED, f"{method} was cancelled")
    log.exception("%s failed with an unexpected error", method)
    context.abort(grpc.StatusCode.INTERNAL, f"{method} failed on the server; see its log")
    raise AssertionError("context.abort returned")  # pragma: no cover


def _code_of(exc: Exception) -> str:
    """The status code name a failed call ends with (for the latency metric)."""
    if isinstance(exc, KVFabricError) and exc.code not in ("UNKNOWN", "OK"):
        return exc.code
    return "INTERNAL"


def _unary(mutating: bool) -> Callable[[_Impl[Req, Resp]], _Handler[Req, Resp]]:
    """Wrap a method with a single response: authorize, run, map errors."""

    def wrap(fn: _Impl[Req, Resp]) -> _Handler[Req, Resp]:
        @functools.wraps(fn)
        def call(self: KVFabricServicer, request: Req, context: Any) -> Resp:
            started, code = time.perf_counter(), "OK"
            try:
                grant = self._begin(context, mutating)
                return fn(self, request, context, grant)
            except Exception as exc:
                code = _code_of(exc)
                _fail(context, fn.__name__, exc)
            finally:
                self._telemetry.observe_rpc(fn.__name__, code, time.perf_counter() - started)

        return call

    return wrap


def _streaming(
    mutating: bool,
) -> Callable[[_Impl[Req, Iterator[Resp]]], _Handler[Req, Iterator[Resp]]]:
    """Wrap a server-streaming method: authorize, stream, map errors."""

    def wrap(fn: _Impl[Req, Iterator[Resp]]) -> _Handler[Req, Iterator[Resp]]:
        @functools.wraps(fn)
        def call(self: KVFabricServicer, request: Req, context: Any) -> Iterator[Resp]:
            started, code = time.perf_counter(), "OK"
            try:
                grant = self._begin(context, mutating)
                yield from fn(self, request, context, grant)
            except Exception as exc:
                code = _code_of(exc)
                _fail(context, fn.__name__, exc)
            finally:  # the whole stream, until its last message or its end
                self._telemetry.observe_rpc(fn.__name__, code, time.perf_counter() - started)

        return call

    return wrap


class KVFabricServicer(pb_grpc.KVFabricServicer):
    """Serves one node's store over gRPC (see ``proto/kvfabric/rpc/v1/kvfabric.proto``)."""

    def __init__(
        self,
        service: NodeStoreService,
        config: KVFabricConfig,
        authorizer: Authorizer | None = None,
        watchdog: servicer_data.Watchdog | None = None,
    ) -> None:
        self._service = service
        self._config = config
        self._auth = authorizer or Authorizer.from_config(config)
        self._watchdog = watchdog or servicer_data.Watchdog()
        self._telemetry = service.telemetry

    # -- helpers ------------------------------------------------------------------------
    def _begin(self, context: Any, mutating: bool) -> Grant:
        grant = self._auth.authorize(context.invocation_metadata(), mutating=mutating)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before it started", "deadline")
        return grant

    def _deadline(self, context: Any) -> servicer_data.Deadline:
        return servicer_data.Deadline(context.time_remaining(), self._config.rpc_max_deadline_s)

    def _chain(
        self, namespace: str, hashes: Sequence[bytes], grant: Grant
    ) -> tuple[str, list[BlockHash]]:
        ns = convert.namespace(namespace)
        chain = convert.hashes(hashes, self._config.rpc_max_chain)
        grant.require(ns)
        return ns, chain

    # -- reads --------------------------------------------------------------------------
    @_unary(mutating=False)
    def Lookup(self, request: pb.LookupRequest, context: Any, grant: Grant) -> pb.LookupResponse:
        """Longest stored prefix of a chain (this node only with ``local_only``)."""
        ns, chain = self._chain(request.namespace, request.hashes, grant)
        svc = self._service
        if request.local_only:
            matched, tiers = svc.lookup_local(ns, chain)
            locations = [(svc.node_id, svc.address, t) for t in tiers]
        else:
            found = svc.lookup(ns, chain)
            matched, locations = int(found["matched"]), list(found["locations"])
        t = self._telemetry
        metrics.count_hits(t, "lookup", (_TIER_NAMES[loc[2]] for loc in locations), len(chain))
        t.inc("recompute_avoided_tokens", matched * request.block_tokens)
        return pb.LookupResponse(matched=matched, locations=convert.locations(locations))

    @_streaming(mutating=False)
    def Get(
        self, request: pb.GetRequest, context: Any, grant: Grant
    ) -> Iterator[pb.GetChunk | bytes]:
        """A header per block, then its bytes in chunks unless ``data_plane``."""
        ns, chain = self._chain(request.namespace, request.hashes, grant)
        keys = [BlockKey(ns, h) for h in chain]
        deadline = self._deadline(context)
        with self._watchdog.watching(context, deadline):
            yield from self._count_get(
                servicer_data.stream_get(self._service, self._config, request, keys, deadline)
            )

    def _count_get(self, chunks: Iterator[pb.GetChunk | bytes]) -> Iterator[pb.GetChunk | bytes]:
        """Pass a Get stream through, counting hits by tier, misses and streamed bytes."""
        t, sent, started = self._telemetry, 0, time.perf_counter()
        try:
            for chunk in chunks:
                if isinstance(chunk, bytes):
                    sent += len(chunk)
                elif chunk.header.found:
                    t.inc("hits", op="get", tier=_TIER_NAMES[chunk.header.location.tier - 1])
                else:
                    t.inc("misses", op="get")
                yield chunk
        finally:
            if sent:
                t.inc("transfer_bytes", sent, transport="grpc", direction="out")
                t.inc("transfer_seconds", time.perf_counter() - started, transport="grpc",
                      direction="out")  # fmt: skip

    @_unary(mutating=False)
    def Stats(self, request: pb.StatsRequest, context: Any, grant: Grant) -> pb.StatsResponse:
        """This node's tiers, counters (the core's and its telemetry) and pins."""
        svc = self._service
        return convert.stats_response(svc.node_id, svc.address, svc.stats(),
                                      self._telemetry.counters(), grant.allows)  # fmt: skip

    @_unary(mutating=False)
    def ListBlocks(
        self, request: pb.ListBlocksRequest, context: Any, grant: Grant
    ) -> pb.ListBlocksResponse:
        """A page of the blocks held here, filtered (only namespaces the caller may read)."""
        ns = convert.optional_text(request.namespace)
        if ns is not None:
            grant.require(convert.namespace(ns))
        tier = convert.tier_from_proto(request.tier)
        where = BlockFilter(
            ns, validate_program_id(convert.optional_text(request.program_id)),
            convert.block_type_from_proto(request.block_type),
            None if tier is None else Tier(tier),
        )  # fmt: skip
        page = self._service.list_blocks(where, size=request.page_size, after=request.page_token,
                                         allowed=grant.allows)  # fmt: skip
        now = self._service.core.clock()
        return pb.ListBlocksResponse(
            blocks=[convert.block_info(m, now) for m in page.blocks],
            next_page_token=page.next_token, node_id=self._service.node_id,
        )  # fmt: skip

    @_streaming(mutating=False)
    def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Any, grant: Grant
    ) -> Iterator[pb.Event]:
        """Directory events after ``from_seq``; with ``follow``, until the client cancels."""
        deadline = self._deadline(context)
        with self._watchdog.watching(context, deadline):
            yield from servicer_data.stream_events(
                self._service, request, grant, context.is_active, deadline
            )

    # -- writes -------------------------------------------------------------------------
    @_unary(mutating=True)
    def Put(self, request_iterator: Iterator[pb.PutChunk], context: Any, grant: Grant) -> Any:
        """Store a streamed batch of blocks: all of it, or nothing on a malformed stream."""
        deadline = self._deadline(context)
        with self._watchdog.watching(context, deadline):
            started = time.perf_counter()
            spec, blocks = servicer_data.read_put(request_iterator, self._config, grant, deadline)
            self._telemetry.inc("transfer_bytes", spec.total_bytes, transport="grpc",
                                direction="in")  # fmt: skip
            self._telemetry.inc("transfer_seconds", time.perf_counter() - started,
                                transport="grpc", direction="in")  # fmt: skip
        outcomes = self._service.put(
            spec.namespace,
            spec.hashes,
            cast(list[bytes], blocks),  # any buffer works; a copy to bytes would double memory
            block_type=spec.block_type,
            program_id=spec.program_id,
        )
        return pb.PutResponse(statuses=[convert.put_status(o.status) for o in outcomes])

    @_unary(mutating=True)
    def Move(self, request: pb.MoveRequest, context: Any, grant: Grant) -> pb.MoveResponse:
        """Move blocks to another tier here, or to another node."""
        ns, chain = self._chain(request.namespace, request.hashes, grant)
        if request.node_id:
            if request.tier != pb.TIER_UNSPECIFIED:
                raise InvalidArgument("set either tier or node_id, not both", "tier")
            node_id = request.node_id
            if len(node_id) > _MAX_NODE_ID_CHARS or not node_id.isprintable():
                raise InvalidArgument(
                    f"node_id must be 1..{_MAX_NODE_ID_CHARS} printable characters", "node_id"
                )
            return pb.MoveResponse(moved=self._service.move_to_node(ns, chain, node_id))
        tier = convert.tier_from_proto(request.tier)
        if tier is None:
            raise InvalidArgument("tier must be set unless node_id is", "tier")
        return convert.move_response(self._service.move(ns, chain, tier))

    @_unary(mutating=True)
    def Pin(self, request: pb.PinRequest, context: Any, grant: Grant) -> pb.PinResponse:
        """Pin blocks held here for ``owner``, optionally for ``ttl_s`` seconds."""
        ns, chain = self._chain(request.namespace, request.hashes, grant)
        ttl = convert.seconds(request.ttl_s, "ttl_s")
        res = self._service.pin(ns, chain, validate_owner(request.owner), ttl)
        self._telemetry.inc("pins", len(res.pinned), op="pin")
        missing = set(res.missing)
        return pb.PinResponse(
            pinned=len(res.pinned), missing=len(res.missing), new_bytes=res.new_bytes,
            missing_indexes=[i for i, h in enumerate(chain) if BlockKey(ns, h) in missing],
        )  # fmt: skip

    @_unary(mutating=True)
    def Unpin(self, request: pb.UnpinRequest, context: Any, grant: Grant) -> pb.UnpinResponse:
        """Drop one pin of ``owner`` on each block."""
        ns, chain = self._chain(request.namespace, request.hashes, grant)
        released = self._service.unpin(ns, chain, validate_owner(request.owner))
        self._telemetry.inc("pins", released, op="unpin")
        return pb.UnpinResponse(released=released)

    @_unary(mutating=True)
    def Evict(self, request: pb.EvictRequest, context: Any, grant: Grant) -> pb.EvictResponse:
        """Remove blocks from this node (refused whole if any is pinned)."""
        ns, chain = self._chain(request.namespace, request.hashes, grant)
        return pb.EvictResponse(evicted=self._service.evict(ns, chain))

    @_unary(mutating=True)
    def Prefetch(self, request: pb.PrefetchRequest, context: Any, grant: Grant) -> Any:
        """Promote blocks here (pulling missing ones from peers) to ``tier`` or the fastest."""
        ns, chain = self._chain(request.namespace, request.hashes, grant)
        tier = convert.tier_from_proto(request.tier)
        return convert.move_response(self._service.prefetch(ns, chain, tier))

    @_unary(mutating=True)
    def Annotate(self, request: pb.AnnotateRequest, context: Any, grant: Grant) -> Any:
        """Set the type, program and/or TTL of blocks held here (unset fields: unchanged)."""
        ns, chain = self._chain(request.namespace, request.hashes, grant)
        block_type = convert.block_type_from_proto(request.block_type)
        program_id = validate_program_id(convert.optional_text(request.program_id))
        ttl = convert.seconds(request.ttl_s, "ttl_s")
        annotated = self._service.annotate(
            ns, chain, block_type=block_type, program_id=program_id, ttl_s=ttl
        )
        return pb.AnnotateResponse(annotated=annotated)

    @_unary(mutating=True)
    def Hint(self, request: pb.HintRequest, context: Any, grant: Grant) -> pb.HintResponse:
        """Tell the policy about a program event; a fork copies its prefix to the targets."""
        hint = convert.hint_from_proto(request, self._config.rpc_max_chain)
        if hint.namespace:
            grant.require(hint.namespace)
        res = self._service.hint(hint)
        return pb.HintResponse(accepted=bool(res["accepted"]), copied=int(res["copied"]))
