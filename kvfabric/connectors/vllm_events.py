"""vLLM-format KV events for the blocks kvfabric holds, so KV-aware routers can see them.

- ``BlockStored``: the worker reports each block it saved (hash, parent hash,
  token ids, ``medium="kvfabric"``) through ``get_kv_connector_kv_cache_events``;
  the scheduler side gathers the workers' reports in ``update_connector_output``
  and hands them to the engine's publisher in ``take_events``. With tensor
  parallelism an event is published once every worker has reported it (vLLM's
  ``KVEventAggregator``).
- ``BlockRemoved``: when the fabric runs as a cluster, a background thread of
  the scheduler follows the directory's event stream (``Client.watch_events``)
  and reports each block of this engine's namespace that left the cluster
  (``BLOCK_REMOVED``: no replica anywhere). A standalone node has no
  directory, so it reports no removals.

The block hashes are kvfabric's canonical chain hashes (32 bytes): unlike
vLLM's own, they are the same in every process and on every node.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING

from vllm.distributed.kv_events import (
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
    KVEventAggregator,
)

if TYPE_CHECKING:
    from kvfabric.connectors.vllm_worker import ClientFactory, Transfer

log = logging.getLogger(__name__)

MEDIUM = "kvfabric"
MAX_PENDING_EVENTS = 65_536  # removal events kept for the publisher; oldest dropped beyond
WATCH_WINDOW_S = 30.0


class KVFabricKVEvents(KVConnectorKVEvents):  # type: ignore[misc]  # vLLM is untyped here
    """The events of one step from the workers, counted per worker."""

    def __init__(self, num_workers: int = 1) -> None:
        self._aggregator = KVEventAggregator(num_workers)

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._aggregator.add_events(events)

    def aggregate(self) -> KVFabricKVEvents:
        common = self._aggregator.get_common_events()
        self._aggregator.clear_events()
        self._aggregator.add_events(common)
        self._aggregator.reset_workers()
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._aggregator.increment_workers(count)

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self._aggregator.get_all_events())

    def get_number_of_workers(self) -> int:
        return int(self._aggregator.get_number_of_workers())

    def clear_events(self) -> None:
        self._aggregator.clear_events()
        self._aggregator.reset_workers()


def stored_event(t: Transfer, block_size: int) -> BlockStored:
    """The ``BlockStored`` event of a finished save."""
    return BlockStored(
        block_hashes=list(t.hashes), parent_block_hash=t.parent,
        token_ids=list(t.token_ids or ()), block_size=block_size, lora_id=None,
        medium=MEDIUM, lora_name=None,
    )  # fmt: skip


class RemovalFollower:
    """Follows the directory's events and queues ``BlockRemoved`` for one namespace."""

    def __init__(self, make_client: ClientFactory, namespace: str) -> None:
        self._make_client = make_client
        self._namespace = namespace
        self._pending: collections.deque[KVCacheEvent] = collections.deque(
            maxlen=MAX_PENDING_EVENTS
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvfabric-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = -1  # -1: start from the directory's current end, not its whole history
        client = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = self._make_client()
                if seq < 0:
                    seq = max((e.seq for e in client.watch_events(0, follow=False)), default=0)
                for e in client.watch_events(seq, follow=True, timeout_s=WATCH_WINDOW_S):
                    seq = max(seq, e.seq)
                    if e.kind == "BLOCK_REMOVED" and e.namespace == self._namespace:
                        self._pending.append(BlockRemoved(block_hashes=[e.hash], medium=MEDIUM))
                    if self._stop.is_set():
                        break
            except Exception as exc:
                # Standalone nodes have no directory (FailedPrecondition): stop quietly.
                if type(exc).__name__ == "FailedPrecondition":
                    log.info("kvfabric: no directory events here; no BlockRemoved events")
                    return
                log.warning("kvfabric event stream broke (%s); retrying", exc)
                self._stop.wait(1.0)

    def take(self) -> list[KVCacheEvent]:
        """The removal events queued since the last call."""
        out = []
        while self._pending:
            out.append(self._pending.popleft())
        return out

    def close(self) -> None:
        """Stop following (the thread ends at its next event or window end)."""
        self._stop.set()
