"""Pins: explicit, counted, owned holds on blocks, with TTLs and pin budgets.

A pinned block is never evicted or demoted automatically. Each owner's pin on
a block is counted (pin twice, unpin twice); a TTL, when given, ends the
owner's pin at once when it expires. The bytes a namespace holds pinned are
bounded by a budget, and so are the bytes one agent program holds pinned
(a pin taken on behalf of a program, e.g. a fork's shared prefix), so one
program cannot pin the whole cache: a pin that would exceed either budget is
refused whole.
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

    def __init__(
        self, budget_bytes: int, max_ttl_s: float, program_budget_bytes: int | None = None
    ) -> None:
        self.budget_bytes = budget_bytes
        self.max_ttl_s = max_ttl_s
        self.program_budget_bytes = (
            budget_bytes if program_budget_bytes is None else program_budget_bytes
        )
        self._pinned_bytes: dict[str, int] = {}
        self._expiry: list[tuple[float, bytes, str, str]] = []  # (time, hash, namespace, owner)
        self._owner_program: dict[str, str] = {}  # owner -> the program it pins for
        # program -> block -> how many of the program's owners pin it (its bytes count once)
        self._program_keys: dict[str, dict[BlockKey, int]] = {}
        self._program_bytes: dict[str, int] = {}

    def pinned_bytes(self, namespace: str) -> int:
        """Bytes of distinct blocks of ``namespace`` held by at least one pin."""
        return self._pinned_bytes.get(namespace, 0)

    def total_pinned_bytes(self) -> int:
        """Bytes pinned across namespaces."""
        return sum(self._pinned_bytes.values())

    def program_pinned_bytes(self, program_id: str) -> int:
        """Bytes of distinct blocks held by pins taken on behalf of ``program_id``."""
        return self._program_bytes.get(program_id, 0)

    def check_ttl(self, ttl_s: float | None) -> None:
        """A TTL must be positive and at most the configured maximum."""
        if ttl_s is not None and not 0 < ttl_s <= self.max_ttl_s:
            raise InvalidArgument(
                f"ttl_s={ttl_s} is outside (0, {self.max_ttl_s}] seconds", "ttl_s"
            )

    def pin(
        self,
        metas: Sequence[BlockMeta],
        owner: str,
        ttl_s: float | None,
        now: float,
        *,
        program_id: str | None = None,
    ) -> int:
        """Add one pin of ``owner`` to each block; all or nothing. Returns bytes newly pinned.

        With ``program_id`` the pin is taken on behalf of that program and also
        counts against its budget (an owner pins for one program only).
        """
        validate_owner(owner)
        self.check_ttl(ttl_s)
        if program_id is not None:
            self._check_program(metas, owner, program_id)
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
        if program_id is not None:
            self._owner_program[owner] = program_id
            for m in metas:
                if m.pins[owner].count == 1:  # a new hold of this owner on this block
                    self._program_add(program_id, m)
        return sum(added.values())

    def _check_program(self, metas: Sequence[BlockMeta], owner: str, program_id: str) -> None:
        known = self._owner_program.get(owner)
        if known is not None and known != program_id:
            raise InvalidArgument(
                f"owner {owner!r} already pins for program {known!r}", "owner"
            )
        held = self._program_keys.get(program_id, {})
        extra = sum({m.key: m.size for m in metas if m.key not in held}.values())
        pinned = self.program_pinned_bytes(program_id)
        if pinned + extra > self.program_budget_bytes:
            raise ResourceExhausted(
                f"pin budget of program {program_id} exceeded: {pinned} bytes pinned + {extra} "
                f"requested > program_pin_budget_bytes={self.program_budget_bytes}",
                "program_pin_budget_bytes",
            )

    def _program_add(self, program_id: str, meta: BlockMeta) -> None:
        keys = self._program_keys.setdefault(program_id, {})
        if meta.key not in keys:
            self._program_bytes[program_id] = self.program_pinned_bytes(program_id) + meta.size
        keys[meta.key] = keys.get(meta.key, 0) + 1

    def _program_release(self, owner: str, meta: BlockMeta) -> None:
        """``owner`` no longer pins ``meta``: give the block back to its program's budget."""
        program_id = self._owner_program.get(owner)
        keys = self._program_keys.get(program_id or "")
        if program_id is None or keys is None or meta.key not in keys:
            return
        keys[meta.key] -= 1
        if keys[meta.key] == 0:
            del keys[meta.key]
            self._program_bytes[program_id] -= meta.size
        if not keys:
            del self._program_keys[program_id]
            del self._program_bytes[program_id]

    def forget_owner(self, owner: str) -> None:
        """The owner holds no pin any more: stop remembering which program it pinned for."""
        self._owner_program.pop(owner, None)

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
            self._program_release(owner, m)
            released += 1
            if not m.pins:
                self._pinned_bytes[m.key.namespace] -= m.size
        return released

    def forget(self, meta: BlockMeta) -> None:
        """A pinned block left the store (explicit force); give its bytes back."""
        if meta.pins:
            self._pinned_bytes[meta.key.namespace] -= meta.size
            for owner in meta.pins:
                self._program_release(owner, meta)
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
