"""vLLM v1 KV connector backed by a kvfabric node.

Load with::

    KVTransferConfig(kv_connector="KVFabricConnector",
                     kv_connector_module_path="kvfabric.connectors.vllm",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"rpc_address": "127.0.0.1:PORT", ...})

Extra config (validated when the engine starts; a bad value names its key):
``rpc_address`` (the node's gRPC API, required), ``namespace`` (default: derived
from the model, dtype, layout, block size and TP rank), ``token`` (bearer
token when the node has auth on), ``timeout_s`` (per call, default 10),
``load_async`` (``"auto"``: asynchronously when a matched block is on another
node, ``"always"`` or ``"never"``).

Scheduler side: block keys are kvfabric's canonical chain hashes of the
request's token ids (with the cache salt and LoRA), never vLLM's, whose
root is random per process. The external hit is the longest prefix the node
finds (in its own tiers and, through the directory, on peers) beyond the
local hit, capped so vLLM computes at least one prompt token. A hit held on
this node loads synchronously before the forward pass; one that needs a
peer transfer loads in the background (the request waits in vLLM's
WAITING_FOR_REMOTE_KVS, the scheduler never blocks on the network).
Program hints and semantic types come from the request's
``kv_transfer_params`` (:mod:`kvfabric.connectors.vllm_params`) and are sent
by a bounded background thread.

Worker side (:mod:`kvfabric.connectors.vllm_worker`): one kvfabric block is
one vLLM block across all layers; newly full blocks are saved after each
step's forward (``wait_for_save``) and reported as vLLM KV events
(:mod:`kvfabric.connectors.vllm_events`).

Failure: an unreachable fabric gives no external hit; a load that fails, or
a block that is missing or corrupt, is reported through
``get_block_ids_with_load_errors`` so vLLM recomputes it; a failed save is
logged and is a future miss. Wrong KV is never used: every block is
checksum-verified on arrival.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvfabric.connectors.vllm_events import KVFabricKVEvents, RemovalFollower, stored_event
from kvfabric.connectors.vllm_params import NO_HINTS, HintEvent, RequestHints, parse_request_hints
from kvfabric.connectors.vllm_worker import AsyncLoader, Breaker, PagedKV, Transfer, load, save
from kvfabric.errors import InvalidArgument, KVFabricError, NotFound
from kvfabric.hashing import ExtraKeys, MMItem, NamespaceSpec, chain_hashes, namespace_id
from kvfabric.types import BlockHash, validate_namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvfabric.rpc.client import Client

log = logging.getLogger(__name__)

KV_LAYOUT = "vllm-v1-paged:block-major,all-layers"
LOAD_MODES = ("auto", "always", "never")
MAX_CONTROL_QUEUE = 1024  # hints waiting to be sent; beyond it new ones are dropped
EXTRA = "kv_connector_extra_config"


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """The connector's validated ``kv_connector_extra_config``."""

    address: str
    namespace: str | None = None
    token: str | None = None
    timeout_s: float = 10.0
    load_async: str = "auto"
    lookup_timeout_s: float = 1.0

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> ConnectorSettings:
        """Validate the extra config; InvalidArgument names the offending key."""
        unknown = sorted(set(extra) - {"rpc_address", "namespace", "token", "timeout_s",
                                       "load_async", "lookup_timeout_s"})  # fmt: skip
        if unknown:
            raise InvalidArgument(f"unknown key {unknown[0]!r} in {EXTRA}",
                                  f"{EXTRA}.{unknown[0]}")  # fmt: skip
        address = extra.get("rpc_address")
        if not isinstance(address, str) or ":" not in address:
            raise InvalidArgument(f"{EXTRA}.rpc_address must be 'host:port'",
                                  f"{EXTRA}.rpc_address")  # fmt: skip
        ns = extra.get("namespace")
        if ns is not None:
            validate_namespace(ns, f"{EXTRA}.namespace")
        token = extra.get("token")
        if token is not None and (not isinstance(token, str) or not token.isprintable()):
            raise InvalidArgument(f"{EXTRA}.token must be a printable string", f"{EXTRA}.token")
        timeout = _seconds(extra, "timeout_s", 10.0)
        lookup_timeout = _seconds(extra, "lookup_timeout_s", 1.0)
        mode = extra.get("load_async", "auto")
        if mode not in LOAD_MODES:
            raise InvalidArgument(f"{EXTRA}.load_async must be one of {', '.join(LOAD_MODES)}",
                                  f"{EXTRA}.load_async")  # fmt: skip
        return cls(address, ns, token, timeout, str(mode), lookup_timeout)


