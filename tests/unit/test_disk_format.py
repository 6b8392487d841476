"""The disk tier's value header: round trips and detection of every damaged byte."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvfabric.errors import Corrupt, InvalidArgument
from kvfabric.tiers.diskformat import (
    FORMAT_VERSION,
    HEADER_ALIGN,
    MAGIC,
    MIN_HEADER_BYTES,
    header_len_for,
    pack_header,
    pack_header_into,
    parse_header,
)
from kvfabric.types import MAX_PROGRAM_ID_CHARS, BlockType

PAYLOAD = bytes(range(256)) * 4


def _value(payload: bytes = PAYLOAD, program_id: str | None = "agent-7", **kw: object) -> bytes:
    block_type = kw.get("block_type", BlockType.REASONING_BRANCH)
    assert isinstance(block_type, BlockType)
    header = pack_header(
        payload_size=len(payload),
        checksum=xxhash.xxh3_64_intdigest(payload),
        block_type=block_type,
        program_id=program_id,
    )
    return header + payload


def test_round_trip_and_layout() -> None:
    value = _value()
    h = parse_header(value)
    assert h.payload_size == len(PAYLOAD)
    assert h.checksum == xxhash.xxh3_64_intdigest(PAYLOAD)
    assert h.type is BlockType.REASONING_BRANCH
    assert h.program_id == "agent-7"
    assert h.header_len % HEADER_ALIGN == 0
    assert value[h.header_len :] == PAYLOAD
    magic, version, hl, size = struct.unpack_from("<4sHHQ", value)
    assert (magic, version, hl, size) == (MAGIC, FORMAT_VERSION, h.header_len, len(PAYLOAD))


def test_no_program_id_gives_minimal_header() -> None:
    value = _value(program_id=None)
    h = parse_header(memoryview(value))
    assert h.program_id is None
    assert h.header_len == MIN_HEADER_BYTES == 32


def test_pack_into_shared_buffer_leaves_payload_alone() -> None:
    hl = header_len_for(len(b"p"))
    buf = bytearray(hl + len(PAYLOAD))
    buf[hl:] = PAYLOAD
    assert (
        pack_header_into(
            buf,
            payload_size=len(PAYLOAD),
            checksum=1,
            block_type=BlockType.GENERIC,
            program_id=b"p",
        )
        == hl
    )
    assert bytes(buf[hl:]) == PAYLOAD
    assert parse_header(buf).program_id == "p"


@pytest.mark.parametrize("program_id", [None, "p", "ünïcode-program-✓"])
def test_every_single_byte_flip_in_header_is_detected(program_id: str | None) -> None:
    value = _value(program_id=program_id)
    hl = parse_header(value).header_len
    for pos in range(hl):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(value)
            damaged[pos] ^= mask
            with pytest.raises(Corrupt):
                parse_header(damaged)


def test_truncated_and_extended_values_are_corrupt() -> None:
    value = _value()
    hl = parse_header(value).header_len
    for cut in (0, 1, 4, MIN_HEADER_BYTES - 1, hl - 1, hl, hl + 1, len(value) - 1):
        with pytest.raises(Corrupt):
            parse_header(value[:cut])
    with pytest.raises(Corrupt):
        parse_header(value + b"\0")


def test_unknown_version_and_type_are_corrupt_even_with_valid_crc() -> None:
    import zlib

    def resealed(value: bytes, offset: int, new: bytes) -> bytes:
        b = bytearray(value)
        b[offset : offset + len(new)] = new
        hl = struct.unpack_from("<H", b, 6)[0]
        struct.pack_into("<I", b, hl - 4, zlib.crc32(b[: hl - 4]))
        return bytes(b)

    value = _value()
    with pytest.raises(Corrupt, match="version"):
        parse_header(resealed(value, 4, struct.pack("<H", 2)))
    with pytest.raises(Corrupt, match="block type"):
        parse_header(resealed(value, 24, bytes([99])))
    with pytest.raises(Corrupt, match="flags"):
        parse_header(resealed(value, 25, bytes([1])))
    with pytest.raises(Corrupt, match="UTF-8"):
        parse_header(resealed(value, 28, b"\xff"))


def test_bad_inputs_raise_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as err:
        pack_header(payload_size=1, checksum=1 << 64, block_type=BlockType.GENERIC)
    assert err.value.field == "checksum"
    with pytest.raises(InvalidArgument) as err:
        pack_header(payload_size=-1, checksum=0, block_type=BlockType.GENERIC)
    assert err.value.field == "size"
    with pytest.raises(InvalidArgument) as err:
        pack_header(payload_size=1, checksum=0, block_type=BlockType.GENERIC, program_id="")
    assert err.value.field == "program_id"
    with pytest.raises(InvalidArgument):
        pack_header_into(bytearray(8), payload_size=1, checksum=0, block_type=BlockType.GENERIC)


@given(
    program_id=st.none() | st.text(min_size=1, max_size=MAX_PROGRAM_ID_CHARS),
    size=st.integers(min_value=0, max_value=4096),
    checksum=st.integers(min_value=0, max_value=(1 << 64) - 1),
    block_type=st.sampled_from(list(BlockType)),
    flip=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_round_trip_property(
    program_id: str | None, size: int, checksum: int, block_type: BlockType, flip: int, mask: int
) -> None:
    header = pack_header(
        payload_size=size, checksum=checksum, block_type=block_type, program_id=program_id
    )
    value = header + bytes(size)
    h = parse_header(value)
    assert (h.header_len, h.payload_size, h.checksum, h.type, h.program_id) == (
        len(header),
        size,
        checksum,
        block_type,
        program_id,
    )
    damaged = bytearray(value)
    damaged[flip % len(header)] ^= mask
    with pytest.raises(Corrupt):
        parse_header(damaged)
