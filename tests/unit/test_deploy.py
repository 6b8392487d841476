"""deploy/: the manifests parse, agree on image and ports, and run commands the CLI accepts."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
import yaml
from typer import TyperException

import kvfabric
from kvfabric.cli.app import app
from kvfabric.config import load_config
from kvfabric.metrics import METRICS, Kind

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGE = f"ghcr.io/kvfabric/kvfabric:{kvfabric.__version__}"
GRPC_PORT = 50051
METRICS_PORT = 8080


def kuberay() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text()))


def launcher() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text()))


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "docker" / "Dockerfile").read_text())
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]
    return [(x.split(None, 1)[0].upper(), x.split(None, 1)[1]) for x in lines]


def pods() -> list[dict[str, Any]]:
    """(rayStartParams, pod spec, pod annotations) of the head and every worker group."""
    spec = next(d for d in kuberay() if d["kind"] == "RayCluster")["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [{"params": g["rayStartParams"], "spec": g["template"]["spec"],
             "annotations": g["template"]["metadata"].get("annotations", {}),
             "labels": g["template"]["metadata"]["labels"]} for g in groups]  # fmt: skip


def kvfabric_commands(text: str) -> list[list[str]]:
    """Every ``kvfabric ...`` invocation inside a shell command line, as argv."""
    return [shlex.split(m.group(1)) for m in re.finditer(r"\bkvfabric\s+([^;&|]+)", text)]


def parse(argv: list[str]) -> None:
    """Parse ``argv`` with the real typer app; TyperException (a usage error) if it is wrong."""
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    if argv[0] not in commands:
        raise typer.BadParameter(f"no such command {argv[0]!r}")
    commands[argv[0]].make_context(argv[0], argv[1:])


def test_every_manifest_parses_and_names_the_same_image() -> None:
    kinds = [d["kind"] for d in kuberay()]
    assert kinds == ["RayCluster", "Service", "Service"]
    images = {c["image"] for p in pods() for c in p["spec"]["containers"]}
    assert images == {IMAGE}
    assert launcher()["docker"]["image"] == IMAGE
    docker = dockerfile()
    assert docker[0] == ("FROM", "rayproject/ray:2.60.0-py311-gpu")  # the Ray of pyproject
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', dict(docker)["LABEL"])
    assert version and version.group(1) == kvfabric.__version__


def test_ports_agree_across_pods_services_image_and_config() -> None:
    for pod in pods():
        (container,) = pod["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert named["kvfabric-grpc"] == GRPC_PORT == int(env["KVFABRIC_RPC_PORT"])
        assert container["readinessProbe"]["grpc"]["port"] == GRPC_PORT
        assert named["metrics"] == METRICS_PORT == int(pod["params"]["metrics-export-port"])
        assert int(pod["annotations"]["prometheus.io/port"]) == METRICS_PORT
        assert pod["labels"]["app.kubernetes.io/name"] == "kvfabric"
        # The environment is a valid node configuration (same checks as at start-up).
        cfg = load_config(env={k: v for k, v in env.items() if k.startswith("KVFABRIC_")})
        assert (cfg.rpc_host, cfg.rpc_port) == ("0.0.0.0", GRPC_PORT)
    services = {d["metadata"]["name"]: d["spec"] for d in kuberay() if d["kind"] == "Service"}
    grpc = services["kvfabric-grpc"]["ports"][0]
    assert grpc["port"] == GRPC_PORT and grpc["targetPort"] == "kvfabric-grpc"
    assert services["kvfabric-metrics"]["ports"][0]["targetPort"] == "metrics"
    for svc in services.values():
        assert svc["selector"] == {"app.kubernetes.io/name": "kvfabric"}
    docker = dockerfile()
    exposed = {int(p) for i, a in docker if i == "EXPOSE" for p in a.split()}
    assert {GRPC_PORT, METRICS_PORT} <= exposed
    env_line = dict(docker)["ENV"]
    assert f"KVFABRIC_RPC_PORT={GRPC_PORT}" in env_line
    node = load_config(DEPLOY / "ray" / "kvfabric.toml", env={})
    assert (node.rpc_host, node.rpc_port) == ("0.0.0.0", GRPC_PORT)
    starts = launcher()["head_start_ray_commands"] + launcher()["worker_start_ray_commands"]
    ray_starts = [c for c in starts if c.startswith("ray start")]
    assert len(ray_starts) == 2
    assert all(f"--metrics-export-port={METRICS_PORT}" in c for c in ray_starts)


def test_commands_in_the_manifests_are_ones_the_cli_accepts() -> None:
    found: list[list[str]] = []
    for pod in pods():
        (container,) = pod["spec"]["containers"]
        found += kvfabric_commands(" ".join(container["lifecycle"]["postStart"]["exec"]["command"]))
    cfg = launcher()
    for line in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        found += kvfabric_commands(line)
    found += [shlex.split(a)[1:] for i, a in dockerfile()
              if i == "RUN" and a.startswith("kvfabric")]  # fmt: skip
    assert len(found) == 5
    assert all(argv[0] in ("up", "doctor") for argv in found)
    for argv in found:
        parse(argv)
    mounted = next(iter(cfg["file_mounts"]))
    assert all(argv[argv.index("--config") + 1] == mounted for argv in found if "--config" in argv)
    # The check can fail: a misspelt option is refused.
    with pytest.raises(TyperException, match="adress"):
        parse(["up", "--adress", "auto"])
    with pytest.raises(TyperException):
        parse(["upp"])


def test_grafana_dashboard_uses_only_metrics_kvfabric_exports() -> None:
    dash = json.loads((DEPLOY / "grafana" / "kvfabric-dashboard.json").read_text())
    exported = set()
    for d in METRICS.values():
        base = f"ray_{d.full_name}"
        exported |= {
            Kind.COUNTER: {f"{base}_total"},
            Kind.GAUGE: {base},
            Kind.HISTOGRAM: {f"{base}_bucket", f"{base}_count", f"{base}_sum"},
        }[d.kind]
    used: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            names = set(re.findall(r"\bray_kvfabric_\w+", target["expr"]))
            assert names, f"panel {panel['title']!r} queries no kvfabric metric"
            assert names <= exported, f"panel {panel['title']!r}: unknown {names - exported}"
            used |= names
    # every metric kvfabric exports is on the dashboard
    assert {f"ray_{d.full_name}" for d in METRICS.values() if d.kind == Kind.GAUGE} <= used
    counters = {f"ray_{d.full_name}_total" for d in METRICS.values() if d.kind == Kind.COUNTER}
    assert counters <= used
    hist = {f"ray_{d.full_name}_bucket" for d in METRICS.values() if d.kind == Kind.HISTOGRAM}
    assert hist <= used
    assert any(v["name"] == "node" for v in dash["templating"]["list"])
