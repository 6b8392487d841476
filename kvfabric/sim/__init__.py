"""The agentic workload simulator: four patterns replayed on real node-store cores.

``generate`` builds a trace, ``run_policy`` replays it with one policy
(program-aware, LRU or the offline optimum) and ``run_pattern`` compares the
three; see ``docs/agentic.md`` for the model and the results.
"""

from kvfabric.sim.config import SimConfig
from kvfabric.sim.report import run_all, run_pattern
from kvfabric.sim.runner import POLICIES, PolicyRun, run_policy
from kvfabric.sim.workloads import PATTERNS, generate

__all__ = [
    "PATTERNS", "POLICIES", "PolicyRun", "SimConfig", "generate", "run_all", "run_pattern",
    "run_policy",
]  # fmt: skip
