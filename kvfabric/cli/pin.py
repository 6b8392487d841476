"""`kvfabric pin` and `kvfabric unpin`: hold a context's blocks in the fabric, or let go.

Pinning a context is the operator's main job: the prompt is tokenized with
the model's own tokenizer, hashed into the canonical chain, and every node
that holds blocks of the chain pins its copies for ``--owner`` (optionally
for ``--ttl``, optionally typing them with ``--type``). The report says how
many blocks of the chain are present, how long a prefix of it is present
(what an engine can reuse), where the pinned copies are, and how many are
missing.

All or nothing: pins are made in batches, node after node; when one is
refused (a pin budget, a node that fails) every pin already made by this
command is released again before the error is reported.
"""

from __future__ import annotations

import getpass
import logging
from typing import Annotated, Any

import typer

from kvfabric.cli import chain as ch
from kvfabric.cli import connection as cn
from kvfabric.cli import render as out
from kvfabric.errors import KVFabricError
from kvfabric.types import BlockType

log = logging.getLogger(__name__)

BATCH = 512
"""Hashes per Pin call (well below the server's rpc_max_chain)."""

NamespaceOpt = Annotated[str, typer.Option("--namespace", "-n", help="namespace id (ns-...)")]
OwnerOpt = Annotated[str | None, typer.Option("--owner", help="pin owner (default cli-USER)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]
NodeOpt = Annotated[str | None, typer.Option("--node", help="only this node (id or prefix)")]


def default_owner() -> str:
    """``cli-<user>``: pins made by hand are recognisable in `kvfabric ls`."""
    try:
        return f"cli-{getpass.getuser()}"
    except Exception:  # no user name in this environment (containers)
        return "cli"


def pin_chain(
    clients: dict[str, Any], chain: ch.Chain, owner: str, ttl_s: float | None,
    block_type: BlockType | None, steps: out.Steps,
) -> dict[str, Any]:  # fmt: skip
    """Pin the chain's blocks on every node holding them; undo everything on a failure."""
    n = len(chain.hashes)
    present = [False] * n
    where: dict[str, int] = {}
    new_bytes = 0
    done: list[tuple[Any, Any]] = []
    try:
        for node_id, client in clients.items():
            for start in range(0, n, BATCH):
                part = chain.hashes[start : start + BATCH]
                r = client.pin(chain.namespace, part, owner, ttl_s)
                done.append((client, part))
                absent = set(r.missing_indexes)
                for j in range(len(part)):
                    present[start + j] = present[start + j] or j not in absent
                where[node_id] = where.get(node_id, 0) + r.pinned
                new_bytes += r.new_bytes
                steps.advance(len(part))
        if block_type is not None:
            for client, part in done:
                client.annotate(chain.namespace, part, block_type=block_type)
    except KVFabricError:
        for client, part in reversed(done):
            try:
                client.unpin(chain.namespace, part, owner)
            except KVFabricError as exc:  # report the first error; this one is logged
                log.warning("releasing pins after a failure failed: %s", exc)
        raise
    prefix = next((i for i, p in enumerate(present) if not p), n)
    return {
        "namespace": chain.namespace, "owner": owner, "ttl_s": ttl_s,
        "type": block_type.name if block_type else None, "tokens": chain.tokens,
        "chain_blocks": n, "present": sum(present), "missing": n - sum(present),
        "prefix_present": prefix, "pinned": {k: v for k, v in where.items() if v},
        "new_bytes": new_bytes,
    }  # fmt: skip


def pin(
    namespace: NamespaceOpt,
    text_file: ch.TextFileOpt = None,
    tokenizer: ch.TokenizerOpt = None,
    token_ids: ch.TokenIdsOpt = None,
    hashes: ch.HashesOpt = None,
    block_size: ch.BlockSizeOpt = None,
    cache_salt: ch.SaltOpt = None,
    lora_id: ch.LoraOpt = None,
    special_tokens: ch.SpecialOpt = True,
    block_type: Annotated[
        str | None, typer.Option("--type", help="also set the blocks' type (SYSTEM_PROMPT, ...)")
    ] = None,
    ttl: Annotated[str | None, typer.Option("--ttl", help="pin lifetime: 90s, 15m, 1h, 2d")] = None,
    owner: OwnerOpt = None,
    node: NodeOpt = None,
    target: cn.TargetOpt = None,
    address: cn.AddressOpt = None,
    config: cn.ConfigOpt = None,
    token_file: cn.TokenFileOpt = None,
    timeout: cn.TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Pin a context's blocks (a prompt, token ids or hashes) wherever they are stored."""
    ttl_s = out.parse_duration(ttl)
    kind = out.parse_enum(block_type, BlockType, "--type")
    src = ch.ChainSource(text_file, tokenizer, token_ids, hashes, block_size, cache_salt,
                         lora_id, special_tokens)  # fmt: skip
    chain = ch.prepare(namespace, src)
    who = owner or default_owner()
    try:
        conn = cn.resolve(target, address, config, token_file, timeout)
        with cn.open_nodes(conn) as nodes:
            clients = nodes.pick(node)
            known = cn.check_namespace(cn.Nodes(clients), namespace)
            holders = {k: v for k, v in clients.items() if k in known}
            total = len(chain.hashes) * len(holders)
            with out.progress("pinning", total, enabled=not json_out and total > BATCH) as steps:
                report = pin_chain(holders, chain, who, ttl_s, kind, steps)
    except KVFabricError as exc:
        raise out.failure(exc) from None
    except ConnectionError as exc:
        raise out.fail(f"cannot reach the fabric: {exc}") from None
    if report["present"] == 0:
        raise out.fail(f"none of the {report['chain_blocks']} blocks of the chain is stored in "
                       f"namespace {namespace}: nothing pinned")  # fmt: skip
    if json_out:
        out.emit_json(report)
        return
    rows = [(out.short(k), v) for k, v in sorted(report["pinned"].items())]
    out.print_table(f"pinned for {who}", ["node", "blocks pinned"], rows)
    typer.echo(
        f"{report['present']} of {report['chain_blocks']} blocks present "
        f"(prefix {report['prefix_present']}), {report['missing']} missing; "
        f"{out.human_bytes(report['new_bytes'])} newly pinned"
        + (f"; ttl {ttl_s:.0f} s" if ttl_s else "")
    )


def unpin(
    namespace: NamespaceOpt,
    text_file: ch.TextFileOpt = None,
    tokenizer: ch.TokenizerOpt = None,
    token_ids: ch.TokenIdsOpt = None,
    hashes: ch.HashesOpt = None,
    block_size: ch.BlockSizeOpt = None,
    cache_salt: ch.SaltOpt = None,
    lora_id: ch.LoraOpt = None,
    special_tokens: ch.SpecialOpt = True,
    owner: OwnerOpt = None,
    node: NodeOpt = None,
    target: cn.TargetOpt = None,
    address: cn.AddressOpt = None,
    config: cn.ConfigOpt = None,
    token_file: cn.TokenFileOpt = None,
    timeout: cn.TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Release one pin of the owner on each block of a context, on every node."""
    src = ch.ChainSource(text_file, tokenizer, token_ids, hashes, block_size, cache_salt,
                         lora_id, special_tokens)  # fmt: skip
    chain = ch.prepare(namespace, src)
    who = owner or default_owner()
    released: dict[str, int] = {}
    try:
        conn = cn.resolve(target, address, config, token_file, timeout)
        with cn.open_nodes(conn) as nodes:
            clients = nodes.pick(node)
            known = cn.check_namespace(cn.Nodes(clients), namespace)
            for node_id in known:
                for part in out.batches(chain.hashes, BATCH):
                    n = clients[node_id].unpin(namespace, part, who)
                    released[node_id] = released.get(node_id, 0) + n
    except KVFabricError as exc:
        raise out.failure(exc) from None
    except ConnectionError as exc:
        raise out.fail(f"cannot reach the fabric: {exc}") from None
    report = {"namespace": namespace, "owner": who, "chain_blocks": len(chain.hashes),
              "released": released}  # fmt: skip
    if json_out:
        out.emit_json(report)
        return
    typer.echo(f"released {sum(released.values())} pins of {who} on {len(chain.hashes)} blocks")


def register(app: typer.Typer) -> None:
    """Add the commands of this module to ``app``."""
    app.command()(pin)
    app.command()(unpin)
