"""The NodeStore Ray actor: a thin shell over :class:`NodeStoreService`.

It learns its node id and IP from Ray, keeps its data under a per-node
directory, and reaches the directory actor through :class:`RayDirectoryPort`,
which puts a timeout on every call and, if the directory was restarted,
re-registers the node and re-sends its inventory before retrying.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from kvfabric import metrics
from kvfabric.cluster import directory_handle
from kvfabric.config import KVFabricConfig
from kvfabric.errors import DeadlineExceeded, Unavailable
from kvfabric.node.changes import NodeChange
from kvfabric.node.service import NodeStoreService
from kvfabric.types import BlockKey

log = logging.getLogger(__name__)


class RayDirectoryPort:
    """The directory actor seen as a synchronous :class:`DirectoryPort`."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.handle = directory_handle()
        self.rejoin: Any = None  # set by the owner: re-register and resync after a restart
        self._rejoining = False

    def _call(self, method: str, *args: Any, wait: bool = True) -> Any:
        for attempt in range(2):
            try:
                ref = getattr(self.handle, method).remote(*args)
                return ray.get(ref, timeout=self.timeout_s) if wait else None
            except GetTimeoutError:
                raise DeadlineExceeded(
                    f"directory.{method} took longer than {self.timeout_s} s", "rpc_timeout_s"
                ) from None
            except RayActorError:
                if attempt or self._rejoining:
                    raise Unavailable(
                        "the kvfabric directory is not reachable", "directory"
                    ) from None
                self._reconnect()
        raise AssertionError("unreachable")

    def _reconnect(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.handle = directory_handle()
                ray.get(self.handle.ping.remote(), timeout=self.timeout_s)
                break
            except (Unavailable, RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise Unavailable(
                        "the kvfabric directory did not come back", "directory"
                    ) from None
                time.sleep(0.2)
        log.info("directory restarted: re-registering this node")
        if self.rejoin is not None:
            self._rejoining = True
            try:
                self.rejoin()
            finally:
                self._rejoining = False

    def register_node(self, node_id: str, address: str, tiers: list[int]) -> None:
        self._call("register_node", node_id, address, tiers)

    def claim_many(
        self, node_id: str, writer_id: str, items: list[tuple[BlockKey, int]]
    ) -> list[str]:
        return list(self._call("claim_many", node_id, writer_id, items))

    def commit_many(self, node_id: str, writer_id: str, changes: list[NodeChange]) -> list[bool]:
        return list(self._call("commit_many", node_id, writer_id, changes))

    def abort_many(self, node_id: str, writer_id: str, keys: list[BlockKey]) -> None:
        self._call("abort_many", node_id, writer_id, keys)

    def apply_changes(self, node_id: str, changes: list[NodeChange]) -> None:
        self._call("apply_changes", node_id, changes)

    def reconcile(self, node_id: str, inventory: list[NodeChange]) -> list[BlockKey]:
        return list(self._call("reconcile", node_id, inventory))

    def locate(
        self, keys: list[BlockKey], prefer_node: str
    ) -> list[list[tuple[str, str, int, int]]]:
        return list(self._call("locate", keys, prefer_node))

    def lookup(
        self, namespace: str, hashes: list[bytes], prefer_node: str | None
    ) -> dict[str, Any]:
        return dict(self._call("lookup", namespace, hashes, prefer_node))

    def events_since(self, seq: int, limit: int) -> list[Any]:
        return list(self._call("events_since", seq, limit))

    def fanout(self, keys: list[BlockKey], targets: list[str]) -> int:
        return int(self._call("fanout", keys, targets))

    def replicate(self, keys: list[BlockKey]) -> None:
        self._call("replicate", keys, wait=False)  # the directory copies in the background


class NodeStoreActorImpl(NodeStoreService):
    """What runs inside the NodeStore actor on each Ray node."""

    def __init__(self, config: KVFabricConfig) -> None:
        node_id = ray.get_runtime_context().get_node_id()
        port = RayDirectoryPort(config.rpc_timeout_s)
        host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        super().__init__(node_id, config.for_node(node_id), port, host=host)
        port.rejoin = self.join
        from kvfabric.rpc.server import start_server

        self.rpc = start_server(self, self.config)
        self.start_local()  # engines on this host copy blocks through the shared arena
        # Listening on every interface (a container): advertise the node's own address.
        wildcard = config.rpc_host in ("0.0.0.0", "::", "[::]")
        self.rpc_address = f"{host}:{self.rpc.port}" if wildcard else self.rpc.address
        self.exporter = metrics.Exporter(
            self.telemetry, lambda: metrics.record_node_stats(self.telemetry, self.stats()),
            config.metrics_interval_s,
        ).start()  # fmt: skip

    def close(self) -> None:
        """Stop the metrics export and the gRPC API, then the data plane and the tiers."""
        self.exporter.stop()
        self.rpc.stop()
        super().close()


NodeStoreActor = ray.remote(NodeStoreActorImpl)
