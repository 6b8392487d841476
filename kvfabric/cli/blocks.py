"""`kvfabric evict`, `move` and `prefetch`: act on a context's blocks where they are.

Each takes the same block selection as `kvfabric pin` (a prompt, token ids
or hashes), checks it and the namespace before anything changes, and calls
every node holding blocks of the namespace (or the one ``--node``) in
batches, with a progress bar for long work. ``move --to-node`` checks the
destination against the nodes found in the cluster first: an unknown node
changes nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kvfabric.cli import chain as ch
from kvfabric.cli import connection as cn
from kvfabric.cli import render as out
from kvfabric.cli.pin import BATCH, JsonOpt, NamespaceOpt, NodeOpt
from kvfabric.errors import KVFabricError
from kvfabric.types import Tier

TierOpt = Annotated[str | None, typer.Option("--tier", help="GPU, CPU or DISK")]


def _each_batch(
    namespace: str, chain: ch.Chain, clients: dict[str, Any], what: str, enabled: bool,
    call: Any,
) -> dict[str, dict[str, int]]:  # fmt: skip
    """``call(client, hashes)`` per node and batch; per node, the summed result counts."""
    totals: dict[str, dict[str, int]] = {}
    total = len(chain.hashes) * len(clients)
    with out.progress(what, total, enabled=enabled and total > BATCH) as steps:
        for node_id, client in clients.items():
            for part in out.batches(chain.hashes, BATCH):
                got = call(client, part)
                counts = got if isinstance(got, dict) else {"count": int(got)}
                mine = totals.setdefault(node_id, {})
                for k, v in counts.items():
                    mine[k] = mine.get(k, 0) + int(v)
                steps.advance(len(part))
    return totals


def _run(
    namespace: str, src: ch.ChainSource, node: str | None, conn_args: tuple[Any, ...],
    what: str, json_out: bool, action: Any,
) -> dict[str, Any]:  # fmt: skip
    chain = ch.prepare(namespace, src)
    try:
        conn = cn.resolve(*conn_args)
        with cn.open_nodes(conn) as nodes:
            clients = nodes.pick(node)
            known = cn.check_namespace(cn.Nodes(clients), namespace)
            holders = {k: v for k, v in clients.items() if k in known}
            call = action(nodes, conn)
            per_node = _each_batch(namespace, chain, holders, what, not json_out, call)
    except KVFabricError as exc:
        raise out.failure(exc) from None
    except ConnectionError as exc:
        raise out.fail(f"cannot reach the fabric: {exc}") from None
    return {"namespace": namespace, "chain_blocks": len(chain.hashes), "nodes": per_node}


def _print(report: dict[str, Any], title: str, json_out: bool) -> None:
    if json_out:
        out.emit_json(report)
        return
    keys = sorted({k for counts in report["nodes"].values() for k in counts})
    rows = [(out.short(n), *[c.get(k, 0) for k in keys]) for n, c in report["nodes"].items()]
    out.print_table(title, ["node", *keys], rows)


def _moved(r: Any) -> dict[str, int]:
    return {"moved": r.moved, "unchanged": r.unchanged, "missing": r.missing,
            "corrupt": r.corrupt}  # fmt: skip


def evict(
    namespace: NamespaceOpt,
    text_file: ch.TextFileOpt = None, tokenizer: ch.TokenizerOpt = None,
    token_ids: ch.TokenIdsOpt = None, hashes: ch.HashesOpt = None,
    block_size: ch.BlockSizeOpt = None, cache_salt: ch.SaltOpt = None,
    lora_id: ch.LoraOpt = None, special_tokens: ch.SpecialOpt = True,
    node: NodeOpt = None, target: cn.TargetOpt = None, address: cn.AddressOpt = None,
    config: cn.ConfigOpt = None, token_file: cn.TokenFileOpt = None,
    timeout: cn.TimeoutOpt = None, json_out: JsonOpt = False,
) -> None:  # fmt: skip
    """Remove a context's blocks from the nodes (refused on a node where one is pinned)."""
    src = ch.ChainSource(text_file, tokenizer, token_ids, hashes, block_size, cache_salt,
                         lora_id, special_tokens)  # fmt: skip
    report = _run(namespace, src, node, (target, address, config, token_file, timeout),
                  "evicting", json_out,
                  lambda nodes, conn: lambda c, part: {"evicted": c.evict(namespace, part)})
    _print(report, "evicted", json_out)


