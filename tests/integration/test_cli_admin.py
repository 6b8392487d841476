"""The admin CLI against a real two-node fabric on Ray: typer's runner, then real subprocesses.

One fabric for the module (two Ray nodes, a NodeStore each, the directory).
Blocks are put over gRPC with the canonical hashes of known token ids, so
every command is checked against what the store really holds (``ls --json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from typer.testing import CliRunner  # noqa: E402

from kvfabric import cluster as kvcluster  # noqa: E402
from kvfabric.cli.app import app  # noqa: E402
from kvfabric.config import load_config  # noqa: E402
from kvfabric.hashing import chain_hashes, format_chain  # noqa: E402
from kvfabric.localray import private_ray_cluster  # noqa: E402
from kvfabric.rpc.client import Client  # noqa: E402
from tests.integration._tokenizer import BOS, build_tokenizer, words  # noqa: E402

pytestmark = pytest.mark.timeout(900)

NS = "ns-cli-admin"
BS = 4  # tokens per block
B = 64 * 1024  # bytes per block
KVFABRIC = [sys.executable, "-m", "kvfabric.cli.app"]
runner = CliRunner()


@dataclass
class Fabric:
    tmp: str
    gcs: str
    nodes: list[str]  # node ids, sorted
    rpc: dict[str, str]  # node id -> gRPC address

    def client(self, i: int) -> Client:
        return Client(self.rpc[self.nodes[i]])


@pytest.fixture(scope="module")
def fab() -> Iterator[Fabric]:
    with private_ray_cluster(2, resources=[{"node_a": 1}, {"node_b": 1}]) as local:
        config = load_config(
            overrides={
                "data_dir": os.path.join(local.tmp, "data"), "cpu_arena_bytes": "8MiB",
                "cpu_slab_bytes": "1MiB", "max_block_bytes": "1MiB", "disk_bytes": "64MiB",
                "cpu_prefault": False, "node_check_interval_s": 0.2,
                "pin_budget_bytes": 5 * B, "metrics_interval_s": 0.5,
            },
            env={},
        )  # fmt: skip
        up = kvcluster.up(config, local.cluster.address, timeout_s=120)
        rpc = {n: i["rpc_address"] for n, i in up["nodes"].items()}
        yield Fabric(local.tmp, local.cluster.address, sorted(rpc), rpc)


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def ids_of(tag: str, n_tokens: int) -> list[int]:
    """Deterministic token ids (4..511) for a test's own chain."""
    seed = int(hashlib.blake2b(tag.encode(), digest_size=4).hexdigest(), 16)
    return [4 + (seed + 13 * i) % 500 for i in range(n_tokens)]


