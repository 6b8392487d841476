"""The one typed, frozen configuration of a kvfabric node.

Values come, in increasing priority, from the embedded defaults, an optional
TOML file (``[kvfabric]`` table or top level), ``KVFABRIC_<FIELD>`` environment
variables, and explicit overrides. Every value is checked against its allowed
range; a bad value raises :class:`ConfigError` naming the field and the range.
Byte sizes accept plain integers or units: ``"512MiB"``, ``"2 GiB"``, ``"64k"``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kvfabric.errors import ConfigError
from kvfabric.tiers.typepolicy import DEFAULT_SPEC as DEFAULT_TYPE_SPEC
from kvfabric.tiers.typepolicy import TypeTable
from kvfabric.types import BlockType

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
ENV_PREFIX = "KVFABRIC_"

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": KiB, "kib": KiB,
    "m": MiB, "mb": MiB, "mib": MiB,
    "g": GiB, "gb": GiB, "gib": GiB,
    "t": TiB, "tb": TiB, "tib": TiB,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def _bounded(lo: float, hi: float, unit: str = "", doc: str = "") -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "unit": unit, "doc": doc}


@dataclass(frozen=True)
class KVFabricConfig:
    """Configuration of one node store; see ``docs/`` and the README for each field."""

    data_dir: str = field(default=".kvfabric", metadata={"doc": "where the disk tier lives"})
    cpu_arena_bytes: int = field(
        default=1 * GiB, metadata=_bounded(64 * KiB, 4 * TiB, "bytes", "host arena size")
    )
    cpu_slab_bytes: int = field(
        default=16 * MiB, metadata=_bounded(4 * KiB, 4 * GiB, "bytes", "slab size of the arena")
    )
    cpu_arena_shm_name: str = field(
        default="",
        metadata={"doc": "name of the /dev/shm segment backing the arena (empty: private)"},
    )
    cpu_prefault: bool = field(default=True, metadata={"doc": "touch every arena page at start"})
    local_channel: bool = field(
        default=True,
        metadata={"doc": "serve co-located clients through the shared-memory arena "
                  "(the arena gets a per-node /dev/shm name unless cpu_arena_shm_name is set)"},
    )  # fmt: skip
    local_max_connections: int = field(
        default=64, metadata=_bounded(1, 4096, "connections", "local-channel clients at once")
    )
    local_max_leases: int = field(
        default=64,
        metadata=_bounded(1, 65536, "leases", "open read leases + write reservations per client"),
    )
    local_lease_timeout_s: float = field(
        default=30.0,
        metadata=_bounded(0.05, 3600.0, "seconds", "when an unreleased lease or slot is reclaimed"),
    )
    gpu_bytes: int = field(
        default=0, metadata=_bounded(0, 4 * TiB, "bytes", "GPU tier size (0 disables)")
    )
    gpu_device: int = field(default=0, metadata=_bounded(0, 1023, "", "CUDA device index"))
    disk_enabled: bool = field(default=True, metadata={"doc": "use the LMDB disk tier"})
    disk_bytes: int = field(
        default=8 * GiB, metadata=_bounded(1 * MiB, 256 * TiB, "bytes", "LMDB map size")
    )
    disk_sync_interval_s: float = field(
        default=1.0, metadata=_bounded(0.0, 3600.0, "seconds", "LMDB fsync period")
    )
    max_block_bytes: int = field(
        default=16 * MiB, metadata=_bounded(1, 4 * GiB, "bytes", "largest block accepted")
    )
    pin_budget_bytes: int = field(
        default=512 * MiB,
        metadata=_bounded(0, 256 * TiB, "bytes", "bytes one namespace may hold pinned"),
    )
    max_pin_ttl_s: float = field(
        default=7 * 24 * 3600.0,
        metadata=_bounded(1.0, 365 * 24 * 3600.0, "seconds", "longest pin TTL"),
    )
    policy: str = field(default="program", metadata={"doc": "eviction policy name in the registry"})
    type_policies: str = field(
        default=DEFAULT_TYPE_SPEC,
        metadata={"doc": "per-type policy table 'TYPE:rank=N,ephemeral,floor=TIER;...'"},
    )
    program_pin_budget_bytes: int = field(
        default=128 * MiB,
        metadata=_bounded(0, 256 * TiB, "bytes", "bytes one program may hold pinned"),
    )
    program_pin_ttl_s: float = field(
        default=3600.0,
        metadata=_bounded(1.0, 365 * 24 * 3600.0, "seconds", "TTL of a fork's prefix pin"),
    )
    tool_lease_default_s: float = field(
        default=30.0,
        metadata=_bounded(0.0, 7 * 24 * 3600.0, "seconds", "lease of a tool call, no estimate"),
    )
    tool_lease_slack: float = field(
        default=1.5, metadata=_bounded(1.0, 100.0, "", "lease = expected tool duration x slack")
    )
    max_programs: int = field(
        default=100_000, metadata=_bounded(1, 1 << 24, "programs", "programs a node tracks at once")
    )
    status_interval_s: float = field(
        default=5.0, metadata=_bounded(0.1, 3600.0, "seconds", "status line period of `up`")
    )

    transport: str = field(default="auto", metadata={"doc": "data plane: auto, tcp or nixl"})
    data_host: str = field(
        default="", metadata={"doc": "address the data plane listens on (empty: the node's IP)"}
    )
    claim_timeout_s: float = field(
        default=30.0, metadata=_bounded(0.1, 3600.0, "seconds", "when a dead writer's claim ends")
    )
    node_check_interval_s: float = field(
        default=1.0, metadata=_bounded(0.05, 60.0, "seconds", "directory liveness check period")
    )
    rpc_timeout_s: float = field(
        default=60.0, metadata=_bounded(0.1, 3600.0, "seconds", "timeout of every remote call")
    )
    replicate_types: str = field(
        default="TOOL_DEFINITION,SYSTEM_PROMPT",
        metadata={"doc": "block types copied to every node"},
    )
    join_push_blocks: int = field(
        default=1024, metadata=_bounded(0, 1 << 24, "blocks", "hot blocks pushed to a new node")
    )
    metrics_interval_s: float = field(
        default=2.0,
        metadata=_bounded(0.1, 3600.0, "seconds", "how often actors export kvfabric_* metrics"),
    )
    directory_snapshot_every: int = field(
        default=10_000, metadata=_bounded(10, 1 << 30, "events", "events between snapshots")
    )

    rpc_host: str = field(default="127.0.0.1", metadata={"doc": "address the gRPC API listens on"})
    rpc_port: int = field(
        default=0, metadata=_bounded(0, 65535, "", "gRPC port (0: any free port)")
    )
    rpc_workers: int = field(default=16, metadata=_bounded(1, 1024, "threads", "gRPC worker pool"))
    rpc_max_concurrent: int = field(
        default=64, metadata=_bounded(1, 100_000, "calls", "concurrent gRPC calls (and streams)")
    )
    rpc_max_chain: int = field(
        default=4096, metadata=_bounded(1, 1 << 20, "hashes", "hashes in one gRPC call")
    )
    rpc_chunk_bytes: int = field(
        default=4 * MiB, metadata=_bounded(4 * KiB, 64 * MiB, "bytes", "streamed chunk size")
    )
    rpc_max_message_bytes: int = field(
        default=8 * MiB, metadata=_bounded(64 * KiB, 1 * GiB, "bytes", "largest gRPC message")
    )
    rpc_max_deadline_s: float = field(
        default=600.0, metadata=_bounded(0.1, 86400.0, "seconds", "longest call the server runs")
    )
    auth_token: str = field(
        default="",
        metadata={"doc": "bearer token for every namespace (empty: auth off)", "secret": True},
    )
    auth_tokens_file: str = field(
        default="", metadata={"doc": "JSON file: token -> list of namespaces or '*'"}
    )
    auth_reads: bool = field(default=False, metadata={"doc": "reads need a token too"})
    tls_cert_file: str = field(default="", metadata={"doc": "server certificate (PEM): TLS on"})
    tls_key_file: str = field(default="", metadata={"doc": "server private key (PEM)"})
    tls_client_ca_file: str = field(
        default="", metadata={"doc": "CA of client certificates (PEM): mutual TLS"}
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if "lo" in f.metadata:
                lo, hi, unit = f.metadata["lo"], f.metadata["hi"], f.metadata["unit"]
                if not lo <= value <= hi:
                    raise ConfigError(
                        f"config field {f.name}={value!r} is outside the allowed range "
                        f"[{lo}, {hi}] {unit}".rstrip(),
                        f.name,
                    )
        if self.cpu_slab_bytes > self.cpu_arena_bytes:
            raise ConfigError(
                f"config field cpu_slab_bytes={self.cpu_slab_bytes} must not exceed "
                f"cpu_arena_bytes={self.cpu_arena_bytes}",
                "cpu_slab_bytes",
            )
        if self.max_block_bytes > self.cpu_slab_bytes:
            raise ConfigError(
                f"config field max_block_bytes={self.max_block_bytes} must not exceed "
                f"cpu_slab_bytes={self.cpu_slab_bytes} (a block lives in one slab)",
                "max_block_bytes",
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError(
                "config fields tls_cert_file and tls_key_file must be set together", "tls_key_file"
            )
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("tls_client_ca_file needs tls_cert_file", "tls_client_ca_file")
        if self.transport not in ("auto", "tcp", "nixl"):
            raise ConfigError(
                f"config field transport={self.transport!r} must be auto, tcp or nixl", "transport"
            )
        for name in filter(None, (t.strip() for t in self.replicate_types.split(","))):
            if name not in BlockType.__members__:
                raise ConfigError(
                    f"config field replicate_types names unknown block type {name!r}; known: "
                    f"{', '.join(BlockType.__members__)}",
                    "replicate_types",
                )
        if not self.policy:
            raise ConfigError("config field policy must name a registered policy", "policy")
        _ = self.type_table  # parses type_policies: ConfigError naming the field when bad
        if self.cpu_arena_shm_name and not re.fullmatch(
            r"[A-Za-z0-9_.-]{1,200}", self.cpu_arena_shm_name
        ):
            raise ConfigError(
                "config field cpu_arena_shm_name may hold only letters, digits, '_', '.', '-'",
                "cpu_arena_shm_name",
            )

    @property
    def type_table(self) -> TypeTable:
        """The per-type policy table (type_policies plus replicate_types)."""
        return TypeTable.from_config(self.type_policies, self.replicated_types)

    @property
    def replicated_types(self) -> frozenset[BlockType]:
        """Block types copied to every node."""
        names = (t.strip() for t in self.replicate_types.split(","))
        return frozenset(BlockType[n] for n in names if n)

    def for_node(self, node_id: str) -> KVFabricConfig:
        """This config with the data directory of one node (several nodes may share a disk)."""
        return self.replace(data_dir=str(Path(self.data_dir) / f"node-{node_id[:16]}"))

    @property
    def directory_path(self) -> Path:
        """Where the directory keeps its event log and snapshots."""
        return Path(self.data_dir) / "directory"

    @property
    def disk_path(self) -> Path:
        """The LMDB environment directory of this node."""
        return Path(self.data_dir) / "disk"

    def replace(self, **changes: Any) -> KVFabricConfig:
        """A copy with ``changes`` applied (and validated)."""
        return load_config(overrides=changes, base=self, env={})

    def describe(self) -> dict[str, Any]:
        """Field → value, for `kvfabric doctor` and status output; secrets are redacted."""
        out = dataclasses.asdict(self)
        for f in fields(self):
            if f.metadata.get("secret") and out[f.name]:
                out[f.name] = "<redacted>"
        return out


def _coerce(name: str, kind: type, raw: Any) -> Any:
    """Convert a value from a file, the environment or a flag to the field's type."""
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError(raw)
            if isinstance(raw, int):
                return raw
            match = _SIZE_RE.match(str(raw))
            if not match or match.group(2).lower() not in _UNITS:
                raise ValueError(raw)
            return int(match.group(1)) * _UNITS[match.group(2).lower()]
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            value = float(raw)
            if value != value:  # NaN never satisfies a range
                raise ValueError(raw)
            return value
        if not isinstance(raw, str):
            raise ValueError(raw)
        return raw
    except (ValueError, TypeError):
        raise ConfigError(
            f"config field {name}={raw!r} is not a valid {kind.__name__}", name
        ) from None


_FIELD_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML config file's contents; ConfigError (field ``config``) if unreadable or invalid."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", "config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", "config") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    base: KVFabricConfig | None = None,
) -> KVFabricConfig:
    """Build a validated config from defaults, a TOML file, the environment and overrides."""
    kinds = {f.name: _FIELD_TYPES[str(f.type)] for f in fields(KVFabricConfig)}
    values: dict[str, Any] = dataclasses.asdict(base) if base else {}
    if path is not None:
        data = read_toml(path)
        table = data.get("kvfabric", data)
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [kvfabric] must be a table", "config")
        for name, raw in table.items():
            if name not in kinds:
                raise ConfigError(f"config file {path}: unknown field {name!r}", name)
            values[name] = _coerce(name, kinds[name], raw)
    environ = os.environ if env is None else env
    for name, kind in kinds.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, kind, raw)
    for name, raw in (overrides or {}).items():
        if name not in kinds:
            raise ConfigError(f"unknown config field {name!r}", name)
        values[name] = _coerce(name, kinds[name], raw)
    return KVFabricConfig(**values)