def move(
    namespace: NamespaceOpt,
    to_tier: Annotated[str | None, typer.Option("--to-tier", help="GPU, CPU or DISK")] = None,
    to_node: Annotated[str | None, typer.Option("--to-node", help="node id or prefix")] = None,
    text_file: ch.TextFileOpt = None, tokenizer: ch.TokenizerOpt = None,
    token_ids: ch.TokenIdsOpt = None, hashes: ch.HashesOpt = None,
    block_size: ch.BlockSizeOpt = None, cache_salt: ch.SaltOpt = None,
    lora_id: ch.LoraOpt = None, special_tokens: ch.SpecialOpt = True,
    node: NodeOpt = None, target: cn.TargetOpt = None, address: cn.AddressOpt = None,
    config: cn.ConfigOpt = None, token_file: cn.TokenFileOpt = None,
    timeout: cn.TimeoutOpt = None, json_out: JsonOpt = False,
) -> None:  # fmt: skip
    """Move a context's blocks to another tier of each node, or to another node."""
    if (to_tier is None) == (to_node is None):
        raise out.usage("give exactly one of --to-tier and --to-node")
    tier = out.parse_enum(to_tier, Tier, "--to-tier")
    src = ch.ChainSource(text_file, tokenizer, token_ids, hashes, block_size, cache_salt,
                         lora_id, special_tokens)  # fmt: skip

    def action(nodes: cn.Nodes, conn: cn.Connection) -> Any:
        if tier is not None:
            return lambda c, part: _moved(c.move(namespace, part, tier=tier))
        # Found through Ray: check the destination here, before anything moves. With one
        # --target, the node's directory checks it (NotFound, nothing copied).
        dest = to_node if conn.target else nodes.resolve(str(to_node))
        return lambda c, part: {"copied": c.move(namespace, part, node_id=dest).moved}

    report = _run(namespace, src, node, (target, address, config, token_file, timeout),
                  "moving", json_out, action)  # fmt: skip
    _print(report, f"moved to {to_tier or to_node}", json_out)


def prefetch(
    namespace: NamespaceOpt,
    tier: TierOpt = None,
    text_file: ch.TextFileOpt = None, tokenizer: ch.TokenizerOpt = None,
    token_ids: ch.TokenIdsOpt = None, hashes: ch.HashesOpt = None,
    block_size: ch.BlockSizeOpt = None, cache_salt: ch.SaltOpt = None,
    lora_id: ch.LoraOpt = None, special_tokens: ch.SpecialOpt = True,
    node: NodeOpt = None, target: cn.TargetOpt = None, address: cn.AddressOpt = None,
    config: cn.ConfigOpt = None, token_file: cn.TokenFileOpt = None,
    timeout: cn.TimeoutOpt = None, json_out: JsonOpt = False,
) -> None:  # fmt: skip
    """Bring a context's blocks into a node's fastest tier (or --tier), pulling absent ones."""
    want = out.parse_enum(tier, Tier, "--tier")
    src = ch.ChainSource(text_file, tokenizer, token_ids, hashes, block_size, cache_salt,
                         lora_id, special_tokens)  # fmt: skip
    chain = ch.prepare(namespace, src)
    try:
        conn = cn.resolve(target, address, config, token_file, timeout)
        with cn.open_nodes(conn) as nodes:
            if node is None and len(nodes.clients) > 1:
                raise out.usage("the fabric has several nodes: say which one with --node")
            clients = nodes.pick(node)
            cn.check_namespace(nodes, namespace)
            per_node = _each_batch(
                namespace, chain, clients, "prefetching", not json_out,
                lambda c, part: _moved(c.prefetch(namespace, part, tier=want)),
            )  # fmt: skip
    except KVFabricError as exc:
        raise out.failure(exc) from None
    except ConnectionError as exc:
        raise out.fail(f"cannot reach the fabric: {exc}") from None
    report = {"namespace": namespace, "chain_blocks": len(chain.hashes), "nodes": per_node}
    _print(report, "prefetched", json_out)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to ``app``."""
    app.command()(evict)
    app.command()(move)
    app.command()(prefetch)