def _seconds(extra: dict[str, Any], key: str, default: float) -> float:
    value = extra.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or math.isnan(value) or not 0 < value <= 600):  # fmt: skip
        raise InvalidArgument(f"{EXTRA}.{key} must be in (0, 600] seconds", f"{EXTRA}.{key}")
    return float(value)


@dataclass
class KVFabricMetadata(KVConnectorMetadata):  # type: ignore[misc]  # vLLM is untyped here
    """What the scheduler asks the workers to load and save this step."""

    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class _ReqState:
    request: Any
    block_ids: list[int]
    hints: RequestHints
    extras: ExtraKeys | None
    hashes: list[bytes] = field(default_factory=list)
    saved: int = 0  # blocks [0, saved) are in the store (or were loaded from it)


class _ControlSender:
    """Sends program hints from a background thread so the scheduler never waits on them."""

    def __init__(self, make_client: Callable[[], Client]) -> None:
        self._make_client = make_client
        self._queue: queue.Queue[Callable[[Client], Any] | None] = queue.Queue(MAX_CONTROL_QUEUE)
        self._thread = threading.Thread(target=self._run, name="kvfabric-hints", daemon=True)
        self._thread.start()

    def send(self, call: Callable[[Client], Any], what: str) -> None:
        try:
            self._queue.put_nowait(call)
        except queue.Full:
            log.warning("kvfabric: %d hints waiting; dropped %s", MAX_CONTROL_QUEUE, what)

    def _run(self) -> None:
        client = None
        while (call := self._queue.get()) is not None:
            try:
                client = client or self._make_client()
                call(client)
            except Exception as exc:
                log.warning("kvfabric hint not delivered (%s)", exc)
        if client is not None:
            client.close()

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)


def _extras(request: Any) -> ExtraKeys | None:
    """Hash extras that change KV: the cache salt, the LoRA, and multimodal inputs
    (each item's content identifier over the placeholder tokens it fills)."""
    salt = getattr(request, "cache_salt", None) or None
    lora = getattr(request, "lora_request", None)
    lora_id = str(lora.lora_name) if lora is not None else None
    mm = tuple(
        MMItem(str(f.identifier), int(f.mm_position.offset), int(f.mm_position.length))
        for f in getattr(request, "mm_features", None) or ()
    )
    if salt is None and lora_id is None and not mm:
        return None
    return ExtraKeys(cache_salt=salt, lora_id=lora_id, mm_items=mm)


def _request_hints(request: Any) -> RequestHints:
    """The request's kvfabric parameters; a bad one is logged and the request served plainly."""
    try:
        return parse_request_hints(getattr(request, "kv_transfer_params", None))
    except InvalidArgument as exc:
        log.warning("kvfabric: request %s: %s; serving it without kvfabric hints",
                    getattr(request, "request_id", "?"), exc.message)  # fmt: skip
        return NO_HINTS


