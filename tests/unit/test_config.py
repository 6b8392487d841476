"""Config: defaults, file, environment, overrides, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvfabric.config import GiB, KVFabricConfig, MiB, load_config
from kvfabric.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = load_config(env={})
    assert cfg == KVFabricConfig()
    assert cfg.cpu_arena_bytes == GiB and cfg.policy == "program"


def test_priority_file_env_override(tmp_path: Path) -> None:
    f = tmp_path / "kvfabric.toml"
    f.write_text('[kvfabric]\ncpu_arena_bytes = "256MiB"\ndisk_bytes = "2GiB"\npolicy = "lru"\n')
    cfg = load_config(
        f, env={"KVFABRIC_DISK_BYTES": "3 GiB", "KVFABRIC_CPU_PREFAULT": "no"},
        overrides={"status_interval_s": "2.5"},
    )  # fmt: skip
    assert cfg.cpu_arena_bytes == 256 * MiB
    assert cfg.disk_bytes == 3 * GiB
    assert cfg.cpu_prefault is False
    assert cfg.status_interval_s == 2.5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu_arena_bytes", "12"),
        ("cpu_arena_bytes", "lots"),
        ("cpu_arena_bytes", "-5"),
        ("disk_sync_interval_s", "nan"),
        ("disk_sync_interval_s", "-1"),
        ("cpu_prefault", "maybe"),
        ("gpu_device", "2048"),
        ("max_block_bytes", "32MiB"),  # larger than the 16 MiB slab
        ("cpu_arena_shm_name", "../etc/passwd"),
    ],
)
def test_bad_values_name_the_field(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"KVFABRIC_" + field.upper(): value})
    assert err.value.field == field
    assert field in str(err.value)


def test_unknown_field_and_bad_toml(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("cpu_arena_bites = 5\n")
    with pytest.raises(ConfigError, match="cpu_arena_bites"):
        load_config(f, env={})
    f.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", env={})


def test_range_error_message_gives_the_range() -> None:
    with pytest.raises(ConfigError) as err:
        KVFabricConfig(cpu_arena_bytes=1)
    assert "allowed range" in str(err.value) and "bytes" in str(err.value)
