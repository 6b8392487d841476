"""How the client lands a streamed Get: checksummed while copied, in one piece or in chunks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfabric import integrity
from kvfabric.errors import Corrupt
from kvfabric.rpc.chunks import encode_field
from kvfabric.rpc.client_data import DataPart, _Block, _land, _verified, decode_get_chunk
from kvfabric.rpc.v1 import kvfabric_pb2 as pb


def _block(data: bytes, checksum: int | None = None) -> tuple[list[_Block], memoryview]:
    header = pb.GetHeader(
        block_index=0,
        found=True,
        size=len(data),
        checksum=integrity.checksum(data) if checksum is None else checksum,
    )
    buf = memoryview(bytearray(len(data)))
    return [_Block(header, buf)], buf


@settings(max_examples=50, deadline=None)
@given(size=st.integers(1, 300_000), cuts=st.lists(st.integers(1, 300_000), max_size=6),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_any_chunking_lands_the_bytes_and_their_checksum(
    size: int, cuts: list[int], seed: int
) -> None:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    blocks, buf = _block(data)
    bounds = sorted({c for c in cuts if c < size} | {0, size})
    for a, b in itertools.pairwise(bounds):
        _land(blocks, DataPart(0, a, memoryview(data)[a:b]))
    assert bytes(buf) == data and _verified(blocks[0])


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 300_000), chunk=st.integers(4096, 200_000),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_what_the_server_encodes_lands_verified(size: int, chunk: int, seed: int) -> None:
    """The server's messages of a block, decoded and landed, give its bytes and checksum."""
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    blocks, buf = _block(data)
    trailer = encode_field(3, blocks[0].header.SerializeToString())
    messages, digest = integrity.encode_chunks_with_checksum(0, data, chunk, trailer)
    assert digest == integrity.checksum(data)
    for i, raw in enumerate(messages):
        part = decode_get_chunk(raw)
        assert isinstance(part, DataPart)
        assert part.header == (blocks[0].header if i == 0 else None)  # inline, first only
        _land(blocks, part)
    assert bytes(buf) == data and _verified(blocks[0])


def test_a_wrong_checksum_or_a_short_block_is_a_miss() -> None:
    data = bytes(range(256)) * 1024
    blocks, _ = _block(data, checksum=integrity.checksum(data) ^ 1)
    _land(blocks, DataPart(0, 0, memoryview(data)))  # one piece: the one-pass path
    assert not _verified(blocks[0])
    blocks, _ = _block(data)
    _land(blocks, DataPart(0, 0, memoryview(data)[:1000]))
    assert not _verified(blocks[0])  # never completed


def test_chunks_out_of_order_are_refused() -> None:
    data = b"x" * 100_000
    blocks, _ = _block(data)
    _land(blocks, DataPart(0, 0, memoryview(data)[:70_000]))
    for part in (DataPart(0, 60_000, memoryview(data)[:10]),  # overlaps
                 DataPart(1, 70_000, memoryview(data)[:10]),  # another block
                 DataPart(0, 70_000, memoryview(data)[:40_000])):  # past the end  # fmt: skip
        with pytest.raises(Corrupt):
            _land(blocks, part)
