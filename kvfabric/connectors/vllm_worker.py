"""The vLLM worker's side of the kvfabric connector: the paged cache as blocks, loads, saves.

A kvfabric block is one vLLM block across all layers: the per-layer slices of
that block stacked as ``(num_layers, *slice_shape)``. Gather and scatter are
one ``index_select`` / ``index_copy_`` per layer for all blocks of a step, on
whatever device holds the cache, with no per-token loop. The block dimension
is found from the cache's own shape (it is the dimension of size
``num_blocks``: 0 for the CPU backend's ``(num_blocks, heads, block_size,
2*head_size)``, 1 for GPU backends that put K/V first), so any attention
backend and any block size work.

Loads are synchronous (before the forward pass, for blocks on this node) or
asynchronous (a bounded background thread, for blocks the node must first
pull from a peer), in which case the request is reported finished through
``get_finished`` once its blocks are in place. A load never leaves wrong KV
behind silently: every block that did not arrive verified is reported as a
load error, and vLLM recomputes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvfabric.types import BlockType

if TYPE_CHECKING:
    from kvfabric.rpc.client import Client

log = logging.getLogger(__name__)

ClientFactory = Callable[[], "Client"]


@dataclass
class Transfer:
    """Blocks of one request to load into, or save from, the paged cache."""

    req_id: str
    hashes: list[bytes]
    block_ids: list[int]
    block_types: list[int] = field(default_factory=list)  # saves: BlockType value per block
    program_id: str | None = None
    ttl_s: float | None = None
    token_ids: list[int] | None = None  # saves with KV events on: the blocks' tokens
    parent: bytes | None = None  # saves: the hash before hashes[0]
    is_async: bool = False  # loads: from a peer, in the background


class Breaker:
    """Skips calls to a fabric that just failed, so a dead or hung node costs the engine one
    timeout per back-off period instead of one per request (back-off doubles up to a cap)."""

    def __init__(self, first_s: float = 1.0, cap_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._first, self._cap, self._clock = first_s, cap_s, clock
        self._backoff = 0.0
        self._until = 0.0

    def allow(self) -> bool:
        """Whether to try the fabric now."""
        return self._clock() >= self._until

    def failed(self) -> None:
        """A call failed: stay away for the next back-off period."""
        self._backoff = min(self._cap, self._backoff * 2 or self._first)
        self._until = self._clock() + self._backoff

    def succeeded(self) -> None:
        """A call worked: the fabric is back."""
        self._backoff = 0.0
        self._until = 0.0


class PagedKV:
    """The engine's per-layer paged KV tensors, read and written a block at a time."""

    def __init__(self, layers: list[torch.Tensor], num_blocks: int) -> None:
        if not layers:
            raise ValueError("kvfabric connector: no KV cache layers registered")
        shapes = {tuple(t.shape) for t in layers}
        if len(shapes) != 1 or len({t.dtype for t in layers}) != 1:
            raise ValueError(f"kvfabric connector needs equal layer shapes, got {shapes}")
        shape = layers[0].shape
        dims = [d for d in (0, 1) if d < len(shape) and shape[d] == num_blocks]
        if not dims:
            raise ValueError(f"no dimension of size num_blocks={num_blocks} in {tuple(shape)}")
        self.layers = layers
        self.block_dim = dims[0]
        self.slice_shape = tuple(s for i, s in enumerate(shape) if i != self.block_dim)
        self.dtype = layers[0].dtype
        per_layer = 1
        for s in self.slice_shape:
            per_layer *= int(s)
        self.block_bytes = per_layer * len(layers) * layers[0].element_size()

    def staging(self, n: int) -> tuple[torch.Tensor, list[Any]]:
        """A host tensor ``(n, layers, *slice)`` and the writable byte view of each block."""
        typed = torch.empty((n, len(self.layers), *self.slice_shape), dtype=self.dtype)
        raw = typed.view(n, -1).view(torch.uint8)
        return typed, [raw[i].numpy() for i in range(n)]

    def gather(self, block_ids: list[int]) -> tuple[torch.Tensor, list[Any]]:
        """Copy blocks out of the cache; returns the host tensor and each block's bytes."""
        n = len(block_ids)
        typed, views = self.staging(n)
        for layer, kv in enumerate(self.layers):
            ids = torch.tensor(block_ids, dtype=torch.long, device=kv.device)
            typed[:, layer] = kv.index_select(self.block_dim, ids).movedim(self.block_dim, 0).cpu()
        return typed, views

    def scatter(self, block_ids: list[int], typed: torch.Tensor) -> None:
        """Write ``typed[i]`` (all layers) into cache block ``block_ids[i]``."""
        for layer, kv in enumerate(self.layers):
            ids = torch.tensor(block_ids, dtype=torch.long, device=kv.device)
            src = typed[:, layer].to(kv.device).movedim(0, self.block_dim)
            kv.index_copy_(self.block_dim, ids, src)


