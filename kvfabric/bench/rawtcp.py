"""The physical baseline of the data plane: plain loopback TCP between two processes.

:func:`raw_loopback_gbps` streams preallocated buffers from a child process
to this one with ``sendall`` / ``recv_into`` and nothing else: no framing, no
store, no checksum. Transport benchmarks divide their throughput by this
number, measured in the same run on the same machine.

Both the byte count and the wall time are bounded: the stream stops at
``total_bytes`` or after ``seconds_limit``, whichever comes first, and the
child is joined (then terminated) with a timeout.
"""

from __future__ import annotations

import logging
import mmap
import socket
import struct
import subprocess
import sys
import time

from kvfabric.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

MiB = 1 << 20
_HELLO = struct.Struct("<Q")  # the sender announces how many bytes it will send
_CONNECT_LIMIT_S = 30.0  # the child interpreter's start-up, bounded separately

# The sender runs in a fresh interpreter with nothing but the standard library,
# so neither its start-up nor the caller's __main__ (spawn re-imports it) matter.
_SENDER = """
import mmap, socket, struct, sys, time
port, total, chunk, region = map(int, sys.argv[1:5])
limit = float(sys.argv[5])
area = mmap.mmap(-1, region)
area.write(b"Z" * region)  # touched: no page faults while timing
buf = memoryview(area)
deadline = time.monotonic() + limit
with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
    sock.sendall(struct.pack("<Q", total))
    sent = 0
    try:
        while sent < total and time.monotonic() < deadline:
            off = sent % region
            n = min(chunk, total - sent, region - off)
            sock.sendall(buf[off : off + n])
            sent += n
    except OSError:
        pass  # the receiver stopped early (its time limit)
"""


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise Unavailable("the raw TCP sender closed the stream early", "address")
        got += n


def _accept(listener: socket.socket, child: subprocess.Popen[bytes]) -> socket.socket:
    """The sender's connection; Unavailable if it exits or takes too long to connect."""
    deadline = time.monotonic() + _CONNECT_LIMIT_S
    while time.monotonic() < deadline:
        try:
            return listener.accept()[0]
        except TimeoutError:
            if child.poll() is not None:
                raise Unavailable(
                    f"the raw TCP sender exited with {child.returncode} before connecting",
                    "address",
                ) from None
    raise Unavailable("the raw TCP sender never connected", "address")


def raw_loopback_gbps(
    total_bytes: int,
    chunk: int = 2 * MiB,
    seconds_limit: float = 10.0,
    *,
    region_bytes: int | None = None,
) -> float:
    """Throughput in GB/s (1e9 bytes per second, not gigabits) of plain loopback TCP.

    A child process (a fresh interpreter) sends ``total_bytes`` in ``chunk``-byte
    ``sendall`` calls; this process receives them with ``recv_into``. Both
    sides walk through a preallocated, pre-touched region of ``region_bytes``
    (default: ``min(total_bytes, 256 MiB)``), so, like a block transfer, the
    bytes come from and land in distinct memory rather than one cache-hot
    buffer; pass ``region_bytes=chunk`` for the cache-hot variant. Timing
    starts at the first payload byte (process start-up is not counted) and
    stops after ``total_bytes`` or ``seconds_limit`` seconds.
    """
    if total_bytes <= 0 or chunk <= 0:
        raise InvalidArgument("total_bytes and chunk must be positive", "total_bytes")
    if seconds_limit <= 0:
        raise InvalidArgument("seconds_limit must be positive", "seconds_limit")
    region = region_bytes if region_bytes is not None else min(total_bytes, 256 * MiB)
    if not chunk <= region <= 4096 * MiB:
        raise InvalidArgument(f"region_bytes must be in {chunk}..{4096 * MiB}", "region_bytes")
    area = mmap.mmap(-1, region)  # anonymous memory like the CPU tier's arena
    area.write(b"\x01" * region)  # touched now, not while timing
    buf = memoryview(area)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.1)
        port = listener.getsockname()[1]
        args = [str(port), str(total_bytes), str(chunk), str(region), str(seconds_limit)]
        child = subprocess.Popen([sys.executable, "-c", _SENDER, *args])
        try:
            with _accept(listener, child) as conn:
                conn.settimeout(seconds_limit)
                hello = memoryview(bytearray(_HELLO.size))
                _recv_exact(conn, hello)
                expected = _HELLO.unpack(hello)[0]
                deadline = time.monotonic() + seconds_limit
                first = received = conn.recv_into(buf[:chunk])
                start = time.perf_counter()
                while received < expected and time.monotonic() < deadline:
                    off = received % region
                    n = conn.recv_into(
                        buf[off : off + min(chunk, expected - received, region - off)]
                    )
                    if n == 0:
                        break
                    received += n
                elapsed = time.perf_counter() - start
        except OSError as exc:  # a timeout or reset mid-stream
            raise Unavailable(f"raw TCP baseline failed: {exc}", "address") from exc
        finally:
            try:
                child.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5.0)
    buf.release()
    area.close()
    # The first recv's bytes arrived before the clock started: leave them out.
    measured = received - first
    if elapsed <= 0 or measured <= 0:
        raise Unavailable("raw TCP baseline moved too few bytes to time", "total_bytes")
    gbps = measured / elapsed / 1e9
    log.info("raw loopback TCP: %d bytes in %.3f s = %.2f GB/s", measured, elapsed, gbps)
    return gbps
