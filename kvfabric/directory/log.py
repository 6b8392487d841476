"""DirectoryLog: the directory's events and latest snapshot, durable in LMDB.

One LMDB environment with two sub-databases:

* ``events``: key = sequence number as big-endian u64 (so LMDB's key order is
  seq order), value = :func:`~kvfabric.directory.events.encode_event` bytes;
* ``snapshots``: key ``latest`` = the latest ``DirectoryCore.snapshot()``
  (its frame carries its seq and a CRC).

:meth:`DirectoryLog.append` writes a batch in one transaction and refuses a
gap or a repeat; :meth:`DirectoryLog.maybe_snapshot` writes a snapshot and
deletes the events it covers in the same transaction, so the log always holds
``snapshot + contiguous events after it``. Restore with
``DirectoryCore.restore(*log.load())``.

Durability, as in the disk tier: ``writemap=True, sync=False``; a committed
transaction survives a process crash at once and ``env.sync()`` runs at most
every ``sync_interval_s`` from :meth:`append` and on :meth:`close`, bounding
what an OS crash can take. Undecodable records raise ``Corrupt``; nothing is
silently skipped.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable

import lmdb

from kvfabric.directory.events import Event, decode_event, encode_event, snapshot_seq
from kvfabric.directory.index import DirectoryCore
from kvfabric.errors import (
    Corrupt,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

_SEQ = struct.Struct(">Q")
_EVENTS_DB = b"events"
_SNAPSHOTS_DB = b"snapshots"
_LATEST = b"latest"


class DirectoryLog:
    """The durable event log and snapshot store of one directory (thread-safe)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        map_size: int = 1 << 30,
        snapshot_every: int = 10_000,
        sync_interval_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(map_size, bool) or not isinstance(map_size, int) or map_size <= 0:
            raise InvalidArgument(f"map_size must be a positive int, got {map_size!r}", "map_size")
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int):
            raise InvalidArgument("snapshot_every must be an int", "snapshot_every")
        if snapshot_every < 1:
            raise InvalidArgument(
                f"snapshot_every must be >= 1, got {snapshot_every}", "snapshot_every"
            )
        if not sync_interval_s >= 0:
            raise InvalidArgument(
                f"sync_interval_s must be >= 0, got {sync_interval_s!r}", "sync_interval_s"
            )
        self.path = os.fspath(path)
        self.snapshot_every = snapshot_every
        self._sync_interval = float(sync_interval_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        os.makedirs(self.path, exist_ok=True)
        try:
            self._env = lmdb.open(
                self.path, map_size=map_size, subdir=True, writemap=True, sync=False,
                metasync=False, max_dbs=2, lock=True,
            )  # fmt: skip
        except lmdb.Error as exc:
            raise Unavailable(f"directory log: cannot open LMDB at {self.path}: {exc}") from exc
        try:
            self._events = self._env.open_db(_EVENTS_DB)
            self._snapshots = self._env.open_db(_SNAPSHOTS_DB)
            with self._env.begin() as txn:
                raw = txn.get(_LATEST, db=self._snapshots)
                self._snap_seq = 0 if raw is None else snapshot_seq(bytes(raw))
                cur = txn.cursor(db=self._events)
                self._last_seq = _seq_of(cur.key()) if cur.last() else self._snap_seq
        except lmdb.Error as exc:
            self._env.close()
            raise Corrupt(f"directory log: LMDB at {self.path} is unreadable: {exc}") from exc
        except Corrupt:
            self._env.close()
            raise
        self._last_sync = clock()
        log.info(
            "directory log opened at %s: snapshot at seq %d, events up to %d",
            self.path,
            self._snap_seq,
            self._last_seq,
        )

    @property
    def last_seq(self) -> int:
        """The sequence number of the last logged event (or of the snapshot when none follow)."""
        return self._last_seq

    @property
    def snapshot_seq(self) -> int:
        """The sequence number of the latest snapshot (0 when there is none)."""
        return self._snap_seq

    def append(self, events: Iterable[Event]) -> None:
        """Write ``events`` in one transaction; their seqs must continue :attr:`last_seq` by 1.

        A gap or a repeat raises FailedPrecondition (field ``seq``) and writes nothing.
        """
        batch = list(events)
        for ev in batch:
            if not isinstance(ev, Event):
                raise InvalidArgument(f"events must hold Event, got {type(ev).__name__}", "events")
        if not batch:
            return
        records = [(_SEQ.pack(ev.seq), encode_event(ev)) for ev in batch]
        with self._lock:
            self._check_open()
            expected = self._last_seq + 1
            for i, ev in enumerate(batch):
                if ev.seq != expected + i:
                    raise FailedPrecondition(
                        f"event seq {ev.seq} at position {i} does not follow {expected + i - 1}; "
                        "the log takes contiguous, increasing sequence numbers",
                        "seq",
                    )
            try:
                with self._env.begin(write=True, db=self._events) as txn:
                    cur = txn.cursor()
                    for k, v in records:
                        if not cur.put(k, v, append=True):
                            raise FailedPrecondition(f"seq {_seq_of(k)} is logged already", "seq")
            except lmdb.MapFullError as exc:
                raise ResourceExhausted(
                    f"directory log: LMDB map at {self.path} is full; raise map_size or "
                    "snapshot more often"
                ) from exc
            except lmdb.Error as exc:
                raise Unavailable(f"directory log: write failed: {exc}") from exc
            self._last_seq = batch[-1].seq
            self._maybe_sync()

    def maybe_snapshot(self, core: DirectoryCore) -> bool:
        """Write ``core.snapshot()`` and drop the events it covers, once ``snapshot_every``
        events have been logged since the last snapshot. Returns whether it wrote one.

        Skipped (False) while ``core`` is ahead of the log: its events must be
        appended first, or they would be lost from the log but not from the snapshot.
        """
        with self._lock:
            self._check_open()
            if min(core.seq, self._last_seq) - self._snap_seq < self.snapshot_every:
                return False
            data = core.snapshot()
            seq = snapshot_seq(data)
            if seq > self._last_seq:
                log.debug("snapshot at seq %d skipped: log holds up to %d", seq, self._last_seq)
                return False
            dropped = 0
            try:
                with self._env.begin(write=True) as txn:
                    txn.put(_LATEST, data, db=self._snapshots)
                    cur = txn.cursor(db=self._events)
                    if cur.first():
                        while cur.key() and _seq_of(cur.key()) <= seq:
                            cur.delete()  # moves to the next record
                            dropped += 1
            except lmdb.MapFullError as exc:
                raise ResourceExhausted(
                    f"directory log: LMDB map at {self.path} is full writing a "
                    f"{len(data)}-byte snapshot"
                ) from exc
            except lmdb.Error as exc:
                raise Unavailable(f"directory log: snapshot write failed: {exc}") from exc
            self._snap_seq = seq
            log.info("directory snapshot at seq %d (%d bytes), %d events compacted",
                     seq, len(data), dropped)  # fmt: skip
            self._maybe_sync()
            return True

    def load(self) -> tuple[bytes | None, list[Event]]:
        """The latest snapshot (or None) and every event after it, for ``DirectoryCore.restore``.

        A gap in the sequence or an undecodable record raises Corrupt.
        """
        with self._lock:
            self._check_open()
            with self._env.begin() as txn:
                raw = txn.get(_LATEST, db=self._snapshots)
                snap = None if raw is None else bytes(raw)
                base = 0 if snap is None else snapshot_seq(snap)
                events = self._read(txn, base, None)
        return snap, events

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """Up to ``limit`` logged events after ``seq``.

        FailedPrecondition (field ``seq``) when they were compacted into the
        snapshot (restore from :meth:`load` instead) or ``seq`` is ahead of the log.
        """
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InvalidArgument(f"seq must be an int >= 0, got {seq!r}", "seq")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"limit must be an int >= 1, got {limit!r}", "limit")
        with self._lock:
            self._check_open()
            if seq < self._snap_seq or seq > self._last_seq:
                raise FailedPrecondition(
                    f"the log holds events {self._snap_seq + 1}..{self._last_seq}; events after "
                    f"{seq} must come from the snapshot (load())",
                    "seq",
                )
            with self._env.begin() as txn:
                return self._read(txn, seq, limit)

    def sync(self) -> None:
        """Flush committed transactions to disk now."""
        with self._lock:
            self._check_open()
            self._env.sync(True)
            self._last_sync = self._clock()

    def close(self) -> None:
        """Sync and close the environment (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._env.sync(True)
            finally:
                self._env.close()

    # -------------------------------------------------------------- internals

    def _read(self, txn: lmdb.Transaction, after: int, limit: int | None) -> list[Event]:
        out: list[Event] = []
        cur = txn.cursor(db=self._events)
        if not cur.set_range(_SEQ.pack(after + 1)):
            return out
        expected = after + 1
        for k, v in cur:
            seq = _seq_of(k)
            if seq != expected:
                raise Corrupt(f"directory log: event {expected} is missing (next is {seq})", "seq")
            try:
                ev = decode_event(bytes(v))
            except Corrupt as exc:
                raise Corrupt(f"directory log: record {seq} is undecodable: {exc.message}",
                              "event") from exc  # fmt: skip
            if ev.seq != seq:
                raise Corrupt(f"directory log: record {seq} holds event {ev.seq}", "event")
            out.append(ev)
            expected += 1
            if limit is not None and len(out) >= limit:
                break
        return out

    def _maybe_sync(self) -> None:
        now = self._clock()
        if now - self._last_sync >= self._sync_interval:
            self._env.sync(True)
            self._last_sync = now

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"directory log at {self.path} is closed")


def _seq_of(key: bytes | memoryview) -> int:
    if len(key) != _SEQ.size:
        raise Corrupt(f"directory log: event key of {len(key)} bytes, expected 8", "seq")
    return int(_SEQ.unpack(key)[0])
