"""Capture that notices when it was bypassed, and live schema changes (store level).

The application is another process writing with stdlib sqlite3 (tests/storeutil.py);
migrations run the real tools: the sqlite-utils CLI and an Alembic batch migration.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import apsw
import pytest

from storeutil import app, make, now_ms, sync_all, table_rows, transfer  # noqa: F401  (fixtures)

SITE_A, SITE_B = b"A" * 16, b"B" * 16

ITEMS = "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER);"


def rows(app, path, table="items"):
    return table_rows(app, path, table, "1")


def sqlite_utils(*args: str) -> None:
    """Run the sqlite-utils command-line tool."""
    subprocess.run([sys.executable, "-m", "sqlite_utils", *args], check=True, capture_output=True)


def seeded(make, app, n=20):
    a, pa = make("a", SITE_A, ITEMS)
    b, pb = make("b", SITE_B, ITEMS)
    app.tx(pa, [("INSERT INTO items VALUES (?, ?, ?)", (i, f"item {i}", i)) for i in range(n)])
    sync_all([a, b], now_ms())
    assert rows(app, pa) == rows(app, pb)
    return a, pa, b, pb


def test_a_table_rebuilt_by_sqlite_utils_keeps_syncing_and_writes_after_it_reach_the_peer(app, make):
    a, pa, b, pb = seeded(make, app)
    # transform: create a new table, copy, drop the old one (our triggers with it), rename;
    # the application runs its migration on every device
    sqlite_utils("transform", str(pa), "items", "--type", "qty", "float")
    sqlite_utils("transform", str(pb), "items", "--type", "qty", "float")
    app.execute(pa, "UPDATE items SET name = 'after the rebuild' WHERE id = 3")
    app.execute(pa, "INSERT INTO items VALUES (100, 'new', 1.5)")
    app.execute(pa, "DELETE FROM items WHERE id = 4")
    sync_all([a, b], now_ms())
    assert rows(app, pa) == rows(app, pb)
    assert app.query(pb, "SELECT name FROM items WHERE id = 3") == [("after the rebuild",)]
    assert app.query(pb, "SELECT count(*) FROM items WHERE id IN (4, 100)") == [(1,)]
    found = a.capture_state()["found"]
    assert found and "rebuilt" in found[-1]["why"], found
    # capture works again: a later write is an ordinary captured one
    app.execute(pa, "UPDATE items SET name = 'captured' WHERE id = 5")
    assert a.pending() == 1


def test_writes_inside_the_rebuild_transaction_are_found_and_synced(app, make, tmp_path):
    a, pa, b, pb = seeded(make, app)
    # sqlite-utils' transform in the application's own transaction, with a data migration in it
    script = textwrap.dedent(f"""
        import sqlite_utils
        db = sqlite_utils.Database({str(pa)!r})
        with db.conn:
            db["items"].transform(rename={{"name": "name"}}, types={{"qty": int}})
            db.execute("UPDATE items SET qty = qty * 10")
            db.execute("INSERT INTO items VALUES (200, 'in the migration', 7)")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    sync_all([a, b], now_ms())
    assert rows(app, pa) == rows(app, pb)
    assert app.query(pb, "SELECT qty FROM items WHERE id = 2") == [(20,)]
    assert app.query(pb, "SELECT name FROM items WHERE id = 200") == [("in the migration",)]


def test_an_alembic_batch_migration_adding_a_column_syncs_the_column(app, make, tmp_path):
    a, pa, b, pb = seeded(make, app)
    mig = tmp_path / "migrate.py"
    mig.write_text(textwrap.dedent(f"""
        import sqlalchemy as sa
        from alembic.migration import MigrationContext
        from alembic.operations import Operations
        engine = sa.create_engine("sqlite:///{pa}")
        with engine.begin() as conn:
            op = Operations(MigrationContext.configure(conn))
            with op.batch_alter_table("items", recreate="always") as batch:
                batch.add_column(sa.Column("colour", sa.Text(), server_default="red"))
            conn.execute(sa.text("UPDATE items SET colour = 'blue' WHERE id < 5"))
    """))
    subprocess.run([sys.executable, str(mig)], check=True, capture_output=True)
    a.stamp(now_ms())
    assert "colour" in a.specs["items"].cols
    app.execute(pb, "ALTER TABLE items ADD COLUMN colour TEXT DEFAULT 'red'")
    sync_all([a, b], now_ms())
    assert rows(app, pa) == rows(app, pb)
    assert app.query(pb, "SELECT count(*) FROM items WHERE colour = 'blue'") == [(5,)]


