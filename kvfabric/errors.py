"""The one error hierarchy of kvfabric.

Every error carries the name of the gRPC status code it maps to, so the RPC
layer converts with ``grpc.StatusCode[err.code]`` and the pure core never
imports gRPC.
"""

from __future__ import annotations


class KVFabricError(Exception):
    """Base of every kvfabric error; ``field`` names the offending input when known."""

    code = "UNKNOWN"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple[type[KVFabricError], tuple[str, str | None]]:
        # Keep the field when the error crosses a process boundary (Ray, multiprocessing).
        return (type(self), (self.message, self.field))


class InvalidArgument(KVFabricError):
    """The caller sent a value outside what the store accepts."""

    code = "INVALID_ARGUMENT"


class ConfigError(InvalidArgument):
    """A configuration value (file, environment or flag) is invalid."""


class NotFound(KVFabricError):
    """The block, namespace or node does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(KVFabricError):
    """The thing being created exists already (e.g. a committed block's claim)."""

    code = "ALREADY_EXISTS"


class ResourceExhausted(KVFabricError):
    """A configured bound (capacity, pin budget, queue depth) would be exceeded."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(KVFabricError):
    """The operation is valid but not in the store's current state (e.g. evict a pinned block)."""

    code = "FAILED_PRECONDITION"


class Unauthenticated(KVFabricError):
    """The caller did not present valid credentials."""

    code = "UNAUTHENTICATED"


class PermissionDenied(KVFabricError):
    """The caller is known but may not touch this namespace."""

    code = "PERMISSION_DENIED"


class Corrupt(KVFabricError):
    """Stored bytes failed their checksum or format check; the block is treated as a miss."""

    code = "DATA_LOSS"


class Unavailable(KVFabricError):
    """A tier, peer or service cannot be reached right now."""

    code = "UNAVAILABLE"


class DeadlineExceeded(KVFabricError):
    """An operation did not finish within its deadline."""

    code = "DEADLINE_EXCEEDED"


BY_CODE: dict[str, type[KVFabricError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, ResourceExhausted, FailedPrecondition,
        Unauthenticated, PermissionDenied, Corrupt, Unavailable, DeadlineExceeded,
    )
}  # fmt: skip
"""The error class of each status-code name (ConfigError shares InvalidArgument's)."""
