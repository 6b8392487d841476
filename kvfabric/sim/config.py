"""SimConfig: the cluster, cost model and load of one simulator run.

Capacities are not set in blocks directly: ``cache_fraction`` sizes the whole
cluster cache (every tier of every node) as a share of the trace's working
set — the most blocks that are, at one moment, still going to be read again —
and ``tier_shares`` splits each node's share over its GPU, CPU and disk
tiers. The default, 0.5, is the issue's "cache holds half the working set".

Costs are modelled, not measured: a block holds ``block_tokens`` tokens of
``kv_bytes_per_token`` bytes (the defaults are an 8B Llama-class model in
bf16); recomputing costs ``block_tokens / prefill_tokens_per_s``; loading
costs the block's bytes over the tier's (and, from another node, the
network's) bandwidth. The stored blocks themselves are tiny (``block_bytes``)
so the real tiers run fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from kvfabric.errors import InvalidArgument

GB = 1e9


@dataclass(frozen=True)
class SimConfig:
    """Knobs of a simulator run (see the module docstring); validated on creation."""

    nodes: int = 4
    programs: int = 64
    arrival_s: float = 0.3  # mean time between program arrivals (Poisson)
    cache_fraction: float = 0.5
    tier_shares: tuple[float, float, float] = (0.25, 0.25, 0.5)  # GPU, CPU, disk per node
    block_bytes: int = 256
    block_tokens: int = 16
    kv_bytes_per_token: int = 131_072
    prefill_tokens_per_s: float = 8000.0
    decode_tokens_per_s: float = 40.0
    gpu_load_gbps: float = 0.0  # 0: a GPU-tier hit is free (already in device memory)
    cpu_load_gbps: float = 25.0  # host -> device (PCIe 5 x16, effective)
    disk_load_gbps: float = 5.0  # NVMe -> device
    net_gbps: float = 12.5  # 100 Gb/s between nodes
    tool_estimate_noise: float = 0.2  # how far a framework's expected duration is off (sigma)
    sample_every: int = 25  # events between cache-use samples
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "tier_shares":
                if (len(value) != 3 or any(not 0 <= s <= 1 for s in value)
                        or not math.isclose(sum(value), 1.0) or value[1] <= 0):  # fmt: skip
                    raise InvalidArgument(
                        "tier_shares must be three shares (GPU, CPU, disk) summing to 1 "
                        "with a CPU share > 0",
                        "tier_shares",
                    )
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgument(f"{f.name} must be a number, got {value!r}", f.name)
            if math.isnan(value) or value < 0:
                raise InvalidArgument(f"{f.name} must be >= 0, got {value!r}", f.name)
        for name in ("nodes", "programs", "block_bytes", "block_tokens", "kv_bytes_per_token",
                     "sample_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1", name)
        if not 0 < self.cache_fraction <= 4:
            raise InvalidArgument("cache_fraction must be in (0, 4]", "cache_fraction")
        if self.prefill_tokens_per_s <= 0 or self.decode_tokens_per_s <= 0:
            raise InvalidArgument("token rates must be > 0", "prefill_tokens_per_s")
        if self.nodes > 64:
            raise InvalidArgument("nodes must be at most 64", "nodes")

    def with_(self, **changes: Any) -> SimConfig:
        """A validated copy with ``changes``."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise InvalidArgument(f"unknown sim setting(s) {sorted(unknown)}", sorted(unknown)[0])
        return replace(self, **changes)

    @classmethod
    def quick(cls, seed: int = 0) -> SimConfig:
        """A smaller run for CI and `--quick`: fewer programs on two nodes."""
        return cls(nodes=2, programs=16, arrival_s=0.3, seed=seed)

    @property
    def block_model_bytes(self) -> int:
        """The modelled size of one block (for bandwidth costs)."""
        return self.block_tokens * self.kv_bytes_per_token

    def load_s(self, tier: int, remote: bool) -> float:
        """Seconds to bring one block from ``tier`` (0 GPU, 1 CPU, 2 disk) of a node."""
        gbps = (self.gpu_load_gbps, self.cpu_load_gbps, self.disk_load_gbps)[tier]
        size = self.block_model_bytes
        cost = size / (gbps * GB) if gbps > 0 else 0.0
        return cost + (size / (self.net_gbps * GB) if remote and self.net_gbps > 0 else 0.0)

    @property
    def recompute_s(self) -> float:
        """Seconds to prefill one block."""
        return self.block_tokens / self.prefill_tokens_per_s

    def decode_s(self, blocks: int) -> float:
        """Seconds to generate ``blocks`` blocks of output."""
        return blocks * self.block_tokens / self.decode_tokens_per_s