def test_writes_made_with_triggers_turned_off_are_found_by_reconciliation(app, make, tmp_path):
    a, pa, b, pb = seeded(make, app)
    # A client that turns triggers off (SQLITE_DBCONFIG_ENABLE_TRIGGER) changes no schema version.
    raw = apsw.Connection(str(pa))
    try:
        raw.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        raw.execute("UPDATE items SET qty = -1 WHERE id = 7")
        raw.execute("INSERT INTO items VALUES (300, 'behind our back', 3)")
        raw.execute("DELETE FROM items WHERE id = 8")
    finally:
        raw.close()
    assert a.pending() == 0
    sync_all([a, b], now_ms())
    assert rows(app, pa) != rows(app, pb)          # stamping alone cannot see them
    found = a.reconcile(now_ms())
    assert [(f.table, f.inserted, f.updated, f.deleted) for f in found] == [("items", 1, 1, 1)]
    sync_all([a, b], now_ms())
    assert rows(app, pa) == rows(app, pb)
    assert a.capture_state()["found_total"] == 3
    assert a.reconcile(now_ms()) == [] and b.reconcile(now_ms()) == []


def test_an_update_of_only_some_columns_behind_capture_sends_only_those_columns(app, make):
    """The reconciled write must not carry columns it did not change, or it would beat a concurrent
    write of those columns on another device."""
    a, pa, b, pb = seeded(make, app)
    raw = apsw.Connection(str(pa))
    raw.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    raw.execute("UPDATE items SET qty = 1000 WHERE id = 9")
    raw.close()
    app.execute(pb, "UPDATE items SET name = 'renamed on B' WHERE id = 9")   # concurrent, another column
    b.stamp(now_ms())
    a.reconcile(now_ms())
    sync_all([a, b], now_ms())
    assert app.query(pa, "SELECT name, qty FROM items WHERE id = 9") == [("renamed on B", 1000)]
    assert rows(app, pa) == rows(app, pb)


def test_merged_values_of_every_type_and_affinity_leave_nothing_to_reconcile(app, make):
    schema = "CREATE TABLE t(id TEXT PRIMARY KEY, n NUMERIC, i INTEGER, r REAL, s TEXT, b BLOB, x);"
    a, pa = make("a", SITE_A, schema, ("t",))
    b, pb = make("b", SITE_B, schema, ("t",))
    values = [1, 1.0, "1", b"1", None, -0.0, 2 ** 62, 1e300, "text", "", b"", "3.0", 2.5]
    app.tx(pa, [("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)", (f"k{j}",) + (v,) * 6) for j, v in enumerate(values)])
    app.tx(pb, [("UPDATE t SET x = ? WHERE id = ?", (v, f"k{j}")) for j, v in enumerate(reversed(values))])
    sync_all([a, b], now_ms())
    app.tx(pb, [("UPDATE t SET s = ?, n = ? WHERE id = ?", (v, v, f"k{j}")) for j, v in enumerate(values)])
    sync_all([a, b], now_ms())
    assert a.reconcile(now_ms()) == [] and b.reconcile(now_ms()) == []
    assert table_rows(app, pa, "t", "id") == table_rows(app, pb, "t", "id")


def test_a_column_added_while_running_is_tracked_at_the_next_stamp(app, make):
    a, pa, b, pb = seeded(make, app)
    app.execute(pa, "ALTER TABLE items ADD COLUMN extra TEXT")
    app.execute(pa, "UPDATE items SET extra = 'only the new column' WHERE id = 1")  # old triggers: mask 0
    app.execute(pa, "INSERT INTO items VALUES (50, 'with extra', 5, 'x')")
    a.stamp(now_ms())
    assert a.specs["items"].cols == ("name", "qty", "extra")
    app.execute(pb, "ALTER TABLE items ADD COLUMN extra TEXT")
    sync_all([a, b], now_ms())
    assert rows(app, pa) == rows(app, pb)
    assert app.query(pb, "SELECT extra FROM items WHERE id IN (1, 50) ORDER BY id") == [
        ("only the new column",), ("x",)]


