"""The `kvfabric` command line (typer + rich).

Exit codes scripts can rely on: 0 ok, 1 failure (one clear line on stderr),
2 usage error. Every command that prints data takes ``--json``. This module
holds the fabric's lifecycle commands; the admin commands live in
``pin.py`` (pin, unpin), ``blocks.py`` (evict, move, prefetch),
``inventory.py`` (ls, stats) and ``top.py`` (top, events), and reach the
nodes as ``connection.py`` describes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kvfabric.cli import blocks, inventory, pin, top
from kvfabric.cli import connection as cn
from kvfabric.cli.render import emit_json, fail
from kvfabric.errors import KVFabricError

app = typer.Typer(
    name="kvfabric",
    help="kvfabric: a tiered, program-aware KV-cache store for LLM serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
__all__ = ["app", "emit_json", "fail", "main"]


@app.command()
def up(
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
    address: Annotated[
        str | None, typer.Option(help="join the Ray cluster at this address (default: start one)")
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="where disk tiers and logs live")] = None,
    cpu_arena_bytes: Annotated[
        str | None, typer.Option(help="host arena per node, e.g. 1GiB")
    ] = None,
    disk_bytes: Annotated[
        str | None, typer.Option(help="LMDB map size per node, e.g. 8GiB")
    ] = None,
    status_interval: Annotated[
        float | None, typer.Option(help="seconds between status lines")
    ] = None,
    standalone: Annotated[
        bool, typer.Option(help="one node store in this process, no Ray")
    ] = False,
    detach: Annotated[bool, typer.Option(help="start the fabric and return")] = False,
    once: Annotated[bool, typer.Option(help="print one status line and stop")] = False,
) -> None:
    """Start (or join) the fabric: directory + a NodeStore on every node; serve until Ctrl-C."""
    from kvfabric.config import load_config

    overrides = {
        k: v
        for k, v in {
            "data_dir": data_dir,
            "cpu_arena_bytes": cpu_arena_bytes,
            "disk_bytes": disk_bytes,
            "status_interval_s": status_interval,
        }.items()
        if v is not None
    }
    try:
        cfg = load_config(config, overrides=overrides)
        if standalone:
            from kvfabric.cli.serve import serve_forever

            serve_forever(cfg, once=once)
        else:
            from kvfabric.cli.serve import serve_cluster

            serve_cluster(cfg, address, detach=detach, once=once)
    except KVFabricError as exc:
        raise fail(exc.message) from None


@app.command()
def down(
    address: Annotated[str, typer.Option(help="address of the Ray cluster")] = "auto",
) -> None:
    """Stop every NodeStore and the directory of a running fabric."""
    from kvfabric import cluster

    try:
        cluster.connect(address)
        typer.echo(f"kvfabric: stopped {cluster.down()} actors")
    except KVFabricError as exc:
        raise fail(exc.message) from None
    except ConnectionError as exc:
        raise fail(f"no Ray cluster at {address}: {exc}") from None


@app.command()
def status(
    address: Annotated[str, typer.Option(help="address of the Ray cluster")] = "auto",
    token_file: cn.TokenFileOpt = None,
    config: cn.ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Nodes, their tiers (used/capacity), readiness and health, and the directory's seq."""
    from kvfabric import cluster
    from kvfabric.cli.render import human_bytes, print_table, short
    from kvfabric.cli.serve import cluster_status

    try:
        conn = cn.resolve(None, address, config, token_file)
        cluster.connect(address)
        report = cluster_status()
        for info in report["nodes"].values():  # gRPC health, as a load balancer sees it
            with cn.client_for(conn, info["rpc_address"]) as client:
                info["healthy"] = client.health(timeout_s=5.0)
            for t in info["stats"]["tiers"]:
                t["tier"] = t["tier"].name  # a name in the table and the JSON, not a number
    except KVFabricError as exc:
        raise fail(exc.message) from None
    except ConnectionError as exc:
        raise fail(f"no Ray cluster at {address}: {exc}") from None
    if json_out:
        emit_json(report)
        return
    rows = [(short(n), i["rpc_address"], "yes" if i["ready"] else "no",
             "SERVING" if i["healthy"] else "NOT SERVING", t["tier"],
             t["blocks"], f"{human_bytes(t['used_bytes'])} / {human_bytes(t['capacity_bytes'])}")
            for n, i in sorted(report["nodes"].items()) for t in i["stats"]["tiers"]]  # fmt: skip
    print_table(f"kvfabric: {len(report['nodes'])} nodes, directory seq {report['seq']}",
                ["node", "gRPC", "ready", "health", "tier", "blocks", "used / capacity"], rows)
    if not all(i["healthy"] and i["ready"] for i in report["nodes"].values()):
        raise typer.Exit(1)


@app.command()
def doctor(json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Check versions, usable tiers and transports, and the hash self-test."""
    from kvfabric.cli.doctor import render, run_checks

    report = run_checks()
    if json_out:
        emit_json(report)
    else:
        render(report)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("hash")
def hash_cmd(
    block_size: Annotated[int, typer.Option(help="tokens per block")],
    tokens: Annotated[str | None, typer.Option(help="comma-separated token ids")] = None,
    tokens_file: Annotated[Path | None, typer.Option(help="file of token ids")] = None,
    cache_salt: Annotated[str | None, typer.Option(help="cache salt of the request")] = None,
    lora_id: Annotated[str | None, typer.Option(help="LoRA adapter id")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print the canonical chained hash of each full block, one hex line per block."""
    from kvfabric.hashing import ExtraKeys, chain_hashes, format_chain, parse_token_list

    if (tokens is None) == (tokens_file is None):
        typer.echo("error: give exactly one of --tokens or --tokens-file", err=True)
        raise typer.Exit(2)
    try:
        if tokens_file is not None:
            try:
                text = tokens_file.read_text()
            except OSError as exc:
                raise fail(f"cannot read --tokens-file {tokens_file}: {exc.strerror}") from None
        else:
            text = tokens or ""
        ids = parse_token_list(text)
        extras = ExtraKeys(cache_salt=cache_salt, lora_id=lora_id)
        lines = format_chain(chain_hashes(ids, block_size, extras))
    except KVFabricError as exc:
        raise fail(exc.message) from None
    if json_out:
        emit_json({"block_size": block_size, "tokens": len(ids), "hashes": lines})
    else:
        for line in lines:
            typer.echo(line)


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="benchmark: tiers")],
    quick: Annotated[bool, typer.Option(help="small sizes, a few seconds")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object last")] = False,
) -> None:
    """Run a benchmark that measures its own baseline in the same run."""
    from kvfabric.bench import BENCHMARKS

    runner = BENCHMARKS.get(name)
    if runner is None:
        typer.echo(f"error: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", err=True)
        raise typer.Exit(2)
    try:
        result = runner(quick=quick, progress=not json_out)
    except KVFabricError as exc:
        raise fail(exc.message) from None
    if json_out:
        emit_json(result)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"kvfabric bench {name}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in result.items():
            table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
        Console().print(table)


for _module in (pin, blocks, inventory, top):  # the admin commands, after the lifecycle ones
    _module.register(app)
from kvfabric.cli import sim as _sim  # noqa: E402  (issue #7: the agentic simulator)

_sim.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KVFabricError as exc:  # a typed error that escaped a command
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
