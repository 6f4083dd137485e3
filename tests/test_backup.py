"""`p2psync backup` copies a live database as of one commit; `restore` puts this device's backup back."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from agents import Lab, lab, wait_until  # noqa: F401  (lab is a fixture)

from p2psync.store.backup import backup
from p2psync.store.connection import open_db

PRELOAD = 3000   # rows in the table before the writer starts: enough pages for many small steps
STEP_PAGES = 8

# Commits items(id=i), i = START, START+1, ..., one per transaction, through stdlib sqlite3 in WAL
# mode (as an application would), and prints each id once it is committed.
WRITER = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("PRAGMA journal_mode=WAL")
i = int(sys.argv[2])
while True:
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO items(id, name, qty, note) VALUES (?, 'w', ?, ?)", (i, i, "n" * 200))
    c.execute("COMMIT")
    print(i, flush=True)
    i += 1
"""


# An application holding a read transaction open until told to go on, then reading anew.
APP = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("BEGIN")
print("snapshot", c.execute("SELECT count(*) FROM items").fetchone()[0], flush=True)
sys.stdin.readline()
print("snapshot", c.execute("SELECT count(*) FROM items").fetchone()[0], flush=True)
c.execute("COMMIT")
print("now", c.execute("SELECT count(*) FROM items").fetchone()[0], c.execute("PRAGMA quick_check").fetchone()[0],
      flush=True)