def put_chain(fab: Fabric, ids: list[int], blocks: int, node: int = 0) -> list[bytes]:
    """Store the first ``blocks`` blocks of the chain of ``ids`` on one node; all hashes."""
    hashes = [bytes(h) for h in chain_hashes(ids, BS)]
    datas = [hashlib.blake2b(h, digest_size=32).digest() * (B // 32) for h in hashes[:blocks]]
    with fab.client(node) as c:
        c.put(NS, hashes[:blocks], datas)
    return hashes


def run(*args: Any, code: int = 0) -> Any:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"{args}: exit {res.exit_code}\n{res.stdout}\n{res.stderr}"
    return res


def js(*args: Any) -> Any:
    return json.loads(run(*args, "--json").stdout.strip().splitlines()[-1])


def listed(**filters: str) -> dict[str, list[dict[str, Any]]]:
    """hash hex -> the ls entries of that block (one per node holding it)."""
    args = ["ls", "-n", NS, "--all"] + [x for k, v in filters.items() for x in (f"--{k}", v)]
    out: dict[str, list[dict[str, Any]]] = {}
    for b in js(*args)["blocks"]:
        out.setdefault(b["hash"], []).append(b)
    return out


def hash_file(path: Path, hashes: list[bytes]) -> Path:
    path.write_text("\n".join(format_chain(hashes)) + "\n")
    return path


def test_status_lists_both_nodes_ready_and_serving(fab: Fabric) -> None:
    report = js("status")
    assert sorted(report["nodes"]) == fab.nodes and report["seq"] > 0
    assert all(n["ready"] and n["healthy"] for n in report["nodes"].values())
    text = run("status").stdout
    assert "directory seq" in text and text.count("SERVING") >= 2 and "CPU" in text


def test_pin_a_prompt_with_the_models_own_tokenizer(fab: Fabric, tokdir: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    body = ids_of("prompt", 15)
    hashes = put_chain(fab, [BOS, *body], blocks=3)  # 16 tokens = 4 blocks; 3 stored
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(words(body))
    args = ["pin", "-n", NS, "--text-file", prompt, "--tokenizer", tokdir, "--block-size", BS]
    rep = js(*args, "--owner", "ops", "--ttl", "1h")
    assert (rep["tokens"], rep["chain_blocks"], rep["present"]) == (16, 4, 3)
    assert (rep["missing"], rep["prefix_present"]) == (1, 3)
    assert rep["pinned"] == {fab.nodes[0]: 3} and rep["new_bytes"] == 3 * B
    blocks = listed()
    for h in hashes[:3]:
        assert [(b["pins"], b["owners"]) for b in blocks[h.hex()]] == [(1, ["ops"])]
    assert hashes[3].hex() not in blocks
    # The engine adds BOS; without it the chain is another one: nothing of it is stored.
    res = run(*args, "--no-special-tokens", code=1)
    assert "nothing pinned" in res.stderr
    assert js("unpin", "-n", NS, "--text-file", prompt, "--tokenizer", tokdir,
              "--block-size", BS, "--owner", "ops")["released"] == {fab.nodes[0]: 3}  # fmt: skip
    assert all(listed()[h.hex()][0]["pins"] == 0 for h in hashes[:3])


def test_pin_by_token_ids_and_hash_file_with_a_type(fab: Fabric, tmp_path: Path) -> None:
    ids = ids_of("typed", 8)
    hashes = put_chain(fab, ids, blocks=2)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(",".join(map(str, ids)))
    rep = js("pin", "-n", NS, "--token-ids", ids_file, "--block-size", BS,
             "--type", "system_prompt", "--owner", "a")  # fmt: skip
    assert rep["present"] == 2 and rep["type"] == "SYSTEM_PROMPT"
    printed = run("hash", "--block-size", BS, "--tokens-file", ids_file).stdout.split()
    assert printed == [h.hex() for h in hashes]
    hf = tmp_path / "h.txt"
    hf.write_text("\n".join(printed))
    assert js("pin", "-n", NS, "--hashes", hf, "--owner", "b")["present"] == 2
    typed = listed(type="SYSTEM_PROMPT")
    assert {h.hex() for h in hashes} <= set(typed)
    assert all(typed[h.hex()][0]["owners"] == ["a", "b"] for h in hashes)
    for owner in ("a", "b"):
        run("unpin", "-n", NS, "--hashes", hf, "--owner", owner)


def snapshot() -> tuple[Any, ...]:
    """What the store holds, pins included (access times left out: reads may touch them)."""
    blocks = js("ls", "--all")["blocks"]
    state = sorted((b["node"], b["namespace"], b["hash"], b["tier"], b["type"], b["pins"],
                    tuple(b["owners"])) for b in blocks)  # fmt: skip
    return tuple(state), js("status")["seq"]


def test_bad_input_is_one_line_exit_1_and_changes_nothing(
    fab: Fabric, tokdir: Path, tmp_path: Path
) -> None:
    kept = put_chain(fab, ids_of("keep", 8), blocks=2)
    run("pin", "-n", NS, "--hashes", hash_file(tmp_path / "k.txt", kept), "--owner", "keep")
    big = put_chain(fab, ids_of("budget", 24), blocks=6)  # 6 blocks > 5-block budget
    # a chain on both nodes, and the second node's budget nearly used: its pin fails
    # after the first node's succeeded, which must be undone
    both = put_chain(fab, ids_of("both", 12), blocks=3)
    ray.get(ray.get_actor(kvcluster.node_actor_name(fab.nodes[1]),
                          namespace="kvfabric").get.remote(NS, both))  # fmt: skip
    fill = put_chain(fab, ids_of("fill", 12), blocks=3, node=1)
    run("pin", "-n", NS, "--hashes", hash_file(tmp_path / "f.txt", fill), "--owner", "fill")
    good = hash_file(tmp_path / "good.txt", kept)
    bad_ids = tmp_path / "bad_ids.txt"
    bad_ids.write_text("1 2 3 four 5")
    bad_hashes = tmp_path / "bad_h.txt"
    bad_hashes.write_text(kept[0].hex() + "\nnot-a-hash\n")
    text = tmp_path / "t.txt"
    text.write_text("w5 w6 w7 w8")
    cases = [
        (["pin", "-n", "ns-nosuch", "--hashes", good], "unknown namespace"),
        (["pin", "-n", NS, "--text-file", text, "--tokenizer", tmp_path / "nodir",
          "--block-size", BS], "tokenizer directory"),
        (["pin", "-n", NS, "--token-ids", bad_ids, "--block-size", BS], "token-ids"),
        (["pin", "-n", NS, "--hashes", bad_hashes], "line 2"),
        (["pin", "-n", NS, "--hashes", hash_file(tmp_path / "big.txt", big)], "pin budget"),
        (["move", "-n", NS, "--hashes", good, "--to-node", "ffffffffff"], "unknown node"),
        (["evict", "-n", NS, "--hashes", good], "pinned"),
        (["ls", "-n", "ns-nosuch"], "unknown namespace"),
    ]  # fmt: skip
    before = snapshot()
    for args, problem in cases:
        res = run(*args, code=1)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], (
            args, res.stderr)  # fmt: skip
        assert snapshot() == before, f"{args} changed the store"
    # Refused on the second node after the first one pinned: undone. The pins are as they
    # were; the directory's log has the pin and its release (so its seq moved on).
    res = run("pin", "-n", NS, "--hashes", hash_file(tmp_path / "both.txt", both), code=1)
    assert "pin budget" in res.stderr and res.stderr.count("\n") == 1
    assert snapshot()[0] == before[0]
    before = snapshot()
    usage = [
        ["pin", "-n", NS],
        ["pin", "-n", NS, "--hashes", good, "--token-ids", bad_ids],
        ["pin", "-n", NS, "--hashes", good, "--ttl", "1w"],
        ["pin", "-n", NS, "--hashes", good, "--type", "PROMPT"],
        ["move", "-n", NS, "--hashes", good],
        ["prefetch", "-n", NS, "--hashes", good],  # two nodes: which one?
        ["nosuchcommand"],
    ]
    for args in usage:
        run(*args, code=2)
    assert snapshot() == before


def test_move_between_tiers_and_to_another_node(fab: Fabric, tmp_path: Path) -> None:
    hashes = put_chain(fab, ids_of("move", 12), blocks=3)
    hf = hash_file(tmp_path / "m.txt", hashes)
    rep = js("move", "-n", NS, "--hashes", hf, "--to-tier", "disk")
    assert rep["nodes"][fab.nodes[0]]["moved"] == 3
    on_disk = listed(tier="DISK")
    assert all([b["node"] for b in on_disk[h.hex()]] == [fab.nodes[0]] for h in hashes)
    rep = js("move", "-n", NS, "--hashes", hf, "--to-node", fab.nodes[1][:10])
    assert rep["nodes"][fab.nodes[0]]["copied"] == 3
    after = listed()
    assert all([b["node"] for b in after[h.hex()]] == [fab.nodes[1]] for h in hashes)


def test_prefetch_into_a_node_then_evict_everywhere(fab: Fabric, tmp_path: Path) -> None:
    hashes = put_chain(fab, ids_of("prefetch", 8), blocks=2)
    hf = hash_file(tmp_path / "p.txt", hashes)
    rep = js("prefetch", "-n", NS, "--hashes", hf, "--node", fab.nodes[1][:12])
    assert sum(rep["nodes"][fab.nodes[1]].values()) == 2
    assert all(sorted(b["node"] for b in listed()[h.hex()]) == fab.nodes for h in hashes)
    rep = js("evict", "-n", NS, "--hashes", hf)
    assert {n: c["evicted"] for n, c in rep["nodes"].items()} == {n: 2 for n in fab.nodes}
    assert not {h.hex() for h in hashes} & set(listed())


def test_ls_pages_across_nodes_see_every_block_once(fab: Fabric) -> None:
    put_chain(fab, ids_of("pages-a", 12), blocks=3)
    put_chain(fab, ids_of("pages-b", 12), blocks=3, node=1)
    every = js("ls", "--all")["blocks"]
    seen, token, pages = [], "", 0
    while True:
        page = js("ls", "--page-size", 2, *(["--page-token", token] if token else []))
        seen += page["blocks"]
        token, pages = page["next_page_token"], pages + 1
        if not token or pages > 100:
            break
    key = [(b["node"], b["namespace"], b["hash"]) for b in seen]
    assert key == [(b["node"], b["namespace"], b["hash"]) for b in every]
    assert len(set(key)) == len(key) and {b["node"] for b in seen} == set(fab.nodes)
    table = run("ls", "--page-size", 2).stdout
    assert "more: --page-token" in table and "hash" in table and "tier" in table


def test_stats_top_and_events(fab: Fabric) -> None:
    hashes = put_chain(fab, ids_of("observe", 8), blocks=2)
    with fab.client(0) as c:
        assert c.lookup(NS, hashes, block_tokens=BS).matched == 2
    stats = js("stats")["nodes"]
    mine = stats[fab.nodes[0]]
    assert mine["namespaces"][NS] == B and mine["tiers"]["CPU"]["capacity_bytes"] == 8 << 20
    assert mine["counters"]["hits{op=lookup,tier=CPU}"] >= 2
    assert mine["bytes_by_type"]["GENERIC"] >= 2 * B
    frame = js("top", "--once")["nodes"][fab.nodes[0]]
    assert 0 < frame["hit_rate"] <= 1 and frame["tiers"]["CPU"]["used_bytes"] >= 2 * B
    text = run("top", "--iterations", 2, "--interval", 0.2).stdout
    assert text.count("kvfabric top") == 2 and "hit rate" in text
    lines = run("events", "--limit", 5, "--json").stdout.strip().splitlines()
    seqs = [json.loads(x)["seq"] for x in lines]
    assert len(seqs) == 5 and seqs == sorted(seqs)
    start = js("status")["seq"]
    later = threading.Timer(1.0, put_chain, (fab, ids_of("follow", 4), 1))
    later.start()
    res = run("events", "--follow", "--for", 4, "--from-seq", start, "--limit", 1, "--json")
    later.join()
    event = json.loads(res.stdout.strip().splitlines()[-1])
    assert event["seq"] > start and event["namespace"] == NS


def _env(fab: Fabric) -> dict[str, str]:
    return {**os.environ, "RAY_TMPDIR": fab.tmp, "KVFABRIC_TOKEN": "s3cret-token-xyz",
            "NO_COLOR": "1"}  # fmt: skip


def test_real_subprocesses_exit_codes_and_output(fab: Fabric, tmp_path: Path) -> None:
    hashes = put_chain(fab, ids_of("subprocess", 8), blocks=2)
    hf = hash_file(tmp_path / "s.txt", hashes)
    env = _env(fab)

    def cli(*args: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*KVFABRIC, *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=180)  # fmt: skip

    started = time.monotonic()
    done = cli("pin", "-n", NS, "--hashes", hf, "--address", fab.gcs, "--owner", "sub", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["pinned"] == {fab.nodes[0]: 2}
    rows = cli("ls", "-n", NS, "--target", fab.rpc[fab.nodes[0]])
    assert rows.returncode == 0 and hashes[0].hex()[:12] in rows.stdout
    assert "\x1b[" not in rows.stdout  # no colour codes when not a terminal
    bad = cli("pin", "-n", NS, "--hashes", tmp_path / "missing.txt", "--address", fab.gcs)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "cannot read" in bad.stderr
    assert cli("pin", "-n", NS, "--address", fab.gcs).returncode == 2
    nobody = cli("stats", "--target", "127.0.0.1:1", "--timeout", "2")
    assert nobody.returncode == 1 and nobody.stderr.startswith("error:")
    for out in (done, rows, bad, nobody):
        assert "s3cret-token-xyz" not in out.stdout + out.stderr
    assert cli("unpin", "-n", NS, "--hashes", hf, "--target", fab.rpc[fab.nodes[0]],
               "--owner", "sub").returncode == 0  # fmt: skip
    assert time.monotonic() - started < 170
