"""Capacity accounting of the disk tier: what a block costs in the LMDB map, what is taken.

Capacity rule: ``capacity() = 90% of the map size``. Each block is charged its
real LMDB footprint, not just its bytes: a value larger than a node is stored
in ``ceil((16 + header + payload) / page_size)`` whole overflow pages, plus
twice the size of its leaf-node entry (leaf pages are at least half full after
splits). Small inline values are charged twice their node size. The other 10%
is headroom for branch pages, the free list, pages copied on write by the
current transaction and free runs too fragmented for a large value. A long
read lease keeps freed pages from being reused (and LMDB hands out pages a
commit freed only from the commit after next, see
:meth:`~kvfabric.tiers.diskenv.DiskEnv.advance_epoch`), so LMDB can still
report ``MapFullError`` within the 90%; the disk tier turns that into
``ResourceExhausted`` with the transaction aborted and nothing committed lost.

:class:`DiskSpace` holds no lock of its own: the disk tier reads and changes
its counters with the tier's lock held.
"""

from __future__ import annotations

from kvfabric.errors import ResourceExhausted
from kvfabric.tiers.diskformat import MAX_HEADER_BYTES
from kvfabric.types import BLOCK_HASH_BYTES, MAX_NAMESPACE_CHARS

USABLE_FRACTION = 0.9
"""Share of the LMDB map that blocks may fill; the rest is B-tree and COW headroom."""

_PAGE_HEADER = 16  # LMDB PAGEHDRSZ on 64-bit builds
_NODE_HEADER = 8  # LMDB NODESIZE
_PGNO = 8  # an overflow value's leaf node stores its first page number
_INDEX_PTR = 2  # per-node slot in the page's index array
_MAX_STORAGE_KEY = MAX_NAMESPACE_CHARS + 1 + BLOCK_HASH_BYTES


class DiskSpace:
    """Footprints of the published blocks and of open reservations, against the capacity.

    Every method expects the disk tier's lock to be held by the caller, except
    :meth:`footprint` and :meth:`largest_footprint`, which read only constants.
    """

    def __init__(self, map_size: int, page_size: int) -> None:
        self._psize = page_size
        # LMDB's me_nodemax: a larger leaf node moves its value to overflow pages.
        self._nodemax = (((page_size - _PAGE_HEADER) // 2) & ~1) - _INDEX_PTR
        self.capacity = int(map_size * USABLE_FRACTION)
        self.published = 0  # footprint of committed values
        self.reserved = 0  # footprint of put reservations not yet committed or aborted

    def footprint(self, key_len: int, value_len: int) -> int:
        """Bytes a value of ``value_len`` under a key of ``key_len`` is charged."""
        node = _NODE_HEADER + key_len + value_len
        if node <= self._nodemax:
            return 2 * (node + (node & 1) + _INDEX_PTR)
        pages = (_PAGE_HEADER - 1 + value_len) // self._psize + 1
        return pages * self._psize + 2 * (_NODE_HEADER + key_len + _PGNO + _INDEX_PTR)

    def largest_footprint(self, size: int) -> int:
        """The footprint of a ``size``-byte payload under the longest key and header."""
        return self.footprint(_MAX_STORAGE_KEY, MAX_HEADER_BYTES + size)

    def used(self) -> int:
        """Footprint of published blocks plus open reservations."""
        return self.published + self.reserved

    def available(self) -> int:
        """Bytes that may still be reserved."""
        return self.capacity - self.published - self.reserved

    def reserve(self, need: int, blocks: int) -> None:
        """Reserve ``need`` bytes for ``blocks`` blocks; ResourceExhausted when they don't fit."""
        available = self.available()
        if need > available:
            raise ResourceExhausted(
                f"disk tier: {blocks} blocks need {need} bytes, {available} of "
                f"{self.capacity} available"
            )
        self.reserved += need
