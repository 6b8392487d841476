"""The per-type policy table and the agent-aware config fields: defaults, parsing, errors."""

from __future__ import annotations

import pytest

from kvfabric.config import load_config
from kvfabric.errors import ConfigError
from kvfabric.tiers.typepolicy import DURABLE_RANK, TypeRule, TypeTable
from kvfabric.types import BlockType, Tier


def test_default_table_matches_the_issue() -> None:
    table = load_config(env={}).type_table
    for durable in (BlockType.SYSTEM_PROMPT, BlockType.TOOL_DEFINITION):
        rule = table.rule(durable)
        assert rule.rank == DURABLE_RANK and rule.replicated and not rule.ephemeral
    assert table.rule(BlockType.REASONING_BRANCH).ephemeral
    assert table.rule(BlockType.EXECUTION_CHECKPOINT).pinned_floor == Tier.CPU
    assert table.rule(BlockType.GENERIC) == TypeRule(rank=3)
    assert table == TypeTable.default()


def test_table_from_environment_and_replication_from_replicate_types() -> None:
    cfg = load_config(env={
        "KVFABRIC_TYPE_POLICIES": "GENERIC:rank=1,ephemeral; EXECUTION_CHECKPOINT:floor=GPU",
        "KVFABRIC_REPLICATE_TYPES": "EXECUTION_CHECKPOINT",
    })  # fmt: skip
    table = cfg.type_table
    assert table.rule(BlockType.GENERIC) == TypeRule(rank=1, ephemeral=True)
    ckpt = table.rule(BlockType.EXECUTION_CHECKPOINT)
    assert ckpt.pinned_floor == Tier.GPU and ckpt.replicated
    assert not table.rule(BlockType.SYSTEM_PROMPT).replicated  # only what replicate_types names
    assert table.rule(BlockType.SYSTEM_PROMPT).rank == DURABLE_RANK  # unnamed types: defaults


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("BOGUS:rank=1", "BOGUS"),
        ("GENERIC:rank=10", "rank"),
        ("GENERIC:rank=x", "rank"),
        ("GENERIC:floor=NVME", "floor"),
        ("GENERIC:sticky", "sticky"),
        ("GENERIC:ephemeral=yes", "ephemeral"),
    ],
)
def test_bad_type_table_names_the_field(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"KVFABRIC_TYPE_POLICIES": spec})
    assert err.value.field == "type_policies" and needle in str(err.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("program_pin_budget_bytes", "-1"),
        ("program_pin_ttl_s", "0"),
        ("tool_lease_default_s", "nan"),
        ("tool_lease_slack", "0.5"),
        ("max_programs", "0"),
    ],
)
def test_agent_fields_are_range_checked(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"KVFABRIC_" + field.upper(): value})
    assert err.value.field == field


def test_agent_fields_take_env_overrides() -> None:
    cfg = load_config(env={"KVFABRIC_PROGRAM_PIN_BUDGET_BYTES": "4MiB",
                           "KVFABRIC_TOOL_LEASE_SLACK": "2", "KVFABRIC_POLICY": "lru"})  # fmt: skip
    assert cfg.program_pin_budget_bytes == 4 << 20 and cfg.tool_lease_slack == 2.0
    assert cfg.policy == "lru"
