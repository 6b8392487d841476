"""kvfabric._native against its pure-Python twins in kvfabric.integrity.

Every native function must return exactly what its ``*_ref`` twin returns and
leave the destination with exactly the same bytes; checksums are XXH3-64 (seed 0)
as computed by the ``xxhash`` package. Bad inputs raise ValueError/TypeError
before anything is written.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfabric import _native  # type: ignore[attr-defined]
from kvfabric import integrity as ig
from kvfabric.rpc.chunks import encode_field
from kvfabric.rpc.v1 import kvfabric_pb2 as pb

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Sizes straddling the native chunk size (streaming vs one-shot hashing) and
# XXH3's own internal size classes (0, 1-3, 4-8, 9-16, 17-128, 129-240, >240).
EDGE_SIZES = [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1023, 1024, 1025]
CHUNK = int(_native.CHUNK_SIZE)
BIG_SIZES = [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 3 * (1 << 20) + 5]
# Calls moving at least STREAM_THRESHOLD bytes in all copy with non-temporal
# stores in STREAM_CHUNK_SIZE chunks (-1: this build never streams).
STREAM_T = int(_native.STREAM_THRESHOLD)
STREAM_CHUNK = int(_native.STREAM_CHUNK_SIZE)
BIG_CALL = max(STREAM_T, 1 << 20)


def _rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _copy1(dst: Any, src: Any) -> int:
    """One block through the native batch path (the store's only native copy entry)."""
    return int(_native.copy_many_with_checksum([dst], [src])[0])


def _xxh(b: bytes) -> int:
    return int(xxhash.xxh3_64_intdigest(b))


@st.composite
def slot_layout(
    draw: st.DrawFn, max_slots: int = 12, max_size: int = 300
) -> tuple[bytes, list[int], int]:
    """(arena bytes, offsets, size): non-overlapping slots at random positions."""
    size = draw(st.integers(0, max_size))
    n = draw(st.integers(0, max_slots))
    gaps = draw(st.lists(st.integers(0, 40), min_size=n + 1, max_size=n + 1))
    offsets, pos = [], 0
    for g in gaps[:n]:
        pos += g
        offsets.append(pos)
        pos += size
    arena_len = pos + gaps[n]
    order = draw(st.permutations(list(range(n))))
    offsets = [offsets[i] for i in order]
    seed = draw(st.integers(0, 2**32 - 1))
    return _rand(arena_len, seed), offsets, size


# --------------------------------------------------------------------------- copy


@FAST
@given(data=st.binary(max_size=5000))
def test_copy_matches_ref_and_xxhash(data: bytes) -> None:
    dst_n, dst_r = bytearray(len(data)), bytearray(len(data))
    got = _copy1(dst_n, data)
    want = ig.copy_with_checksum_ref(dst_r, data)
    assert got == want == _xxh(data)
    assert dst_n == dst_r == data
    assert isinstance(got, int) and 0 <= got < 2**64


@pytest.mark.parametrize("n", EDGE_SIZES + BIG_SIZES)
def test_copy_sizes_across_chunk_boundaries(n: int) -> None:
    src = _rand(n, n)
    dst = np.zeros(n, dtype=np.uint8)
    assert _copy1(dst, src) == _xxh(src) == ig.checksum(src)
    assert dst.tobytes() == src


def test_copy_buffer_kinds() -> None:
    src = _rand(4096, 1)
    want = _xxh(src)
    m = mmap.mmap(-1, 4096)
    srcs: list[Any] = [
        src,
        bytearray(src),
        memoryview(src),
        np.frombuffer(src, np.uint8).reshape(64, 64),
    ]
    dsts: list[Any] = [bytearray(4096), np.zeros(512, np.uint64), memoryview(bytearray(4096)), m]
    for s in srcs:
        for d in dsts:
            assert _copy1(d, s) == want
            assert bytes(memoryview(d).cast("B")) == src
            _copy1(d, bytes(4096))
    m.close()


@pytest.mark.parametrize("n", [200_000, BIG_CALL + 3])
def test_copy_overlapping_matches_ref(n: int) -> None:
    for shift in (-7, -1, 0, 1, 7, 70_000):
        base = _rand(n + 100_000, 5)
        a_n, a_r = bytearray(base), bytearray(base)
        d0, s0 = (shift, 0) if shift >= 0 else (0, -shift)
        got = _copy1(memoryview(a_n)[d0 : d0 + n], memoryview(a_n)[s0 : s0 + n])
        want = ig.copy_with_checksum_ref(memoryview(a_r)[d0 : d0 + n], memoryview(a_r)[s0 : s0 + n])
        assert got == want
        assert a_n == a_r


@pytest.mark.parametrize("dst_misalign", [0, 1, 8, 15])
@pytest.mark.parametrize("extra", [0, 1, 15, 16, 63, 64, STREAM_CHUNK - 1, STREAM_CHUNK + 17])
def test_streaming_copy_alignment_and_tails(dst_misalign: int, extra: int) -> None:
    """Large calls (streaming stores): any destination alignment, any tail length."""
    n = BIG_CALL + extra
    src = _rand(n + 3, extra)[3:]
    buf = bytearray(n + 16)
    dst = memoryview(buf)[dst_misalign : dst_misalign + n]
    assert _copy1(dst, src) == _xxh(src)
    assert bytes(dst) == src
    assert buf[:dst_misalign] == bytes(dst_misalign)
    assert buf[dst_misalign + n :] == bytes(16 - dst_misalign)


def test_streaming_applies_to_small_pieces_of_a_large_call() -> None:
    """copy_many/gather/scatter decide once per call: small odd-sized pieces of a
    large call take the streaming path too and must still be exact."""
    sizes = [0, 1, 3, 15, 16, 17, 63, 65, 255, 4097, STREAM_CHUNK - 1, STREAM_CHUNK + 1]
    srcs = [_rand(k, k) for k in sizes] + [_rand(BIG_CALL, 1)]
    bufs = [bytearray(len(x) + 1) for x in srcs]
    dsts = [memoryview(b)[1:] for b in bufs]  # odd destination addresses
    assert _native.copy_many_with_checksum(dsts, srcs) == [_xxh(x) for x in srcs]
    assert [bytes(d) for d in dsts] == srcs

    size = 4099  # odd: every slot lands at a different alignment
    count = BIG_CALL // size + 2
    arena = _rand(count * size + 11, 2)
    offsets = [(i * 7919) % (count * size) for i in range(count)]
    offsets = [min(o, len(arena) - size) for o in offsets]
    dn, dr = bytearray(count * size), bytearray(count * size)
    got = _native.gather_with_checksum(arena, offsets, size, dn)
    assert got == ig.gather_with_checksum_ref(arena, offsets, size, dr)
    assert dn == dr
    an, ar = bytearray(len(arena)), bytearray(len(arena))
    distinct = sorted({o - o % size for o in offsets})[: count // 2]
    src = bytes(dn[: len(distinct) * size])
    got2 = _native.scatter_with_checksum(src, an, distinct, size)
    assert got2 == ig.scatter_with_checksum_ref(src, ar, distinct, size)
    assert an == ar


# ---------------------------------------------------------------------- copy_many


@FAST
@given(blobs=st.lists(st.binary(max_size=600), max_size=10))
def test_copy_many_matches_ref(blobs: list[bytes]) -> None:
    dn = [bytearray(len(b)) for b in blobs]
    dr = [bytearray(len(b)) for b in blobs]
    got = _native.copy_many_with_checksum(dn, blobs)
    assert got == ig.copy_many_with_checksum_ref(dr, blobs) == [_xxh(b) for b in blobs]
    assert dn == dr == [bytearray(b) for b in blobs]


def test_copy_many_large_and_iterables() -> None:
    srcs = [_rand(n, n) for n in (0, 1, CHUNK + 3, 1 << 20)]
    dsts = [np.zeros(len(s), np.uint8) for s in srcs]
    got = _native.copy_many_with_checksum(iter(dsts), tuple(srcs))
    assert got == [_xxh(s) for s in srcs]
    assert [d.tobytes() for d in dsts] == srcs


def test_copy_many_errors_leave_all_destinations_untouched() -> None:
    dsts = [bytearray(4), bytearray(4), bytearray(4)]
    with pytest.raises(ValueError, match="same length"):
        _native.copy_many_with_checksum(dsts, [b"aaaa", b"bbbb"])
    with pytest.raises(ValueError, match=r"dsts\[2\]"):
        _native.copy_many_with_checksum(dsts, [b"aaaa", b"bbbb", b"ccc"])
    with pytest.raises(TypeError, match=r"dsts\[1\]"):
        _native.copy_many_with_checksum([dsts[0], b"xxxx", dsts[2]], [b"aaaa"] * 3)
    with pytest.raises(TypeError, match=r"srcs\[2\]"):
        _native.copy_many_with_checksum(dsts, [b"aaaa", b"bbbb", "cccc"])
    with pytest.raises(TypeError):
        _native.copy_many_with_checksum(5, [])
    assert dsts == [bytearray(4)] * 3


# ---------------------------------------------------------------- gather/scatter


@FAST
@given(layout=slot_layout())
def test_gather_matches_ref(layout: tuple[bytes, list[int], int]) -> None:
    arena, offsets, size = layout
    dn = bytearray(len(offsets) * size)
    dr = bytearray(len(offsets) * size)
    got = _native.gather_with_checksum(arena, offsets, size, dn)
    assert got == ig.gather_with_checksum_ref(arena, offsets, size, dr)
    assert dn == dr
    assert got == [_xxh(arena[o : o + size]) for o in offsets]


@FAST
@given(layout=slot_layout(), seed=st.integers(0, 2**32 - 1))
def test_scatter_matches_ref(layout: tuple[bytes, list[int], int], seed: int) -> None:
    arena, offsets, size = layout
    src = _rand(len(offsets) * size, seed)
    an, ar = bytearray(arena), bytearray(arena)
    got = _native.scatter_with_checksum(src, an, offsets, size)
    assert got == ig.scatter_with_checksum_ref(src, ar, offsets, size)
    assert an == ar
    assert got == [_xxh(src[i * size : (i + 1) * size]) for i in range(len(offsets))]


@FAST
@given(
    size=st.integers(0, 64),
    offsets=st.lists(st.integers(0, 200), max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
def test_scatter_overlapping_slots_written_in_order(
    size: int, offsets: list[int], seed: int
) -> None:
    src = _rand(len(offsets) * size, seed)
    an, ar = bytearray(300), bytearray(300)
    got = _native.scatter_with_checksum(src, an, offsets, size)
    assert got == ig.scatter_with_checksum_ref(src, ar, offsets, size)
    assert an == ar


@pytest.mark.parametrize("size", [CHUNK + 1, 256 << 10])
def test_gather_scatter_large_slots(size: int) -> None:
    n = 6
    arena = np.frombuffer(_rand((n + 2) * size, 9), np.uint8).copy()
    offsets = [5 * size, 0, 2 * size, 7 * size, size, 3 * size]
    dn, dr = np.zeros(n * size, np.uint8), np.zeros(n * size, np.uint8)
    got = _native.gather_with_checksum(arena, offsets, size, dn)
    assert got == ig.gather_with_checksum_ref(arena, offsets, size, dr)
    assert np.array_equal(dn, dr)
    an, ar = np.zeros_like(arena), np.zeros_like(arena)
    got2 = _native.scatter_with_checksum(dn, an, offsets, size)
    assert got2 == ig.scatter_with_checksum_ref(dr, ar, offsets, size) == got
    assert np.array_equal(an, ar)


@pytest.mark.parametrize(
    "make_offsets",
    [
        lambda: np.array([64, 0, 128], dtype=np.int64),
        lambda: np.array([64, 0, 128], dtype=np.uint32),
        lambda: np.array([64, 0, 128], dtype=np.int16),
        lambda: np.array([0, 128, 64, 0], dtype=np.int64)[[2, 3, 1]],
        lambda: np.array([128, 9, 0, 9, 64], dtype=np.int64)[::-2],  # non-contiguous view
        lambda: np.array([64, 0, 128], dtype=np.int64).data,  # memoryview, format "l"
        lambda: (x for x in (64, 0, 128)),
        lambda: (np.int64(64), np.int32(0), 128),
        lambda: [64, 0, 128],
        lambda: bytes([64, 0, 128]),
    ],
)
def test_offsets_accepted_types(make_offsets: Callable[[], object]) -> None:
    arena = _rand(256, 3)
    dst = bytearray(3 * 64)
    got = _native.gather_with_checksum(arena, make_offsets(), 64, dst)
    want_dst = bytearray(3 * 64)
    want = ig.gather_with_checksum_ref(arena, [64, 0, 128], 64, want_dst)
    assert got == want
    assert dst == want_dst == arena[64:128] + arena[0:64] + arena[128:192]


def test_size_zero_and_empty() -> None:
    assert _native.gather_with_checksum(b"", [], 0, bytearray()) == []
    assert _native.gather_with_checksum(b"abc", [0, 3, 1], 0, bytearray()) == [_xxh(b"")] * 3
    assert _native.scatter_with_checksum(b"", bytearray(3), [3, 0], 0) == [_xxh(b"")] * 2
    assert _native.gather_with_checksum(b"abc", [], 7, bytearray()) == []
    assert _copy1(bytearray(), b"") == _xxh(b"")


# ------------------------------------------------------------------------ errors


SENTINEL = 0xEE


def _sentinel(n: int) -> bytearray:
    return bytearray([SENTINEL]) * n


GATHER_ERRORS: list[tuple[type[Exception], str, tuple[object, ...]]] = [
    (ValueError, "dst has 7 bytes", ([0, 1], 4, _sentinel(7))),
    (ValueError, "dst has 9 bytes", ([0, 1], 4, _sentinel(9))),
    (ValueError, r"offsets\[1\] = -1", ([0, -1], 4, _sentinel(8))),
    (ValueError, r"offsets\[1\] = 13", ([0, 13], 4, _sentinel(8))),
    (ValueError, r"offsets\[1\]", ([0, 2**70], 4, _sentinel(8))),
    (ValueError, r"offsets\[1\]", (np.array([0, 2**63], dtype=np.uint64), 4, _sentinel(8))),
    (ValueError, "size must be >= 0", ([0, 1], -4, _sentinel(0))),
    (ValueError, "size", ([0, 1], 2**80, _sentinel(8))),
    (TypeError, r"offsets\[1\]", ([0, "1"], 4, _sentinel(8))),
    (TypeError, r"offsets\[1\]", ([0, 1.0], 4, _sentinel(8))),
    (TypeError, "offsets", (5, 4, _sentinel(8))),
    (TypeError, "size", ([0, 1], 4.0, _sentinel(8))),
    (TypeError, "dst", ([0, 1], 4, bytes(8))),  # read-only destination
    (TypeError, "dst", ([0, 1], 4, np.zeros(16, np.uint8)[::2])),  # non-contiguous
    (TypeError, "dst", ([0, 1], 4, [0] * 8)),  # not a buffer
]


@pytest.mark.parametrize(("exc", "match", "args"), GATHER_ERRORS)
def test_gather_bad_inputs_leave_dst_untouched(
    exc: type[Exception], match: str, args: tuple[object, ...]
) -> None:
    arena = bytes(range(16))
    offsets, size, dst = args
    before = bytearray(dst) if isinstance(dst, bytearray) else None
    with pytest.raises(exc, match=match):
        _native.gather_with_checksum(arena, offsets, size, dst)
    if isinstance(dst, bytearray):
        assert dst == before


def test_gather_rejects_bad_arena_and_readonly_numpy() -> None:
    dst = _sentinel(8)
    with pytest.raises(TypeError, match="arena"):
        _native.gather_with_checksum("not a buffer", [0, 1], 4, dst)
    ro = np.zeros(8, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="dst"):
        _native.gather_with_checksum(bytes(16), [0, 1], 4, ro)
    assert dst == _sentinel(8)


def test_scatter_bad_inputs_leave_arena_untouched() -> None:
    arena = _sentinel(16)
    bad = [
        (ValueError, (b"x" * 7, arena, [0, 4], 4)),  # src length != n*size
        (ValueError, (b"x" * 8, arena, [0, 13], 4)),  # slot beyond arena
        (ValueError, (b"x" * 8, arena, [-4, 0], 4)),
        (ValueError, (b"x" * 8, arena, [0, 4], -1)),
        (TypeError, (b"x" * 8, bytes(16), [0, 4], 4)),  # read-only arena
        (TypeError, (b"x" * 8, memoryview(bytes(16)), [0, 4], 4)),
        (TypeError, (object(), arena, [0, 4], 4)),
        (TypeError, (b"x" * 8, arena, None, 4)),
    ]
    for exc, args in bad:
        with pytest.raises(exc):
            _native.scatter_with_checksum(*args)
    # The valid first slot must not have been written before the bad second one was seen.
    assert arena == _sentinel(16)


def test_copy_bad_inputs_leave_dst_untouched() -> None:
    dst = bytearray(b"\xee" * 4)
    with pytest.raises(ValueError, match=r"4 bytes.*3 bytes"):
        _copy1(dst, b"abc")
    with pytest.raises(TypeError, match="dst"):
        _copy1(b"abcd", b"abcd")
    with pytest.raises(TypeError, match="src"):
        _copy1(dst, "abcd")
    with pytest.raises(TypeError, match="dst"):
        _copy1(None, b"abcd")
    with pytest.raises(TypeError, match="src"):
        _copy1(dst, np.zeros(8, np.uint8)[::2])
    assert dst == b"\xee" * 4


def test_buffers_released_after_errors() -> None:
    """A leaked buffer export would leave the bytearrays locked against resizing."""
    arena, dst = bytearray(64), bytearray(8)
    failing: list[Callable[[], object]] = [
        lambda: _copy1(dst, bytearray(3)),
        lambda: _copy1(dst, "str"),
        lambda: _native.copy_many_with_checksum([dst, dst], [arena, b"x"]),
        lambda: _native.copy_many_with_checksum([dst, b"ro"], [bytearray(8), b"x"]),
        lambda: _native.gather_with_checksum(arena, [0, 99], 4, dst),
        lambda: _native.gather_with_checksum(arena, [0, 1], 4, bytearray(9)),
        lambda: _native.scatter_with_checksum(dst, arena, [0, 99], 4),
        lambda: _native.scatter_with_checksum(dst, arena, [0, 1], 4.5),
    ]
    for call in failing:
        with pytest.raises((ValueError, TypeError)):
            call()
    _native.gather_with_checksum(arena, [0, 4], 4, dst)
    dst.extend(b"x")  # BufferError if an export were still held
    arena.extend(b"x")


# ------------------------------------------------------------------ encode_chunks


def _generated(
    index: int, block: bytes, chunk: int, header: pb.GetHeader | None = None
) -> list[bytes]:
    """What the generated protobuf classes serialize for each chunk of ``block`` (the
    first carrying ``header`` as its ``block_header``)."""
    return [
        pb.GetChunk(
            data=pb.BlockData(block_index=index, offset=off, data=block[off : off + chunk]),
            block_header=header if off == 0 else None,
        ).SerializeToString()
        for off in range(0, len(block), chunk)
    ]


@FAST
@given(
    block=st.binary(max_size=3000),
    chunk=st.integers(1, 1200),
    index=st.one_of(st.sampled_from([0, 1, 127, 128, 16383, 16384, 2**32 - 1]),
                    st.integers(0, 2**32 - 1)),
)  # fmt: skip
def test_encode_chunks_matches_ref_and_the_generated_classes(
    block: bytes, chunk: int, index: int
) -> None:
    chunks, digest = _native.encode_chunks_with_checksum(index, block, chunk, b"")
    assert (chunks, digest) == ig.encode_chunks_with_checksum_ref(index, block, chunk, b"")
    assert chunks == _generated(index, block, chunk)
    assert digest == _xxh(block)


@FAST
@given(block=st.binary(min_size=1, max_size=3000), chunk=st.integers(1, 1200),
       index=st.integers(0, 2**32 - 1), size=st.integers(0, 2**64 - 1),
       checksum=st.integers(0, 2**64 - 1), address=st.text(max_size=30))  # fmt: skip
def test_an_inline_header_trailer_gives_the_generated_block_header(
    block: bytes, chunk: int, index: int, size: int, checksum: int, address: str
) -> None:
    header = pb.GetHeader(block_index=index, found=True, size=size, checksum=checksum,
                          location=pb.Location(node_id="n", address=address))  # fmt: skip
    trailer = encode_field(3, header.SerializeToString())
    chunks, digest = _native.encode_chunks_with_checksum(index, block, chunk, trailer)
    assert (chunks, digest) == ig.encode_chunks_with_checksum_ref(index, block, chunk, trailer)
    assert chunks == _generated(index, block, chunk, header)


@pytest.mark.parametrize(
    ("n", "chunk"),
    [(3 * (1 << 20) + 5, 1 << 20), (2 << 20, 4 << 20), (CHUNK * 3 + 7, CHUNK - 1),
     (CHUNK * 2, CHUNK), (300_000, 4096)],
)  # fmt: skip
def test_encode_chunks_large_blocks(n: int, chunk: int) -> None:
    """Chunks that straddle the native copy's own internal pieces, and offsets past 2**21."""
    block = _rand(n, n)
    chunks, digest = _native.encode_chunks_with_checksum(5, block, chunk, b"")
    assert chunks == _generated(5, block, chunk)
    assert digest == _xxh(block)


def test_encode_chunks_buffer_kinds() -> None:
    raw = _rand(10_000, 3)
    want = ig.encode_chunks_with_checksum_ref(2, raw, 999, b"")
    kinds: list[Any] = [bytearray(raw), memoryview(raw), np.frombuffer(raw, np.uint8),
                        np.frombuffer(raw, np.uint16), memoryview(b"xx" + raw)[2:]]  # fmt: skip
    for kind in kinds:
        assert _native.encode_chunks_with_checksum(2, kind, 999, b"") == want
        assert ig.encode_chunks_with_checksum_ref(2, kind, 999, b"") == want
    with mmap.mmap(-1, len(raw)) as m:
        m[:] = raw
        assert _native.encode_chunks_with_checksum(2, m, 999, b"") == want


def test_encode_chunks_of_an_empty_block() -> None:
    assert _native.encode_chunks_with_checksum(0, b"", 10, b"") == ([], _xxh(b""))
    assert ig.encode_chunks_with_checksum_ref(0, b"", 10, b"") == ([], _xxh(b""))


@pytest.mark.parametrize(
    ("exc", "args"),
    [(ValueError, (-1, b"abc", 2, b"")), (ValueError, (2**32, b"abc", 2, b"")),
     (ValueError, (0, b"abc", 0, b"")), (ValueError, (0, b"abc", -5, b"")),
     (TypeError, ("1", b"abc", 2, b"")), (TypeError, (0, "abc", 2, b"")),
     (TypeError, (0, np.zeros((4, 4), np.uint8)[:, 1], 2, b"")),
     (TypeError, (0, b"abc", 2, "trailer")), (TypeError, (0, b"abc", 2))],
)  # fmt: skip
def test_encode_chunks_bad_inputs(exc: type[Exception], args: tuple[Any, ...]) -> None:
    with pytest.raises(exc):
        _native.encode_chunks_with_checksum(*args)
    with pytest.raises(exc):
        ig.encode_chunks_with_checksum_ref(*args)


def test_encode_chunks_releases_its_buffer_after_errors() -> None:
    block = bytearray(64)
    with pytest.raises(ValueError):
        _native.encode_chunks_with_checksum(2**40, block, 8, b"")
    with pytest.raises(TypeError):
        _native.encode_chunks_with_checksum(0, block, 8, "not bytes")
    _native.encode_chunks_with_checksum(0, block, 8, b"")
    block.extend(b"x")  # BufferError if an export were still held


# -------------------------------------------------------------- StreamingChecksum


def _land_pieces(make: Callable[[], Any], pieces: list[bytes]) -> tuple[bytearray, int]:
    """Copy ``pieces`` one after another into one buffer; the bytes and the checksum."""
    dst, h, pos = bytearray(sum(map(len, pieces))), make(), 0
    for piece in pieces:
        h.copy(memoryview(dst)[pos : pos + len(piece)], piece)
        pos += len(piece)
    return dst, h.intdigest()


@FAST
@given(pieces=st.lists(st.binary(max_size=700), max_size=8))
def test_streaming_checksum_matches_ref(pieces: list[bytes]) -> None:
    got = _land_pieces(_native.StreamingChecksum, pieces)
    assert got == _land_pieces(ig.StreamingChecksumRef, pieces)
    assert got == (bytearray(b"".join(pieces)), _xxh(b"".join(pieces)))


@pytest.mark.parametrize(
    "sizes",
    [[1 << 20, 1 << 20], [(64 << 10) - 1, 1, 64 << 10, 3], [3 * (1 << 20) + 5],
     [BIG_CALL - 1, BIG_CALL + 7], [CHUNK + 1, STREAM_CHUNK - 1, 240, 17]],
)  # fmt: skip
def test_streaming_checksum_large_pieces(sizes: list[int]) -> None:
    """Pieces on both sides of the GIL and streaming-store thresholds and the chunk sizes."""
    pieces = [_rand(n, i) for i, n in enumerate(sizes)]
    assert _land_pieces(_native.StreamingChecksum, pieces) == (
        bytearray(b"".join(pieces)), _xxh(b"".join(pieces)))  # fmt: skip


def test_streaming_checksum_overlapping_matches_ref() -> None:
    raw = _rand(200_000, 9)
    bufs = [bytearray(raw), bytearray(raw)]
    for buf, h in zip(bufs, (_native.StreamingChecksum(), ig.StreamingChecksumRef()), strict=True):
        h.copy(memoryview(buf)[1000:101_000], memoryview(buf)[0:100_000])
        h.copy(memoryview(buf)[0:100_000], memoryview(buf)[50_000:150_000])
        buf.append(h.intdigest() & 0xFF)
    assert bufs[0] == bufs[1]


def test_streaming_checksum_bad_inputs_change_nothing() -> None:
    h, dst = _native.StreamingChecksum(), bytearray(4)
    h.copy(dst, b"abcd")
    before = h.intdigest()
    for args, exc in [((bytearray(3), b"abcd"), ValueError), ((b"ro!!", b"abcd"), TypeError),
                      (("str!", b"abcd"), TypeError), ((dst, 1234), TypeError),
                      ((np.zeros((4, 4), np.uint8)[:, 0], b"abcd"), TypeError)]:  # fmt: skip
        with pytest.raises(exc):
            h.copy(*args)
    assert h.intdigest() == before == _xxh(b"abcd") and dst == b"abcd"
    dst.extend(b"x")  # BufferError if an export were still held
    with pytest.raises(TypeError):
        _native.StreamingChecksum(0)


# ----------------------------------------------------------------------- threads


def test_concurrent_copies_are_correct() -> None:
    n = 1 << 20
    srcs = [_rand(n, 100 + t) for t in range(2)]
    want = [_xxh(s) for s in srcs]
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def worker(t: int) -> None:
        dst = np.zeros(n, np.uint8)
        barrier.wait()
        for _ in range(20):
            if _copy1(dst, srcs[t]) != want[t]:
                errors.append(f"thread {t}: bad checksum")
            if dst.tobytes() != srcs[t]:
                errors.append(f"thread {t}: bad bytes")
            dst[:] = 0

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


@pytest.mark.parametrize("call", ["copy_many", "encode_chunks", "streaming_checksum"])
def test_gil_is_released_during_copy(call: str) -> None:
    """Another Python thread runs while a long native copy is in flight.

    A C call that kept the GIL would block every other Python thread for its
    whole duration, so no tick of the spinning thread could fall inside it.
    """
    n = 64 << 20
    src = np.ones(n, np.uint8)
    dst = np.zeros(n, np.uint8)
    stamps: list[float] = []
    done = threading.Event()
    started = threading.Event()

    def spin() -> None:
        started.set()
        while not done.is_set():
            stamps.append(time.perf_counter())

    th = threading.Thread(target=spin)
    th.start()
    started.wait()
    try:
        t0 = time.perf_counter()
        if call == "copy_many":
            _native.copy_many_with_checksum([dst] * 6, [src] * 6)
        elif call == "encode_chunks":  # one call: between two calls the GIL is free anyway
            _native.encode_chunks_with_checksum(0, src, 1 << 20, b"")
        else:
            _native.StreamingChecksum().copy(dst, src)
        t1 = time.perf_counter()
    finally:
        done.set()
        th.join()
    margin = min(0.015, (t1 - t0) / 4)
    inside = [t for t in stamps if t0 + margin < t < t1 - margin]
    assert inside, f"no other thread ran during a {t1 - t0:.3f} s native call"
