"""The one place that opens SQLite connections for p2psync."""

from __future__ import annotations

from pathlib import Path

import apsw

BUSY_TIMEOUT_MS = 5000


def open_db(path: str | Path, *, readonly: bool = False) -> apsw.Connection:
    """Open ``path`` in WAL mode with a busy timeout (full sync for the writer)."""
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    conn = apsw.Connection(str(path), flags=flags)
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
        if mode.lower() != "wal":
            raise apsw.CantOpenError(f"{path}: could not switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL").fetchall()
    return conn