def derive_namespace(vllm_config: VllmConfig) -> str:
    """The namespace of this engine's KV: model, revision, dtype, layout, block size, TP."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    layers = int(getattr(mc.hf_config, "num_hidden_layers", 0) or 0)
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(mc.dtype) if cache_dtype in (None, "auto") else str(cache_dtype)
    spec = NamespaceSpec(
        str(mc.model), int(vllm_config.cache_config.block_size),
        revision=str(mc.revision or ""), dtype=dtype, kv_layout=KV_LAYOUT,
        tp_rank=int(getattr(pc, "rank", 0) or 0) % max(1, pc.tensor_parallel_size),
        tp_size=int(pc.tensor_parallel_size), layer_group=f"all:{layers}",
    )  # fmt: skip
    return namespace_id(spec)


class KVFabricConnector(KVConnectorBase_V1):  # type: ignore[misc]  # vLLM is untyped here
    """Reads and writes a vLLM engine's KV blocks through a kvfabric node."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._settings = ConnectorSettings.from_extra(
            dict(self._kv_transfer_config.kv_connector_extra_config or {})
        )
        self._block_size = int(vllm_config.cache_config.block_size)
        self._namespace = self._settings.namespace or derive_namespace(vllm_config)
        ev = vllm_config.kv_events_config
        self._emit_events = bool(ev is not None and ev.enable_kv_cache_events)
        self._client: Client | None = None
        self._breaker = Breaker()  # one per process: the scheduler's lookups, a worker's saves
        # scheduler state
        self._reqs: dict[str, _ReqState] = {}
        self._matched: dict[str, tuple[int, int, list[bytes], bool]] = {}
        self._loads: list[Transfer] = []
        self._node_id: str | None = None
        self._hints: _ControlSender | None = None
        self._worker_events: KVFabricKVEvents | None = None
        self._removals: RemovalFollower | None = None
        # worker state
        self._paged: PagedKV | None = None
        self._loader: AsyncLoader | None = None
        self._load_errors: set[int] = set()
        self._stored: list[KVCacheEvent] = []
        log.info("kvfabric connector (%s) namespace %s at %s", role.name, self._namespace,
                 self._settings.address)  # fmt: skip

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    def _new_client(self) -> Client:
        from kvfabric.rpc.client import Client

        s = self._settings
        return Client(s.address, token=s.token, timeout_s=s.timeout_s, retries=1)

    def _get_client(self) -> Client:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        bs = self._block_size
        usable = max(0, (len(tokens) - 1) // bs)  # vLLM must compute at least one token
        if usable * bs <= num_computed_tokens or not self._breaker.allow():
            return 0, False
        try:
            hashes = [bytes(h) for h in chain_hashes(tokens[: usable * bs], bs, _extras(request))]
            timeout = self._settings.lookup_timeout_s
            found = self._get_client().lookup(self._namespace, hashes, timeout_s=timeout,
                                              block_tokens=bs)  # fmt: skip
        except NotFound:  # the node has never seen this namespace
            self._breaker.succeeded()
            return 0, False
        except Exception as exc:  # fabric unreachable: no external hit
            log.warning("kvfabric lookup failed (%s); recomputing", exc)
            self._breaker.failed()
            return 0, False
        self._breaker.succeeded()
        matched = int(found.matched)
        ext = matched * bs - num_computed_tokens
        if ext <= 0:
            return 0, False
        first = num_computed_tokens // bs
        is_async = self._load_async(found.locations[first:matched])
        self._matched[request.request_id] = (num_computed_tokens, matched, hashes, is_async)
        return ext, is_async

    def _load_async(self, locations: Iterable[Any]) -> bool:
        """Whether a load must wait for a peer transfer (then it runs in the background)."""
        mode = self._settings.load_async
        if mode != "auto":
            return mode == "always"
        if self._node_id is None:
            try:
                self._node_id = self._get_client().stats().node_id
            except KVFabricError as exc:
                log.info("kvfabric: node id unknown (%s); loading synchronously", exc)
                return False
        return any(loc.node_id and loc.node_id != self._node_id for loc in locations)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        rid = request.request_id
        st = self._reqs.get(rid)
        if st is None:  # first allocation (an async load's second call keeps the state)
            st = _ReqState(request, [], _request_hints(request), _extras(request))
            self._reqs[rid] = st
            self._send_events(st, finish=False)
        st.block_ids = list(blocks.get_block_ids()[0])
        got = self._matched.pop(rid, None)
        if num_external_tokens > 0 and got is not None:
            local, matched, hashes, is_async = got
            first = local // self._block_size
            self._loads.append(Transfer(rid, hashes[first:matched], st.block_ids[first:matched],
                                        is_async=is_async))  # fmt: skip
            st.hashes, st.saved = hashes[:matched], matched

    def _send_events(self, st: _ReqState, *, finish: bool) -> None:
        events = st.hints.events_at(finish)
        if not events:
            return
        if self._hints is None:
            self._hints = _ControlSender(self._new_client)
        bs = self._block_size
        tokens = list(st.request.all_token_ids if finish else st.request.prompt_token_ids or [])
        chain = [bytes(h) for h in chain_hashes(tokens[: len(tokens) // bs * bs], bs, st.extras)]
        program = st.hints.program_id
        for e in events:
            hashes = chain if e.prefix_tokens is None else chain[: e.prefix_tokens // bs]
            self._hints.send(self._hint_call(program, e, hashes), f"{e.kind.value} of {program}")

    def _hint_call(
        self, program: str | None, e: HintEvent, hashes: list[bytes]
    ) -> Callable[[Client], Any]:
        ns = self._namespace

        def call(client: Client) -> Any:
            return client.hint(str(program), e.kind, namespace=ns, hashes=hashes, step=e.step,
                               targets=e.targets, children=e.children,
                               expected_duration_s=e.expected_duration_s)  # fmt: skip

        return call

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVFabricMetadata(loads=self._loads)
        self._loads = []
        for req_id, computed in self._ran(scheduler_output):
            st = self._reqs[req_id]
            total = computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            save = self._save_of(st, req_id, total)
            if save is not None:
                meta.saves.append(save)
        return meta

    def _ran(self, so: SchedulerOutput) -> list[tuple[str, int]]:
        """(request, computed tokens) of every known request scheduled this step."""
        ran: list[tuple[str, int]] = []
        for r in so.scheduled_new_reqs:
            st = self._reqs.get(r.req_id)
            if st is not None:
                st.block_ids = list(r.block_ids[0])
                ran.append((r.req_id, r.num_computed_tokens))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new = cached.new_block_ids[i]
            if new is not None:
                if req_id in cached.resumed_req_ids:
                    st.block_ids = list(new[0])
                else:
                    st.block_ids.extend(new[0])
            ran.append((req_id, cached.num_computed_tokens[i]))
        return ran

    def _save_of(self, st: _ReqState, req_id: str, total: int) -> Transfer | None:
        """The newly full blocks of a request after this step, as a save."""
        bs = self._block_size
        tokens = st.request.all_token_ids
        full = min(total, len(tokens), len(st.block_ids) * bs) // bs
        if full <= st.saved or not st.hints.store:
            return None
        have = len(st.hashes)
        if full > have:
            parent = BlockHash(st.hashes[-1]) if have else None
            new = chain_hashes(list(tokens[have * bs : full * bs]), bs, st.extras,
                               parent=parent, start=have * bs)  # fmt: skip
            st.hashes.extend(bytes(h) for h in new)
        first = st.saved
        save = Transfer(
            req_id, st.hashes[first:full], st.block_ids[first:full],
            block_types=[t.value for t in st.hints.block_types(first, full - first, bs)],
            program_id=st.hints.program_id, ttl_s=st.hints.ttl_s,
            token_ids=list(tokens[first * bs : full * bs]) if self._emit_events else None,
            parent=st.hashes[first - 1] if first else None,
        )  # fmt: skip
        st.saved = full
        return save

    def _forget_failed_loads(self, invalid: set[int]) -> None:
        """Blocks that failed to load are recomputed by vLLM: save them again afterwards,
        so a block the store dropped (corrupt, evicted meanwhile) is stored anew."""
        for st in self._reqs.values():
            for i, block_id in enumerate(st.block_ids[: st.saved]):
                if block_id in invalid:
                    st.saved = i
                    break

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        if st is not None:
            self._send_events(st, finish=True)
        return False, None

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if connector_output.invalid_block_ids:
            self._forget_failed_loads(connector_output.invalid_block_ids)
        events = connector_output.kv_cache_events
        if not isinstance(events, KVFabricKVEvents):
            return
        if self._worker_events is None:
            self._worker_events = events
        else:
            self._worker_events.add_events(events.get_all_events())
            self._worker_events.increment_workers(events.get_number_of_workers())

    def take_events(self) -> Iterable[KVCacheEvent]:
        if not self._emit_events:
            return
        if self._worker_events is not None:
            yield from self._worker_events.aggregate().get_all_events()
            self._worker_events = None
        if self._removals is None:
            self._removals = RemovalFollower(self._new_client, self._namespace)
        yield from self._removals.take()

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = int(getattr(self._kv_cache_config, "num_blocks", 0) or 0)
        layers = list(kv_caches.values())
        self._paged = PagedKV(layers, num_blocks or int(layers[0].shape[0]))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVFabricMetadata) or self._paged is None:
            return
        for t in meta.loads:
            if t.is_async:
                if self._loader is None:
                    self._loader = AsyncLoader(self._new_client, self._namespace, self._paged)
                self._loader.submit(t)
            else:
                self._load_errors |= load(self._get_client(), self._namespace, self._paged, t)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads land before the forward pass (sync) or before the request resumes

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        return  # whole blocks across layers are saved in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVFabricMetadata) or self._paged is None:
            return
        for t in meta.saves:
            if not self._breaker.allow():
                log.debug("kvfabric unreachable lately; not saving %s", t.req_id)
                continue
            try:
                save(self._get_client(), self._namespace, self._paged, t)
            except Exception as exc:
                log.warning("kvfabric save of %s failed (%s)", t.req_id, exc)
                self._breaker.failed()
                continue
            self._breaker.succeeded()
            if self._emit_events:
                self._stored.append(stored_event(t, self._block_size))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._loader is None:
            return None, None
        done, errors = self._loader.take()
        self._load_errors |= errors
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errs, self._load_errors = self._load_errors, set()
        return errs

    def get_kv_connector_kv_cache_events(self) -> KVFabricKVEvents | None:
        if not self._stored:
            return None
        events = KVFabricKVEvents(num_workers=1)
        events.add_events(self._stored)
        self._stored = []
        return events

    def shutdown(self) -> None:
        for part in (self._loader, self._hints, self._removals):
            if part is not None:
                part.close()
        self._loader = self._hints = self._removals = None
        if self._client is not None:
            self._client.close()
            self._client = None
