"""Unit tests of kvfabric.hashing: golden vectors, chain invariants, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfabric.errors import FailedPrecondition, InvalidArgument, KVFabricError
from kvfabric.hashing import (
    ROOT_HASH,
    ExtraKeys,
    MMItem,
    NamespaceSpec,
    SelfTestResult,
    chain_hashes,
    format_chain,
    namespace_id,
    parse_token_list,
    require_selftest,
    run_selftest,
)
from kvfabric.types import BLOCK_HASH_BYTES, BlockHash, validate_namespace

REPO = Path(__file__).resolve().parents[2]
TEST_GOLDEN = REPO / "tests" / "golden" / "hash_vectors.json"
PACKAGE_GOLDEN = REPO / "kvfabric" / "hashing" / "golden.json"

FAST = settings(max_examples=60, deadline=None)
token_ids = st.integers(min_value=0, max_value=2**32 - 1)
token_lists = st.lists(token_ids, max_size=160)
block_sizes = st.integers(min_value=1, max_value=24)


def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(TEST_GOLDEN.read_text("utf-8"))
    return data


def case(name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in golden()["chains"] if c["name"] == name)
    return found


# --- golden vectors ------------------------------------------------------------------


def test_selftest_passes_on_packaged_vectors() -> None:
    result = run_selftest()
    assert result == SelfTestResult(True, result.checked, [])
    assert result.checked == 1 + len(golden()["chains"]) + len(golden()["namespaces"])
    assert require_selftest().ok


def test_selftest_passes_on_test_copy_of_vectors() -> None:
    assert run_selftest(TEST_GOLDEN).ok


def test_packaged_golden_file_equals_test_golden_file() -> None:
    assert PACKAGE_GOLDEN.read_bytes() == TEST_GOLDEN.read_bytes()


def test_golden_covers_the_required_cases() -> None:
    data = golden()
    chains = data["chains"]
    assert {c["block_size"] for c in chains} >= {1, 16, 128}
    assert any(c["tokens"] == [] for c in chains)
    assert any(2**32 - 1 in c["tokens"] for c in chains)
    assert any(len(c["tokens"]) % c["block_size"] for c in chains)
    assert any(c.get("parent") for c in chains)
    extras = [c.get("extras") or {} for c in chains]
    assert any(e.get("cache_salt") for e in extras)
    assert any(e.get("lora_id") for e in extras)
    assert any(e.get("mm_items") for e in extras)
    assert len(data["namespaces"]) >= 3


def test_selftest_reports_a_mismatch(tmp_path: Path) -> None:
    data = golden()
    data["chains"][3]["hashes"][1] = "00" * 32
    data["namespaces"][0]["id"] = "ns-" + "0" * 24
    bad = tmp_path / "vectors.json"
    bad.write_text(json.dumps(data), "utf-8")
    result = run_selftest(bad)
    assert not result.ok
    assert len(result.failures) == 2
    assert "block 1" in result.failures[0]
    with pytest.raises(FailedPrecondition, match="self-test failed") as info:
        require_selftest(bad)
    assert isinstance(info.value, KVFabricError)


def test_selftest_reports_an_unreadable_file(tmp_path: Path) -> None:
    result = run_selftest(tmp_path / "missing.json")
    assert not result.ok and result.checked == 0
    with pytest.raises(FailedPrecondition):
        require_selftest(tmp_path / "missing.json")


# --- independent, hand-built vectors ---------------------------------------------------


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32, person=b"kvfabric-blk-v1").digest()


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def test_root_hash_is_the_documented_constant() -> None:
    assert _h(b"kvfabric/v1/root") == ROOT_HASH
    assert ROOT_HASH.hex() == golden()["root"]
    assert len(ROOT_HASH) == BLOCK_HASH_BYTES


def test_hand_built_plain_vector() -> None:
    c = case("token-ids-near-max")
    tokens = c["tokens"]
    h0 = _h(ROOT_HASH + _u32(4) + b"".join(_u32(t) for t in tokens[:4]))
    h1 = _h(h0 + _u32(4) + b"".join(_u32(t) for t in tokens[4:8]))
    assert [h0.hex(), h1.hex()] == c["hashes"]


def test_hand_built_salt_and_multimodal_vector() -> None:
    c = case("multimodal-across-blocks")
    tokens = c["tokens"]
    salt = _tlv(0x01, b"tenant-a")
    # Item "sha256:9f2c4a" covers tokens 10..39: six tokens of block 0, all of block 1,
    # eight of block 2. Item "img-b" covers 40..47, inside block 2.
    mm_a = b"sha256:9f2c4a"
    block0 = salt + _tlv(0x03, _u32(10) + _u32(0) + _u32(6) + mm_a)
    block1 = _tlv(0x03, _u32(0) + _u32(6) + _u32(16) + mm_a)
    block2 = _tlv(0x03, _u32(0) + _u32(22) + _u32(8) + mm_a) + _tlv(
        0x03, _u32(8) + _u32(0) + _u32(8) + b"img-b"
    )
    block3 = b""
    prev: bytes = ROOT_HASH
    expected = []
    for i, extra in enumerate((block0, block1, block2, block3)):
        body = b"".join(_u32(t) for t in tokens[i * 16 : (i + 1) * 16])
        prev = _h(prev + _u32(16) + body + extra)
        expected.append(prev.hex())
    assert expected == c["hashes"]


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _u32(len(value)) + value


def test_hand_built_namespace_id() -> None:
    fields = [
        (0x01, b"meta-llama/Llama-3.1-8B-Instruct"),
        (0x02, b""),
        (0x03, b""),
        (0x04, b""),
        (0x05, _u32(16)),
        (0x06, _u32(0)),
        (0x07, _u32(1)),
        (0x08, b""),
    ]
    raw = b"kvfabric/v1/ns" + b"".join(_tlv(t, v) for t, v in fields)
    digest = hashlib.blake2b(raw, digest_size=12, person=b"kvfabric-ns-v1").hexdigest()
    spec = NamespaceSpec(model="meta-llama/Llama-3.1-8B-Instruct", block_size=16)
    assert namespace_id(spec) == "ns-" + digest
    assert golden()["namespaces"][0]["id"] == "ns-" + digest


# --- chain properties ------------------------------------------------------------------


@FAST
@given(tokens=token_lists, bs=block_sizes)
def test_only_full_blocks_get_hashes(tokens: list[int], bs: int) -> None:
    hashes = chain_hashes(tokens, bs)
    assert len(hashes) == len(tokens) // bs
    assert all(len(h) == BLOCK_HASH_BYTES for h in hashes)


@FAST
@given(tokens=token_lists, bs=block_sizes, data=st.data())
def test_prefix_property(tokens: list[int], bs: int, data: st.DataObject) -> None:
    full = chain_hashes(tokens, bs)
    k = data.draw(st.integers(min_value=0, max_value=len(full)))
    assert chain_hashes(tokens[: k * bs], bs) == full[:k]
    # Extra trailing tokens that do not fill a block change nothing.
    assert chain_hashes(tokens[: k * bs + bs - 1], bs) == full[:k]


mm_items = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=12),
        st.integers(min_value=0, max_value=200),
        st.integers(min_value=1, max_value=60),
    ),
    max_size=4,
)
extra_keys = st.builds(
    ExtraKeys,
    cache_salt=st.none() | st.text(max_size=10),
    lora_id=st.none() | st.text(max_size=10),
    mm_items=mm_items,
)


@FAST
@given(tokens=token_lists, bs=block_sizes, extras=st.none() | extra_keys, data=st.data())
def test_continuation_with_parent_equals_one_shot(
    tokens: list[int], bs: int, extras: ExtraKeys | None, data: st.DataObject
) -> None:
    full = chain_hashes(tokens, bs, extras)
    k = data.draw(st.integers(min_value=1, max_value=max(1, len(full))))
    if k > len(full):
        return
    rest = chain_hashes(tokens[k * bs :], bs, extras, parent=full[k - 1], start=k * bs)
    assert rest == full[k:]


@FAST
@given(tokens=st.lists(token_ids, min_size=1, max_size=160), bs=block_sizes, data=st.data())
def test_single_token_change_changes_that_block_and_all_later(
    tokens: list[int], bs: int, data: st.DataObject
) -> None:
    if len(tokens) < bs:
        return
    full = chain_hashes(tokens, bs)
    pos = data.draw(st.integers(min_value=0, max_value=len(full) * bs - 1))
    new = data.draw(token_ids.filter(lambda t: t != tokens[pos]))
    changed = chain_hashes([*tokens[:pos], new, *tokens[pos + 1 :]], bs)
    block = pos // bs
    assert changed[:block] == full[:block]
    assert all(a != b for a, b in zip(changed[block:], full[block:], strict=True))


@FAST
@given(tokens=st.lists(token_ids, min_size=32, max_size=96), salt=st.text(min_size=1))
def test_salt_and_lora_change_every_hash(tokens: list[int], salt: str) -> None:
    plain = chain_hashes(tokens, 16)
    salted = chain_hashes(tokens, 16, ExtraKeys(cache_salt=salt))
    lora = chain_hashes(tokens, 16, ExtraKeys(lora_id=salt))
    other_salt = chain_hashes(tokens, 16, ExtraKeys(cache_salt=salt + "x"))
    for variant in (salted, lora, other_salt):
        assert all(a != b for a, b in zip(plain, variant, strict=True))
    # Salt and LoRA id carry distinct tags: the same text in one or the other differs.
    assert all(a != b for a, b in zip(salted, lora, strict=True))
    assert all(a != b for a, b in zip(salted, other_salt, strict=True))


def test_multimodal_items_change_exactly_the_overlapped_blocks_onward() -> None:
    tokens = list(range(80))
    plain = chain_hashes(tokens, 16)
    img = chain_hashes(tokens, 16, ExtraKeys(mm_items=(MMItem("img-a", 20, 20),)))
    other = chain_hashes(tokens, 16, ExtraKeys(mm_items=(MMItem("img-b", 20, 20),)))
    shifted = chain_hashes(tokens, 16, ExtraKeys(mm_items=(MMItem("img-a", 21, 20),)))
    assert img[0] == plain[0]
    assert all(a != b for a, b in zip(img[1:], plain[1:], strict=True))
    assert all(a != b for a, b in zip(img[1:], other[1:], strict=True))
    assert all(a != b for a, b in zip(img[1:], shifted[1:], strict=True))
    # Past the hashed range an item changes nothing.
    beyond = chain_hashes(tokens, 16, ExtraKeys(mm_items=(MMItem("img-a", 80, 5),)))
    assert beyond == plain


def test_extra_keys_are_canonical() -> None:
    a = ExtraKeys(mm_items=(MMItem("x", 3, 4), MMItem("y", 1, 2)))
    b = ExtraKeys(mm_items=[("y", 1, 2), ("x", 3, 4)])  # type: ignore[arg-type]
    assert a == b
    assert ExtraKeys(cache_salt="", lora_id="") == ExtraKeys()
    assert chain_hashes(range(32), 16, ExtraKeys()) == chain_hashes(range(32), 16)


def test_salt_applies_only_without_parent() -> None:
    tokens = list(range(32))
    full = chain_hashes(tokens, 16, ExtraKeys(cache_salt="s"))
    cont = chain_hashes(tokens[16:], 16, ExtraKeys(cache_salt="other"), full[0], start=16)
    assert cont == full[1:]


@FAST
@given(tokens=token_lists, bs=block_sizes)
def test_list_numpy_and_array_inputs_agree(tokens: list[int], bs: int) -> None:
    want = chain_hashes(tokens, bs)
    assert chain_hashes(np.array(tokens, dtype=np.uint32), bs) == want
    assert chain_hashes(np.array(tokens, dtype=np.int64), bs) == want
    assert chain_hashes(np.array(tokens, dtype=np.uint64), bs) == want
    assert chain_hashes(array("I", tokens), bs) == want
    assert chain_hashes(tuple(tokens), bs) == want


def test_determinism_across_processes() -> None:
    code = (
        "from kvfabric.hashing import chain_hashes, ExtraKeys, MMItem, NamespaceSpec, "
        "namespace_id\n"
        "e = ExtraKeys(cache_salt='s\\u00e9l', lora_id='l', mm_items=(MMItem('im', 5, 30),))\n"
        "print(','.join(h.hex() for h in chain_hashes(list(range(100)), 16, e)))\n"
        "print(namespace_id(NamespaceSpec('m', 16, dtype='fp8', tp_rank=1, tp_size=2)))\n"
    )
    e = ExtraKeys(cache_salt="s\u00e9l", lora_id="l", mm_items=(MMItem("im", 5, 30),))
    here = ",".join(h.hex() for h in chain_hashes(list(range(100)), 16, e)) + "\n"
    here += namespace_id(NamespaceSpec("m", 16, dtype="fp8", tp_rank=1, tp_size=2)) + "\n"
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout == here


# --- bad input -------------------------------------------------------------------------


def _any(value: object) -> Any:
    """Pass a deliberately ill-typed value past the type checker."""
    return value


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: chain_hashes([1, -1], 1), "tokens"),
        (lambda: chain_hashes([2**32], 1), "tokens"),
        (lambda: chain_hashes([2**64], 1), "tokens"),
        (lambda: chain_hashes(np.array([-5], dtype=np.int32), 1), "tokens"),
        (lambda: chain_hashes(_any([1.5, 2.0]), 1), "tokens"),
        (lambda: chain_hashes(_any([[1, 2]]), 1), "tokens"),
        (lambda: chain_hashes(_any("12"), 1), "tokens"),
        (lambda: chain_hashes([1], 0), "block_size"),
        (lambda: chain_hashes([1], 65537), "block_size"),
        (lambda: chain_hashes([1], True), "block_size"),
        (lambda: chain_hashes([1], _any(16.0)), "block_size"),
        (lambda: chain_hashes([1], 1, _any({"cache_salt": "x"})), "extras"),
        (lambda: chain_hashes([1], 1, None, _any(b"short")), "parent"),
        (lambda: chain_hashes([1], 1, None, None, start=16), "start"),
        (lambda: chain_hashes([1], 4, None, ROOT_HASH, start=6), "start"),
        (lambda: ExtraKeys(cache_salt=_any(5)), "cache_salt"),
        (lambda: ExtraKeys(lora_id=_any(b"x")), "lora_id"),
        (lambda: ExtraKeys(cache_salt="\ud800"), "cache_salt"),
        (lambda: ExtraKeys(mm_items=_any("abc")), "mm_items"),
        (lambda: ExtraKeys(mm_items=_any([("h", 0)])), "mm_items"),
        (lambda: ExtraKeys(mm_items=_any([("h", -1, 3)])), "mm_items"),
        (lambda: MMItem("", 0, 1), "content_hash"),
        (lambda: MMItem("h", -1, 1), "start_token"),
        (lambda: MMItem("h", 0, 0), "num_tokens"),
        (lambda: MMItem("h", 0, 2**32), "num_tokens"),
        (lambda: NamespaceSpec("", 16), "model"),
        (lambda: NamespaceSpec(_any(7), 16), "model"),
        (lambda: NamespaceSpec("m" * 257, 16), "model"),
        (lambda: NamespaceSpec("m", 0), "block_size"),
        (lambda: NamespaceSpec("m", 65537), "block_size"),
        (lambda: NamespaceSpec("m", 16, revision="r" * 257), "revision"),
        (lambda: NamespaceSpec("m", 16, dtype=_any(None)), "dtype"),
        (lambda: NamespaceSpec("m", 16, kv_layout=_any(1)), "kv_layout"),
        (lambda: NamespaceSpec("m", 16, layer_group="g" * 300), "layer_group"),
        (lambda: NamespaceSpec("m", 16, tp_rank=2, tp_size=2), "tp_rank"),
        (lambda: NamespaceSpec("m", 16, tp_rank=-1), "tp_rank"),
        (lambda: NamespaceSpec("m", 16, tp_size=0), "tp_size"),
        (lambda: namespace_id(_any("ns")), "spec"),
        (lambda: parse_token_list("1,2,x"), "tokens"),
        (lambda: parse_token_list("1 -2"), "tokens"),
        (lambda: parse_token_list("4294967296"), "tokens"),
        (lambda: parse_token_list("1.0"), "tokens"),
    ],
)
def test_bad_input_names_the_field(call: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        call()
    assert info.value.field == field


# --- namespaces, formatting, parsing ------------------------------------------------------


def test_namespace_ids_are_valid_and_distinct() -> None:
    base = NamespaceSpec(model="m", block_size=16)
    variants = [
        base,
        NamespaceSpec("m", 32),
        NamespaceSpec("m2", 16),
        NamespaceSpec("m", 16, revision="r"),
        NamespaceSpec("m", 16, dtype="bf16"),
        NamespaceSpec("m", 16, kv_layout="HND"),
        NamespaceSpec("m", 16, tp_size=2),
        NamespaceSpec("m", 16, tp_rank=1, tp_size=2),
        NamespaceSpec("m", 16, layer_group="swa"),
        # Field boundaries are length-prefixed: moving text between fields differs.
        NamespaceSpec("m", 16, revision="bf16"),
    ]
    ids = [namespace_id(v) for v in variants]
    assert len(set(ids)) == len(ids)
    for ns in ids:
        assert validate_namespace(ns) == ns
        assert ns.startswith("ns-") and len(ns) == 27
    assert namespace_id(NamespaceSpec("m", np.int64(16))) == ids[0]  # type: ignore[arg-type]


def test_format_chain_and_parse_token_list() -> None:
    hashes = chain_hashes([1, 2, 3, 4], 2)
    hexes = format_chain(hashes)
    assert hexes == [h.hex() for h in hashes]
    assert all(len(x) == 64 for x in hexes)
    assert [BlockHash(bytes.fromhex(x)) for x in hexes] == hashes
    assert parse_token_list("1,2,3") == [1, 2, 3]
    assert parse_token_list(" 1, 2 ,3\n4\t5\n") == [1, 2, 3, 4, 5]
    assert parse_token_list("") == []
    assert parse_token_list("4294967295") == [2**32 - 1]


def test_throughput_of_a_2000_token_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    tokens = list(np.random.default_rng(0).integers(0, 152064, size=2000))
    as_ints = [int(t) for t in tokens]
    chain_hashes(as_ints, 16)
    rounds = 200
    t0 = time.perf_counter()
    for _ in range(rounds):
        hashes = chain_hashes(as_ints, 16)
    per_chain = (time.perf_counter() - t0) / rounds
    with capsys.disabled():
        print(
            f"\n[hashing] 2000-token prompt, block_size 16: {per_chain * 1e6:.0f} us per chain, "
            f"{len(hashes) / per_chain:,.0f} block hashes/s"
        )
