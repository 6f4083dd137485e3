"""Review probes of the SQLite store: scenarios where replicas must converge."""

from __future__ import annotations

import shutil
import time

import pytest

from p2psync.model import VersionVector
from p2psync.store import SqliteStore
from storeutil import App, app, dump, make, now_ms, table_rows, transfer  # noqa: F401 (fixtures)

SA, SB, SC = (bytes([n]) * 16 for n in (0xA1, 0xB2, 0xC3))



def exchange(a, b):
    now = now_ms()
    a.stamp(now)
    b.stamp(now)
    transfer(a, b, now)
    transfer(b, a, now)


UNIQ = """
CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE, name TEXT,
                   team TEXT, login TEXT COLLATE NOCASE, UNIQUE(team, login) ON CONFLICT REPLACE);
"""


def users(app, db):
    return app.query(db, "SELECT * FROM users ORDER BY id")


def test_rows_deleted_by_replace_on_a_unique_column_are_deleted_on_peers_too(app, make):
    """SQLite fires no DELETE trigger for rows a REPLACE removes through a UNIQUE index.

    Before the fix the peer kept the old row and then refused the new one for
    ever (UNIQUE constraint failed): sync between the two stalled.
    """
    a, pa = make("a", SA, UNIQ, ["users"])
    b, pb = make("b", SB, UNIQ, ["users"])
    app.tx(pa, [("INSERT INTO users VALUES (1, 'x@e', 'one', 't', 'Ann')", ()),
                ("INSERT INTO users VALUES (2, 'y@e', 'two', 't', 'Bob')", ()),
                ("INSERT INTO users VALUES (3, 'z@e', 'three', 't', 'Cy')", ()),
                ("INSERT INTO users VALUES (4, 'w@e', 'four', 'u', 'Di')", ())])
    exchange(a, b)
    app.execute(pa, "INSERT OR REPLACE INTO users VALUES (5, 'x@e', 'five', NULL, NULL)")  # replaces 1
    app.execute(pa, "UPDATE OR REPLACE users SET email = 'y@e' WHERE id = 3")  # replaces 2
    app.execute(pa, "INSERT INTO users VALUES (6, NULL, 'six', 'u', 'DI')")  # ON CONFLICT REPLACE, NOCASE: 4
    # these delete nothing: an ignored insert, an upsert, a NULL (NULLs never clash)
    app.execute(pa, "INSERT OR IGNORE INTO users VALUES (7, 'y@e', 'seven', NULL, NULL)")
    app.execute(pa, "INSERT INTO users VALUES (8, 'x@e', 'eight', NULL, NULL) "
                    "ON CONFLICT(email) DO UPDATE SET name = 'five!'")
    app.execute(pa, "INSERT OR REPLACE INTO users VALUES (9, NULL, 'nine', NULL, NULL)")
    exchange(a, b)
    expected = [(3, 'y@e', 'three', 't', 'Cy'), (5, 'x@e', 'five!', None, None),
                (6, None, 'six', 'u', 'DI'), (9, None, 'nine', None, None)]
    assert users(app, pa) == expected
    assert users(app, pb) == expected
    # and the peer keeps syncing
    app.execute(pa, "UPDATE users SET name = 'later' WHERE id = 3")
    exchange(a, b)
    assert users(app, pb)[0] == (3, 'y@e', 'later', 't', 'Cy')
    assert a.pending() == 0 and b.pending() == 0


def test_a_new_replica_gets_the_default_of_a_column_added_after_the_row_was_written(app, make):
    """Rows older than an ALTER TABLE ADD COLUMN have no clock for it; a receiver must use the default.

    Before the fix a new device created those rows with NULL there: a NOT NULL
    column made every batch fail (sync stalled), a nullable one diverged.
    """
    a, pa = make("a", SA, "CREATE TABLE t(id INTEGER PRIMARY KEY, a TEXT);", ["t"])
    app.execute(pa, "INSERT INTO t VALUES (1, 'x')")
    a.stamp(now_ms())
    app.script(pa, "ALTER TABLE t ADD COLUMN z TEXT NOT NULL DEFAULT 'd'; ALTER TABLE t ADD COLUMN y DEFAULT 7;")
    a.track("t")
    app.execute(pa, "INSERT INTO t(id, a) VALUES (2, 'new')")
    c, pc = make("c", SC, "CREATE TABLE t(id INTEGER PRIMARY KEY, a TEXT, z TEXT NOT NULL DEFAULT 'd', y DEFAULT 7);",
                 ["t"])
    exchange(a, c)
    assert app.query(pc, "SELECT * FROM t ORDER BY id") == [(1, "x", "d", 7), (2, "new", "d", 7)]
    assert table_rows(app, pc, "t", "id") == table_rows(app, pa, "t", "id")


