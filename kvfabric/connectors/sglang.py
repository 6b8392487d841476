"""SGLang HiCache storage backend (the third tier: GPU → host → kvfabric).

Load it through SGLang's dynamic backend option (SGLang 0.5.23)::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic \\
      --hicache-storage-backend-extra-config '{"backend_name": "kvfabric",
          "module_path": "kvfabric.connectors.sglang", "class_name": "KVFabricStorage",
          "interface_v1": 1, "rpc_address": "127.0.0.1:50051"}'

``interface_v1`` makes SGLang's cache controller call the zero-copy
``batch_get_v1``/``batch_set_v1`` with host-pool indices; without it, the
legacy ``batch_get``/``batch_set`` move flat page copies. Both store the same
blocks. Optional settings: see :class:`~kvfabric.connectors.sglang_keys.StorageSettings`.

Keys and bytes: see :mod:`kvfabric.connectors.sglang_keys`. Each contiguous
run ("segment") of a page in the host pool is one kvfabric block, so
``get_into`` lands bytes in the pool and ``put`` reads them from it.

Failure: the fabric is a cache. A miss, a corrupt block, an unreachable or
slow node or any error the node returns makes a get a miss and a set a
failure, logged; after an unreachable node the backend answers misses for
``down_s`` seconds without calling. Malformed arguments (wrong sizes, index
counts, key types) raise :class:`~kvfabric.errors.InvalidArgument`, which
SGLang's prefetch and backup threads log and count as zero pages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from kvfabric.connectors.sglang_keys import (
    PageLayout,
    PoolFacts,
    StorageSettings,
    check_key,
    contiguous_runs,
    derive_namespace,
    page_block_hashes,
    pages_chain,
    sglang_page_keys,
)
from kvfabric.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KVFabricError,
    NotFound,
    Unavailable,
)
from kvfabric.rpc.client import Client, PutStatus

log = logging.getLogger(__name__)
T = TypeVar("T")


class KVFabricStorage(HiCacheStorage):
    """HiCache storage backed by a kvfabric node; built by SGLang's backend factory.

    ``storage_config`` is SGLang's (model, TP/PP ranks); ``kwargs`` is what the
    factory passes to dynamic backends (unused). Settings come from
    ``storage_config.extra_config``. Pages can move only after
    :meth:`register_mem_pool_host` (SGLang calls it right after construction):
    the pool fixes the page geometry and, unless configured, the namespace.
    """

    def __init__(self, storage_config: HiCacheStorageConfig,
                 kwargs: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.settings = StorageSettings.from_extra_config(storage_config.extra_config)
        self.storage_config = storage_config
        self.client = Client(self.settings.rpc_address, token=self.settings.token,
                             timeout_s=self.settings.timeout_s,
                             retries=self.settings.retries)  # fmt: skip
        self.namespace: str | None = self.settings.namespace
        self.page: PageLayout | None = None
        self._pool: Any = None
        self._buffer: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self._down_until = 0.0  # monotonic time before which calls are skipped
        log.info("kvfabric HiCache backend for %s at %s", storage_config.model_name,
                 self.settings.rpc_address)  # fmt: skip

    # -- registration ---------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Bind the host KV pool: its buffer, page geometry and namespace.

        The pool's buffer (a contiguous CPU tensor) is viewed as bytes once;
        every later get and set hands slices of that view to the client, so
        bytes go between the fabric and the pool without a staging copy.
        """
        super().register_mem_pool_host(mem_pool_host)
        ps = int(mem_pool_host.page_size)
        _check_key_scheme(ps)
        buf = getattr(mem_pool_host, "kv_buffer", None)
        if not isinstance(buf, torch.Tensor) or buf.device.type != "cpu" or not buf.is_contiguous():
            raise InvalidArgument("mem_pool_host.kv_buffer must be one contiguous CPU tensor",
                                  "mem_pool_host")  # fmt: skip
        page = PageLayout.derive(_runs(mem_pool_host, buf, 0), _runs(mem_pool_host, buf, ps), ps,
                                 int(mem_pool_host.size) // ps, buf.numel() * buf.element_size())
        self._buffer = buf.view(-1).view(torch.uint8).numpy()
        self._pool, self.page = mem_pool_host, page
        if self.namespace is None:
            self.namespace = derive_namespace(self._facts(mem_pool_host), page)
        log.info("kvfabric namespace %s: pages of %d tokens, %d segment(s) of %d bytes",
                 self.namespace, ps, page.segments, page.segment_bytes)  # fmt: skip

    def _facts(self, pool: Any) -> PoolFacts:
        cfg = self.storage_config
        if not cfg.model_name:
            raise InvalidArgument("SGLang gave no model name; set 'namespace' in the extra "
                                  "config", "extra_config.namespace")  # fmt: skip
        tp = (0, 1) if cfg.is_mla_model else (cfg.tp_rank, cfg.tp_size)  # MLA KV is replicated
        return PoolFacts(
            model=str(cfg.model_name), dtype=str(pool.dtype).removeprefix("torch."),
            pool_class=type(pool).__name__, layout=str(pool.layout),
            page_size=int(pool.page_size),
            layers=(int(pool.start_layer), int(pool.end_layer)), tp=tp,
            pp=(cfg.pp_rank, cfg.pp_size), cp=(cfg.attn_cp_rank, cfg.attn_cp_size),
        )  # fmt: skip

    # -- zero-copy v1 ---------------------------------------------------------------------
    def batch_exists(self, keys: list[str],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> int:  # fmt: skip
        """How many leading pages of ``keys`` are stored (in this node or the cluster)."""
        ns, page, _ = self._bound()
        keys = _keys(keys)
        found = 0
        for a, b in self._groups(keys, page):
            chain = pages_chain(keys[a:b], page.segments)
            res = self._guard("lookup", None, self.client.lookup, ns, chain)
            matched = 0 if res is None else res.matched
            found += matched // page.segments
            if matched < len(chain):
                break
        return found

    def exists(self, key: str) -> bool:
        """Whether page ``key`` is stored."""
        return self.batch_exists([key]) == 1

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:  # fmt: skip
        """Land each page straight in the host pool at ``host_indices``; True per page hit."""
        ns, page, buf = self._bound()
        keys = _keys(keys)
        spans = self._spans(len(keys), host_indices)
        return self._get(ns, page, keys, [buf[a:b] for a, b in spans])

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:  # fmt: skip
        """Store each page straight from the host pool at ``host_indices``; True per page."""
        ns, page, buf = self._bound()
        keys = _keys(keys)
        spans = self._spans(len(keys), host_indices)
        return self._put(ns, page, keys, [buf[a:b] for a, b in spans])

    # -- legacy (flat page copies) --------------------------------------------------------
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        """Page ``key`` into ``target_location`` (a flat page tensor; new if None), or None."""
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[Any]:  # fmt: skip
        """Each page into its flat tensor (allocated when not given); None per miss."""
        ns, page, _ = self._bound()
        keys = _keys(keys)
        if target_locations is None:
            target_locations = [self._pool.get_dummy_flat_data_page() for _ in keys]
        flats = _flat_views(target_locations, len(keys), page, "target_locations")
        dsts = [f[j * page.segment_bytes : (j + 1) * page.segment_bytes]
                for f in flats for j in range(page.segments)]  # fmt: skip
        hits = self._get(ns, page, keys, dsts)
        return [t if hit else None for t, hit in zip(target_locations, hits, strict=True)]

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:  # fmt: skip
        """Store the flat page tensor ``value`` under ``key``."""
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:  # fmt: skip
        """Store flat page tensors; True when every page is stored."""
        ns, page, _ = self._bound()
        keys = _keys(keys)
        flats = _flat_views(values, len(keys), page, "values")
        segs = [f[j * page.segment_bytes : (j + 1) * page.segment_bytes]
                for f in flats for j in range(page.segments)]  # fmt: skip
        return all(self._put(ns, page, keys, segs))

    # -- lifecycle ------------------------------------------------------------------------
    def clear(self) -> None:
        """Leave the fabric as it is: its blocks are shared with other engines."""
        log.info("kvfabric HiCache backend: clear() leaves the shared store untouched")

    def close(self) -> None:
        """Close the client (idempotent)."""
        self.client.close()

    # -- plumbing -------------------------------------------------------------------------
    def _bound(self) -> tuple[str, PageLayout, np.ndarray[Any, np.dtype[np.uint8]]]:
        """Namespace, page layout and pool bytes; FailedPrecondition before registration."""
        if self.page is None or self.namespace is None or self._buffer is None:
            raise FailedPrecondition("register_mem_pool_host must be called before pages move",
                                     "mem_pool_host")  # fmt: skip
        return self.namespace, self.page, self._buffer

    def _spans(self, n_pages: int, host_indices: Any) -> list[tuple[int, int]]:
        """Byte spans of every segment of the ``n_pages`` pages at ``host_indices``."""
        _, page, _ = self._bound()
        if not isinstance(host_indices, torch.Tensor) or host_indices.dim() != 1:
            raise InvalidArgument("host_indices must be a 1-D tensor", "host_indices")
        if host_indices.numel() != n_pages * page.page_size:
            raise InvalidArgument(f"host_indices has {host_indices.numel()} entries for "
                                  f"{n_pages} pages of {page.page_size} tokens",
                                  "host_indices")  # fmt: skip
        starts = host_indices[:: page.page_size].tolist() if n_pages else []
        pages = int(self._pool.size) // page.page_size
        spans = []
        for s in starts:
            if s % page.page_size or not 0 <= s // page.page_size < pages:
                raise InvalidArgument(f"host index {s} is not the start of a pool page",
                                      "host_indices")  # fmt: skip
            spans.extend(page.spans(s // page.page_size))
        return spans

    def _groups(self, keys: list[str], page: PageLayout) -> list[tuple[int, int]]:
        """Page ranges small enough for one call (``max_chain`` hashes)."""
        per_call = max(1, self.settings.max_chain // page.segments)
        return [(a, min(a + per_call, len(keys))) for a in range(0, len(keys), per_call)]

    def _get(self, ns: str, page: PageLayout, keys: list[str], dsts: list[Any]) -> list[bool]:
        out: list[bool] = []
        n = page.segments
        for a, b in self._groups(keys, page):
            chain = pages_chain(keys[a:b], n)
            ok = self._guard("get", None, self.client.get_into, ns, chain, dsts[a * n : b * n])
            out += _per_page(ok, b - a, n)
        return out

    def _put(self, ns: str, page: PageLayout, keys: list[str], segs: list[Any]) -> list[bool]:
        out: list[bool] = []
        n = page.segments
        for a, b in self._groups(keys, page):
            chain = pages_chain(keys[a:b], n)
            statuses = self._guard("put", None, self.client.put, ns, chain, segs[a * n : b * n])
            # PENDING: another writer is storing the same bytes (write once): a success.
            out += _per_page(None if statuses is None else [s in _STORED for s in statuses],
                             b - a, n)  # fmt: skip
        return out

    def _guard(self, what: str, miss: T, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)``, or ``miss`` when the fabric fails (no call while it is down)."""
        if time.monotonic() < self._down_until:
            return miss
        try:
            return call(*args)
        except NotFound:
            return miss  # the node has never seen this namespace
        except (Unavailable, DeadlineExceeded) as exc:
            self._down_until = time.monotonic() + self.settings.down_s
            log.warning("kvfabric %s failed (%s); treating pages as misses for %.1f s", what,
                        exc, self.settings.down_s)  # fmt: skip
        except KVFabricError as exc:
            log.warning("kvfabric %s failed (%s); treating pages as misses", what, exc)
        return miss


_STORED = (PutStatus.STORED, PutStatus.EXISTS, PutStatus.PENDING)


def _check_key_scheme(page_size: int) -> None:
    """Golden check: this SGLang keys pages the way :func:`sglang_page_keys` documents.

    Store keys derive from SGLang's page keys, so two SGLang builds that hash
    tokens differently would silently share nothing (and kvfabric's client
    could not address SGLang's pages by token ids): refuse to attach instead.
    """
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    probe = [(17 * i + 3) % 32000 for i in range(2 * page_size)]
    theirs = get_storage_hash_str(probe, None, page_size=page_size)
    if list(theirs) != sglang_page_keys(probe, page_size):
        raise FailedPrecondition(
            "this SGLang computes page keys differently from the scheme the kvfabric backend "
            "was built for (SHA-256 chain over u32 token ids); refusing to attach", "sglang",
        )  # fmt: skip


def _keys(keys: Any) -> list[str]:
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise InvalidArgument("keys must be a list of page keys", "keys")
    return [check_key(k) for k in keys]


def _runs(pool: Any, buf: torch.Tensor, index: int) -> list[tuple[int, int]]:
    """Contiguous byte runs of the page at token ``index``, relative to the buffer start."""
    view = pool.get_data_page(index, flat=False)
    if not isinstance(view, torch.Tensor) or view.untyped_storage().data_ptr() != \
            buf.untyped_storage().data_ptr():  # fmt: skip
        raise InvalidArgument("mem_pool_host.get_data_page must return a view of kv_buffer",
                              "mem_pool_host")  # fmt: skip
    item = view.element_size()
    rel = (view.data_ptr() - buf.data_ptr()) // item
    return contiguous_runs(tuple(view.shape), tuple(view.stride()), rel, item)


def _flat_views(tensors: Any, n: int, page: PageLayout, field: str) -> list[Any]:
    """Byte views of ``n`` flat page tensors, each exactly one page."""
    if tensors is None or len(tensors) != n:
        raise InvalidArgument(f"{field} must hold one tensor per key ({n})", field)
    out = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous():
            raise InvalidArgument(f"{field} must be contiguous CPU tensors", field)
        if t.numel() * t.element_size() != page.page_bytes:
            raise InvalidArgument(f"{field} holds a tensor of {t.numel() * t.element_size()} "
                                  f"bytes; a page is {page.page_bytes}", field)  # fmt: skip
        out.append(t.view(-1).view(torch.uint8).numpy())
    return out


def _per_page(ok: list[bool] | None, pages: int, segments: int) -> list[bool]:
    """A page succeeded when all its segments did."""
    if ok is None:
        return [False] * pages
    return [all(ok[p * segments : (p + 1) * segments]) for p in range(pages)]


__all__ = ["KVFabricStorage", "page_block_hashes"]
