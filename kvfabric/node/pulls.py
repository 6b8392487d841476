"""Pulls from peers: copies of blocks this node lacks, fetched over the data plane.

A get that misses locally, a prefetch, and the directory's replication planner
all end here. :meth:`PeerPulls.pull_missing` asks the directory where each
block is, groups the keys by the first peer that holds them, and fetches
each group in one transport call; a block whose peer failed, lacked it, or
sent a corrupt copy is tried at its next replica, up to three rounds in all.
:meth:`PeerPulls.pull_from` copies from one named peer. Fetched blocks are
stored through the core (verified by the transport), and the new local
replicas are reported to the directory before either call returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from kvfabric.errors import Unavailable
from kvfabric.node.core import NodeStoreCore
from kvfabric.node.port import DirectoryPort
from kvfabric.transfer import Transport
from kvfabric.types import BlockKey

log = logging.getLogger(__name__)

_ROUNDS = 3  # next replica on a peer failure or a corrupt copy


class PeerPulls:
    """Fetches of blocks from other nodes into this node's core.

    ``ensure_namespace(namespace, block_bytes)`` registers a namespace here on
    first sight; ``count_transfer(fetched, started)`` records one fetch's bytes
    and seconds; ``report()`` sends the core's changes to the directory.
    """

    def __init__(
        self,
        node_id: str,
        core: NodeStoreCore,
        directory: DirectoryPort | None,
        transport: Transport,
        timeout_s: float,
        *,
        ensure_namespace: Callable[[str, int], None],
        count_transfer: Callable[[Sequence[BlockKey], float], None],
        report: Callable[[], None],
    ) -> None:
        self._node_id = node_id
        self._core = core
        self._directory = directory
        self._transport = transport
        self._timeout_s = timeout_s
        self._ensure_namespace = ensure_namespace
        self._count_transfer = count_transfer
        self._report = report

    def pull_missing(self, keys: Sequence[BlockKey]) -> int:
        """Fetch ``keys`` from the best replicas elsewhere; returns how many arrived."""
        if self._directory is None or not keys:
            return 0
        locations = self._directory.locate(list(keys), self._node_id)
        todo = {k: [loc for loc in locs if loc[0] != self._node_id]
                for k, locs in zip(keys, locations, strict=True)}  # fmt: skip
        arrived = 0
        for _attempt in range(_ROUNDS):
            by_peer: dict[str, list[BlockKey]] = {}
            for k, locs in todo.items():
                if locs:
                    _node, address, _tier, size = locs.pop(0)
                    self._ensure_namespace(k.namespace, size)
                    by_peer.setdefault(address, []).append(k)
            if not by_peer:
                break
            failed: set[BlockKey] = set()
            for address, peer_keys in by_peer.items():
                try:
                    started = time.perf_counter()
                    res = self._transport.fetch(
                        address, peer_keys, self._core, timeout_s=self._timeout_s
                    )
                    self._count_transfer(res.fetched, started)
                except (Unavailable, OSError) as exc:
                    log.warning(
                        "fetch of %d blocks from %s failed: %s", len(peer_keys), address, exc
                    )
                    failed.update(peer_keys)
                    continue
                arrived += len(res.fetched)
                failed.update(res.missing)
                failed.update(res.corrupt)
            todo = {k: v for k, v in todo.items() if k in failed}
        self._report()
        return arrived

    def pull_from(self, address: str, keys: list[BlockKey], namespace: str, size: int) -> int:
        """Copy ``keys`` (all of ``namespace``, blocks of ``size`` bytes) from the peer at
        ``address``; returns how many are held here afterwards."""
        self._ensure_namespace(namespace, size)
        started = time.perf_counter()
        res = self._transport.fetch(address, keys, self._core, timeout_s=self._timeout_s)
        self._count_transfer(res.fetched, started)
        self._report()
        return len(res.fetched) + len(res.already_present)
