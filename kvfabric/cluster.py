"""Bringing a kvfabric cluster up on Ray, finding its actors, and taking it down.

One named, detached ``Directory`` actor per Ray cluster (namespace
``kvfabric``) and one named, detached ``NodeStore`` actor per Ray node, placed
with node affinity. The directory's supervisor starts a NodeStore on every
node that joins later; this module starts the directory and waits for the
nodes to be ready.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from kvfabric.config import KVFabricConfig
from kvfabric.errors import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)

NAMESPACE = "kvfabric"
DIRECTORY_NAME = "kvfabric-directory"


def node_actor_name(node_id: str) -> str:
    """The Ray actor name of the NodeStore on ``node_id``."""
    return f"kvfabric-node-{node_id[:16]}"


def connect(address: str | None = None, *, local_config: dict[str, Any] | None = None) -> None:
    """Join the Ray cluster at ``address``, or start a local one (loopback only)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return
    # A local single-machine fabric: every port on loopback, no token file written.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(namespace=NAMESPACE, log_to_driver=False, **(local_config or {}))


def directory_handle() -> Any:
    """The directory actor, or Unavailable when it is not running."""
    import ray

    try:
        return ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
    except ValueError:
        raise Unavailable("the kvfabric directory is not running", "directory") from None


def ensure_directory(config: KVFabricConfig) -> Any:
    """Start the directory if absent (a restarted one restores its index from its log)."""
    from kvfabric.directory.actor import DirectoryActor

    return DirectoryActor.options(
        name=DIRECTORY_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=16,
    ).remote(config)


def node_stores() -> dict[str, Any]:
    """Node id → NodeStore actor handle, for every alive node with a NodeStore."""
    import ray

    out = {}
    for node_id in alive_node_ids():
        try:
            out[node_id] = ray.get_actor(node_actor_name(node_id), namespace=NAMESPACE)
        except ValueError:
            continue
    return out


def alive_node_ids() -> set[str]:
    """Ids of the Ray nodes that are alive now."""
    import ray

    nodes = ray.nodes()  # type: ignore[no-untyped-call]
    return {n["NodeID"] for n in nodes if n["Alive"]}


def wait_ready(timeout_s: float = 120.0) -> dict[str, dict[str, Any]]:
    """Wait until every alive Ray node has a ready NodeStore; returns their info by node id."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = alive_node_ids()
        infos: dict[str, dict[str, Any]] = {}
        for node_id, handle in node_stores().items():
            try:
                infos[node_id] = ray.get(handle.info.remote(), timeout=10)
            except Exception:
                continue
        if alive and alive <= {n for n, i in infos.items() if i["ready"]}:
            return infos
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"{len(alive) - len(infos)} of {len(alive)} nodes have no ready NodeStore "
                f"after {timeout_s:.0f} s",
                "timeout",
            )
        time.sleep(0.2)


def warmth(namespace: str, hashes: list[bytes], timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """KV-warmth routing helper: per node, the leading blocks of ``hashes`` it holds and their
    tiers (``matched``, ``tiers``), best node first. Needs :func:`connect` first."""
    import ray

    ref = directory_handle().warmth.remote(namespace, list(hashes))
    result: list[dict[str, Any]] = ray.get(ref, timeout=timeout_s)
    return result


def up(
    config: KVFabricConfig, address: str | None = None, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Start or join Ray, start the directory and a NodeStore on every node, wait for them."""
    import ray

    connect(address)
    directory = ensure_directory(config)
    ray.get(directory.ping.remote(), timeout=timeout_s)
    nodes = wait_ready(timeout_s)
    return {"ray_address": ray.get_runtime_context().gcs_address, "nodes": nodes}


def down(timeout_s: float = 30.0) -> int:
    """Stop every NodeStore and the directory cleanly (flushing their LMDB files)."""
    import ray

    stopped = 0
    for handle in node_stores().values():
        try:
            ray.get(handle.close.remote(), timeout=timeout_s)
        except Exception as exc:
            log.warning("NodeStore close failed: %s", exc)
        ray.kill(handle)
        stopped += 1
    try:
        directory = directory_handle()
    except Unavailable:
        return stopped
    try:
        ray.get(directory.shutdown.remote(), timeout=timeout_s)
    except Exception as exc:
        log.warning("directory shutdown failed: %s", exc)
    ray.kill(directory)
    return stopped + 1