def test_track_new_columns_off_leaves_them_untracked_and_says_so(app, make):
    a, pa = make("a", SITE_A, ITEMS)
    a.track_new_columns = False
    app.execute(pa, "ALTER TABLE items ADD COLUMN extra TEXT")
    a.stamp(now_ms())
    assert a.specs["items"].cols == ("name", "qty")
    assert a.capture_state()["untracked_columns"] == {"items": ["extra"]}


def test_a_renamed_column_stops_that_table_with_a_message_and_renaming_back_resumes(app, make):
    schema = ITEMS + "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);"
    a, pa = make("a", SITE_A, schema, ("items", "notes"))
    b, pb = make("b", SITE_B, schema, ("items", "notes"))
    app.tx(pa, [("INSERT INTO items VALUES (1, 'one', 1)", ()), ("INSERT INTO notes VALUES (1, 'n')", ())])
    sync_all([a, b], now_ms())
    app.execute(pa, "ALTER TABLE items RENAME COLUMN qty TO quantity")
    app.execute(pa, "UPDATE items SET quantity = 99 WHERE id = 1")
    app.execute(pa, "INSERT INTO notes VALUES (2, 'other tables keep syncing')")
    sync_all([a, b], now_ms())
    problems = a.capture_state()["problems"]
    assert [(p["table"], p["kind"]) for p in problems] == [("items", "columns-gone")]
    assert "'qty'" in problems[0]["message"] and "rename it back" in problems[0]["message"]
    assert app.query(pb, "SELECT body FROM notes WHERE id = 2") == [("other tables keep syncing",)]
    app.execute(pa, "ALTER TABLE items RENAME COLUMN quantity TO qty")
    sync_all([a, b], now_ms())
    assert a.capture_state()["problems"] == []
    assert app.query(pb, "SELECT qty FROM items WHERE id = 1") == [(99,)]
    assert rows(app, pa) == rows(app, pb)


def test_a_changed_primary_key_is_reported_not_synced(app, make):
    a, pa = make("a", SITE_A, ITEMS)
    app.script(pa, "CREATE TABLE items2(id INTEGER, name TEXT PRIMARY KEY, qty INTEGER); "
                   "INSERT INTO items2 SELECT * FROM items; DROP TABLE items; ALTER TABLE items2 RENAME TO items;")
    a.stamp(now_ms())
    [p] = a.capture_state()["problems"]
    assert p["kind"] == "key-changed" and "['id']" in p["message"] and "['name']" in p["message"]


def test_a_database_tracked_before_digests_gets_them_without_resending_anything(app, make, tmp_path):
    a, pa = make("a", SITE_A, ITEMS)
    app.tx(pa, [("INSERT INTO items VALUES (?, 'x', 1)", (i,)) for i in range(10)])
    a.stamp(now_ms())
    dbv = a._state()[0]
    a.close()
    raw = apsw.Connection(str(pa))
    raw.execute('DROP TABLE "_p2p_digest_items"')      # as a database from before this version
    raw.close()
    a2 = type(a)(pa, SITE_A)
    try:
        assert a2.reconcile(now_ms()) == []
        assert a2._state()[0] == dbv
    finally:
        a2.close()


