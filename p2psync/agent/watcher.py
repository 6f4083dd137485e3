"""Wake up when another process or connection may have committed to a SQLite file.

How this works: a commit in WAL mode appends frames to ``<db>-wal``; in rollback
mode it writes ``<db>-journal`` and the database file; a checkpoint writes the
database file. We watch the database's *directory* with Linux inotify (through
ctypes, no dependency) for IN_MODIFY | IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE
and keep only events that name one of those three files. Watching the directory
rather than the files means files created later (a new ``-wal`` after the last
connection closed and deleted it) are seen too.

The inotify descriptor is non-blocking and waited on with
``trio.lowlevel.wait_readable``, so an idle watcher costs no CPU. Each
``wait_changed`` drains every queued event in one go, so a burst of commits
wakes the caller once (or a few times), not once per write.

The watcher only says "something may have changed"; it also fires on our own
writes and on checkpoints. The caller decides whether it was a foreign commit
with ``PRAGMA data_version``. The watcher never opens SQLite.

Fallback: where inotify is unavailable (not Linux, or the kernel's limit on
inotify instances or watches is reached), the watcher polls the three files'
``stat()`` (inode, size, mtime) every 0.5 s. That costs a little CPU and up to
half a second of latency, and is logged once at warning level.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from pathlib import Path
from types import TracebackType

import trio

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5

# From <sys/inotify.h>.
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = 0o2000000
WATCH_MASK = IN_MODIFY | IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE

# struct inotify_event { int wd; uint32_t mask, cookie, len; char name[len]; }
_EVENT = struct.Struct("=iIII")
_READ_SIZE = 64 * 1024  # far more than one event (16 + NAME_MAX + 1 bytes)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


def _open_inotify(directory: Path) -> int:
    """An inotify fd watching ``directory``; OSError if inotify is unavailable."""
    libc = _load_libc()
    if libc is None:
        raise OSError(errno.ENOSYS, "inotify is not available on this system")
    fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1 failed: {os.strerror(err)}")
    wd = libc.inotify_add_watch(fd, os.fsencode(directory), WATCH_MASK)
    if wd < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"inotify_add_watch on {directory} failed: {os.strerror(err)}")
    return fd


def parse_events(buf: bytes) -> list[tuple[int, int, bytes]]:
    """The (wd, mask, name) of each inotify event packed in ``buf``."""
    events = []
    offset = 0
    while offset + _EVENT.size <= len(buf):
        wd, mask, _cookie, name_len = _EVENT.unpack_from(buf, offset)
        start = offset + _EVENT.size
        end = start + name_len
        if end > len(buf):
            break  # truncated event: cannot happen with one read(), but never trust it
        name = buf[start:end].split(b"\0", 1)[0]
        events.append((wd, mask, name))
        offset = end
    return events


class DbWatcher:
    """Reports changes to a SQLite database file and its -wal / -journal files."""

    def __init__(self, db_path: os.PathLike[str] | str, *, use_inotify: bool = True):
        path = Path(os.path.realpath(db_path))  # SQLite names its journals after the real path
        self.db_path = path
        self._directory = path.parent
        if not self._directory.is_dir():
            raise FileNotFoundError(f"cannot watch {db_path}: directory {self._directory} does not exist")
        self._names = {os.fsencode(path.name + suffix) for suffix in ("", "-wal", "-journal")}
        self._fd: int | None = None
        self._closed = False
        self._poll_signature: tuple | None = None
        self.backend = "poll"
        if use_inotify:
            try:
                self._fd = _open_inotify(self._directory)
                self.backend = "inotify"
            except OSError as exc:
                log.warning("%s; watching %s by polling every %.1f s instead", exc, path, POLL_INTERVAL)
        if self._fd is None:
            self._poll_signature = self._signature()

    async def wait_changed(self) -> None:
        """Return once the database or its journals changed since the previous call."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("DbWatcher is closed")
            if self._fd is None:
                await trio.sleep(POLL_INTERVAL)
                if self._poll_changed():
                    return
                continue
            if self._drain():
                return
            if self._fd is not None:
                await trio.lowlevel.wait_readable(self._fd)

    def close(self) -> None:
        """Stop watching; a pending ``wait_changed`` raises ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        self._close_fd()

    def __enter__(self) -> DbWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _drain(self) -> bool:
        """Read every queued event; True if one concerns our files."""
        assert self._fd is not None
        changed = False
        while True:
            try:
                buf = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return changed
            except InterruptedError:
                continue
            if not buf:
                return changed
            for _wd, mask, name in parse_events(buf):
                if mask & IN_Q_OVERFLOW:
                    changed = True  # events were lost: assume the worst
                elif mask & IN_IGNORED:
                    # The directory went away or was unmounted: no more events will come.
                    log.warning("inotify watch on %s was removed; polling every %.1f s instead",
                                self._directory, POLL_INTERVAL)
                    self._close_fd()
                    self._poll_signature = self._signature()
                    return True
                elif name in self._names:
                    changed = True

    def _close_fd(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:
            pass  # not inside trio.run: nobody can be waiting on it
        os.close(fd)

    def _signature(self) -> tuple:
        sig = []
        for name in sorted(self._names):
            try:
                st = os.stat(self._directory / os.fsdecode(name))
            except OSError:
                sig.append(None)
            else:
                sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def _poll_changed(self) -> bool:
        sig = self._signature()
        changed = sig != self._poll_signature
        self._poll_signature = sig
        return changed
