"""The pure parts of the admin CLI: block selection, listing pages, settings, `top` maths."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from kvfabric.cli import chain as ch
from kvfabric.cli import connection as cn
from kvfabric.cli import render, top
from kvfabric.errors import ConfigError, InvalidArgument
from kvfabric.hashing import ExtraKeys, chain_hashes, format_chain
from kvfabric.node.listing import BlockFilter, list_page, page_token, parse_token
from kvfabric.rpc.client_data import Stats, TierStats
from kvfabric.types import BlockHash, BlockKey, BlockMeta, BlockType, Pin, Tier


def test_hash_file_round_trips_what_kvfabric_hash_prints(tmp_path: Path) -> None:
    hashes = chain_hashes(list(range(12)), 4)
    f = tmp_path / "h.txt"
    f.write_text("# a context\n" + "\n".join(format_chain(hashes)) + "\n\n")
    got = ch.read_chain("ns-a", ch.ChainSource(hashes=f))
    assert got.hashes == tuple(bytes(h) for h in hashes) and got.tokens is None


@pytest.mark.parametrize(
    ("text", "line"),
    [("zz" * 32, 1), ("ab" * 31, 1), (("ab" * 32) + "\n" + "xyz", 2)],
)
def test_malformed_hash_files_name_the_line(tmp_path: Path, text: str, line: int) -> None:
    f = tmp_path / "h.txt"
    f.write_text(text)
    with pytest.raises(InvalidArgument, match=f"line {line}") as err:
        ch.read_chain("ns-a", ch.ChainSource(hashes=f))
    assert err.value.field == "hashes"


def test_token_ids_are_hashed_with_the_extras(tmp_path: Path) -> None:
    f = tmp_path / "ids.txt"
    f.write_text("1, 2 3\n4 5 6 7 8 9")
    src = ch.ChainSource(token_ids=f, block_size=4, cache_salt="s")
    got = ch.read_chain("ns-a", src)
    want = chain_hashes(list(range(1, 10)), 4, ExtraKeys(cache_salt="s"))
    assert got.hashes == tuple(bytes(h) for h in want) and got.tokens == 9
    f.write_text("1 2 x")
    with pytest.raises(InvalidArgument, match="token-ids"):
        ch.read_chain("ns-a", src)
    f.write_text("1 2")
    with pytest.raises(InvalidArgument, match="no full block"):
        ch.read_chain("ns-a", src)


def test_source_combinations_that_are_usage_errors(tmp_path: Path) -> None:
    f = tmp_path / "x"
    assert ch.ChainSource().usage_problem() is not None
    assert ch.ChainSource(hashes=f, token_ids=f).usage_problem() is not None
    assert "--tokenizer" in str(ch.ChainSource(text_file=f, block_size=4).usage_problem())
    assert "--block-size" in str(ch.ChainSource(token_ids=f).usage_problem())
    assert ch.ChainSource(hashes=f).usage_problem() is None


def test_missing_tokenizer_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist") as err:
        ch.tokenize("hello", tmp_path / "nope")
    assert err.value.field == "tokenizer"


def _meta(ns: str, i: int, tier: Tier = Tier.CPU, program: str | None = None) -> BlockMeta:
    m = BlockMeta(BlockKey(ns, BlockHash(bytes([i]) * 32)), 4096, 0, tier, BlockType.GENERIC,
                  program, 0.0, 0.0)  # fmt: skip
    if i % 2:
        m.pins["op"] = Pin("op")
    return m


def test_listing_pages_cover_every_match_once_in_order() -> None:
    metas = [_meta(ns, i, Tier.CPU if i % 3 else Tier.DISK) for ns in ("ns-b", "ns-a")
             for i in range(10)]  # fmt: skip
    seen: list[BlockMeta] = []
    token = ""
    while True:
        page = list_page(metas, BlockFilter(), size=3, after=token)
        seen += page.blocks
        token = page.next_token
        if not token:
            break
    keys = [(m.key.namespace, m.key.hash) for m in seen]
    assert keys == sorted(keys) and len(keys) == 20 == len(set(keys))
    disk = list_page(metas, BlockFilter(namespace="ns-a", tier=Tier.DISK), size=100)
    assert [m.key.hash[0] for m in disk.blocks] == [0, 3, 6, 9] and disk.next_token == ""
    hidden = list_page(metas, BlockFilter(), size=100, allowed=lambda ns: ns == "ns-b")
    assert {m.key.namespace for m in hidden.blocks} == {"ns-b"}


def test_listing_rejects_bad_page_arguments() -> None:
    with pytest.raises(InvalidArgument, match="page_size"):
        list_page([], BlockFilter(), size=1001)
    with pytest.raises(InvalidArgument, match="page_token"):
        parse_token("ns-a/zz")
    m = _meta("ns-a", 4)
    assert parse_token(page_token(m)) == ("ns-a", bytes(m.key.hash))


def test_durations_and_enum_choices() -> None:
    assert render.parse_duration("90") == 90
    assert render.parse_duration("15m") == 900
    assert render.parse_duration("1h") == 3600
    assert render.parse_duration("2d") == 172800
    for bad in ("1w", "-1h", "0", "h"):
        with pytest.raises(typer.BadParameter):
            render.parse_duration(bad)
    assert render.parse_enum("system_prompt", BlockType, "--type") is BlockType.SYSTEM_PROMPT
    with pytest.raises(typer.Exit) as err:
        render.parse_enum("PROMPT", BlockType, "--type")
    assert err.value.exit_code == 2


def test_settings_come_from_flags_then_env_then_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[client]\ntarget = "10.0.0.1:50051"\ntimeout_s = 5\n'
                   '[kvfabric]\nauth_token = "node-secret"\n')  # fmt: skip
    from_file = cn.resolve(config=cfg, env={})
    assert from_file.target == "10.0.0.1:50051" and from_file.timeout_s == 5
    assert from_file.token == "node-secret"
    assert "node-secret" not in repr(from_file) and from_file.describe()["token"] == "<redacted>"
    env = cn.resolve(config=cfg, env={"KVFABRIC_TOKEN": "env-secret"})
    assert env.token == "env-secret"
    tok = tmp_path / "tok"
    tok.write_text("file-secret\n")
    flags = cn.resolve("127.0.0.1:1", config=cfg, token_file=tok, timeout_s=2, env={})
    assert (flags.target, flags.token, flags.timeout_s) == ("127.0.0.1:1", "file-secret", 2)
    with pytest.raises(InvalidArgument, match="host:port"):
        cn.resolve("nohost", env={})
    cfg.write_text('[client]\ntargett = "x"\n')
    with pytest.raises(ConfigError, match="targett"):
        cn.resolve(config=cfg, env={})


def _stats(hits: int, misses: int, sent: int) -> Stats:
    counters = {"hits{op=lookup,tier=CPU}": hits, "misses{op=lookup}": misses,
                "transfer_bytes{transport=tcp,direction=in}": sent}  # fmt: skip
    return Stats("n", "a", (TierStats(Tier.CPU, 2, 8192, 1 << 20),), counters, 4096, 1,
                 {"GENERIC": 2}, {"GENERIC": 8192})  # fmt: skip


def test_top_rates_come_from_two_samples() -> None:
    first = top.summarize(None, _stats(8, 2, 1000), 1.0)
    assert first["hit_rate"] == 0.8 and first["hit_rate_now"] is None
    later = top.summarize(_stats(8, 2, 1000), _stats(10, 10, 5000), 2.0)
    assert later["hit_rate_now"] == pytest.approx(2 / 10)
    assert later["transfers"]["tcp/in"]["bytes_per_s"] == pytest.approx(2000)
    assert later["tiers"]["CPU"]["used_bytes"] == 8192 and later["pinned_blocks"] == 1
