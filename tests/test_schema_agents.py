"""Schema changes while both agents run: real agents, real migration tools as the application.

`sqlite-utils` rebuilds the table (copy, drop, rename: our triggers go with the
dropped table), with writes inside the migration's transaction and after it;
`ALTER TABLE ADD COLUMN` on one device while the other keeps the old schema.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from agents import lab, pair, wait_until  # noqa: F401  (lab is a fixture)

INSERT = "INSERT INTO items(id, name, qty, note) VALUES (?, ?, ?, ?)"




def migrate_with_sqlite_utils(db, extra_sql: str) -> None:
    """The application's migration: sqlite-utils' transform plus a data migration, in one transaction."""
    script = textwrap.dedent(f"""
        import sqlite_utils
        db = sqlite_utils.Database({str(db)!r})
        with db.conn:
            db["items"].transform(types={{"qty": float}})
            {extra_sql}
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=60)


def test_a_table_rebuilt_by_sqlite_utils_while_agents_run_loses_no_write(lab):
    a, b = pair(lab)
    a.transaction([(INSERT, (i, f"row {i}", i, None)) for i in range(1, 21)])
    lab.wait_converged(a, b)
    migrate_with_sqlite_utils(a.db, 'db.execute("INSERT INTO items VALUES (100, \'inside the migration\', 1.5, NULL)")')
    migrate_with_sqlite_utils(b.db, "")
    a.execute("UPDATE items SET note = 'after the migration' WHERE id = 3")
    a.execute("DELETE FROM items WHERE id = 4")
    b.execute(INSERT, (200, "B after its migration", 2, None))
    final = lab.wait_converged(a, b)
    rows = {r[0]: r for r in final}
    assert rows[100][1] == "inside the migration" and rows[3][3] == "after the migration"
    assert 4 not in rows and 200 in rows
    assert all(isinstance(r[2], float) for r in final if r[2] is not None)   # the new column type, everywhere
    found = a.status()["capture"]["found"]
    assert found and "rebuilt" in found[-1]["why"]
    lab.check_alive()


def test_a_column_added_while_running_reaches_a_device_on_the_old_schema_then_everything(lab):
    a, b = pair(lab)
    a.transaction([(INSERT, (i, f"row {i}", i, None)) for i in range(1, 6)])
    lab.wait_converged(a, b)
    a.execute("ALTER TABLE items ADD COLUMN colour TEXT")
    a.execute("INSERT INTO items(id, name, qty, colour) VALUES (10, 'new with colour', 1, 'red')")
    a.execute("UPDATE items SET colour = 'blue', name = 'renamed' WHERE id = 1")
    # B, on the old schema, shows every column it has of those rows
    wait_until(lambda: b.row(10) == (10, "new with colour", 1, None) and b.row(1)[1] == "renamed",
               what="B to show the columns it knows")
    wait_until(lambda: any(p.get("schema_differs") for p in b.status()["peers"]), what="B to see A's schema differs")
    assert b.status()["held"]["reasons"].get("unknown-column", 0) >= 2
    b.execute("ALTER TABLE items ADD COLUMN colour TEXT")
    b.execute("UPDATE items SET colour = 'green' WHERE id = 2")
    final = lab.wait_converged(a, b)
    rows = {r[0]: r for r in final}
    assert rows[10][4] == "red" and rows[1][4] == "blue" and rows[2][4] == "green"
    wait_until(lambda: b.status()["held"]["count"] == 0, what="B's held cells to apply")
    lab.check_alive()


def test_track_while_the_agents_run_takes_effect_at_once(lab):
    a, b = pair(lab)
    for d in (a, b):
        d.execute("CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT)")
    a.execute("INSERT INTO notes VALUES ('n1', 'written before track')")
    a.cli("track", "notes")
    b.cli("track", "notes")
    a.execute("INSERT INTO notes VALUES ('n2', 'written after track')")
    wait_until(lambda: sorted(b.query("SELECT id, body FROM notes")) == [
        ("n1", "written before track"), ("n2", "written after track")], what="B to get A's notes")
    assert "notes" in a.status()["tracked"]
    lab.check_alive()