def test_concurrent_updates_of_different_columns_beyond_the_62nd_both_survive(app, make):
    """Tables wider than the trigger's 62-bit mask: each column is still its own register.

    Before the fix an update of any column >= 62 stamped all of them, so a
    concurrent update of another such column on a peer was lost.
    """
    cols = ", ".join(f"c{i} INTEGER" for i in range(130))
    schema = f'CREATE TABLE w(id INTEGER PRIMARY KEY, {cols});'
    a, pa = make("a", SA, schema, ["w"])
    b, pb = make("b", SB, schema, ["w"])
    app.execute(pa, "INSERT INTO w(id) VALUES (1)")
    exchange(a, b)
    app.execute(pb, "UPDATE w SET c68 = 2, c129 = 2, c1 = 2 WHERE id = 1")
    b.stamp(now_ms())
    time.sleep(0.005)
    app.execute(pa, "UPDATE w SET c65 = 1, c124 = 1, c2 = 1 WHERE id = 1")  # later, other columns
    a.stamp(now_ms())
    app.execute(pa, "UPDATE w SET c3 = c3 WHERE id = 1")  # changes nothing: no new db version
    assert a.stamp(now_ms()) is None
    exchange(a, b)
    want = [(2, 1, 2, 1, 2, 1)]
    sql = "SELECT c1, c2, c68, c65, c129, c124 FROM w"
    assert app.query(pa, sql) == want
    assert app.query(pb, sql) == want


def test_a_database_restored_from_a_backup_does_not_reuse_its_db_versions(app, make, tmp_path):
    """A device restored from an older copy gets its own writes back from peers, and its new
    writes reach them. Before the fix it numbered new writes with db versions that peers
    already had from it, so they never asked for them: those writes never left the device."""
    schema = "CREATE TABLE t(id INTEGER PRIMARY KEY, a TEXT);"
    a, pa = make("a", SA, schema, ["t"])
    b, pb = make("b", SB, schema, ["t"])
    app.execute(pa, "INSERT INTO t VALUES (1, 'x')")
    exchange(a, b)
    backup = tmp_path / "backup.db"
    a.conn.execute(f"VACUUM INTO '{backup}'")
    for i in (2, 3):
        app.execute(pa, "INSERT INTO t VALUES (?, 'lost with the disk')", (i,))
        exchange(a, b)
    a.close()
    app.disconnect(pa)
    restored = tmp_path / "restored.db"
    shutil.copy(backup, restored)
    a = SqliteStore(restored, SA)
    try:
        exchange(a, b)  # catches up, its own writes included
        app.execute(restored, "INSERT INTO t VALUES (4, 'after the restore')")
        exchange(a, b)
        want = [(1, "x"), (2, "lost with the disk"), (3, "lost with the disk"), (4, "after the restore")]
        assert app.query(restored, "SELECT * FROM t ORDER BY id") == want
        assert app.query(pb, "SELECT * FROM t ORDER BY id") == want
        assert a.version_vector() == b.version_vector()
    finally:
        app.disconnect(restored)
        a.close()


def test_a_site_whose_writes_were_all_superseded_still_completes_a_peers_vector(app, make):
    """C learns A's range from B with no change in it (B's write superseded A's); C must pass that
    range on. Before the fix D never got it from C: D's vector stayed behind for ever."""
    schema = "CREATE TABLE t(id INTEGER PRIMARY KEY, a TEXT);"
    a, pa = make("a", SA, schema, ["t"])
    b, pb = make("b", SB, schema, ["t"])
    c, _ = make("c", SC, schema, ["t"])
    d, pd = make("d", bytes([0xD4]) * 16, schema, ["t"])
    app.execute(pa, "INSERT INTO t VALUES (1, 'a')")
    a.stamp(now_ms())
    transfer(a, b, now_ms())
    time.sleep(0.005)
    app.execute(pb, "INSERT OR REPLACE INTO t VALUES (1, 'b')")
    b.stamp(now_ms())
    transfer(b, c, now_ms())
    transfer(c, d, now_ms())
    assert c.version_vector() == b.version_vector() == VersionVector({SA: 1, SB: 1})
    assert d.version_vector() == c.version_vector()
    assert app.query(pd, "SELECT * FROM t") == [(1, "b")]


def test_a_row_whose_key_is_set_to_null_is_deleted_on_peers(app, make):
    """A row moved to a NULL key (allowed for TEXT keys) leaves sync; peers must not keep the old key."""
    schema = "CREATE TABLE tk(k TEXT PRIMARY KEY, v); CREATE TABLE comp(k TEXT, n INTEGER, v, PRIMARY KEY(k, n));"
    a, pa = make("a", SA, schema, ["tk", "comp"])
    b, pb = make("b", SB, schema, ["tk", "comp"])
    app.tx(pa, [("INSERT INTO tk VALUES ('k', 1)", ()), ("INSERT INTO comp VALUES ('k', 1, 1)", ())])
    exchange(a, b)
    app.tx(pa, [("UPDATE tk SET k = NULL WHERE k = 'k'", ()), ("UPDATE comp SET n = NULL", ())])
    exchange(a, b)
    assert app.query(pb, "SELECT count(*) FROM tk") == [(0,)]
    assert app.query(pb, "SELECT count(*) FROM comp") == [(0,)]
    # and back: a NULL key given a real one is a new row
    app.execute(pa, "UPDATE tk SET k = 'back' WHERE k IS NULL")
    exchange(a, b)
    assert app.query(pb, "SELECT * FROM tk") == [("back", 1)]
