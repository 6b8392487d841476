"""`kvfabric sim`: replay an agentic pattern against program-aware, LRU and Bélády."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvfabric.cli.render import emit_json, fail
from kvfabric.errors import KVFabricError

CHOICES = ("tot", "react", "swarm", "workflow", "all")


def sim(
    pattern: Annotated[str, typer.Argument(help="tot, react, swarm, workflow or all")],
    quick: Annotated[bool, typer.Option(help="a smaller run (seconds)")] = False,
    seed: Annotated[int, typer.Option(help="workload seed")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object last")] = False,
    plot: Annotated[Path | None, typer.Option(help="write PNG plots to this directory")] = None,
) -> None:
    """Simulate agentic programs on real node-store cores; compare policies in the same run."""
    from kvfabric.sim import SimConfig, run_all
    from kvfabric.sim.report import ALL_PATTERNS, render
    from kvfabric.sim.report import plot as draw

    if pattern not in CHOICES:
        typer.echo(f"error: unknown pattern {pattern!r}; known: {', '.join(CHOICES)}", err=True)
        raise typer.Exit(2)
    if seed < 0:
        typer.echo("error: --seed must be >= 0", err=True)
        raise typer.Exit(2)
    try:
        cfg = SimConfig.quick(seed) if quick else SimConfig(seed=seed)
        result = run_all(ALL_PATTERNS if pattern == "all" else [pattern], cfg)
        written = draw(result, plot) if plot is not None else []
    except KVFabricError as exc:
        raise fail(exc.message) from None
    except OSError as exc:
        raise fail(f"cannot write plots to {plot}: {exc.strerror}") from None
    if json_out:
        emit_json(result)
        return
    render(result)
    for path in written:
        typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add `kvfabric sim` to ``app``."""
    app.command()(sim)
