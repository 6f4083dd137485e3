"""DbWatcher sees commits made by another process, and stays quiet otherwise."""

from __future__ import annotations

import sqlite3
import struct
import sys
from pathlib import Path

import pytest
import trio

from p2psync.agent.watcher import IN_MODIFY, DbWatcher, parse_events

WRITER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
for i in range(int(sys.argv[2])):
    db.execute("INSERT INTO t (v) VALUES (?)", (i,))
db.close()
"""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v)")
    conn.close()
    return path


async def write_rows(db: Path, count: int) -> None:
    """Commit ``count`` rows, one transaction each, from a separate Python process."""
    await trio.run_process([sys.executable, "-c", WRITER, str(db), str(count)])


async def returns_within(watcher: DbWatcher, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        await watcher.wait_changed()
        return True
    return False


@pytest.mark.trio
async def test_commit_from_another_process_wakes_waiter(db: Path) -> None:
    woke = trio.Event()

    async def waiter() -> None:
        await watcher.wait_changed()
        woke.set()

    with DbWatcher(db) as watcher:
        assert watcher.backend == "inotify"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.01)
            assert not woke.is_set()
            await write_rows(db, 1)
            with trio.fail_after(1):
                await woke.wait()


@pytest.mark.trio
async def test_no_change_no_wakeup(db: Path) -> None:
    with DbWatcher(db) as watcher:
        assert not await returns_within(watcher, 0.3)


@pytest.mark.trio
async def test_unrelated_file_in_directory_is_ignored(db: Path) -> None:
    with DbWatcher(db) as watcher:
        (db.parent / "other.txt").write_text("hello")
        (db.parent / "app.db.bak").write_text("hello")
        assert not await returns_within(watcher, 0.3)


@pytest.mark.trio
async def test_burst_of_commits_is_coalesced(db: Path) -> None:
    with DbWatcher(db) as watcher:
        await write_rows(db, 100)
        assert await returns_within(watcher, 1)  # everything queued is drained at once
        assert not await returns_within(watcher, 0.3)


@pytest.mark.trio
async def test_waiter_keeps_up_with_burst_then_goes_quiet(db: Path) -> None:
    wakeups = 0

    async def waiter() -> None:
        nonlocal wakeups
        while True:
            await watcher.wait_changed()
            wakeups += 1

    with DbWatcher(db) as watcher:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await write_rows(db, 100)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        assert wakeups >= 1
        assert not await returns_within(watcher, 0.3)


@pytest.mark.trio
async def test_changes_between_calls_are_not_lost(db: Path) -> None:
    with DbWatcher(db) as watcher:
        await write_rows(db, 1)  # nobody is waiting yet
        assert await returns_within(watcher, 1)


@pytest.mark.trio
async def test_close_wakes_pending_waiter(db: Path) -> None:
    watcher = DbWatcher(db)
    async with trio.open_nursery() as nursery:

        async def waiter() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await watcher.wait_changed()

        nursery.start_soon(waiter)
        await trio.sleep(0.01)
        watcher.close()
    with pytest.raises(trio.ClosedResourceError):
        await watcher.wait_changed()


@pytest.mark.trio
async def test_polling_fallback_sees_commit(db: Path) -> None:
    with DbWatcher(db, use_inotify=False) as watcher:
        assert watcher.backend == "poll"
        assert not await returns_within(watcher, 0.6)
        await write_rows(db, 1)
        assert await returns_within(watcher, 1.5)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DbWatcher(tmp_path / "nope" / "app.db")


def test_parse_events_reads_packed_structs() -> None:
    def event(wd: int, mask: int, name: bytes, padded: int) -> bytes:
        field = name.ljust(padded, b"\0")
        return struct.pack("=iIII", wd, mask, 0, len(field)) + field

    buf = event(1, IN_MODIFY, b"app.db-wal", 16) + event(1, IN_MODIFY, b"", 0) + event(2, 0x100, b"x", 16)
    assert parse_events(buf) == [(1, IN_MODIFY, b"app.db-wal"), (1, IN_MODIFY, b""), (2, 0x100, b"x")]
    assert parse_events(buf[:-3]) == [(1, IN_MODIFY, b"app.db-wal"), (1, IN_MODIFY, b"")]
