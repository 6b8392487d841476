"""A disk-tier writer that the crash test runs as a real subprocess and SIGKILLs.

Usage: ``python _disk_writer.py PATH MAP_SIZE FIRST_BATCH [MAX_SECONDS]``

It opens a :class:`DiskTier` at PATH and writes batches FIRST_BATCH,
FIRST_BATCH+1, ... forever (until MAX_SECONDS pass), printing and flushing
``PUTTING <batch>`` just before each ``complete_put`` and ``COMMITTED <batch>``
after it returns. Every byte is a
pure function of the batch number, so the test can recompute what a batch
holds: :func:`batch_blocks` is shared by both sides.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import time

import numpy as np

from kvfabric.tiers.base import BlockRecord
from kvfabric.tiers.disk import DiskTier
from kvfabric.types import BlockHash, BlockKey

NAMESPACE = "crash"
MIN_BLOCK, MAX_BLOCK = 64 << 10, 512 << 10
_ID = struct.Struct("<QHH")  # batch number, index in batch, blocks in batch


def batch_size(batch: int) -> int:
    """Blocks in ``batch``: 1..16, varying from batch to batch."""
    return 1 + (batch * 7 + 3) % 16


def block_key(batch: int, index: int) -> BlockKey:
    """The key of block ``index`` of ``batch``; its hash starts with both numbers."""
    ident = _ID.pack(batch, index, batch_size(batch))
    return BlockKey(NAMESPACE, BlockHash(ident + hashlib.sha256(ident).digest()[:20]))


def decode_key(key: BlockKey) -> tuple[int, int, int]:
    """``(batch, index, blocks in batch)`` encoded in a key made by :func:`block_key`."""
    batch, index, count = _ID.unpack_from(key.hash)
    return int(batch), int(index), int(count)


def block_bytes(batch: int, index: int) -> bytes:
    """The payload of block ``index`` of ``batch`` (64 KiB..512 KiB, seeded by both)."""
    rng = np.random.default_rng([batch, index])
    return rng.bytes(int(rng.integers(MIN_BLOCK, MAX_BLOCK + 1)))


def batch_blocks(batch: int) -> list[tuple[BlockKey, bytes]]:
    """Every ``(key, payload)`` of ``batch``."""
    return [(block_key(batch, i), block_bytes(batch, i)) for i in range(batch_size(batch))]


def main(argv: list[str]) -> int:
    path, map_size, first = argv[0], int(argv[1]), int(argv[2])
    max_seconds = float(argv[3]) if len(argv) > 3 else 20.0
    tier = DiskTier(path, map_size, max_block_bytes=MAX_BLOCK, sync_interval_s=0.25)
    print("READY", flush=True)
    deadline = time.monotonic() + max_seconds
    batch = first
    while time.monotonic() < deadline:
        items = batch_blocks(batch)
        handle = tier.prepare_put([BlockRecord(k, len(b)) for k, b in items])
        handle.set_checksums(tier.write(handle, [b for _, b in items]))
        # Announced so the test can aim its SIGKILL inside the write transaction.
        print(f"PUTTING {batch}", flush=True)
        tier.complete_put(handle)
        print(f"COMMITTED {batch}", flush=True)
        batch += 1
    tier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
