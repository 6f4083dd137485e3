"""Online backup and restore of a device's database, through SQLite's backup API.

How this works. ``backup`` copies the live database (the application's tables
and p2psync's ``_p2p_*`` tables, which live in the same file) while the agent
and the application keep writing. It holds one read transaction on the source
connection from before the first ``sqlite3_backup_step`` until after the last:
in WAL mode that pins one snapshot, so every step copies pages of the same
committed state and the copy is exactly the database as of one commit. Writers
are not blocked (WAL readers never block writers); they append to the WAL,
which cannot be checkpointed past the snapshot, so it grows by what is written
during the backup and is reused afterwards.

Measured (/tmp experiment, 100k rows of 200 bytes, a writer process committing
one row every ~1 ms, steps of 100 pages with a 5 ms pause between steps):
with no transaction held, SQLite opens a read transaction per step, sees the
writer's commit and restarts the copy: 247-7,920 restarts and never finished
in 15 s. ``BEGIN IMMEDIATE`` (on a second connection) around each step blocks
writers during a step but not between steps, so it restarted just as often
(293 restarts, never finished). The held read transaction finished in 0.31 s,
no restart, the copy a consistent prefix of the writer's rows, passing
integrity_check, the writer's p99 commit 3.6 ms. So we take no write lock on
the source at all; the "write lock held <= ~100 ms at a time" goal holds
trivially, and the step size only bounds how long an uninterruptible step
copies. What a writer can still feel is I/O: on ext4 a writer's fsync waits
for the copy's dirty pages, and one fsync of a 260 MB copy at the end made
the writer's commits take up to 119-142 ms. So the copy is fsynced every
FLUSH_BYTES as it grows: with 16 MiB no commit during a backup took over
20 ms (1 and 4 MiB did no better), for a few percent more backup time (0.70 s
instead of 0.65 s). ``bench/backup_bench.py``, 1M rows: worst commit 16-17 ms
during backups against 2-6 ms without.

The copy is written to ``DEST.partial`` in rollback-journal mode (one
self-contained file, any page size), checked with ``PRAGMA integrity_check``,
fsynced and renamed over DEST, then the directory is fsynced.

``restore`` writes a backup INTO the existing database file through the same
API, with a connection to that file as the destination. SQLite makes this one
write transaction: other connections (an application that still has the file
open) see the old database or the restored one, never a mix, and the WAL and
shared memory stay coherent. Replacing the file by rename instead would leave
such connections on the unlinked file and a stale ``-wal`` beside the new one,
which SQLite would replay into it. Before copying, the restore takes the
database's write lock (a first step of 0 pages) and, under it, keeps a copy of
the current database as ``PATH.before-restore``, so nothing commits between
that copy and the restore, and a mistaken restore can be undone by restoring
that file. The caller makes sure the agent is stopped (cli.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import apsw

from .connection import open_db
from .errors import StoreError

STEP_PAGES = 1024            # pages copied per backup step (4 MiB at SQLite's default page size)
FLUSH_BYTES = 16 << 20        # the copy is fsynced every this many bytes written (see the docstring)
PARTIAL_SUFFIX = ".partial"
KEPT_SUFFIX = ".before-restore"


class BackupError(StoreError):
    """A backup or restore was refused or failed; the message says why and what to do."""


@dataclass(frozen=True)
class BackupReport:
    """What a backup wrote: the file, the application's rows in it, its pages and bytes, and the time taken."""

    dest: Path
    rows: int
    pages: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did: the database restored, from where, the copy kept of the previous one, and the size."""

    db: Path
    src: Path
    kept: Path | None
    rows: int
    pages: int
    seconds: float


# -- backup --------------------------------------------------------------------

def backup(db_path: str | Path, dest: str | Path, *, force: bool = False, step_pages: int = STEP_PAGES,
           between_steps: Callable[[int, int], None] | None = None) -> BackupReport:
    """Copy the database at ``db_path`` to ``dest`` as of one commit, while others write to it.

    ``between_steps(done, total)`` is called after each step but the last, in pages.
    """
    t0 = time.perf_counter()
    db_path, dest = Path(db_path).absolute(), Path(dest).absolute()
    _check_dest(db_path, dest, force)
    partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
    source = _open_existing(db_path)
    try:
        pages = _copy_snapshot(source, partial, step_pages, between_steps)
    finally:
        source.close()
    try:
        rows = _check_copy(partial)
        _fsync(partial)
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
    return BackupReport(dest, rows, pages, dest.stat().st_size, time.perf_counter() - t0)


def _check_dest(db_path: Path, dest: Path, force: bool) -> None:
    if dest.is_dir():
        raise BackupError(f"{dest} is a directory; give the backup a file name, e.g. {dest / 'backup.db'}")
    if not dest.parent.is_dir():
        raise BackupError(f"directory {dest.parent} does not exist; create it or choose another DEST")
    if dest.exists() and os.path.samefile(dest, db_path):
        raise BackupError(f"{dest} is the database itself; choose another DEST")
    if dest.exists() and not force:
        raise BackupError(f"{dest} already exists; choose another DEST, or add --force to replace it")
    for side in (Path(f"{dest}-wal"), Path(f"{dest}-journal")):   # SQLite would apply it to the new file
        if side.exists():
            raise BackupError(f"{side} exists, so {dest} is a database in use (or not closed cleanly); "
                              f"choose another DEST")


def _open_existing(path: Path) -> apsw.Connection:
    if not path.is_file():
        raise BackupError(f"{path} does not exist or is not a file")
    return open_db(path, readonly=True)


def _copy_snapshot(source: apsw.Connection, partial: Path, step_pages: int,
                   between_steps: Callable[[int, int], None] | None) -> int:
    """Copy ``source`` as of one snapshot into a new file ``partial``; its page count."""
    for leftover in (partial, Path(f"{partial}-journal"), Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)      # an earlier backup's, interrupted
    out = open_db(partial)
    try:
        out.execute("PRAGMA journal_mode=DELETE").fetchall()   # before the copy: it may change the page size
        out.execute("PRAGMA synchronous=OFF").fetchall()       # a crash leaves only .partial; fsynced before rename
        flush = _Flusher(partial, between_steps)
        try:
            source.execute("BEGIN").fetchall()
            try:
                source.execute("SELECT count(*) FROM sqlite_schema").fetchall()   # the read transaction starts here
                pages = _run_backup(out, source, step_pages, flush.step)
            finally:
                source.execute("COMMIT").fetchall()
        finally:
            flush.close()
        out.execute("PRAGMA journal_mode=DELETE").fetchall()   # the copied header says WAL, like the source's
    except BaseException:
        out.close()
        partial.unlink(missing_ok=True)
        raise
    out.close()
    return pages


class _Flusher:
    """Fsyncs the copy every FLUSH_BYTES written, so no big flush makes other writers' fsyncs wait."""

    def __init__(self, path: Path, then: Callable[[int, int], None] | None):
        self.fd, self.then, self.flushed = os.open(path, os.O_RDONLY), then, 0

    def step(self, done: int, total: int) -> None:
        size = os.fstat(self.fd).st_size
        if size - self.flushed >= FLUSH_BYTES:
            os.fsync(self.fd)
            self.flushed = size
        if self.then is not None:
            self.then(done, total)

    def close(self) -> None:
        os.close(self.fd)


