"""Pins: explicit, counted, owned holds on blocks, with TTLs and per-namespace budgets.

A pinned block is never evicted or demoted automatically. Each owner's pin on
a block is counted (pin twice, unpin twice); a TTL, when given, ends the
owner's pin at once when it expires. The bytes a namespace holds pinned are
bounded by a budget: a pin that would exceed it is refused whole.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from kvfabric.errors import InvalidArgument, ResourceExhausted
from kvfabric.types import BlockKey, BlockMeta, Pin

MAX_OWNER_CHARS = 128


def validate_owner(owner: str) -> str:
    """An owner is a short non-empty printable name (a user, program or service)."""
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_CHARS:
        raise InvalidArgument(f"owner must be 1..{MAX_OWNER_CHARS} characters", "owner")
    if not owner.isprintable():
        raise InvalidArgument("owner must be printable", "owner")
    return owner


class PinTable:
    """Pin bookkeeping of one node store (the pins themselves live on BlockMeta)."""

    def __init__(self, budget_bytes: int, max_ttl_s: float) -> None:
        self.budget_bytes = budget_bytes
        self.max_ttl_s = max_ttl_s
        self._pinned_bytes: dict[str, int] = {}
        self._expiry: list[tuple[float, bytes, str, str]] = []  # (time, hash, namespace, owner)

    def pinned_bytes(self, namespace: str) -> int:
        """Bytes of distinct blocks of ``namespace`` held by at least one pin."""
        return self._pinned_bytes.get(namespace, 0)

    def total_pinned_bytes(self) -> int:
        """Bytes pinned across namespaces."""
        return sum(self._pinned_bytes.values())

    def check_ttl(self, ttl_s: float | None) -> None:
        """A TTL must be positive and at most the configured maximum."""
        if ttl_s is not None and not 0 < ttl_s <= self.max_ttl_s:
            raise InvalidArgument(
                f"ttl_s={ttl_s} is outside (0, {self.max_ttl_s}] seconds", "ttl_s"
            )

    def pin(self, metas: Sequence[BlockMeta], owner: str, ttl_s: float | None, now: float) -> int:
        """Add one pin of ``owner`` to each block; all or nothing. Returns bytes newly pinned."""
        validate_owner(owner)
        self.check_ttl(ttl_s)
        added: dict[str, int] = {}
        seen: set[BlockKey] = set()
        for m in metas:
            if not m.pins and m.key not in seen:
                added[m.key.namespace] = added.get(m.key.namespace, 0) + m.size
            seen.add(m.key)
        for ns, extra in added.items():
            if self.pinned_bytes(ns) + extra > self.budget_bytes:
                raise ResourceExhausted(
                    f"pin budget of namespace {ns} exceeded: {self.pinned_bytes(ns)} bytes pinned "
                    f"+ {extra} requested > pin_budget_bytes={self.budget_bytes}",
                    "pin_budget_bytes",
                )
        expires = None if ttl_s is None else now + ttl_s
        for m in metas:
            old = m.pins.get(owner)
            count = 1 if old is None else old.count + 1
            m.pins[owner] = Pin(owner, count, expires)
            if expires is not None:
                heapq.heappush(self._expiry, (expires, m.key.hash, m.key.namespace, owner))
        for ns, extra in added.items():
            self._pinned_bytes[ns] = self.pinned_bytes(ns) + extra
        return sum(added.values())

    def unpin(self, metas: Sequence[BlockMeta], owner: str, *, all_counts: bool = False) -> int:
        """Drop one (or every) count of ``owner``'s pin; returns how many blocks it released."""
        validate_owner(owner)
        released = 0
        for m in metas:
            pin = m.pins.get(owner)
            if pin is None:
                continue
            if pin.count > 1 and not all_counts:
                m.pins[owner] = Pin(owner, pin.count - 1, pin.expires_at)
                continue
            del m.pins[owner]
            released += 1
            if not m.pins:
                self._pinned_bytes[m.key.namespace] -= m.size
        return released

    def forget(self, meta: BlockMeta) -> None:
        """A pinned block left the store (explicit force); give its bytes back."""
        if meta.pins:
            self._pinned_bytes[meta.key.namespace] -= meta.size
            meta.pins.clear()

    def expire(self, now: float, find: Callable[[str, bytes], BlockMeta | None]) -> list[BlockMeta]:
        """End every pin whose TTL has passed; returns the blocks whose pins ended."""
        ended: list[BlockMeta] = []
        while self._expiry and self._expiry[0][0] <= now:
            when, digest, ns, owner = heapq.heappop(self._expiry)
            meta = find(ns, digest)
            pin = None if meta is None else meta.pins.get(owner)
            if meta is None or pin is None or pin.expires_at != when:
                continue  # gone, unpinned, or re-pinned with a later TTL
            self.unpin([meta], owner, all_counts=True)
            ended.append(meta)
        return ended
