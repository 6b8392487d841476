"""The vLLM connector's request parameters and settings: parsing, validation, block types."""

from __future__ import annotations

from typing import Any

import pytest

from kvfabric.connectors.vllm_params import (
    NO_HINTS,
    HintEvent,
    TypedSpan,
    parse_request_hints,
)
from kvfabric.errors import InvalidArgument
from kvfabric.hints import HintKind
from kvfabric.types import BlockType


def kv(**kw: Any) -> dict[str, Any]:
    return {"kvfabric": kw}


def test_absent_parameters_mean_no_hints() -> None:
    assert parse_request_hints(None) is NO_HINTS
    assert parse_request_hints({"other_connector": {"x": 1}}) is NO_HINTS


def test_a_full_request_parses() -> None:
    h = parse_request_hints(kv(
        program_id="agent-1", block_type="system_prompt", ttl_s=60,
        spans=[{"start": 0, "end": 64, "type": "TOOL_DEFINITION"}],
        events=[{"kind": "fork", "children": 3, "targets": ["n1"], "prefix_tokens": 32},
                {"kind": "tool_call_start", "at": "finish", "expected_duration_s": 1.5}],
    ))  # fmt: skip
    assert h.program_id == "agent-1" and h.block_type is BlockType.SYSTEM_PROMPT
    assert h.ttl_s == 60.0 and h.store
    assert not parse_request_hints(kv(store=False)).store
    assert h.spans == (TypedSpan(0, 64, BlockType.TOOL_DEFINITION),)
    assert h.events_at(False) == [HintEvent(HintKind.FORK, children=3, targets=("n1",),
                                            prefix_tokens=32)]  # fmt: skip
    assert h.events_at(True) == [HintEvent(HintKind.TOOL_CALL_START, at_finish=True,
                                           expected_duration_s=1.5)]  # fmt: skip