def _run_backup(dest: apsw.Connection, source: apsw.Connection, step_pages: int,
                between_steps: Callable[[int, int], None] | None, before_copy: Callable[[], None] | None = None) -> int:
    """Every page of ``source`` into ``dest`` in steps; ``before_copy`` runs once ``dest`` is write-locked."""
    b = dest.backup("main", source, "main")
    try:
        done = b.step(0)              # locks the destination for writing, copies nothing
        if before_copy is not None:
            before_copy()
        while not done:
            done = b.step(step_pages)
            if not done and between_steps is not None:
                between_steps(b.pagecount - b.remaining, b.pagecount)
        return b.pagecount
    finally:
        b.finish()


def _check_copy(path: Path) -> int:
    """Rows of the application's tables in the copy at ``path``; BackupError unless integrity_check passes."""
    conn = open_db(path, readonly=True)
    try:
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check(10)")]
        if problems != ["ok"]:
            raise BackupError(f"the copy {path} fails integrity_check ({'; '.join(problems[:3])}); "
                              f"nothing was written to DEST: check the database's disk and try again")
        return _app_rows(conn)
    finally:
        conn.close()


def _app_rows(conn: apsw.Connection) -> int:
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
        "AND name NOT LIKE '\\_p2p\\_%' ESCAPE '\\' AND sql NOT LIKE 'CREATE VIRTUAL%'")]
    return sum(conn.execute(f'SELECT count(*) FROM "{t.replace(chr(34), chr(34) * 2)}"').fetchall()[0][0]
               for t in tables)


