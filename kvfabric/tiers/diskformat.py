"""The on-disk form of one block in the disk tier: a fixed header, then the payload.

Every LMDB value written by :mod:`kvfabric.tiers.disk` is ``header || payload``.
The header is little-endian and ``header_len`` bytes long, a multiple of 16 so
the payload starts 16-byte aligned relative to the value::

    offset  size  field
    0       4     magic            b"KVFB"
    4       2     version          u16, = 1
    6       2     header_len       u16, = align16(28 + program_id_len + 4)
    8       8     payload_size     u64, bytes of payload after the header
    16      8     payload_checksum u64, XXH3-64 (seed 0) of the payload
    24      1     block_type       u8, a BlockType value
    25      1     flags            u8, reserved, 0 in version 1
    26      2     program_id_len   u16, 0 when the block has no program id
    28      n     program_id       UTF-8 bytes
    28+n    pad   zero bytes up to header_len - 4
    hl-4    4     header_crc       u32, CRC-32 (zlib) of bytes [0, header_len - 4)

The header is guarded by CRC-32 rather than a truncated XXH3 because CRC-32
detects every error burst of up to 32 bits, so any single flipped header byte
is caught with certainty, not merely with high probability. ``header_len`` and
``program_id_len`` are cross-checked before the CRC is read, so a flip in
either cannot move the CRC onto other bytes. A value also has to be exactly
``header_len + payload_size`` bytes long. Every failed check raises
:class:`~kvfabric.errors.Corrupt`; the payload checksum itself is verified by
whoever copies the payload out.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

from kvfabric.errors import Corrupt, InvalidArgument
from kvfabric.types import BlockType, validate_program_id

Buffer = Any  # bytes, bytearray or memoryview

MAGIC = b"KVFB"
FORMAT_VERSION = 1
HEADER_ALIGN = 16
_FIXED = struct.Struct("<4sHHQQBBH")
_CRC = struct.Struct("<I")
MIN_HEADER_BYTES = HEADER_ALIGN * -(-(_FIXED.size + _CRC.size) // HEADER_ALIGN)
MAX_PROGRAM_ID_BYTES = 4 * 128  # MAX_PROGRAM_ID_CHARS characters of up to 4 UTF-8 bytes
MAX_HEADER_BYTES = HEADER_ALIGN * -(
    -(_FIXED.size + MAX_PROGRAM_ID_BYTES + _CRC.size) // HEADER_ALIGN
)
_MAX_U64 = (1 << 64) - 1
_BLOCK_TYPES = {t.value: t for t in BlockType}


@dataclass(frozen=True, slots=True)
class ValueHeader:
    """The parsed header of one stored value."""

    header_len: int
    payload_size: int
    checksum: int
    type: BlockType
    program_id: str | None


def encode_program_id(program_id: str | None) -> bytes:
    """The header bytes of ``program_id`` (empty for None); validates the id."""
    pid = validate_program_id(program_id)
    if pid is None:
        return b""
    raw = pid.encode("utf-8")
    if len(raw) > MAX_PROGRAM_ID_BYTES:  # unreachable with today's char limit; kept as a guard
        raise InvalidArgument(
            f"program_id is {len(raw)} UTF-8 bytes; the limit is {MAX_PROGRAM_ID_BYTES}",
            "program_id",
        )
    return raw


def header_len_for(program_id_bytes: int) -> int:
    """Header length for a program id of ``program_id_bytes`` encoded bytes."""
    raw = _FIXED.size + program_id_bytes + _CRC.size
    return HEADER_ALIGN * -(-raw // HEADER_ALIGN)


def pack_header_into(
    buf: Buffer,
    *,
    payload_size: int,
    checksum: int,
    block_type: BlockType,
    program_id: bytes = b"",
) -> int:
    """Write the header into the start of ``buf``; return its length.

    ``buf`` must be at least ``header_len_for(len(program_id))`` bytes; the
    payload is expected to follow the header in the same buffer.
    """
    if not 0 <= payload_size <= _MAX_U64:
        raise InvalidArgument(f"size {payload_size} does not fit in 64 bits", "size")
    if not 0 <= checksum <= _MAX_U64:
        raise InvalidArgument(f"checksum {checksum} does not fit in 64 bits", "checksum")
    if len(program_id) > MAX_PROGRAM_ID_BYTES:
        raise InvalidArgument(
            f"program_id is {len(program_id)} bytes; the limit is {MAX_PROGRAM_ID_BYTES}",
            "program_id",
        )
    hl = header_len_for(len(program_id))
    view = memoryview(buf).cast("B")
    if len(view) < hl:
        raise InvalidArgument(f"buffer of {len(view)} bytes cannot hold a {hl}-byte header", "buf")
    _FIXED.pack_into(
        view,
        0,
        MAGIC,
        FORMAT_VERSION,
        hl,
        payload_size,
        checksum,
        BlockType(block_type).value,
        0,
        len(program_id),
    )
    end = _FIXED.size + len(program_id)
    view[_FIXED.size : end] = program_id
    view[end : hl - _CRC.size] = bytes(hl - _CRC.size - end)
    _CRC.pack_into(view, hl - _CRC.size, zlib.crc32(view[: hl - _CRC.size]))
    return hl


def pack_header(
    *, payload_size: int, checksum: int, block_type: BlockType, program_id: str | None = None
) -> bytes:
    """The header bytes for a payload (a convenience for tests and tools)."""
    pid = encode_program_id(program_id)
    out = bytearray(header_len_for(len(pid)))
    pack_header_into(
        out, payload_size=payload_size, checksum=checksum, block_type=block_type, program_id=pid
    )
    return bytes(out)


def parse_header(value: Buffer) -> ValueHeader:
    """Parse and validate the header of a whole stored value; raise Corrupt on any defect.

    Only the header bytes are read, so calling this on a zero-copy view into
    the LMDB map touches the first page of the value and no more.
    """
    view = memoryview(value)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    total = view.nbytes
    if total < MIN_HEADER_BYTES:
        raise Corrupt(f"value of {total} bytes is shorter than the {MIN_HEADER_BYTES}-byte header")
    magic, version, hl, size, csum, type_raw, flags, pid_len = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise Corrupt(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise Corrupt(f"unsupported format version {version}")
    if pid_len > MAX_PROGRAM_ID_BYTES or hl != header_len_for(pid_len):
        raise Corrupt(f"header length {hl} does not match program id length {pid_len}")
    if total < hl:
        raise Corrupt(f"value of {total} bytes is shorter than its {hl}-byte header")
    (stored_crc,) = _CRC.unpack_from(view, hl - _CRC.size)
    if zlib.crc32(view[: hl - _CRC.size]) != stored_crc:
        raise Corrupt("header checksum mismatch")
    # Past the CRC the fields are what the writer wrote; these checks catch a
    # writer of another build, not bit rot.
    if flags != 0:
        raise Corrupt(f"unknown header flags {flags:#x}")
    block_type = _BLOCK_TYPES.get(type_raw)
    if block_type is None:
        raise Corrupt(f"unknown block type {type_raw}")
    if total != hl + size:
        raise Corrupt(f"value is {total} bytes; header says {hl} + {size}")
    program_id: str | None = None
    if pid_len:
        try:
            program_id = bytes(view[_FIXED.size : _FIXED.size + pid_len]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Corrupt("program id is not valid UTF-8") from exc
    return ValueHeader(hl, size, csum, block_type, program_id)
