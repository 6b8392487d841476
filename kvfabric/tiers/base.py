"""The interface every storage tier implements.

A tier owns bytes and nothing else: it knows no policy, no pins and no
namespaces beyond the keys it is handed. The node-store core decides what goes
where; a tier only reserves, publishes, reads and removes.

Lifecycle (two-phase, so nothing half-written is ever visible):

* put:  ``prepare_put(records)`` reserves space and returns a :class:`PutHandle`
  whose ``buffers`` the caller fills; then exactly one of
  ``complete_put(handle)`` (publish every block atomically) or
  ``abort_put(handle)`` (release the reservation). Until ``complete_put``
  returns, ``contains`` answers False for those keys and ``prepare_get`` does
  not see them.
* get:  ``prepare_get(keys)`` returns a :class:`GetHandle` whose ``buffers``
  stay valid and unchanged until ``complete_get(handle)``; a block that is
  being read is never freed or overwritten before then.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvfabric import integrity
from kvfabric.types import BlockKey, BlockType, Tier


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """What a tier persists beside a block's bytes (enough to rebuild the index)."""

    key: BlockKey
    size: int
    checksum: int = 0
    type: BlockType = BlockType.GENERIC
    program_id: str | None = None


@dataclass(slots=True)
class PutHandle:
    """A reservation made by :meth:`TierBackend.prepare_put`.

    ``buffers[i]`` is a writable buffer of exactly ``records[i].size`` bytes.
    The caller fills it and sets ``records[i]`` checksums (via
    :meth:`set_checksums`) before ``complete_put``.
    """

    tier: Tier
    records: list[BlockRecord]
    buffers: list[Any]  # memoryviews for host tiers, device tensors for the GPU tier
    slots: list[object] = field(default_factory=list)
    done: bool = False

    def set_checksums(self, checksums: Sequence[int]) -> None:
        """Record the checksum of the bytes written into each buffer."""
        self.records = [
            BlockRecord(r.key, r.size, c, r.type, r.program_id)
            for r, c in zip(self.records, checksums, strict=True)
        ]


@dataclass(slots=True)
class GetHandle:
    """A read lease made by :meth:`TierBackend.prepare_get`.

    ``buffers[i]`` is None when ``keys[i]`` is absent or its stored form is
    corrupt (then ``corrupt[i]`` is True). ``expected[i]`` is the checksum the
    tier has on record for the block; the reader verifies the bytes against
    it while copying them out.
    """

    tier: Tier
    keys: list[BlockKey]
    buffers: list[Any]  # memoryview (host) or tensor (GPU); None when absent
    expected: list[int | None]
    corrupt: list[bool]
    slots: list[object] = field(default_factory=list)
    lease: object = None
    done: bool = False


class TierBackend(ABC):
    """One storage tier (GPU memory, the host arena, or LMDB on disk)."""

    tier: Tier

    @abstractmethod
    def prepare_put(self, records: Sequence[BlockRecord]) -> PutHandle:
        """Reserve space for ``records``; raise ResourceExhausted if they do not fit."""

    @abstractmethod
    def complete_put(self, handle: PutHandle) -> None:
        """Publish every block of ``handle`` at once; afterwards they are readable."""

    @abstractmethod
    def abort_put(self, handle: PutHandle) -> None:
        """Release the reservation of ``handle``; nothing becomes visible."""

    @abstractmethod
    def prepare_get(self, keys: Sequence[BlockKey]) -> GetHandle:
        """Lease the stored bytes of ``keys`` for reading (absent keys give None)."""

    @abstractmethod
    def complete_get(self, handle: GetHandle) -> None:
        """End the read lease of ``handle``; its buffers must not be used afterwards."""

    @abstractmethod
    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each key is published in this tier."""

    @abstractmethod
    def remove(self, keys: Sequence[BlockKey]) -> int:
        """Remove published keys (absent ones are ignored); return how many were removed."""

    @abstractmethod
    def can_fit(self, sizes: Sequence[int]) -> bool:
        """Whether blocks of ``sizes`` could be reserved right now without evicting."""

    @abstractmethod
    def capacity(self) -> int:
        """Total bytes this tier may hold."""

    @abstractmethod
    def used(self) -> int:
        """Bytes held by published and reserved blocks."""

    def write(self, handle: PutHandle, srcs: Sequence[integrity.Buffer]) -> list[int]:
        """Copy ``srcs`` into the reserved buffers of ``handle``; return their checksums.

        Host-memory tiers copy and checksum in one pass; a device tier overrides this.
        """
        return list(integrity.copy_many_with_checksum(handle.buffers, srcs))

    def read(self, handle: GetHandle, dsts: Sequence[integrity.Buffer | None]) -> list[int | None]:
        """Copy leased buffer ``i`` into ``dsts[i]`` (host memory) and return its checksum.

        Positions whose buffer or destination is None are skipped (result None).
        The caller compares the result with ``handle.expected[i]``.
        """
        wanted = [
            i
            for i, (d, b) in enumerate(zip(dsts, handle.buffers, strict=True))
            if d is not None and b is not None
        ]
        sums = integrity.copy_many_with_checksum(
            [dsts[i] for i in wanted], [handle.buffers[i] for i in wanted]
        )
        out: list[int | None] = [None] * len(dsts)
        for i, c in zip(wanted, sums, strict=True):
            out[i] = int(c)
        return out

    def inventory(self) -> Iterator[BlockRecord]:
        """Records of the published blocks that survive a restart (persistent tiers)."""
        return iter(())

    def close(self) -> None:
        """Release the tier's resources; the object is unusable afterwards."""
