"""Block checksums and the copy paths that compute them.

A block's checksum is XXH3-64 of its bytes (seed 0). Every copy of block bytes
in the store goes through one of the functions below, which copy and checksum
in one pass when the native extension does it faster, so that verifying on
every move costs (almost) nothing extra.

Each fast path has a pure numpy/xxhash reference (``*_ref``) that defines its
result; tests compare the two on random inputs. ``kvfabric._native`` is part
of the package: if it did not build, importing this module fails loudly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash

from kvfabric import _native  # type: ignore[attr-defined]
from kvfabric.rpc.chunks import encode_data_chunk

Buffer = Any  # any object exposing the buffer protocol (bytes, memoryview, numpy array)


def checksum(buf: Buffer) -> int:
    """XXH3-64 of ``buf``'s bytes."""
    return int(xxhash.xxh3_64_intdigest(buf))


def _u8(buf: Buffer) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)


def copy_with_checksum_ref(dst: Buffer, src: Buffer) -> int:
    """Copy ``src`` into ``dst`` (same length) and return the checksum of the bytes."""
    np.copyto(_u8(dst), _u8(src))
    return checksum(src)


def copy_many_with_checksum_ref(dsts: Sequence[Buffer], srcs: Sequence[Buffer]) -> list[int]:
    """Pairwise :func:`copy_with_checksum_ref` over two equal-length sequences."""
    return [copy_with_checksum_ref(d, s) for d, s in zip(dsts, srcs, strict=True)]


def gather_with_checksum_ref(
    arena: Buffer, offsets: Sequence[int], size: int, dst: Buffer
) -> list[int]:
    """Copy ``len(offsets)`` slots of ``size`` bytes from ``arena`` into contiguous ``dst``."""
    a, d = _u8(arena), _u8(dst)
    out = []
    for i, off in enumerate(offsets):
        out.append(copy_with_checksum_ref(d[i * size : (i + 1) * size], a[off : off + size]))
    return out


def scatter_with_checksum_ref(
    src: Buffer, arena: Buffer, offsets: Sequence[int], size: int
) -> list[int]:
    """Copy contiguous ``src`` into ``len(offsets)`` slots of ``size`` bytes in ``arena``."""
    s, a = _u8(src), _u8(arena)
    out = []
    for i, off in enumerate(offsets):
        out.append(copy_with_checksum_ref(a[off : off + size], s[i * size : (i + 1) * size]))
    return out


class StreamingChecksumRef:
    """XXH3-64 of a block that arrives in pieces, each copied into place as it is hashed.

    :meth:`copy` copies a piece into its destination and feeds it to the
    checksum; :meth:`intdigest` is XXH3-64 of every piece so far, in order
    (equal to the checksum of their concatenation).
    """

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_64()

    def copy(self, dst: Buffer, src: Buffer) -> None:
        """Copy ``src`` into ``dst`` (same length) and add the bytes to the checksum."""
        np.copyto(_u8(dst), _u8(src))
        self._hasher.update(src)

    def intdigest(self) -> int:
        """The checksum of every byte copied so far."""
        return int(self._hasher.intdigest())


def encode_chunks_with_checksum_ref(
    block_index: int, block: Buffer, chunk_bytes: int, trailer: Buffer
) -> tuple[list[bytes], int]:
    """A streamed block: its serialized ``GetChunk{data: BlockData}`` messages and checksum.

    ``block`` is cut into chunks of ``chunk_bytes`` (the last may be shorter),
    each encoded by :func:`kvfabric.rpc.chunks.encode_data_chunk`; the bytes of
    ``trailer`` (other serialized ``GetChunk`` fields: the block's inline
    header) end the first message, where the generated classes put a field
    numbered above 2; an empty block has no messages. The
    checksum is that of the whole block. ValueError for a ``block_index``
    outside 0..2**32-1 (the field is a uint32) or a ``chunk_bytes`` below 1.
    """
    if not 0 <= block_index <= 0xFFFFFFFF:
        raise ValueError(f"block_index {block_index} is out of range 0..2**32-1")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    view = memoryview(block).cast("B")
    chunks = [
        encode_data_chunk(block_index, off, view[off : off + chunk_bytes])
        for off in range(0, len(view), chunk_bytes)
    ]
    if chunks:
        chunks[0] += bytes(trailer)
    return chunks, checksum(view)


# The paths the store uses. Each is bound to the native function only where
# `kvfabric bench tiers` shows it beats the reference by >= 1.5x (docs/benchmarks.md):
# a single large copy is as fast in numpy + xxhash (AVX2), batches are not.
copy_with_checksum = copy_with_checksum_ref
copy_many_with_checksum = _native.copy_many_with_checksum
gather_with_checksum = _native.gather_with_checksum
scatter_with_checksum = _native.scatter_with_checksum
# The two ends of a streamed Get (`kvfabric bench rpc`, docs/benchmarks.md): one
# GIL-free pass per block or piece where the reference makes a separate hashing
# pass, which there sits on the stream's critical path.
encode_chunks_with_checksum = _native.encode_chunks_with_checksum
StreamingChecksum = _native.StreamingChecksum
