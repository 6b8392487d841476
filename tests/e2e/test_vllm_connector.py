"""The vLLM connector with the real CPU engine, a tiny random model, and a real node.

Each engine runs in its own process (tests/e2e/_engine.py) and is kept up for
the module; the kvfabric node is a real ``kvfabric up --standalone`` process
on 127.0.0.1 whose CPU arena lives in /dev/shm (so a test can corrupt stored
bytes from outside). Outputs are greedy and float32, so "identical" means
token for token. Every engine resets its own prefix cache after each prompt,
so a cached token can only have come from kvfabric.

Engines: ``ref`` (no connector, the reference), ``e1`` (the connector, loads
synchronously from its node, publishes KV events), ``e2`` (a second process
on the same fabric, every load through the asynchronous path).
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", exc_type=ImportError)

from kvfabric.hashing import chain_hashes
from kvfabric.rpc.client import Client
from tests.e2e.harness import Engine, EventSubscriber, StandaloneNode, tokens
from tests.e2e.tiny_model import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BS = 32  # the engines' block size


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def model(work: Path) -> Path:
    return build_tiny_model(work / "tiny")


@pytest.fixture(scope="module")
def node(work: Path) -> Iterator[StandaloneNode]:
    n = StandaloneNode(work / "node", f"kvf-e2e-{os.getpid()}")
    yield n
    n.stop()


@pytest.fixture(scope="module")
def events_endpoint(work: Path) -> str:
    return f"ipc://{work}/kv-events.sock"


@pytest.fixture(scope="module")
def subscriber(events_endpoint: str) -> Iterator[EventSubscriber]:
    s = EventSubscriber(events_endpoint)
    yield s
    s.close()


@pytest.fixture(scope="module")
def ref(model: Path, work: Path) -> Iterator[Engine]:
    e = Engine(model, work, "ref")
    yield e
    e.close()


@pytest.fixture(scope="module")
def e1(model: Path, work: Path, node: StandaloneNode, events_endpoint: str,
       subscriber: EventSubscriber) -> Iterator[Engine]:  # fmt: skip
    e = Engine(model, work, "e1", address=node.address, events=events_endpoint)
    yield e
    e.close()


@pytest.fixture(scope="module")
def e2(model: Path, work: Path, node: StandaloneNode) -> Iterator[Engine]:
    e = Engine(model, work, "e2", address=node.address, load_async="always")
    yield e
    e.close()


def namespace_of(address: str) -> str:
    """The one namespace the engines registered on the node (derived from the model)."""
    import grpc

    from kvfabric.rpc.v1 import kvfabric_pb2 as pb
    from kvfabric.rpc.v1 import kvfabric_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        r = pb_grpc.KVFabricStub(ch).Stats(pb.StatsRequest(), timeout=10)
    names = [n.namespace for n in r.namespaces]
    assert len(names) == 1, names
    return names[0]


def chain(prompt: list[int], blocks: int) -> list[bytes]:
    return [bytes(h) for h in chain_hashes(prompt[: blocks * BS], BS)]


def program(pid: str, **kw: Any) -> dict[str, Any]:
    return {"kvfabric": {"program_id": pid, **kw}}


def test_identical_output_and_external_hits_across_engines(
    ref: Engine, e1: Engine, e2: Engine, node: StandaloneNode
) -> None:
    a = tokens(200, 1)
    ab = a + tokens(40, 77)
    base = [ref.generate(a), ref.generate(ab)]
    params = program("e2e", block_type="SYSTEM_PROMPT")
    first = e1.generate(a, params=params)
    assert first["tokens"] == base[0]["tokens"] and first["cached"] == 0  # nothing stored yet
    again = e1.generate(ab, params=params)
    assert again["tokens"] == base[1]["tokens"]
    assert again["cached"] >= 192  # the 6 full blocks of the first prompt, from kvfabric
    other = e2.generate(ab, params=params)  # a second engine process, asynchronous loads
    assert other["tokens"] == base[1]["tokens"]
    assert other["cached"] == 224  # every usable block: (240 - 1) // 32 * 32
    with Client(node.address) as c:
        assert c.stats().blocks_by_type.get("SYSTEM_PROMPT", 0) >= 7  # the type reached the store


def _pinned(address: str) -> int:
    with Client(address) as c:
        return c.stats().pinned_blocks


def _wait_pinned(address: str, want: int, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (got := _pinned(address)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_react_turns_reuse_every_earlier_turn_and_hints_reach_the_store(
    ref: Engine, e1: Engine, node: StandaloneNode
) -> None:
    tool_defs = tokens(96, 300)  # three blocks of tool definitions
    context = tool_defs + tokens(40, 5)  # + the user's task
    spans = [{"start": 0, "end": 96, "type": "TOOL_DEFINITION"}]
    reusable, turns = 0, 4
    for turn in range(turns):
        first = {"kind": "program_start"} if turn == 0 else {"kind": "tool_call_end"}
        events = [first, {"kind": "step_start", "step": turn},
                  {"kind": "step_end", "step": turn, "at": "finish"}]  # fmt: skip
        if turn < turns - 1:  # the model's answer is a tool call; the tool then runs
            events.append({"kind": "tool_call_start", "at": "finish", "step": turn,
                           "expected_duration_s": 0.5})  # fmt: skip
        want = ref.generate(context)
        got = e1.generate(context, params=program("react-e2e", spans=spans, events=events))
        assert got["tokens"] == want["tokens"], f"turn {turn}"
        usable = (len(context) - 1) // BS * BS
        assert got["cached"] >= min(reusable, usable), f"turn {turn}: {got['cached']}"
        # Saved: every full block of prompt + output whose KV was computed (all but the last).
        reusable = (len(context) + len(got["tokens"]) - 1) // BS * BS
        context = context + got["tokens"] + tokens(24, 1000 + turn)  # the tool's observation
    ns = namespace_of(node.address)
    with Client(node.address) as c:
        assert c.lookup(ns, chain(tool_defs, 3)).matched == 3
        assert c.stats().blocks_by_type.get("TOOL_DEFINITION", 0) >= 3
    # The program forks over its tool definitions: the shared prefix is pinned until the join.
    before = _pinned(node.address)
    fork = {"kind": "fork", "children": 2, "prefix_tokens": 96}
    e1.generate(context, params=program("react-e2e", spans=spans, events=[fork]))
    assert _wait_pinned(node.address, before + 3) == before + 3
    e1.generate(context, params=program("react-e2e", spans=spans, events=[
        {"kind": "join"}, {"kind": "program_end", "at": "finish"}]))  # fmt: skip
    assert _wait_pinned(node.address, before) == before
    log = e1.log.read_text(errors="replace")
    assert "hint not delivered" not in log and "save of" not in log  # every hint was taken


def test_kv_events_announce_the_blocks_saved(e1: Engine, subscriber: EventSubscriber) -> None:
    prompt = tokens(128, 900)
    e1.generate(prompt)
    want = chain(prompt, 4)
    found = subscriber.wait_for(
        lambda e: getattr(e, "medium", None) == "kvfabric"
        and bytes(e.block_hashes[0]) in want
    )  # fmt: skip
    announced = [bytes(h) for e in found for h in e.block_hashes]
    assert set(want) <= set(announced)
    first = next(e for e in found if bytes(e.block_hashes[0]) == want[0])
    assert first.parent_block_hash is None and first.block_size == BS
    assert list(first.token_ids[:BS]) == prompt[:BS]


def test_loaded_kv_is_really_used(
    ref: Engine, e1: Engine, e2: Engine, node: StandaloneNode
) -> None:
    """Negative control: valid-checksum KV of another prompt, stored under this prompt's
    hashes, changes the output — so the engine really computes from loaded KV."""
    real, fake = tokens(160, 2000), tokens(160, 3000)
    e1.generate(real)
    ns = namespace_of(node.address)
    with Client(node.address) as c:
        blocks = c.get(ns, chain(real, 4))
        assert all(b is not None for b in blocks)
        c.put(ns, chain(fake, 4), [b for b in blocks if b is not None])
    want = ref.generate(fake)
    got = e2.generate(fake)
    assert got["cached"] == 128
    assert got["tokens"] != want["tokens"]


def _corrupt_in_arena(shm: Path, block: bytes) -> None:
    with shm.open("r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        at = m.find(block)
        assert at >= 0, "block bytes not found in the node's arena"
        m[at + len(block) // 2] ^= 0xFF


@pytest.mark.parametrize("engine", ["e1", "e2"])
def test_a_corrupt_block_is_caught_and_recomputed(
    engine: str, request: pytest.FixtureRequest, ref: Engine, e1: Engine, node: StandaloneNode
) -> None:
    prompt = tokens(160, 4000 if engine == "e1" else 5000)
    e1.generate(prompt)  # stores 4 full blocks
    ns = namespace_of(node.address)
    hashes = chain(prompt, 4)
    with Client(node.address) as c:
        block = c.get(ns, hashes[2:3])[0]
        assert block is not None
        _corrupt_in_arena(node.shm_path, block)
        before = c.stats().counters.get("checksum_failures", 0)
        got = request.getfixturevalue(engine).generate(prompt)
        assert got["tokens"] == ref.generate(prompt)["tokens"]
        assert c.stats().counters.get("checksum_failures", 0) > before
        # The corrupt copy was dropped, never served; the engine recomputed the block and
        # the connector stored it again, bit for bit what it was (float32, same split).
        assert c.get(ns, hashes[2:3])[0] == block


def test_engines_keep_serving_when_the_fabric_stops_mid_run(
    ref: Engine, e1: Engine, e2: Engine, node: StandaloneNode
) -> None:
    prompt = tokens(200, 1) + tokens(40, 77)  # stored by the first test
    want = ref.generate(prompt)
    node.stop()
    for engine in (e1, e2):
        got = engine.generate(prompt)
        assert got["tokens"] == want["tokens"] and got["cached"] == 0
