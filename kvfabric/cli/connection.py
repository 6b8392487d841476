"""How the admin commands reach the fabric: settings, and one gRPC client per node.

Settings come, in increasing priority, from the ``[client]`` table of a TOML
config file (``--config`` / ``KVFABRIC_CONFIG``; the ``[kvfabric]`` table's
``auth_token`` is used when the client table has no token), ``KVFABRIC_*``
environment variables, and flags:

========================  ===========================  =========================
flag                      environment                  ``[client]`` key
========================  ===========================  =========================
``--target host:port``    ``KVFABRIC_TARGET``          ``target``
``--address``             ``KVFABRIC_RAY_ADDRESS``     ``ray_address``
``--token-file F``        ``KVFABRIC_TOKEN_FILE``      ``token_file``
(none: never a flag)      ``KVFABRIC_TOKEN``           ``token``
(none)                    ``KVFABRIC_TLS_CA``          ``tls_ca``
``--timeout S``           ``KVFABRIC_TIMEOUT_S``       ``timeout_s``
========================  ===========================  =========================

With a target the commands talk to that one node's gRPC API. Without one they
join the Ray cluster (``--address``, default ``auto``) and find every
NodeStore's gRPC address there. The token is sent as a bearer token and never
printed: :meth:`Connection.describe` redacts it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from kvfabric.config import read_toml
from kvfabric.errors import ConfigError, InvalidArgument, NotFound, Unavailable

TargetOpt = Annotated[
    str | None,
    typer.Option("--target", envvar="KVFABRIC_TARGET", show_envvar=True,
                 help="gRPC address of one node (host:port); default: find nodes via Ray"),
]  # fmt: skip
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", envvar="KVFABRIC_RAY_ADDRESS", show_envvar=True,
                 help="Ray cluster to find the nodes in (default: auto)"),
]  # fmt: skip
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", envvar="KVFABRIC_CONFIG", show_envvar=True,
                 help="TOML file with a [client] table"),
]  # fmt: skip
TokenFileOpt = Annotated[
    Path | None,
    typer.Option("--token-file", envvar="KVFABRIC_TOKEN_FILE", show_envvar=True,
                 help="file holding the bearer token (or set KVFABRIC_TOKEN)"),
]  # fmt: skip
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", envvar="KVFABRIC_TIMEOUT_S", show_envvar=True,
                 help="seconds per call (default 30)"),
]  # fmt: skip

_CLIENT_KEYS = {"target", "ray_address", "token", "token_file", "tls_ca", "timeout_s"}


@dataclass(frozen=True)
class Connection:
    """Resolved connection settings (the token is kept out of ``repr``)."""

    target: str | None = None
    ray_address: str | None = None
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    timeout_s: float = 30.0

    def describe(self) -> dict[str, Any]:
        """The settings for display: the token redacted."""
        return {
            "target": self.target, "ray_address": self.ray_address,
            "token": "<redacted>" if self.token else None, "tls_ca": self.tls_ca,
            "timeout_s": self.timeout_s,
        }  # fmt: skip


def _read_table(path: Path) -> tuple[dict[str, Any], str | None]:
    data = read_toml(path)
    table = data.get("client", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [client] must be a table", "config")
    unknown = set(table) - _CLIENT_KEYS
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown [client] key {sorted(unknown)[0]!r}; "
            f"known: {', '.join(sorted(_CLIENT_KEYS))}",
            sorted(unknown)[0],
        )
    node = data.get("kvfabric", {})
    node_token = node.get("auth_token") if isinstance(node, dict) else None
    return table, node_token if isinstance(node_token, str) and node_token else None


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}", "token_file") from None
    if not token or not token.isprintable():
        raise ConfigError(f"token file {path} must hold one printable token", "token_file")
    return token


def resolve(
    target: str | None = None,
    address: str | None = None,
    config: Path | None = None,
    token_file: Path | None = None,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> Connection:
    """Connection settings from flags (given here), environment and config file."""
    environ = os.environ if env is None else env
    table, node_token = _read_table(config) if config is not None else ({}, None)
    token = environ.get("KVFABRIC_TOKEN") or None
    if token_file is not None:
        token = _read_token(str(token_file))
    elif token is None and table.get("token_file"):
        token = _read_token(str(table["token_file"]))
    if token is None:
        token = table.get("token") or node_token
    timeout = timeout_s if timeout_s is not None else table.get("timeout_s", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}",
                          "timeout_s")  # fmt: skip
    tls_ca = environ.get("KVFABRIC_TLS_CA") or table.get("tls_ca")
    chosen = target or table.get("target")
    return Connection(
        target=check_target(str(chosen)) if chosen else None,
        ray_address=address or table.get("ray_address"),
        token=token,
        tls_ca=tls_ca,
        timeout_s=float(timeout),
    )


@dataclass
class Nodes:
    """One client per reachable node, by full node id (sorted)."""

    clients: dict[str, Any]

    def pick(self, node: str | None) -> dict[str, Any]:
        """All nodes, or the one whose id starts with ``node`` (NotFound otherwise)."""
        if node is None:
            return self.clients
        return {self.resolve(node): self.clients[self.resolve(node)]}

    def resolve(self, node: str) -> str:
        """The full id of the node ``node`` names (an id or a unique prefix of one)."""
        hits = [n for n in self.clients if n.startswith(node)] if node else []
        if len(hits) != 1:
            known = ", ".join(n[:12] for n in self.clients)
            what = "unknown" if not hits else "ambiguous"
            raise NotFound(f"{what} node {node!r}; nodes: {known}", "node")
        return hits[0]


def client_for(conn: Connection, target: str) -> Any:
    """A :class:`kvfabric.Client` of the node at ``target`` with these settings."""
    from kvfabric.rpc.client import Client

    root = None
    if conn.tls_ca:
        try:
            root = Path(conn.tls_ca).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --tls-ca {conn.tls_ca}: {exc.strerror}",
                              "tls_ca") from None  # fmt: skip
    return Client(target, token=conn.token, tls_root_cert=root, timeout_s=conn.timeout_s,
                  retries=1)  # fmt: skip


def _discover(conn: Connection) -> dict[str, str]:
    """Node id → gRPC address of every ready NodeStore, found through Ray."""
    import ray

    from kvfabric import cluster

    try:
        cluster.connect(conn.ray_address or "auto")
    except ConnectionError as exc:
        raise Unavailable(
            f"no kvfabric target: give --target host:port, or run where a Ray cluster is "
            f"reachable ({exc})",
            "target",
        ) from None
    found = {}
    for node_id, handle in cluster.node_stores().items():
        info = ray.get(handle.info.remote(), timeout=conn.timeout_s)
        if info.get("rpc_address"):
            found[node_id] = info["rpc_address"]
    if not found:
        raise Unavailable("the Ray cluster runs no kvfabric NodeStore (kvfabric up?)", "target")
    return dict(sorted(found.items()))


@contextmanager
def open_nodes(conn: Connection) -> Iterator[Nodes]:
    """Clients of every node (or of the one ``target``); closed on exit."""
    if conn.target:
        client = client_for(conn, conn.target)
        try:
            clients = {client.stats().node_id: client}
        except BaseException:
            client.close()
            raise
    else:
        clients = {}
        try:
            for node_id, address in _discover(conn).items():
                clients[node_id] = client_for(conn, address)
        except BaseException:
            for c in clients.values():
                c.close()
            raise
    try:
        yield Nodes(clients)
    finally:
        for c in clients.values():
            c.close()


def check_target(value: str) -> str:
    """A ``host:port`` string (InvalidArgument naming ``target`` otherwise)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"--target must be host:port, got {value!r}", "target")
    return value


def check_namespace(nodes: Nodes, namespace: str) -> dict[str, int]:
    """Node id → block bytes of ``namespace`` on the nodes that know it; NotFound if none."""
    known: dict[str, int] = {}
    every: set[str] = set()
    for node_id, client in nodes.clients.items():
        spaces = client.stats().namespaces
        every.update(spaces)
        if namespace in spaces:
            known[node_id] = spaces[namespace]
    if not known:
        listed = ", ".join(sorted(every)[:5]) or "none"
        raise NotFound(
            f"unknown namespace {namespace!r}: no node holds blocks of it (known: {listed})",
            "namespace",
        )
    return known
