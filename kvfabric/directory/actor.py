"""The Directory Ray actor: a thin shell over :class:`DirectoryService`.

Besides serving calls it runs one supervisor thread that, every
``node_check_interval_s``: releases claims of dead writers; removes the
replicas of nodes that left Ray or whose NodeStore died (one step, through
the reverse index); starts a NodeStore on every Ray node without one; asks
nodes known from the log to re-send their inventories after a restart; and
prepares each newly registered node (pushing replicated and hot blocks)
before marking it ready.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvfabric.cluster import NAMESPACE, alive_node_ids, node_actor_name
from kvfabric.config import KVFabricConfig
from kvfabric.directory.service import DirectoryService
from kvfabric.errors import Unavailable
from kvfabric.metrics import Exporter

log = logging.getLogger(__name__)


class RayNodeCaller:
    """Reaches NodeStore actors by name, with a timeout on every call."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def pull_from(
        self, target_node: str, address: str, namespace: str, hashes: list[bytes], size: int
    ) -> int:
        try:
            handle = ray.get_actor(node_actor_name(target_node), namespace=NAMESPACE)
            ref: Any = handle.pull_from.remote(address, namespace, hashes, size)
            return int(ray.get(ref, timeout=self.timeout_s))
        except (ValueError, RayActorError, GetTimeoutError) as exc:
            raise Unavailable(f"node {target_node[:12]} unreachable: {exc}", "node_id") from None


class DirectoryActorImpl(DirectoryService):
    """What runs inside the Directory actor."""

    def __init__(self, config: KVFabricConfig, autostart_nodes: bool = True) -> None:
        super().__init__(config, RayNodeCaller(config.rpc_timeout_s))
        self.autostart_nodes = autostart_nodes
        self._ready: set[str] = set()
        self._resync = set(self.node_ids())  # nodes known from the log re-send inventories
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvfabric-supervisor", daemon=True)
        self._thread.start()
        self.exporter = Exporter(self.telemetry, self.record_metrics, config.metrics_interval_s)
        self.exporter.start()

    def ping(self) -> int:
        """Liveness check; returns the current event sequence number."""
        return self.seq()

    def ready_nodes(self) -> list[str]:
        """Nodes prepared and marked ready."""
        return sorted(self._ready)

    def shutdown(self) -> None:
        """Stop the supervisor and close the log (the actor can then be killed)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.exporter.stop()
        self.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.node_check_interval_s):
            try:
                self.tick()
                self._supervise()
            except Exception:  # the supervisor must outlive any one failure
                log.exception("directory supervisor step failed")

    def _supervise(self) -> None:
        alive = alive_node_ids()
        registered = set(self.node_ids())
        for node_id in registered - alive:
            log.info("node %s left the Ray cluster: removing its replicas", node_id[:12])
            self.remove_node(node_id)
            self._ready.discard(node_id)
        for node_id in alive:
            handle = self._handle(node_id)
            if handle is None or not self._alive(handle):
                if node_id in registered:
                    log.info("NodeStore on %s is gone: removing its replicas", node_id[:12])
                    self.remove_node(node_id)
                    self._ready.discard(node_id)
                if handle is None and self.autostart_nodes:
                    self._start_node(node_id)
                continue
            if node_id not in registered:
                continue  # still starting: it registers itself from its constructor
            if node_id in self._resync:
                self._resync.discard(node_id)
                handle.resync.remote()
            if node_id not in self._ready:
                copied = self.prepare_join(node_id)
                ray.get(handle.mark_ready.remote(), timeout=self.config.rpc_timeout_s)
                self._ready.add(node_id)
                log.info("node %s ready (%d blocks pushed on join)", node_id[:12], copied)
        self._send_replica_counts(alive)

    def _send_replica_counts(self, alive: set[str]) -> None:
        """Tell each node how many copies of its changed blocks others hold (fire and forget:
        a lost update only makes a node treat a copied block as its sole copy, the safe side)."""
        for node_id, (keys, counts) in self.replica_updates().items():
            handle = self._handle(node_id) if node_id in alive else None
            if handle is not None:
                handle.note_replicas.remote(keys, counts)

    def _handle(self, node_id: str) -> Any:
        try:
            return ray.get_actor(node_actor_name(node_id), namespace=NAMESPACE)
        except ValueError:
            return None

    def _alive(self, handle: Any) -> bool:
        try:
            ray.get(handle.ping.remote(), timeout=max(5.0, self.config.node_check_interval_s))
            return True
        except GetTimeoutError:
            return True  # busy, not dead: a dead actor fails fast
        except RayActorError:
            return False

    def _start_node(self, node_id: str) -> None:
        from kvfabric.node.actor import NodeStoreActor

        log.info("starting a NodeStore on node %s", node_id[:12])
        NodeStoreActor.options(
            name=node_actor_name(node_id),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=16,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(self.config)


DirectoryActor = ray.remote(DirectoryActorImpl)
