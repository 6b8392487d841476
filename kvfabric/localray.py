"""A private Ray cluster on this machine, for tests and benchmarks.

Several Ray "nodes" (``ray.cluster_utils.Cluster``) on loopback only, with
their own short temp directory (Ray's socket paths are length-limited, and a
private directory keeps a stale "current cluster" file from another run out of
the way), token auth off and usage stats off; everything is shut down and
removed afterwards, the fabric first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass
class LocalRay:
    """The running cluster and its private directory (data may live under ``tmp``)."""

    cluster: Any
    tmp: str


@contextmanager
def private_ray_cluster(
    num_nodes: int, *, resources: Sequence[dict[str, float]] = (), dashboard: bool = False
) -> Iterator[LocalRay]:
    """Start ``num_nodes`` Ray nodes (1 CPU each) and connect this process to them."""
    import ray
    from ray.cluster_utils import Cluster

    from kvfabric import cluster as kv

    tmp = tempfile.mkdtemp(prefix="kvf-", dir="/tmp")
    os.makedirs(os.path.join(tmp, "ray"))
    saved = {k: os.environ.get(k) for k in (*_ENV, "RAY_TMPDIR")}
    os.environ.update({**_ENV, "RAY_TMPDIR": tmp})
    res = list(resources) + [{}] * (num_nodes - len(resources))
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": res[0], "include_dashboard": dashboard},
    )
    try:
        for r in res[1:num_nodes]:
            c.add_node(num_cpus=1, resources=r)
        ray.init(address=c.address, namespace=kv.NAMESPACE, log_to_driver=False)
        yield LocalRay(c, tmp)
    finally:
        try:
            if ray.is_initialized():
                kv.down()
        finally:
            ray.shutdown()
            c.shutdown()  # type: ignore[no-untyped-call]
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(tmp, ignore_errors=True)
