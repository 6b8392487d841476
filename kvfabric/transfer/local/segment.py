"""The shared-memory segment behind the CPU arena: its name, cleanup and safe mapping.

A node's arena is ``/dev/shm/kvfabric-<node>-<pid>-<n>`` (unless the config
names it), so two nodes on one host, or two stores in one process, never
collide. The file is created 0600 by the node (:class:`kvfabric.tiers.cpu.Arena`)
and unlinked when the node closes; a node that was killed leaves it behind,
and the next node started by the same user removes segments whose process is
gone and that no live node holds (:func:`remove_stale_segments`; a serving
node holds a shared ``flock`` on its segment, which also protects it from a
cleaner in another pid namespace sharing ``/dev/shm``).

:func:`map_segment` is the client side: it maps the segment read-write only
when it is a regular file owned by this user, readable by nobody else, of
the size and identity (device, inode) the node announced — so a client never
maps a file someone else put under that name.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import re
import stat
from dataclasses import dataclass

from kvfabric.errors import PermissionDenied, Unavailable

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_PREFIX = "kvfabric-"
_STALE = re.compile(r"^kvfabric-[A-Za-z0-9_.-]{1,40}-(\d{1,10})-\d{1,6}$")
_counter = itertools.count()


def segment_name(node_id: str) -> str:
    """A fresh segment name for a node created by this process."""
    node = re.sub(r"[^A-Za-z0-9_.-]", "_", node_id)[:16] or "node"
    return f"{_PREFIX}{node}-{os.getpid()}-{next(_counter)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def hold(path: str) -> int:
    """Take a shared lock on the node's segment; the returned fd keeps it until closed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _held(path: str) -> bool:
    """Whether a live node holds ``path`` (see :func:`hold`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_stale_segments(directory: str = SHM_DIR) -> list[str]:
    """Unlink this user's kvfabric segments whose creating process is gone; their names.

    Only names :func:`segment_name` makes are considered, only files owned by
    this user, only when the pid in the name is dead and no node holds the
    file's lock: a live node's segment is never touched.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        m = _STALE.match(name)
        if m is None or _alive(int(m.group(1))) or int(m.group(1)) == os.getpid():
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if st.st_uid == os.getuid() and stat.S_ISREG(st.st_mode) and not _held(path):
                os.unlink(path)
                removed.append(name)
    if removed:
        log.warning("removed %d shared-memory segments left by dead kvfabric nodes: %s",
                    len(removed), ", ".join(removed))  # fmt: skip
    return removed


@dataclass(frozen=True, slots=True)
class SegmentId:
    """What a node announces about its segment, for the client to check before mapping."""

    name: str
    size: int
    device: int
    inode: int


def describe(path: str, size: int) -> SegmentId:
    """The identity of the node's own segment file."""
    st = os.stat(path)
    return SegmentId(os.path.basename(path), size, st.st_dev, st.st_ino)


def map_segment(seg: SegmentId, directory: str = SHM_DIR) -> mmap.mmap:
    """Map the node's segment read-write; PermissionDenied or Unavailable if it is not safe."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", seg.name):
        raise PermissionDenied(f"segment name {seg.name!r} is not a plain file name", "segment")
    path = os.path.join(directory, seg.name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise Unavailable(
            f"cannot open the arena segment {path}: {exc.strerror}", "segment"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionDenied(f"{path} is not a file owned by this user", "segment")
        if st.st_mode & 0o077:
            raise PermissionDenied(f"{path} is open to other users (mode {st.st_mode & 0o777:o})",
                                   "segment")  # fmt: skip
        if (st.st_dev, st.st_ino) != (seg.device, seg.inode) or st.st_size != seg.size:
            raise PermissionDenied(f"{path} is not the segment the node announced", "segment")
        return mmap.mmap(fd, seg.size, mmap.MAP_SHARED)
    finally:
        os.close(fd)


def boot_id() -> str:
    """This kernel's boot id (the same for every process of one host and boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""