def test_a_block_takes_the_type_of_the_span_holding_its_first_token() -> None:
    h = parse_request_hints(kv(block_type="REASONING_BRANCH", spans=[
        {"start": 0, "end": 40, "type": "TOOL_DEFINITION"},
        {"start": 64, "end": 96, "type": "EXECUTION_CHECKPOINT"}]))  # fmt: skip
    assert h.block_types(0, 4, 16) == [BlockType.TOOL_DEFINITION, BlockType.TOOL_DEFINITION,
                                       BlockType.TOOL_DEFINITION, BlockType.REASONING_BRANCH]
    assert h.block_types(4, 3, 16) == [BlockType.EXECUTION_CHECKPOINT,
                                       BlockType.EXECUTION_CHECKPOINT,
                                       BlockType.REASONING_BRANCH]  # fmt: skip


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("nope", "kv_transfer_params"),
        ({"kvfabric": []}, "kv_transfer_params.kvfabric"),
        (kv(colour="red"), "kv_transfer_params.kvfabric.colour"),
        (kv(program_id=""), "kv_transfer_params.kvfabric.program_id"),
        (kv(program_id="x" * 129), "kv_transfer_params.kvfabric.program_id"),
        (kv(block_type="HOT"), "kv_transfer_params.kvfabric.block_type"),
        (kv(block_type=3), "kv_transfer_params.kvfabric.block_type"),
        (kv(ttl_s=-1), "kv_transfer_params.kvfabric.ttl_s"),
        (kv(ttl_s=0), "kv_transfer_params.kvfabric.ttl_s"),
        (kv(ttl_s=float("nan")), "kv_transfer_params.kvfabric.ttl_s"),
        (kv(ttl_s=True), "kv_transfer_params.kvfabric.ttl_s"),
        (kv(store="no"), "kv_transfer_params.kvfabric.store"),
        (kv(spans={"start": 0}), "kv_transfer_params.kvfabric.spans"),
        (kv(spans=[{"start": 0, "end": 8}]), "kv_transfer_params.kvfabric.spans[0]"),
        (kv(spans=[{"start": 9, "end": 8, "type": "GENERIC"}]),
         "kv_transfer_params.kvfabric.spans[0].end"),
        (kv(spans=[{"start": -1, "end": 8, "type": "GENERIC"}]),
         "kv_transfer_params.kvfabric.spans[0].start"),
        (kv(spans=[{"start": 0, "end": 8, "type": "GENERIC"}] * 1025),
         "kv_transfer_params.kvfabric.spans"),
        (kv(events=[{"kind": "fork"}]), "kv_transfer_params.kvfabric.program_id"),
        (kv(program_id="p", events=[{"kind": "explode"}]),
         "kv_transfer_params.kvfabric.events[0].kind"),
        (kv(program_id="p", events=[{"kind": "join", "at": "later"}]),
         "kv_transfer_params.kvfabric.events[0].at"),
        (kv(program_id="p", events=[{"kind": "tool_call_start", "expected_duration_s": -2}]),
         "kv_transfer_params.kvfabric.events[0].expected_duration_s"),
        (kv(program_id="p", events=[{"kind": "fork", "children": -1}]),
         "kv_transfer_params.kvfabric.events[0].children"),
        (kv(program_id="p", events=[{"kind": "fork", "targets": [""]}]),
         "kv_transfer_params.kvfabric.events[0].targets"),
        (kv(program_id="p", events=[{"kind": "fork", "prefix_tokens": 0}]),
         "kv_transfer_params.kvfabric.events[0].prefix_tokens"),
        (kv(program_id="p", events=[{"kind": "fork", "when": 1}]),
         "kv_transfer_params.kvfabric.events[0].when"),
        (kv(program_id="p", events=[{"kind": "step_start"}] * 17),
         "kv_transfer_params.kvfabric.events"),
    ],
)  # fmt: skip
def test_bad_parameters_name_their_field(params: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_request_hints(params)
    assert err.value.field == field


def test_connector_settings_validate_the_extra_config() -> None:
    pytest.importorskip("vllm", exc_type=ImportError)
    from kvfabric.connectors.vllm import ConnectorSettings

    s = ConnectorSettings.from_extra({"rpc_address": "127.0.0.1:1", "load_async": "never"})
    assert (s.address, s.load_async, s.timeout_s, s.namespace) == ("127.0.0.1:1", "never",
                                                                   10.0, None)  # fmt: skip
    bad = [({}, "rpc_address"), ({"rpc_address": "nohost"}, "rpc_address"),
           ({"rpc_address": "h:1", "timeout_s": 0}, "timeout_s"),
           ({"rpc_address": "h:1", "timeout_s": "5"}, "timeout_s"),
           ({"rpc_address": "h:1", "load_async": "sometimes"}, "load_async"),
           ({"rpc_address": "h:1", "lookup_timeout_s": -1}, "lookup_timeout_s"),
           ({"rpc_address": "h:1", "namespace": "a/b"}, "namespace"),
           ({"rpc_address": "h:1", "token": "\n"}, "token"),
           ({"rpc_address": "h:1", "rpc_adress": "typo"}, "rpc_adress")]  # fmt: skip
    for extra, key in bad:
        with pytest.raises(InvalidArgument) as err:
            ConnectorSettings.from_extra(extra)
        assert err.value.field == f"kv_connector_extra_config.{key}"


def test_hash_extras_cover_salt_lora_and_multimodal_inputs() -> None:
    pytest.importorskip("vllm", exc_type=ImportError)
    from types import SimpleNamespace

    from kvfabric.connectors.vllm import _extras
    from kvfabric.hashing import ExtraKeys, MMItem, chain_hashes

    plain = SimpleNamespace(cache_salt=None, lora_request=None, mm_features=[])
    assert _extras(plain) is None
    image = SimpleNamespace(identifier="img-1", mm_position=SimpleNamespace(offset=20, length=8))
    req = SimpleNamespace(cache_salt="s", lora_request=SimpleNamespace(lora_name="ad"),
                          mm_features=[image])  # fmt: skip
    extras = _extras(req)
    assert extras == ExtraKeys(cache_salt="s", lora_id="ad", mm_items=(MMItem("img-1", 20, 8),))
    tokens = list(range(64))
    # the image changes the block it lands in (block 1 of 16-token blocks) and all after it
    with_image = chain_hashes(tokens, 16, ExtraKeys(mm_items=(MMItem("img-1", 20, 8),)))
    without = chain_hashes(tokens, 16)
    assert with_image[0] == without[0] and with_image[1] != without[1]


def test_the_breaker_backs_off_after_failures_and_resets_on_success() -> None:
    pytest.importorskip("vllm", exc_type=ImportError)
    from kvfabric.connectors.vllm_worker import Breaker

    now = [100.0]
    b = Breaker(first_s=1.0, cap_s=4.0, clock=lambda: now[0])
    assert b.allow()
    b.failed()
    assert not b.allow()
    now[0] += 1.0
    assert b.allow()
    b.failed()  # 2 s
    now[0] += 1.5
    assert not b.allow()
    b.failed()  # 4 s (capped from here on)
    b.failed()
    now[0] += 3.9
    assert not b.allow()
    now[0] += 0.2
    assert b.allow()
    b.succeeded()
    b.failed()  # back to the first back-off
    now[0] += 1.0
    assert b.allow()
