"""`kvfabric top` (a live view of the fabric) and `kvfabric events` (the directory's stream).

`top` samples every node's Stats each ``--interval`` seconds and shows, per
node and in total: the hit rate over the last interval and since start
(lookups and gets), bytes by tier against capacity, bytes by semantic type,
transfer throughput by transport, and pins. On a terminal it redraws in
place; piped, it prints one frame per sample. ``--iterations`` / ``--once``
bound it (tests, scripts); otherwise it runs until Ctrl-C.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

import typer

from kvfabric.cli import connection as cn
from kvfabric.cli import render as out
from kvfabric.cli.pin import JsonOpt, NodeOpt
from kvfabric.errors import KVFabricError

_SERIES = re.compile(r"^(\w+)\{(.*)\}$")


def labelled(counters: dict[str, int], name: str) -> dict[tuple[tuple[str, str], ...], int]:
    """The series of one telemetry counter: ``{(("op","get"),("tier","CPU")): n, ...}``."""
    found = {}
    for key, value in counters.items():
        m = _SERIES.match(key)
        if m and m.group(1) == name:
            labels = tuple(tuple(p.split("=", 1)) for p in m.group(2).split(",") if "=" in p)
            found[labels] = value
    return found


def _sum(counters: dict[str, int], name: str, **match: str) -> int:
    return sum(v for labels, v in labelled(counters, name).items()
               if all(dict(labels).get(k) == x for k, x in match.items()))  # fmt: skip


def summarize(prev: Any | None, cur: Any, dt: float) -> dict[str, Any]:
    """One node's view from two Stats samples ``dt`` seconds apart (``prev`` None: first)."""
    c, p = cur.counters, (prev.counters if prev is not None else {})
    hits, misses = _sum(c, "hits"), _sum(c, "misses")
    d_hits, d_miss = hits - _sum(p, "hits"), misses - _sum(p, "misses")
    transfers = {}
    for labels, total in labelled(c, "transfer_bytes").items():
        tags = dict(labels)
        name = f"{tags.get('transport')}/{tags.get('direction')}"
        before = _sum(p, "transfer_bytes", **tags) if prev is not None else total
        transfers[name] = {"bytes": total, "bytes_per_s": (total - before) / dt if dt > 0 else 0}
    return {
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "hit_rate_now": d_hits / (d_hits + d_miss) if prev and d_hits + d_miss else None,
        "hits": hits, "misses": misses,
        "tiers": {t.tier.name: {"used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes,
                                "blocks": t.blocks} for t in cur.tiers},
        "bytes_by_type": dict(cur.bytes_by_type), "blocks_by_type": dict(cur.blocks_by_type),
        "transfers": transfers,
        "pinned_blocks": cur.pinned_blocks, "pinned_bytes": cur.pinned_bytes,
    }  # fmt: skip


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def frame(views: dict[str, dict[str, Any]], stamp: str) -> Any:
    """The rich renderable of one sample."""
    from rich.console import Group

    nodes = [(out.short(n), _pct(v["hit_rate_now"]), _pct(v["hit_rate"]), v["hits"], v["misses"],
              v["pinned_blocks"], out.human_bytes(v["pinned_bytes"]))
             for n, v in views.items()]  # fmt: skip
    tiers = [(out.short(n), name, t["blocks"], out.human_bytes(t["used_bytes"]),
              out.human_bytes(t["capacity_bytes"]),
              _pct(t["used_bytes"] / t["capacity_bytes"] if t["capacity_bytes"] else None))
             for n, v in views.items() for name, t in v["tiers"].items()]  # fmt: skip
    types = [(out.short(n), name, v["blocks_by_type"].get(name, 0), out.human_bytes(b))
             for n, v in views.items() for name, b in sorted(v["bytes_by_type"].items())]
    moves = [(out.short(n), name, out.human_bytes(t["bytes"]),
              f"{out.human_bytes(t['bytes_per_s'])}/s")
             for n, v in views.items() for name, t in sorted(v["transfers"].items())]  # fmt: skip
    head = ["node", "hit rate (now)", "hit rate (all)", "hits", "misses", "pinned", "pinned bytes"]
    return Group(
        out.table(f"kvfabric top  {stamp}", head, nodes),
        out.table("tiers", ["node", "tier", "blocks", "used", "capacity", "full"], tiers),
        out.table("by type", ["node", "type", "blocks", "bytes"], types),
        out.table("transfers", ["node", "transport/dir", "total", "rate"], moves),
    )


