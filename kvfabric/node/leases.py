"""Zero-copy access to a node's stored bytes for the data plane.

A :class:`ReadLease` exposes the host buffers of stored blocks so a transport
can send them without an intermediate copy; a :class:`WriteReservation`
exposes reserved host-arena slots so a transport can receive straight into
them. Both are two-phase like the tiers beneath them: bytes received are
published only by :meth:`WriteReservation.commit`, which verifies each
block's checksum first; a lease's buffers are valid until
:meth:`ReadLease.release`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvfabric.node.results import PutResult
from kvfabric.tiers.base import BlockRecord
from kvfabric.types import BlockKey


@dataclass
class ReadLease:
    """Stored blocks leased for sending: ``buffers[i]`` is None where ``keys[i]`` is absent."""

    keys: list[BlockKey]
    buffers: list[memoryview | None]
    checksums: list[int | None]
    records: list[BlockRecord | None]
    _release: Callable[[], None] = field(repr=False, default=lambda: None)
    _done: bool = field(default=False, repr=False)

    def release(self) -> None:
        """End the lease (idempotent); the buffers must not be used afterwards."""
        if not self._done:
            self._done = True
            self._release()

    def __enter__(self) -> ReadLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass
class WriteReservation:
    """Reserved arena slots for incoming blocks.

    ``records`` lists the blocks that need bytes (keys already stored are left
    out and reported in ``present``); ``buffers[i]`` receives ``records[i]``.
    """

    records: list[BlockRecord]
    buffers: list[memoryview]
    present: list[BlockKey]
    _commit: Callable[[list[bool], list[int] | None], list[PutResult | None]] = field(repr=False)
    _abort: Callable[[], None] = field(repr=False)
    _done: bool = field(default=False, repr=False)

    def commit(
        self, received: list[bool] | None = None, checksums: list[int] | None = None
    ) -> list[PutResult | None]:
        """Verify and publish every block marked received; None where it failed its checksum.

        ``checksums`` replaces the records' checksums: a writer that checksums
        while it copies (the local shared-memory path) learns them only now.
        """
        if self._done:
            raise RuntimeError("reservation already committed or aborted")
        self._done = True
        got = received if received is not None else [True] * len(self.records)
        return self._commit(got, checksums)

    def abort(self) -> None:
        """Release every slot; nothing becomes visible (idempotent after commit)."""
        if not self._done:
            self._done = True
            self._abort()
