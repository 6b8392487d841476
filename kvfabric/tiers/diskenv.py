"""The disk tier's LMDB environment from open to close: options, read leases, sync.

:class:`DiskEnv` owns one LMDB environment and everything about its
lifecycle: how it is opened (and what a failed open means), the read
transactions that back read leases, the free-page epoch, the sync schedule
and the close. The disk tier (:mod:`kvfabric.tiers.disk`) writes and reads
blocks through it.

Durability: the environment is opened with ``writemap=True, sync=False,
metasync=False`` (the fastest LMDB write mode, see PITFALLS.md). A committed
transaction survives a crash of the process at once (it is in the page
cache); ``env.sync()`` runs from :meth:`DiskEnv.maybe_sync` (called after
each write) at most every ``sync_interval_s`` and on :meth:`DiskEnv.close`,
bounding what an OS crash or power loss can take. With ``writemap`` and no
sync LMDB does not order its writes, so after a power loss the file itself
may be damaged: an open that fails is reported as ``Corrupt`` and the caller
decides whether to wipe the directory.

Read leases: a lease is a read transaction opened with ``buffers=True``; the
payload views handed out under it point straight into the map and stay valid
(LMDB's MVCC never reuses pages a live reader can see) until the lease ends.
Leases and short reads share LMDB's :data:`MAX_READERS` reader slots; a read
that finds none free raises ResourceExhausted.

Locks, in this order: :attr:`DiskEnv.write_lock` (LMDB has one writer; ours
queue here), the sync lock, then the tier's lock, which the tier passes in
and which guards the tier's counters, the leases and the closed flag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import lmdb

from kvfabric.errors import Corrupt, FailedPrecondition, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

_DB_NAME = b"blocks"
_META_DB_NAME = b"meta"
_EPOCH_KEY = b"free-epoch"
MAX_READERS = 1024
"""LMDB reader slots: one per concurrent read lease (and inventory batch)."""


@dataclass(eq=False, slots=True)
class ReadLease:
    """The read transaction behind a :class:`~kvfabric.tiers.base.GetHandle`."""

    owner: DiskEnv
    txn: lmdb.Transaction
    views: list[memoryview]


class DiskEnv:
    """One LMDB environment opened for the disk tier, with its leases and sync schedule.

    Lifecycle: the constructor opens the environment (Unavailable when it
    cannot, Corrupt when it opens but is unreadable); transactions and
    leases run until :meth:`close`, which ends open leases, syncs and
    closes. ``lock`` is the tier's lock (see the module docstring).
    """

    def __init__(
        self,
        path: str,
        map_size: int,
        lock: threading.Lock,
        *,
        sync_interval_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._sync_interval = float(sync_interval_s)
        self._clock = clock
        os.makedirs(self.path, exist_ok=True)
        try:
            self.lmdb = lmdb.open(
                self.path,
                map_size=map_size,
                subdir=True,
                writemap=True,
                sync=False,
                metasync=False,
                map_async=False,
                # A value is MiBs of contiguous overflow pages read whole: with
                # read-around on, cold random 2 MiB reads ran at ~1.2-1.7 GB/s
                # here; with it off (MADV_RANDOM, 4 KiB faults) at ~75 MB/s.
                readahead=True,
                max_dbs=2,
                max_readers=MAX_READERS,
                lock=True,
            )
        except lmdb.Error as exc:
            raise Unavailable(f"disk tier: cannot open LMDB at {self.path}: {exc}") from exc
        try:
            self.db = self.lmdb.open_db(_DB_NAME)
            self.meta_db = self.lmdb.open_db(_META_DB_NAME)
            self.map_size = int(self.lmdb.info()["map_size"])
            self.page_size = int(self.lmdb.stat()["psize"])
        except lmdb.Error as exc:
            self.lmdb.close()
            raise Corrupt(f"disk tier: LMDB at {self.path} is unreadable: {exc}") from exc
        self.write_lock = threading.Lock()  # LMDB has one writer; ours queue here
        self._sync_lock = threading.Lock()
        self._lock = lock
        self._leases: set[ReadLease] = set()
        self.closed = False  # set holding write_lock and the tier's lock; read under either
        self._last_sync = clock()

    def check_open(self) -> None:
        """FailedPrecondition once closed; the caller holds the tier's lock or write_lock."""
        if self.closed:
            raise FailedPrecondition("disk tier is closed")

    # ---------------------------------------------------------------- reading

    def read(self) -> lmdb.Transaction:
        """A short read transaction on the blocks database (the caller ends it)."""
        with self._lock:
            self.check_open()
        return self._read_txn()

    def lease(self) -> ReadLease:
        """Open a read lease; it lasts until :meth:`end_lease` or :meth:`close`."""
        with self._lock:
            self.check_open()
            txn = self._read_txn()
            lease = ReadLease(self, txn, [])
            self._leases.add(lease)
        return lease

    def end_lease(self, lease: ReadLease) -> None:
        """Release the views of ``lease`` and end its transaction (once; later calls do nothing)."""
        with self._lock:
            if lease not in self._leases:
                return
            self._leases.discard(lease)
        for view in lease.views:
            # Later use raises ValueError instead of reading pages LMDB may reuse;
            # a view the caller still exports (e.g. via numpy) cannot be released.
            with contextlib.suppress(BufferError):
                view.release()
        lease.views.clear()
        lease.txn.abort()

    def _read_txn(self) -> lmdb.Transaction:
        try:
            return self.lmdb.begin(db=self.db, buffers=True)
        except lmdb.ReadersFullError as exc:
            raise ResourceExhausted(
                f"disk tier: all {MAX_READERS} LMDB read slots are leased"
            ) from exc

    # ---------------------------------------------------------------- writing

    def advance_epoch(self) -> None:
        """Commit one tiny write so the pages the last transaction freed become reusable.

        LMDB keeps the two newest committed snapshots intact, so pages freed by
        transaction T are handed out again no earlier than by T+2 (and only
        once no reader holds a snapshot older than T). Without this, "evict a
        block, store one of the same size" would hit MapFullError near full.
        The caller holds :attr:`write_lock`.
        """
        try:
            with self.lmdb.begin(write=True, db=self.meta_db) as txn:
                raw = txn.get(_EPOCH_KEY)
                epoch = 0 if raw is None else int.from_bytes(raw, "little")
                txn.put(_EPOCH_KEY, (epoch + 1).to_bytes(8, "little"))
        except lmdb.Error as exc:  # the freed pages just stay unusable a little longer
            log.warning("disk tier: could not advance the free-page epoch: %s", exc)

    # ------------------------------------------------------------- durability

    def sync(self) -> None:
        """Flush every committed transaction to stable storage now."""
        with self._sync_lock:
            with self._lock:
                self.check_open()
            self._last_sync = self._clock()
            self.lmdb.sync(True)

    def maybe_sync(self) -> None:
        """Sync when ``sync_interval_s`` has passed since the last one (never waits for one)."""
        if self._clock() - self._last_sync < self._sync_interval:
            return
        if not self._sync_lock.acquire(blocking=False):
            return  # another thread is syncing right now
        try:
            with self._lock:
                if self.closed:
                    return
            self._last_sync = self._clock()
            self.lmdb.sync(True)
            log.debug("disk tier: synced %s", self.path)
        finally:
            self._sync_lock.release()

    def close(self) -> None:
        """Sync and close the environment; outstanding read leases are ended first.

        No other call may be running on the tier while it closes: the
        payload views of a lease point into the map that closing unmaps.
        """
        with self.write_lock, self._sync_lock:
            with self._lock:
                if self.closed:
                    return
                self.closed = True
                leases = list(self._leases)
            if leases:
                log.warning("disk tier: closing with %d read leases still open", len(leases))
            for lease in leases:
                self.end_lease(lease)
            try:
                self.lmdb.sync(True)
            finally:
                self.lmdb.close()