def top(
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="seconds")] = 1.0,
    iterations: Annotated[int, typer.Option("--iterations", min=0, help="0: until Ctrl-C")] = 0,
    once: Annotated[bool, typer.Option("--once", help="one sample, then exit")] = False,
    node: NodeOpt = None,
    target: cn.TargetOpt = None, address: cn.AddressOpt = None, config: cn.ConfigOpt = None,
    token_file: cn.TokenFileOpt = None, timeout: cn.TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:  # fmt: skip
    """A live view: hit rate, bytes by tier and type, transfers and pins, each second."""
    rounds = 1 if once else iterations
    try:
        conn = cn.resolve(target, address, config, token_file, timeout)
        with cn.open_nodes(conn) as nodes:
            _loop(nodes.pick(node), interval, rounds, json_out)
    except KVFabricError as exc:
        raise out.failure(exc) from None
    except ConnectionError as exc:
        raise out.fail(f"cannot reach the fabric: {exc}") from None


def _loop(clients: dict[str, Any], interval: float, rounds: int, json_out: bool) -> None:
    from rich.live import Live

    con = out.console()
    live = Live(console=con, auto_refresh=False) if con.is_terminal and not json_out else None
    prev: dict[str, Any] = {}
    last = time.monotonic()
    done = 0
    try:
        if live is not None:
            live.start()
        while True:
            now = time.monotonic()
            cur = {n: c.stats() for n, c in clients.items()}
            views = {n: summarize(prev.get(n), s, now - last) for n, s in cur.items()}
            prev, last, done = cur, now, done + 1
            if json_out:
                out.emit_json({"time": time.time(), "nodes": views})
            elif live is not None:
                live.update(frame(views, time.strftime("%H:%M:%S")), refresh=True)
            else:
                con.print(frame(views, time.strftime("%H:%M:%S")))
            if rounds and done >= rounds:
                return
            time.sleep(max(0.0, interval - (time.monotonic() - now)))
    except KeyboardInterrupt:
        return
    finally:
        if live is not None:
            live.stop()


def events(
    from_seq: Annotated[int, typer.Option("--from-seq", min=0, help="after this seq")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming")] = False,
    limit: Annotated[int, typer.Option("--limit", min=0, help="stop after N (0: no limit)")] = 0,
    duration: Annotated[
        float | None, typer.Option("--for", min=0.1, help="follow for this many seconds")
    ] = None,
    target: cn.TargetOpt = None, address: cn.AddressOpt = None, config: cn.ConfigOpt = None,
    token_file: cn.TokenFileOpt = None, timeout: cn.TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:  # fmt: skip
    """The directory's events (one per line); --follow streams new ones as they happen."""
    seen = 0
    try:
        conn = cn.resolve(target, address, config, token_file, timeout)
        with cn.open_nodes(conn) as nodes:
            client = next(iter(nodes.clients.values()))
            span = duration if duration is not None else (3600.0 * 24 if follow else None)
            stream = client.watch_events(from_seq, follow, timeout_s=span)
            try:
                for e in stream:
                    seen += 1
                    _print_event(e, json_out)
                    if limit and seen >= limit:
                        break
            finally:
                stream.close()
    except KVFabricError as exc:
        raise out.failure(exc) from None
    except ConnectionError as exc:
        raise out.fail(f"cannot reach the fabric: {exc}") from None
    except KeyboardInterrupt:
        pass


def _print_event(e: Any, json_out: bool) -> None:
    tier = e.tier.name if e.tier is not None else ""
    if json_out:
        out.emit_json({"seq": e.seq, "kind": e.kind, "namespace": e.namespace,
                       "hash": e.hash.hex(), "node": e.node_id, "tier": tier or None})
        return
    typer.echo(f"{e.seq:>8} {e.kind:<16} {e.namespace or '-':<28} "
               f"{e.hash[:8].hex() or '-':<16} {out.short(e.node_id) or '-':<12} {tier}")


def register(app: typer.Typer) -> None:
    """Add the commands of this module to ``app``."""
    app.command()(top)
    app.command()(events)
