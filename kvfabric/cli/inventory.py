"""`kvfabric ls` and `kvfabric stats`: what the nodes hold, block by block or in sum.

`ls` pages through the blocks of every node (node by node, in node id order;
within a node by namespace and hash), filtered by namespace, program, type,
tier and node. Its page token is ``<node id>@<the node's own token>``, so the
next page picks up on the node where this one stopped.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kvfabric.cli import connection as cn
from kvfabric.cli import render as out
from kvfabric.cli.pin import JsonOpt, NodeOpt
from kvfabric.errors import InvalidArgument, KVFabricError, NotFound
from kvfabric.types import BlockType, Tier


def _split_token(token: str) -> tuple[str, str]:
    node, sep, rest = token.partition("@")
    if not sep or not node:
        raise InvalidArgument("--page-token must be a token printed by a previous `ls`",
                              "page_token")  # fmt: skip
    return node, rest


def list_page(
    clients: dict[str, Any], filters: dict[str, Any], size: int, token: str
) -> tuple[list[tuple[str, Any]], str]:
    """Up to ``size`` (node id, block) pairs after ``token``, and the next token ("" at the end).

    NotFound when a namespace filter names a namespace no visited node knows.
    """
    order = sorted(clients)
    node_id, inner = (order[0], "") if not token else _split_token(token)
    if node_id not in clients:
        raise InvalidArgument(f"--page-token names node {node_id[:12]}, which is not listed",
                              "page_token")  # fmt: skip
    rows: list[tuple[str, Any]] = []
    i, visited, unknown = order.index(node_id), 0, 0
    while i < len(order) and len(rows) < size:
        nid = order[i]
        try:
            page = clients[nid].list_blocks(page_size=size - len(rows), page_token=inner,
                                            **filters)  # fmt: skip
        except NotFound:
            page = None
            unknown += 1  # this node never saw the namespace
        if page is not None:
            rows.extend((nid, b) for b in page.blocks)
            if page.next_page_token:
                inner = page.next_page_token
                continue  # more on this node (the loop ends if the page is full)
        visited += 1
        i, inner = i + 1, ""
    if not rows and unknown and unknown == visited and filters.get("namespace"):
        raise NotFound(f"unknown namespace {filters['namespace']!r}: no node holds blocks of it",
                       "namespace")  # fmt: skip
    return rows, "" if i >= len(order) else f"{order[i]}@{inner}"


def ls(
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="namespace id")] = None,
    program: Annotated[str | None, typer.Option("--program", help="program id")] = None,
    block_type: Annotated[str | None, typer.Option("--type", help="semantic type")] = None,
    tier: Annotated[str | None, typer.Option("--tier", help="GPU, CPU or DISK")] = None,
    node: NodeOpt = None,
    page_size: Annotated[int, typer.Option("--page-size", min=1, max=1000)] = 50,
    page_token: Annotated[str, typer.Option("--page-token", help="from the last page")] = "",
    all_pages: Annotated[bool, typer.Option("--all", help="every page, not just one")] = False,
    target: cn.TargetOpt = None, address: cn.AddressOpt = None, config: cn.ConfigOpt = None,
    token_file: cn.TokenFileOpt = None, timeout: cn.TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:  # fmt: skip
    """List stored blocks, filtered and paged (node, namespace, hash, tier, type, pins...)."""
    filters = {"namespace": namespace, "program_id": program,
               "block_type": out.parse_enum(block_type, BlockType, "--type"),
               "tier": out.parse_enum(tier, Tier, "--tier")}  # fmt: skip
    rows: list[tuple[str, Any]] = []
    try:
        conn = cn.resolve(target, address, config, token_file, timeout)
        with cn.open_nodes(conn) as nodes:
            clients = nodes.pick(node)
            token = page_token
            while True:
                got, token = list_page(clients, filters, page_size, token)
                rows.extend(got)
                if not all_pages or not token:
                    break
    except KVFabricError as exc:
        raise out.failure(exc) from None
    except ConnectionError as exc:
        raise out.fail(f"cannot reach the fabric: {exc}") from None
    blocks = [{"node": n, "namespace": b.namespace, "hash": b.hash.hex(),
               "tier": b.tier.name if b.tier is not None else None,
               "type": b.block_type.name if b.block_type else None, "program": b.program_id,
               "size": b.size, "pins": b.pins, "owners": list(b.pin_owners),
               "idle_s": round(b.idle_s, 3), "accesses": b.access_count}
              for n, b in rows]  # fmt: skip
    if json_out:
        out.emit_json({"blocks": blocks, "next_page_token": token})
        return
    head = ["node", "namespace", "hash", "tier", "type", "program", "size", "pins", "owners",
            "idle"]  # fmt: skip
    table = [[out.short(b["node"]), b["namespace"], b["hash"][:12], b["tier"] or "-",
              b["type"] or "-", b["program"] or "-", out.human_bytes(b["size"]), b["pins"],
              ",".join(b["owners"]) or "-", f"{b['idle_s']:.0f}s"] for b in blocks]  # fmt: skip
    # Columns that say nothing here are left out, so the table fits an 80-column terminal:
    # the namespace when filtered by it (the title names it), the program when none is set.
    drop = [i for i, useless in ((5, not any(b["program"] for b in blocks)), (1, bool(namespace)))
            if useless]  # fmt: skip
    for i in drop:
        head.pop(i)
        for row in table:
            row.pop(i)
    title = f"{len(blocks)} blocks" + (f" of {namespace}" if namespace else "")
    out.print_table(title, head, table, keep=("node", "hash"))  # what a later command needs
    if token:
        typer.echo(f"more: --page-token {token}")


def stats(
    node: NodeOpt = None,
    target: cn.TargetOpt = None, address: cn.AddressOpt = None, config: cn.ConfigOpt = None,
    token_file: cn.TokenFileOpt = None, timeout: cn.TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:  # fmt: skip
    """Each node's tiers, bytes by type, pins and counters."""
    try:
        conn = cn.resolve(target, address, config, token_file, timeout)
        with cn.open_nodes(conn) as nodes:
            got = {n: c.stats() for n, c in nodes.pick(node).items()}
    except KVFabricError as exc:
        raise out.failure(exc) from None
    except ConnectionError as exc:
        raise out.fail(f"cannot reach the fabric: {exc}") from None
    report = {n: {"address": s.address,
                  "tiers": {t.tier.name: {"blocks": t.blocks, "used_bytes": t.used_bytes,
                                          "capacity_bytes": t.capacity_bytes} for t in s.tiers},
                  "blocks_by_type": s.blocks_by_type, "bytes_by_type": s.bytes_by_type,
                  "pinned_bytes": s.pinned_bytes, "pinned_blocks": s.pinned_blocks,
                  "namespaces": s.namespaces, "counters": s.counters}
              for n, s in got.items()}  # fmt: skip
    if json_out:
        out.emit_json({"nodes": report})
        return
    for n, r in report.items():
        rows = [(name, t["blocks"], out.human_bytes(t["used_bytes"]),
                 out.human_bytes(t["capacity_bytes"])) for name, t in r["tiers"].items()]
        rows += [(f"type {k}", r["blocks_by_type"].get(k, 0), out.human_bytes(v), "-")
                 for k, v in sorted(r["bytes_by_type"].items())]
        rows.append(("pinned", r["pinned_blocks"], out.human_bytes(r["pinned_bytes"]), "-"))
        out.print_table(f"node {out.short(n)} ({r['address']})",
                        ["", "blocks", "used", "capacity"], rows)  # fmt: skip
        counters = [(k, v) for k, v in sorted(r["counters"].items()) if v]
        out.print_table("counters", ["counter", "value"], counters)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to ``app``."""
    app.command()(ls)
    app.command()(stats)
