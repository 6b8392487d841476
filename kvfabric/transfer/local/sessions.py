"""What one local-channel client holds open, bounded in count and in time (pure).

A client of the local channel holds two kinds of things between two of its
messages: read leases (blocks it is copying out of the arena, which must not
be freed meanwhile) and write reservations (arena slots it is copying into).
:class:`HoldTable` keeps them per connection so that a client can never pin
the arena: at most ``max_open`` at once, each ended after ``timeout_s``
whether or not the client comes back, and all of them ended when the
connection goes away (a killed process included). Ending is done by the
``end`` callable given with each item (release the lease, abort the
reservation); the table only decides when.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from kvfabric.errors import ResourceExhausted

T = TypeVar("T")


class Kind(Enum):
    """What a held item is (an id of one kind never ends an item of the other)."""

    LEASE = "lease"
    RESERVATION = "reservation"


@dataclass(slots=True)
class _Held(Generic[T]):
    kind: Kind
    item: T
    end: Callable[[], None]
    deadline: float


class HoldTable(Generic[T]):
    """Open leases and reservations of one connection; not thread-safe (one per connection)."""

    def __init__(
        self, max_open: int, timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_open = max_open
        self.timeout_s = timeout_s
        self._clock = clock
        self._held: dict[int, _Held[T]] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._held)

    def add(self, kind: Kind, item: T, end: Callable[[], None]) -> int:
        """Hold ``item`` and return its id; ResourceExhausted (and ``end()``) when full."""
        if len(self._held) >= self.max_open:
            end()
            raise ResourceExhausted(
                f"{len(self._held)} leases and reservations are open on this connection "
                f"(local_max_leases={self.max_open}); release some first",
                "local_max_leases",
            )
        ident = next(self._ids)
        self._held[ident] = _Held(kind, item, end, self._clock() + self.timeout_s)
        return ident

    def take(self, kind: Kind, ident: int) -> T | None:
        """Stop holding ``ident`` and return its item (None if unknown, expired or of
        another kind); the caller ends it."""
        held = self._held.get(ident)
        if held is None or held.kind is not kind:
            return None
        del self._held[ident]
        return held.item

    def next_deadline(self) -> float | None:
        """When the oldest held item times out (None when nothing is held)."""
        return min((h.deadline for h in self._held.values()), default=None)

    def expire(self) -> int:
        """End every item past its deadline; returns how many."""
        now = self._clock()
        due = [i for i, h in self._held.items() if h.deadline <= now]
        for ident in due:
            self._held.pop(ident).end()
        return len(due)

    def end_all(self) -> int:
        """End every held item (the connection is gone); returns how many."""
        held, self._held = list(self._held.values()), {}
        failures: list[BaseException] = []
        for h in held:
            try:
                h.end()
            except Exception as exc:  # end the rest before reporting
                failures.append(exc)
        if failures:
            raise failures[0]
        return len(held)