def load(client: Client, namespace: str, paged: PagedKV, t: Transfer) -> set[int]:
    """Load ``t`` into the cache; returns the block ids that did not load (to recompute).

    Blocks load as a prefix: after the first miss nothing later is used, since
    a block's KV is only valid after all the blocks before it.
    """
    n = len(t.block_ids)
    if n == 0:
        return set()
    try:
        typed, views = paged.staging(n)
        ok = client.get_into(namespace, t.hashes, views)
    except Exception as exc:
        log.warning("kvfabric load of %s failed (%s); recomputing", t.req_id, exc)
        return set(t.block_ids)
    good = ok.index(False) if False in ok else n
    if good:
        paged.scatter(t.block_ids[:good], typed[:good])
    if good < n:
        log.info("kvfabric load of %s: %d of %d blocks; recomputing the rest", t.req_id, good, n)
    return set(t.block_ids[good:])


def save(client: Client, namespace: str, paged: PagedKV, t: Transfer) -> int:
    """Store ``t``'s blocks, one put per run of equal type; returns how many were sent."""
    n = len(t.block_ids)
    if n == 0:
        return 0
    _, views = paged.gather(t.block_ids)
    types = t.block_types or [BlockType.GENERIC.value] * n
    start = 0
    while start < n:
        end = start
        while end < n and types[end] == types[start]:
            end += 1
        client.put(namespace, t.hashes[start:end], views[start:end],
                   block_type=BlockType(types[start]), program_id=t.program_id)  # fmt: skip
        start = end
    if t.ttl_s is not None:
        client.annotate(namespace, t.hashes, ttl_s=t.ttl_s)
    return n


class AsyncLoader:
    """Background loads for blocks that a node must first pull from a peer.

    One worker thread with its own client, so the engine's forward passes
    never wait on the network; finished requests and failed blocks are
    collected for ``get_finished`` / ``get_block_ids_with_load_errors``.
    """

    def __init__(self, make_client: ClientFactory, namespace: str, paged: PagedKV) -> None:
        self._make_client = make_client
        self._namespace = namespace
        self._paged = paged
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfabric-load")
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._done: set[str] = set()
        self._errors: set[int] = set()

    def submit(self, t: Transfer) -> None:
        """Start loading ``t``; it is reported finished (loaded or failed) later."""
        self._pool.submit(self._run, t)

    def _run(self, t: Transfer) -> None:
        try:
            if self._client is None:
                self._client = self._make_client()
            errors = load(self._client, self._namespace, self._paged, t)
        except Exception as exc:  # never lose a request: report it finished and failed
            log.warning("kvfabric async load of %s failed (%s)", t.req_id, exc)
            errors = set(t.block_ids)
        with self._lock:
            self._errors |= errors
            self._done.add(t.req_id)

    def take(self) -> tuple[set[str], set[int]]:
        """Requests whose loads ended since the last call, and the blocks that failed."""
        with self._lock:
            done, errors = self._done, self._errors
            self._done, self._errors = set(), set()
        return done, errors

    def close(self) -> None:
        """Finish the loads in flight and close the client."""
        self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
            self._client = None