def test_a_device_on_the_older_schema_shows_every_column_it_has_then_catches_up(app, make):
    a, pa, b, pb = seeded(make, app, n=3)
    c, pc = make("c", b"C" * 16, ITEMS)
    app.execute(pa, "ALTER TABLE items ADD COLUMN extra TEXT")
    app.execute(pa, "INSERT INTO items VALUES (10, 'new row', 5, 'e10')")
    app.execute(pa, "UPDATE items SET name = 'both columns', extra = 'e1' WHERE id = 1")
    sync_all([a, b], now_ms())
    # B lacks `extra`: the new row and the update appear with B's columns, the cells of `extra` wait
    assert app.query(pb, "SELECT id, name, qty FROM items WHERE id IN (1, 10) ORDER BY id") == [
        (1, "both columns", 1), (10, "new row", 5)]
    assert [h.reason for h in b.held()] == ["unknown-column", "unknown-column"]
    # C, also on the old schema, gets them from B only: B passes the held cells on
    sync_all([b, c], now_ms())
    assert rows(app, pc) == rows(app, pb)
    app.execute(pb, "ALTER TABLE items ADD COLUMN extra TEXT")
    app.execute(pc, "ALTER TABLE items ADD COLUMN extra TEXT")
    for s in (b, c):
        s.stamp(now_ms())          # the schema check tracks the new column
        s.release_held(now_ms())   # (the agent does this when the tracked schema changes)
    sync_all([a, b, c], now_ms())
    assert rows(app, pa) == rows(app, pb) == rows(app, pc)
    assert app.query(pc, "SELECT extra FROM items WHERE id IN (1, 10) ORDER BY id") == [("e1",), ("e10",)]


def test_a_captured_write_does_not_hide_an_uncaptured_one_to_another_column_of_the_row(app, make):
    a, pa, b, pb = seeded(make, app)
    app.execute(pa, "UPDATE items SET name = 'captured' WHERE id = 6")          # logged: column name
    raw = apsw.Connection(str(pa))
    raw.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    raw.execute("UPDATE items SET qty = 600 WHERE id = 6")                      # not logged
    raw.close()
    a.stamp(now_ms())              # stamps `name` of row 6 only; `qty` keeps its old digest
    [f] = a.reconcile(now_ms())
    assert (f.inserted, f.updated, f.deleted) == (0, 1, 0)
    sync_all([a, b], now_ms())
    assert app.query(pb, "SELECT name, qty FROM items WHERE id = 6") == [("captured", 600)]


def test_a_captured_insert_deleted_behind_capture_before_its_stamp_is_synced_as_deleted(app, make):
    """Found by the schema convergence property test: the insert is stamped (the row is alive for
    p2psync) after the row was already gone; peers must not keep a row of NULLs."""
    a, pa, b, pb = seeded(make, app, n=2)
    app.execute(pa, "INSERT INTO items VALUES (50, 'short-lived', 1)")
    raw = apsw.Connection(str(pa))
    raw.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    raw.execute("DELETE FROM items WHERE id = 50")
    raw.close()
    sync_all([a, b], now_ms())
    a.reconcile(now_ms())
    sync_all([a, b], now_ms())
    assert app.query(pb, "SELECT count(*) FROM items WHERE id = 50") == [(0,)]
    assert rows(app, pa) == rows(app, pb)


def test_a_forwarded_cell_changed_behind_capture_is_not_sent_under_its_origins_signature(app, make):
    """B forwards A's version to C; B's copy of one cell was changed behind capture on B: C must
    get the rest of A's version (verified) and B's new value later as B's own write."""
    from storeutil import SigningGroup
    group = SigningGroup()
    a, pa = make("a", SITE_A, ITEMS)
    b, pb = make("b", SITE_B, ITEMS)
    c, pc = make("c", b"C" * 16, ITEMS)
    for s in (a, b, c):
        group.arm(s)
    app.tx(pa, [("INSERT INTO items VALUES (?, ?, ?)", (i, f"item {i}", i)) for i in range(3)])
    a.stamp(now_ms())
    transfer(a, b, now_ms())
    raw = apsw.Connection(str(pb))
    raw.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    raw.execute("UPDATE items SET qty = 99 WHERE id = 1")
    raw.close()
    results = transfer(b, c, now_ms())
    assert all(not r.refused for r in results), [r.refusals for r in results]
    assert app.query(pc, "SELECT id, name FROM items ORDER BY id") == [(0, "item 0"), (1, "item 1"), (2, "item 2")]
    b.reconcile(now_ms())
    transfer(b, c, now_ms())
    assert app.query(pc, "SELECT qty FROM items WHERE id = 1") == [(99,)]
