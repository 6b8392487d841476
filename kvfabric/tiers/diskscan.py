"""The disk tier's restart scan: every stored value known from its header alone.

The disk tier keeps no side tables: each value's header (see
:mod:`kvfabric.tiers.diskformat`) carries its size, checksum, type and
program id, so a restarted node learns what its disk holds by walking the
blocks database in key order. :func:`scan` reads it in short read
transactions of a few hundred entries, so it holds no reader across yields;
it is not one snapshot when writers run beside it.

Two uses: :func:`usage` adds up the footprints of every entry (what a
reopened tier has in use, corrupt values included, since they take space
until removed), and :func:`records` turns the valid entries into
:class:`~kvfabric.tiers.base.BlockRecord` for the node's index. A header that
fails its checks, or a value under a key that is no storage key, is counted
as corrupt through the caller's ``count_corrupt`` and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import lmdb

from kvfabric.errors import Corrupt, InvalidArgument
from kvfabric.tiers.base import BlockRecord
from kvfabric.tiers.diskformat import ValueHeader, parse_header
from kvfabric.types import BlockKey

log = logging.getLogger(__name__)

_INVENTORY_BATCH = 512  # entries read per short read transaction

Entry = tuple[bytes, int, ValueHeader | None]
"""``(storage key, value length, header or None if corrupt)``."""


def scan(
    begin: Callable[[], lmdb.Transaction], count_corrupt: Callable[[], None]
) -> Iterator[Entry]:
    """Yield an :data:`Entry` for every value, reading each batch in a transaction of ``begin``."""
    last: bytes | None = None
    while True:
        batch: list[Entry] = []
        with begin() as txn:
            cur = txn.cursor()
            more = cur.first() if last is None else cur.set_range(last)
            while more and len(batch) < _INVENTORY_BATCH:
                key = bytes(cur.key())
                if key != last:
                    value = cur.value()
                    header: ValueHeader | None
                    try:
                        header = parse_header(value)
                    except Corrupt as exc:
                        count_corrupt()
                        log.warning(
                            "disk tier: corrupt header under key %r: %s", key[:80], exc.message
                        )
                        header = None
                    batch.append((key, len(value), header))
                more = cur.next()
        if not batch:
            return
        last = batch[-1][0]
        yield from batch


def usage(entries: Iterable[Entry], footprint: Callable[[int, int], int]) -> tuple[int, int]:
    """How many entries there are and the sum of their footprints."""
    count = used = 0
    for key, size, _header in entries:
        count += 1
        used += footprint(len(key), size)
    return count, used


def records(entries: Iterable[Entry], count_corrupt: Callable[[], None]) -> Iterator[BlockRecord]:
    """The record of every valid entry; corrupt ones are skipped."""
    for key, _size, header in entries:
        if header is None:
            continue
        try:
            block_key = BlockKey.from_storage_key(key)
        except (InvalidArgument, UnicodeDecodeError):
            count_corrupt()
            log.warning("disk tier: skipping value under malformed key %r", key[:80])
            continue
        yield BlockRecord(
            block_key, header.payload_size, header.checksum, header.type, header.program_id
        )
