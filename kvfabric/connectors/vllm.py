"""vLLM v1 KV connector backed by a kvfabric node (WORK IN PROGRESS — first cut).

Load with::

    KVTransferConfig(kv_connector="KVFabricConnector",
                     kv_connector_module_path="kvfabric.connectors.vllm",
                     kv_role="kv_both",
                     kv_connector_extra_config={"rpc_address": "127.0.0.1:PORT",
                                                "namespace": "ns-..." (optional)})

Scheduler side: block keys are kvfabric's canonical chain hashes of the
request's token ids (``kvfabric.hashing.chain_hashes``), never vLLM's; the
external hit is the longest stored prefix (``Client.lookup``) beyond the
local hit, capped so at least one prompt token is computed. Loads are
synchronous (before the forward pass). Newly full blocks are saved after the
step's forward (``wait_for_save``).

Store block = one vLLM block across all layers: the per-layer slices
``kv[block_id]`` stacked into ``(num_layers, *kv.shape[1:])``; gather and
scatter are one indexed copy per layer for all blocks of a step (no
per-token loops).

Failure: any error reaching the fabric makes the lookup return 0 tokens; a
load that fails (exception or a missing/corrupt block) reports the affected
vLLM block ids through ``get_block_ids_with_load_errors`` so vLLM recomputes
them; a failed save is logged and dropped (a future miss).

Program hints: ``kv_transfer_params`` (``SamplingParams(extra_args={"kv_transfer_params":
{...}})``) keys ``kvfabric_block_type`` (a BlockType name) and
``kvfabric_program_id`` tag the request's saved blocks. The cache salt and
LoRA name go into the hash (ExtraKeys).

Not done yet (WIP): ProgramHint events (Client.hint), async loads from
peers (the lookup is the node's, which already covers peers; the get is
synchronous), multimodal extras in the hash, tensor parallelism beyond
rank-in-namespace, HMA groups, metrics, tests under ``tests/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvfabric.errors import NotFound
from kvfabric.hashing import ExtraKeys, NamespaceSpec, chain_hashes, namespace_id
from kvfabric.types import BlockType

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from kvfabric.rpc.client import Client

log = logging.getLogger(__name__)

KV_LAYOUT = "vllm-v1-paged:block-major,all-layers"


@dataclass
class _Transfer:
    req_id: str
    hashes: list[bytes]
    block_ids: list[int]
    block_type: int = 0  # kvfabric BlockType value (saves)
    program_id: str | None = None


@dataclass
class KVFabricMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)


@dataclass
class _ReqState:
    request: Any
    block_ids: list[int]
    hashes: list[bytes] = field(default_factory=list)
    saved: int = 0  # blocks [0, saved) are in the store (or were loaded from it)
    extras: ExtraKeys | None = None
    block_type: int = 0
    program_id: str | None = None


def _params(request: Any) -> dict[str, Any]:
    """The request's ``kv_transfer_params`` (``SamplingParams.extra_args``), or {}."""
    p = getattr(request, "kv_transfer_params", None)
    return p if isinstance(p, dict) else {}


def _extras(request: Any) -> ExtraKeys | None:
    """Hash extras that change KV: the cache salt and LoRA (multimodal: not yet)."""
    salt = getattr(request, "cache_salt", None) or None
    lora = getattr(request, "lora_request", None)
    lora_id = str(lora.lora_name) if lora is not None else None
    if salt is None and lora_id is None:
        return None
    return ExtraKeys(cache_salt=salt, lora_id=lora_id)


def _hints(request: Any) -> tuple[int, str | None]:
    """(block type value, program id) from ``kv_transfer_params``: ``kvfabric_block_type``
    (a BlockType name) and ``kvfabric_program_id``; unknown values are ignored."""
    p = _params(request)
    name = str(p.get("kvfabric_block_type", "GENERIC")).upper()
    btype = BlockType[name].value if name in BlockType.__members__ else 0
    prog = p.get("kvfabric_program_id")
    return btype, (str(prog)[:128] if prog else None)


def derive_namespace(vllm_config: VllmConfig) -> str:
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


class KVFabricConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        self._block_size = int(vllm_config.cache_config.block_size)
        self._address = str(cfg.get_from_extra_config("rpc_address", ""))
        self._timeout_s = float(cfg.get_from_extra_config("timeout_s", 10.0))
        ns = cfg.get_from_extra_config("namespace", None)
        self._namespace = str(ns) if ns else derive_namespace(vllm_config)
        self._client: Client | None = None
        # scheduler state
        self._reqs: dict[str, _ReqState] = {}
        self._matched: dict[str, tuple[int, int, list[bytes]]] = {}
        self._loads: list[_Transfer] = []
        # worker state
        self._layers: list[torch.Tensor] = []
        self._load_errors: set[int] = set()
        log.info("kvfabric connector (%s) namespace %s at %s", role.name, self._namespace,
                 self._address)  # fmt: skip

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    def _get_client(self) -> Client:
        if self._client is None:
            from kvfabric.rpc.client import Client

            self._client = Client(self._address, timeout_s=self._timeout_s, retries=1)
        return self._client

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        bs = self._block_size
        usable = max(0, (len(tokens) - 1) // bs)  # vLLM must compute at least one token
        if usable * bs <= num_computed_tokens or not self._address:
            return 0, False
        try:
            hashes = [bytes(h) for h in chain_hashes(tokens[: usable * bs], bs, _extras(request))]
            matched = int(self._get_client().lookup(self._namespace, hashes).matched)
        except NotFound:  # the node has never seen this namespace
            return 0, False
        except Exception as exc:  # fabric unreachable: no external hit
            log.warning("kvfabric lookup failed (%s); recomputing", exc)
            return 0, False
        ext = matched * bs - num_computed_tokens
        if ext <= 0:
            return 0, False
        self._matched[request.request_id] = (num_computed_tokens, matched, hashes)
        return ext, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        block_ids = list(blocks.get_block_ids()[0])
        btype, prog = _hints(request)
        state = _ReqState(request, block_ids, extras=_extras(request), block_type=btype,
                          program_id=prog)  # fmt: skip
        got = self._matched.pop(request.request_id, None)
        if num_external_tokens > 0 and got is not None:
            local, matched, hashes = got
            first = local // self._block_size
            self._loads.append(_Transfer(request.request_id, hashes[first:matched],
                                         block_ids[first:matched]))  # fmt: skip
            state.hashes, state.saved = hashes[:matched], matched
        self._reqs[request.request_id] = state

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVFabricMetadata(loads=self._loads)
        self._loads = []
        ran: list[tuple[str, int]] = []
        for r in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(r.req_id)
            if st is not None:
                st.block_ids = list(r.block_ids[0])
                ran.append((r.req_id, r.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
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
        bs = self._block_size
        for req_id, computed in ran:
            st = self._reqs[req_id]
            total = computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            tokens = st.request.all_token_ids
            full = min(total, len(tokens), len(st.block_ids) * bs) // bs
            if full <= st.saved:
                continue
            have = len(st.hashes)
            if full > have:
                parent = st.hashes[-1] if have else None
                new = chain_hashes(list(tokens[have * bs : full * bs]), bs, st.extras,
                                   parent=parent, start=have * bs)  # fmt: skip
                st.hashes.extend(bytes(h) for h in new)
            meta.saves.append(_Transfer(req_id, st.hashes[st.saved:full],
                                        st.block_ids[st.saved:full], st.block_type,
                                        st.program_id))  # fmt: skip
            st.saved = full
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        return False, None

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = list(kv_caches.values())
        shapes = {tuple(t.shape[1:]) for t in self._layers}
        if len(shapes) != 1:
            raise ValueError(f"kvfabric connector needs equal layer shapes, got {shapes}")

    def _block_view(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = self._layers[0]
        typed = torch.empty((n, len(self._layers), *first.shape[1:]), dtype=first.dtype)
        return typed, typed.view(n, -1).view(torch.uint8)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVFabricMetadata) or not meta.loads or not self._layers:
            return
        for t in meta.loads:
            n = len(t.block_ids)
            if n == 0:
                continue
            try:
                typed, raw = self._block_view(n)
                ok = self._get_client().get_into(self._namespace, t.hashes,
                                                 [raw[i].numpy() for i in range(n)])  # fmt: skip
            except Exception as exc:
                log.warning("kvfabric load of %s failed (%s); recomputing", t.req_id, exc)
                self._load_errors.update(t.block_ids)
                continue
            good = ok.index(False) if False in ok else n
            if good < n:
                self._load_errors.update(t.block_ids[good:])
            if good == 0:
                continue
            ids = torch.tensor(t.block_ids[:good], dtype=torch.long)
            for layer, kv in enumerate(self._layers):
                kv[ids.to(kv.device)] = typed[:good, layer].to(kv.device)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        return  # whole blocks across layers are saved in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVFabricMetadata) or not meta.saves or not self._layers:
            return
        for t in meta.saves:
            n = len(t.block_ids)
            if n == 0:
                continue
            try:
                ids = torch.tensor(t.block_ids, dtype=torch.long)
                typed = torch.stack([kv[ids.to(kv.device)].cpu() for kv in self._layers], dim=1)
                raw = typed.contiguous().view(n, -1).view(torch.uint8)
                self._get_client().put(self._namespace, t.hashes,
                                       [raw[i].numpy() for i in range(n)],
                                       block_type=BlockType(t.block_type),
                                       program_id=t.program_id)  # fmt: skip
            except Exception as exc:
                log.warning("kvfabric save of %s failed (%s)", t.req_id, exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errs, self._load_errors = self._load_errors, set()
        return errs

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
