"""Start and stop the gRPC server of one node: the kvfabric.v1 API plus standard health.

:func:`start_server` binds ``rpc_host:rpc_port`` (port 0 picks a free port),
serves :class:`~kvfabric.rpc.servicer.KVFabricServicer` from a bounded worker
pool with at most ``rpc_max_concurrent`` calls in flight (gRPC itself answers
RESOURCE_EXHAUSTED beyond that), limits messages to ``rpc_max_message_bytes``
both ways, and serves ``grpc.health.v1.Health`` (SERVING for ``""`` and
``kvfabric.v1.KVFabric``, readable without a token). With ``tls_cert_file`` and
``tls_key_file`` it serves TLS; with ``tls_client_ca_file`` as well it
requires client certificates signed by that CA (mutual TLS).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvfabric.config import KVFabricConfig
from kvfabric.errors import ConfigError
from kvfabric.node.service import NodeStoreService
from kvfabric.rpc.auth import Authorizer
from kvfabric.rpc.servicer import KVFabricServicer
from kvfabric.rpc.servicer_data import Watchdog
from kvfabric.rpc.v1 import kvfabric_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = "kvfabric.v1.KVFabric"


def _read(config: KVFabricConfig, field: str) -> bytes:
    """The bytes of the file a config field names; ConfigError naming the field."""
    path = getattr(config, field)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {field} {path}: {exc.strerror}", field) from None
    if not data:
        raise ConfigError(f"{field} {path} is empty", field)
    return data


def server_credentials(config: KVFabricConfig) -> Any | None:
    """TLS credentials from the config, or None when TLS is off."""
    if not config.tls_cert_file:
        return None
    cert = _read(config, "tls_cert_file")
    key = _read(config, "tls_key_file")
    client_ca = _read(config, "tls_client_ca_file") if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _mode(config: KVFabricConfig) -> str:
    if not config.tls_cert_file:
        return "plaintext"
    return "mutual TLS" if config.tls_client_ca_file else "TLS"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class RpcServer:
    """A running gRPC server; ``stop()`` (or leaving the ``with`` block) ends it."""

    def __init__(
        self,
        server: Any,
        executor: ThreadPoolExecutor,
        health_servicer: Any,
        watchdog: Watchdog,
        host: str,
        port: int,
    ) -> None:
        self._server = server
        self._executor = executor
        self._health = health_servicer
        self._watchdog = watchdog
        self._stopped = threading.Event()
        self.port = port
        self.address = _host_port(host, port)

    def stop(self, grace_s: float = 2.0) -> None:
        """Refuse new calls, give running ones ``grace_s`` seconds, then end (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait(timeout=grace_s + 5.0)
        self._watchdog.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("gRPC server on %s stopped", self.address)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops (or ``timeout_s`` passes); True once stopped."""
        return bool(self._server.wait_for_termination(timeout=timeout_s))

    def __enter__(self) -> RpcServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server(service: NodeStoreService, config: KVFabricConfig) -> RpcServer:
    """Serve ``service`` on ``config.rpc_host:config.rpc_port`` and return the running server.

    Raises ConfigError (naming the field) for an unreadable TLS or tokens
    file, or when the address cannot be bound.
    """
    authorizer = Authorizer.from_config(config)
    credentials = server_credentials(config)
    limit = config.rpc_max_message_bytes
    executor = ThreadPoolExecutor(max_workers=config.rpc_workers, thread_name_prefix="kvfabric-rpc")
    server = grpc.server(
        executor,
        maximum_concurrent_rpcs=config.rpc_max_concurrent,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    watchdog = Watchdog()
    server.add_generic_rpc_handlers(
        (_handlers(KVFabricServicer(service, config, authorizer, watchdog)),)
    )
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    target = _host_port(config.rpc_host, config.rpc_port)
    try:
        if credentials is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
    except RuntimeError as exc:
        port = 0
        log.debug("binding %s failed: %s", target, exc)
    if not port:
        executor.shutdown(wait=False)
        raise ConfigError(
            f"cannot listen on {target} (rpc_host/rpc_port): in use or not a local address",
            "rpc_port",
        )
    server.start()
    running = RpcServer(server, executor, health_servicer, watchdog, config.rpc_host, port)
    log.info(
        "gRPC server on %s (%s, %d workers, at most %d calls)",
        running.address,
        _mode(config),
        config.rpc_workers,
        config.rpc_max_concurrent,
    )
    return running


def _serialize(message: Any) -> bytes:
    """Responses are messages, or data chunks already encoded (rpc/chunks.py)."""
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


def _handlers(servicer: Any) -> grpc.GenericRpcHandler:
    """The KVFabric service's handlers, as the generated code builds them, but with a
    serializer that passes pre-encoded chunks through (the generated one would not)."""
    unary: dict[str, Any] = {
        "Lookup": pb.LookupRequest, "Move": pb.MoveRequest, "Pin": pb.PinRequest,
        "Unpin": pb.UnpinRequest, "Evict": pb.EvictRequest, "Prefetch": pb.PrefetchRequest,
        "Annotate": pb.AnnotateRequest, "Hint": pb.HintRequest, "Stats": pb.StatsRequest,
        "ListBlocks": pb.ListBlocksRequest,
    }  # fmt: skip
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=req.FromString,
            response_serializer=_serialize,
        )
        for name, req in unary.items()
    }  # fmt: skip
    handlers["Put"] = grpc.stream_unary_rpc_method_handler(
        servicer.Put, request_deserializer=pb.PutChunk.FromString, response_serializer=_serialize
    )
    for name, req in (("Get", pb.GetRequest), ("WatchEvents", pb.WatchEventsRequest)):
        handlers[name] = grpc.unary_stream_rpc_method_handler(
            getattr(servicer, name), request_deserializer=req.FromString,
            response_serializer=_serialize,
        )  # fmt: skip
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
