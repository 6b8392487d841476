"""Output of the admin commands: rich tables and progress bars, or one JSON object.

Rich decides colour from the terminal: piped output (a script, CI) has no
escape codes, and ``NO_COLOR`` is honoured. ``--json`` output is exactly one
JSON object on the last line (``events`` and ``top`` print one per line).
Failures are one line on stderr and exit code 1; usage errors exit 2.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer

from kvfabric.errors import KVFabricError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def console(stderr: bool = False) -> Any:
    """A rich console (colour only on a terminal; rich honours NO_COLOR)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit-1 exception to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def usage(message: str) -> typer.Exit:
    """Print a usage error on stderr and return the exit-2 exception to raise."""
    typer.echo(f"usage error: {message}", err=True)
    return typer.Exit(2)


def failure(exc: KVFabricError) -> typer.Exit:
    """The one line of a typed error (naming its field) and exit 1."""
    message = exc.message
    if exc.field and exc.field not in message:
        message = f"{exc.field}: {message}"
    return fail(message)


def emit_json(obj: Any) -> None:
    """One JSON object on one line."""
    typer.echo(json.dumps(obj, sort_keys=True, default=str))


def parse_duration(text: str | None) -> float | None:
    """Seconds of ``90``, ``90s``, ``15m``, ``1h`` or ``2d`` (BadParameter otherwise)."""
    if text is None:
        return None
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 15m, 1h or 2d")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def short(node_id: str) -> str:
    """The 12-character form of a node id used in tables."""
    return node_id[:12]


def table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], keep: Sequence[str] = ()
) -> Any:
    """A rich table; numeric columns right-aligned; ``keep`` columns are never shortened."""
    from rich import box
    from rich.table import Table

    # Light rules, no side borders: 10 columns still fit an 80-column terminal.
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, col in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], (int, float)) for r in rows)
        width = max([len(col), *(len(str(r[i])) for r in rows)]) if col in keep else len(col)
        t.add_column(col, justify="right" if numeric else "left", min_width=width)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], keep: Sequence[str] = ()
) -> None:
    """Print :func:`table` to stdout."""
    console().print(table(title, columns, rows, keep))


class Steps:
    """A progress bar over a known number of steps (silent when ``enabled`` is False)."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` more steps done."""
        if self._progress is not None:
            self._progress.advance(self._task, n)


@contextmanager
def progress(description: str, total: int, enabled: bool = True) -> Iterator[Steps]:
    """A rich progress bar on stderr for long work (moves, prefetches, pins of many blocks).

    Shown only when stderr is a terminal; it stays when the work is done and is
    erased when the work fails.
    """
    err = console(stderr=True)
    if not enabled or not err.is_terminal:  # piped stderr keeps just the one error line
        yield Steps(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, transient=False,
    ) as bar:  # fmt: skip
        try:
            yield Steps(bar, bar.add_task(description, total=total))
        except BaseException:
            bar.live.transient = True  # a failed run leaves the error line, not a stuck bar
            raise


def batches(items: Sequence[bytes], size: int) -> list[Sequence[bytes]]:
    """``items`` cut into consecutive slices of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def parse_enum(value: str | None, enum: Any, option: str) -> Any:
    """The member of ``enum`` named ``value`` (any case); a usage error names the choices."""
    if value is None:
        return None
    member = enum.__members__.get(value.upper())
    if member is None:
        raise usage(f"{option} {value!r} is not one of {', '.join(enum.__members__)}")
    return member