# -- restore -------------------------------------------------------------------

def restore(src: str | Path, db_path: str | Path, site_id: bytes, *, step_pages: int = STEP_PAGES) -> RestoreReport:
    """Replace the database at ``db_path`` by the backup ``src`` of this device (site ``site_id``).

    The agent must be stopped (the caller checks). The database as it was is
    kept as ``db_path`` + ``.before-restore``, replacing an older such copy.
    """
    # What a restore means for sync (db versions already sent to peers come again with other
    # contents) is handled when the agent starts: it detects the restored database ("incarnations").
    t0 = time.perf_counter()
    src, db_path = Path(src).absolute(), Path(db_path).absolute()
    kept = db_path.with_name(db_path.name + KEPT_SUFFIX)
    if db_path.exists() and src.exists() and os.path.samefile(src, db_path):
        raise BackupError(f"{src} is the database itself; give the backup file to restore")
    existed = db_path.is_file() and db_path.stat().st_size > 0
    partial = kept.with_name(kept.name + PARTIAL_SUFFIX)
    source = _open_backup(src, site_id)
    try:
        target = open_db(db_path)
        try:
            keep = (lambda: _keep_previous(db_path, partial)) if existed else None
            try:
                pages = _run_backup(target, source, step_pages, None, keep)
            except apsw.ReadOnlyError as e:
                raise _write_error(src, source, db_path, target, e) from None
            rows = _app_rows(target)
            target.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            target.close()
    except BaseException:
        partial.unlink(missing_ok=True)     # the database was not replaced: the older copy stays as it was
        raise
    finally:
        source.close()
    if existed:
        os.replace(partial, kept)
        _fsync_dir(kept.parent)
    return RestoreReport(db_path, src, kept if existed else None, rows, pages, time.perf_counter() - t0)


def _open_backup(src: Path, site_id: bytes) -> apsw.Connection:
    """``src`` opened read-only, once it is known to be an undamaged p2psync database of site ``site_id``."""
    conn = _open_existing(src)
    try:
        try:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(10)")]
        except (apsw.NotADBError, apsw.CorruptError):
            raise BackupError(f"{src} is not an SQLite database; give a file written by `p2psync backup`") from None
        if problems != ["ok"]:
            raise BackupError(f"{src} is damaged (quick_check: {'; '.join(problems[:3])}); restore another backup")
        if not conn.execute("SELECT 1 FROM sqlite_schema WHERE name = '_p2p_state'").fetchall():
            raise BackupError(f"{src} is not a p2psync database (it has no _p2p_state table); "
                              f"give a file written by `p2psync backup`")
        found = conn.execute("SELECT site_id FROM _p2p_state").fetchall()
        if not found or found[0][0] != site_id:
            other = found[0][0].hex()[:12] if found else "none"
            raise BackupError(f"{src} is a backup of another device (site {other}), not of this one "
                              f"({site_id.hex()[:12]}); restore it on that device (this one gets the "
                              f"group's data by syncing)")
    except BaseException:
        conn.close()
        raise
    return conn


def _keep_previous(db_path: Path, partial: Path) -> None:
    """Copy the database as it is now to ``partial`` (renamed to ``.before-restore`` once the restore is done)."""
    source = open_db(db_path, readonly=True)
    try:
        _copy_snapshot(source, partial, STEP_PAGES, None)
    finally:
        source.close()
    _fsync(partial)


def _write_error(src: Path, source: apsw.Connection, db_path: Path, target: apsw.Connection,
                 error: Exception) -> BackupError:
    """Why SQLite would not write ``src`` into ``db_path``: most often, page sizes that differ."""
    theirs = source.execute("PRAGMA page_size").fetchall()[0][0]
    ours = target.execute("PRAGMA page_size").fetchall()[0][0]
    if theirs == ours:
        return BackupError(f"cannot write to {db_path} ({error}); check its permissions and free space")
    return BackupError(f"cannot restore {src} into {db_path}: their page sizes differ ({theirs} and {ours} bytes) "
                       f"and a WAL database cannot change its own; on a copy of the backup run "
                       f"`sqlite3 COPY 'PRAGMA page_size={ours}; VACUUM'` and restore that copy")


# -- files ---------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