"""


class Writer:
    """The writer process, and the last id it reported committed."""

    def __init__(self, db: Path, start: int):
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(start)],
                                     stdout=subprocess.PIPE, text=True)
        self.last = -1
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for text in self.proc.stdout:
            self.last = int(text)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


def query(db: Path, sql: str) -> list[tuple]:
    conn = open_db(db, readonly=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def ids(db: Path) -> list[int]:
    return [r[0] for r in query(db, "SELECT id FROM items ORDER BY id")]


def preload(dev, rows: range) -> None:
    dev.transaction(("INSERT INTO items(id, name, qty, note) VALUES (?, 'p', ?, ?)", (i, i, "p" * 200)) for i in rows)


def test_backup_while_another_process_commits_is_one_consistent_commit(lab, tmp_path):
    (a,) = lab.devices(1)
    preload(a, range(PRELOAD))
    writer = Writer(a.db, PRELOAD)
    steps, commits_between_steps = [], []
    try:
        wait_until(lambda: writer.last >= PRELOAD + 20, what="the writer's first commits")
        committed_before = writer.last

        def between_steps(done: int, total: int) -> None:
            assert not steps or done > steps[-1], f"the backup restarted (at page {done} after {steps[-1]})"
            steps.append(done)
            seen = writer.last   # the writer commits while the backup is under way, between its steps
            wait_until(lambda: writer.last > seen, timeout=10, interval=0.001, what="a commit between two steps")
            commits_between_steps.append(writer.last - seen)

        report = backup(a.db, tmp_path / "copy.db", step_pages=STEP_PAGES, between_steps=between_steps)
    finally:
        writer.stop()
    copy = tmp_path / "copy.db"
    assert report.dest == copy and report.bytes == copy.stat().st_size
    assert not (tmp_path / "copy.db.partial").exists()
    assert query(copy, "PRAGMA integrity_check") == [("ok",)]
    assert query(copy, "PRAGMA journal_mode") == [("delete",)]    # one self-contained file

    got = ids(copy)
    k = got[-1]
    assert got == list(range(k + 1)), "the copy is not a prefix of the writer's commits"
    assert k >= committed_before, "rows committed before the backup started are missing"
    assert report.rows == len(got)
    assert len(steps) >= 10 and sum(commits_between_steps) >= len(steps)
    assert writer.last > k + len(steps) - 1, "the writer was not committing during the backup"

    # The sync metadata is in the copy, as of the same commit as the rows.
    assert query(copy, "SELECT hex(site_id) FROM _p2p_state") == [(a.site.upper(),)]
    assert query(copy, "SELECT name FROM _p2p_tables") == [("items",)]
    logged = [r[0] for r in query(copy, 'SELECT id FROM "_p2p_log_items" WHERE op = 1 ORDER BY id')]
    assert logged == got


def test_restore_round_trip_keeps_the_previous_database(lab, tmp_path):
    (a,) = lab.devices(1)
    preload(a, range(100))
    bk = tmp_path / "a-backup.db"
    out = a.cli("backup", str(bk)).stdout
    assert "backed up" in out and "100 rows" in out
    at_backup = a.rows()

    a.execute("DELETE FROM items WHERE id < 50")
    a.execute("INSERT INTO items(id, name) VALUES (1000, 'after the backup')")
    changed = a.rows()

    # An application that keeps the file open (here with a read transaction too) across the restore.
    app = subprocess.Popen([sys.executable, "-c", APP, str(a.db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert app.stdout.readline().split() == ["snapshot", str(len(changed))]
        out = a.cli("restore", str(bk)).stdout
        app.stdin.write("\n")
        app.stdin.flush()
        assert app.stdout.readline().split() == ["snapshot", str(len(changed))]    # its snapshot is intact
        assert app.stdout.readline().split() == ["now", str(len(at_backup)), "ok"]
    finally:
        app.kill()
        app.wait(10)
        app.stdin.close()
        app.stdout.close()
    kept = Path(f"{a.db}.before-restore")
    assert str(kept) in out
    assert a.rows() == at_backup
    assert query(kept, "SELECT id, name, qty, note FROM items ORDER BY id") == changed
    assert query(a.db, "SELECT hex(site_id) FROM _p2p_state") == [(a.site.upper(),)]
    assert query(a.db, "PRAGMA integrity_check") == [("ok",)]

    # A mistaken restore is undone by restoring the copy it kept (which then keeps the undone state).
    a.cli("restore", str(kept), "--db", str(a.db))
    assert a.rows() == changed
    assert query(kept, "SELECT id, name, qty, note FROM items ORDER BY id") == at_backup


def test_restore_refuses_another_devices_backup_a_foreign_file_and_a_running_agent(lab, tmp_path):
    (a,) = lab.devices(1)
    preload(a, range(10))
    mine = tmp_path / "mine.db"
    a.cli("backup", str(mine))

    other_lab = Lab(tmp_path / "other-group")
    try:
        (b,) = other_lab.devices(1)
        theirs = tmp_path / "theirs.db"
        b.cli("backup", str(theirs))
    finally:
        other_lab.close()

    plain = tmp_path / "plain.db"
    subprocess.run([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                    "c.execute('CREATE TABLE items(id INTEGER PRIMARY KEY)'); c.commit()", str(plain)], check=True)
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)

    before = a.rows()
    for src, why in ((theirs, "backup of another device"), (plain, "not a p2psync database"),
                     (text, "not an SQLite database"), (tmp_path / "missing.db", "does not exist")):
        r = a.cli("restore", str(src), check=False)
        assert r.returncode == 1 and why in r.stderr, (src, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert a.rows() == before
    assert not Path(f"{a.db}.before-restore").exists()

    lab.start(a)      # a real agent for this home
    r = a.cli("restore", str(mine), check=False)
    assert r.returncode == 1 and "an agent is running" in r.stderr and "stop it" in r.stderr, r.stderr
    assert not Path(f"{a.db}.before-restore").exists()
    lab.stop(a)
    a.cli("restore", str(mine))
    assert a.rows() == before


def test_backup_refuses_an_existing_dest_unless_forced(lab, tmp_path):
    (a,) = lab.devices(1)
    preload(a, range(5))
    dest = tmp_path / "taken.db"
    dest.write_text("someone else's file")
    r = a.cli("backup", str(dest), check=False)
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr, r.stderr
    assert dest.read_text() == "someone else's file"

    a.cli("backup", str(dest), "--force")
    assert ids(dest) == list(range(5))
