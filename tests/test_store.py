"""The SQLite store: capture, stamping, atomic and idempotent apply, values, clocks, bad input, crashes.

Applications write through Python's stdlib ``sqlite3`` in a separate process
(see storeutil) or through the ``sqlite3`` shell; the store is p2psync's.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import require
from p2psync.model import Batch, Change, Range, VersionVector
from p2psync.model.change import MAX_COLUMNS, MAX_VALUE_BYTES
from p2psync.model.hlc import pack
from p2psync.store import NotTrackable, SqliteStore, StoreError
from storeutil import ITEMS, App, app, dump, groups, ident, join, make, now_ms, table_rows, transfer  # noqa: F401 (fixtures)

SA, SB, SC, SX = (bytes([n]) * 16 for n in (0xA1, 0xB2, 0xC3, 0xEE))


def items(app, db):
    return table_rows(app, db, "items", "id")


def count(app, db, table="items") -> int:
    return app.query(db, f'SELECT count(*) FROM "{table}"')[0][0]


def exchange(a: SqliteStore, b: SqliteStore, **kw) -> None:
    now = now_ms()
    a.stamp(now)
    b.stamp(now)
    transfer(a, b, now, **kw)
    transfer(b, a, now, **kw)


# -- tracking -------------------------------------------------------------


def test_existing_rows_become_changes_when_a_table_is_tracked(app, make, tmp_path):
    path = tmp_path / "pre.db"
    app.script(path, ITEMS)
    app.tx(path, [("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", (i, f"n{i}", i, i / 4, bytes([i]), None))
                  for i in range(5)])
    a = SqliteStore(path, SA)
    try:
        a.track("items")
        b, pb = make("b", SB)
        assert a.stamp(now_ms()) == 1
        transfer(a, b, now_ms())
        assert items(app, pb) == items(app, path) and len(items(app, pb)) == 5
    finally:
        app.disconnect(path)
        a.close()


def test_a_table_without_primary_key_is_refused(app, make):
    a, pa = make("a", SA, ITEMS + "CREATE TABLE nopk(a, b);")
    before = dump(pa)
    with pytest.raises(NotTrackable, match="primary key"):
        a.track("nopk")
    assert isinstance(NotTrackable("x"), StoreError)
    assert dump(pa) == before
    app.execute(pa, "INSERT INTO nopk VALUES (1, 2)")
    assert a.pending() == 0


@pytest.mark.parametrize("key", ["site", "Value", "col", "dbv", "wall", "e_a", "h0", "old_k"])
def test_a_key_column_named_like_p2psync_bookkeeping_is_refused_clearly(app, make, key):
    a, pa = make("a", SA, ITEMS + f'CREATE TABLE kv("{key}" TEXT, k INTEGER, x, PRIMARY KEY("{key}", k));')
    before = dump(pa)
    with pytest.raises(NotTrackable, match=f"{key}.*rename"):
        a.track("kv")
    assert dump(pa) == before
    # other tables are unaffected
    app.execute(pa, "INSERT INTO items(id) VALUES (1)")
    assert a.stamp(now_ms()) == 1


KEYED = """
CREATE TABLE comp(k TEXT, n INTEGER, v, PRIMARY KEY(k, n));
CREATE TABLE wr(k TEXT PRIMARY KEY, v INTEGER, w TEXT) WITHOUT ROWID;
CREATE TABLE tk(k TEXT PRIMARY KEY, v);
CREATE TABLE rev(a INTEGER, b TEXT, v, PRIMARY KEY(b, a)) WITHOUT ROWID;
"""
KEYED_TABLES = {"comp": "k, n", "wr": "k", "tk": "k", "rev": "b, a"}


def test_composite_without_rowid_and_text_keys_sync_both_ways(app, make):
    a, pa = make("a", SA, KEYED, KEYED_TABLES)
    b, pb = make("b", SB, KEYED, KEYED_TABLES)
    app.tx(pa, [("INSERT INTO comp VALUES (?, ?, ?)", (k, n, f"{k}{n}")) for k in "xyz" for n in range(3)]
           + [("INSERT INTO wr VALUES (?, ?, ?)", (f"k{i}", i, "w")) for i in range(4)]
           + [("INSERT INTO tk VALUES (?, ?)", (k, k * 2)) for k in ["", "é", "日本", "a b"]]
           + [("INSERT INTO rev VALUES (?, ?, ?)", (i, s, i)) for i in range(2) for s in "pq"])
    app.tx(pa, [("UPDATE comp SET v = 'changed' WHERE k = 'y'", ()), ("DELETE FROM comp WHERE n = 2", ()),
                ("UPDATE wr SET k = 'renamed' WHERE k = 'k0'", ()), ("DELETE FROM tk WHERE k = ''", ()),
                ("UPDATE rev SET v = 99 WHERE a = 1", ())])
    exchange(a, b)
    for t, order in KEYED_TABLES.items():
        assert table_rows(app, pb, t, order) == table_rows(app, pa, t, order), t
    assert table_rows(app, pb, "wr", "k")[-1] == (("str", "renamed"), ("int", 0), ("str", "w"))
    # and back from B
    app.tx(pb, [("INSERT INTO comp VALUES ('b', 7, x'00')", ()), ("UPDATE wr SET w = 'from b'", ()),
                ("DELETE FROM rev WHERE b = 'p'", ())])
    exchange(a, b)
    for t, order in KEYED_TABLES.items():
        assert table_rows(app, pa, t, order) == table_rows(app, pb, t, order), t
    assert count(app, pa, "rev") == 2 and count(app, pa, "comp") == 7


def test_a_row_with_a_null_key_is_not_synced_and_blocks_nothing(app, make):
    """SQLite lets a TEXT PRIMARY KEY be NULL; such a row cannot be identified across devices."""
    a, pa = make("a", SA, KEYED, KEYED_TABLES)
    b, pb = make("b", SB, KEYED, KEYED_TABLES)
    app.tx(pa, [("INSERT INTO tk VALUES (NULL, 'no key')", ()), ("INSERT INTO tk VALUES ('k', 'keyed')", ()),
                ("INSERT INTO comp VALUES (NULL, 1, 'no key')", ())])
    exchange(a, b)
    app.execute(pa, "UPDATE tk SET v = 'still syncing' WHERE k = 'k'")
    exchange(a, b)
    assert app.query(pb, "SELECT * FROM tk") == [("k", "still syncing")]
    assert app.query(pb, "SELECT count(*) FROM comp") == [(0,)]
    assert a.pending() == 0


def test_writes_by_the_sqlite3_shell_are_captured(app, make):
    shell = shutil.which("sqlite3")
    require(shell is not None, "the sqlite3 command-line shell is not installed")
    a, pa = make("a", SA)
    b, pb = make("b", SB)
    app.tx(pa, [("INSERT INTO items(id, name) VALUES (1, 'from python')", ())])
    for sql in ["INSERT INTO items(id, name, qty) VALUES (2, 'from shell', 5), (3, 'gone', 0);",
                "UPDATE items SET qty = 6 WHERE id = 2;",
                "DELETE FROM items WHERE id = 3;",
                "BEGIN; UPDATE items SET note = 'shell txn' WHERE id = 1; INSERT INTO items(id) VALUES (4); COMMIT;"]:
        subprocess.run([shell, str(pa), sql], check=True, capture_output=True, timeout=30)
    assert a.pending() > 0
    exchange(a, b)
    assert items(app, pb) == items(app, pa)
    assert [r[0][1] for r in items(app, pb)] == [1, 2, 4]
    assert app.query(pb, "SELECT name, qty, note FROM items WHERE id IN (1, 2) ORDER BY id") == [
        ("from python", None, "shell txn"), ("from shell", 6, None)]


def test_retracking_after_add_column_syncs_the_new_column(app, make):
    a, pa = make("a", SA)
    b, pb = make("b", SB)
    app.tx(pa, [("INSERT INTO items(id, name) VALUES (?, ?)", (i, f"r{i}")) for i in range(3)])
    exchange(a, b)
    a.track("items")  # tracking again changes nothing: existing rows are not re-sent
    assert a.pending() == 0 and a.stamp(now_ms()) is None
    app.script(pa, "ALTER TABLE items ADD COLUMN color TEXT DEFAULT 'none';")
    a.track("items")
    app.tx(pa, [("UPDATE items SET color = 'red' WHERE id = 1", ()),
                ("INSERT INTO items(id, name, color) VALUES (9, 'new', 'blue')", ()),
                ("UPDATE items SET name = 'old column still synced' WHERE id = 2", ())])
    now = now_ms()
    a.stamp(now)
    # B has not added the column yet: the changes that need it wait, the rest applies
    res = transfer(a, b, now)
    assert sum(r.held for r in res) == 2
    assert {h.reason for h in b.held()} == {"unknown-column"}
    app.script(pb, "ALTER TABLE items ADD COLUMN color TEXT DEFAULT 'none';")
    b.track("items")
    assert b.release_held(now_ms()) == 2
    assert b.held() == []
    assert items(app, pb) == items(app, pa)
    assert app.query(pb, "SELECT id, name, color FROM items ORDER BY id") == [
        (0, "r0", "none"), (1, "r1", "red"), (2, "old column still synced", "none"), (9, "new", "blue")]
    # and later writes of the new column flow both ways
    app.execute(pb, "UPDATE items SET color = 'green' WHERE id = 0")
    exchange(a, b)
    assert app.query(pa, "SELECT color FROM items WHERE id = 0") == [("green",)]
    assert items(app, pb) == items(app, pa)


# -- stamping -------------------------------------------------------------


def test_two_transactions_before_one_stamp_get_one_db_version(app, make):
    a, pa = make("a", SA)
    b, pb = make("b", SB)
    app.tx(pa, [("INSERT INTO items(id, name) VALUES (1, 'one')", ())])
    app.tx(pa, [("INSERT INTO items(id, name) VALUES (2, 'two')", ()), ("UPDATE items SET qty = 1 WHERE id = 1", ())])
    assert a.stamp(now_ms()) == 1
    assert a.stamp(now_ms()) is None
    assert a.version_vector() == VersionVector({SA: 1})
    gs = groups(a, VersionVector(), max_changes=1)
    assert len(gs) == 1 and gs[0].ranges == (Range(SA, 0, 1),)
    assert {c.dbv for c in gs[0].changes} == {1}
    b.apply(gs[0], now_ms())
    assert items(app, pb) == items(app, pa)


def test_stamping_never_splits_an_application_transaction(app, make):
    """The app commits 500-row transactions while the agent stamps as fast as it can."""
    a, pa = make("a", SA)
    b, pb = make("b", SB)
    ntx, size = 6, 500
    done = threading.Event()
    errors = []

    def writer():
        wapp = App()  # its own process, so commits really race with stamps
        try:
            for t in range(ntx):
                wapp.tx(pa, [("INSERT INTO items(id, name, qty) VALUES (?, ?, ?)", (t * size + i, f"t{t}", t))
                             for i in range(size)])
                time.sleep(0.01)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            wapp.close()
            done.set()

    th = threading.Thread(target=writer)
    th.start()
    stamps = []
    while not done.is_set():
        if (d := a.stamp(now_ms())) is not None:
            stamps.append(d)
    th.join()
    if (d := a.stamp(now_ms())) is not None:
        stamps.append(d)
    assert not errors
    assert len(stamps) >= 2, "stamps did not interleave with the writes; the test proved nothing"
    sizes = []
    for g in groups(a, VersionVector(), max_changes=1):  # one group per db version
        b.apply(g, now_ms())
        n = count(app, pb)
        sizes.append(len({c.pk for c in g.changes}))
        assert n % size == 0, f"peer saw {n} rows: part of a transaction"
        per_tx = app.query(pb, "SELECT qty, count(*) FROM items GROUP BY qty")
        assert all(c == size for _, c in per_tx), per_tx
    assert all(s % size == 0 for s in sizes), sizes
    assert count(app, pb) == ntx * size


# -- atomicity ------------------------------------------------------------


@pytest.mark.parametrize("max_changes", [1, 7, 100, 1000])
def test_a_transaction_reaches_the_peer_whole_whatever_the_batch_size(app, make, max_changes):
    a, pa = make("a", SA)
    b, pb = make("b", SB)
    c, pc = make("c", SC)
    for t in range(2):
        app.tx(pa, [("INSERT INTO items(id, name, qty) VALUES (?, ?, ?)", (t * 500 + i, f"t{t}", t)) for i in range(500)])
        a.stamp(now_ms())
    # B receives the stream as documented: parts are kept until the group's final part
    parts, applied, nparts = [], 0, 0
    for batch, more in a.changes_since(b.version_vector(), max_changes):
        nparts += 1
        parts.append(batch)
        assert count(app, pb) == applied
        if not more:
            b.apply(join(parts), now_ms())
            parts = []
            applied = count(app, pb)
            assert applied in (500, 1000)
            assert app.query(pb, "SELECT qty, count(*) FROM items GROUP BY qty") == [
                (t, 500) for t in range(applied // 500)]
    assert applied == 1000 and items(app, pb) == items(app, pa)
    if max_changes < 500:
        assert nparts > 2
    # C's connection drops just before a final part: C has nothing of that group
    stream = a.changes_since(c.version_vector(), max_changes)
    parts, seen_groups = [], 0
    for batch, more in stream:
        if not more:
            if seen_groups == 0 and len(parts) > 0:
                break  # the final part never arrives
            seen_groups += 1
            c.apply(join(parts + [batch]), now_ms())
            parts = []
            continue
        parts.append(batch)
    stream.close()
    assert count(app, pc) in (0, 500, 1000)
    if max_changes < 500:
        assert count(app, pc) == 0 and c.version_vector() == VersionVector()
    # and a later sync completes it
    transfer(a, c, now_ms(), max_changes=max_changes)
    assert items(app, pc) == items(app, pa)
    assert c.version_vector() == a.version_vector()


def test_writes_committed_after_the_last_stamp_never_leak_into_a_sync(app, make):
    """The agent reads for a peer while the app has committed writes it has not stamped yet."""
    schema = ITEMS + "CREATE TABLE strict_t(id INTEGER PRIMARY KEY, n INTEGER NOT NULL) STRICT;"
    a, pa = make("a", SA, schema, ("items", "strict_t"))
    b, pb = make("b", SB, schema, ("items", "strict_t"))
    app.tx(pa, [("INSERT INTO items(id, name) VALUES (?, 'old')", (i,)) for i in (1, 2)]
           + [("INSERT INTO strict_t VALUES (1, 10)", ())])
    a.stamp(now_ms())
    # one app transaction, committed but not stamped: change row 1, add row 3, delete rows of both tables
    app.tx(pa, [("UPDATE items SET name = 'new' WHERE id = 1", ()), ("INSERT INTO items(id, name) VALUES (3, 'new')", ()),
                ("DELETE FROM items WHERE id = 2", ()), ("DELETE FROM strict_t", ())])
    transfer(a, b, now_ms())  # must not fail on strict_t.n, nor show part of the transaction
    names = app.query(pb, "SELECT id, name FROM items ORDER BY id")
    assert names in ([], [(1, "old"), (2, "old")]), names
    assert app.query(pb, "SELECT * FROM strict_t") in ([], [(1, 10)])
    a.stamp(now_ms())
    transfer(a, b, now_ms())
    assert app.query(pb, "SELECT id, name FROM items ORDER BY id") == [(1, "new"), (3, "new")]
    assert app.query(pb, "SELECT * FROM strict_t") == []
    assert b.version_vector() == a.version_vector()


# -- idempotence ----------------------------------------------------------


def test_reapplying_a_batch_changes_nothing(app, make):
    a, pa = make("a", SA)
    b, pb = make("b", SB)
    c, pc = make("c", SC)
    app.tx(pa, [("INSERT INTO items(id, name, qty) VALUES (?, ?, ?)", (i, f"r{i}", i)) for i in range(6)])
    exchange(a, b)
    exchange(a, c)
    # concurrently: A updates rows 0..3, then C deletes rows 2..5 (a later clock) and inserts row 7
    app.tx(pa, [("UPDATE items SET name = 'a-upd' WHERE id < 4", ()), ("INSERT INTO items(id) VALUES (6)", ())])
    a.stamp(now_ms())
    time.sleep(0.005)
    app.tx(pc, [("DELETE FROM items WHERE id >= 2", ()), ("INSERT INTO items(id, name) VALUES (7, 'c')", ())])
    c.stamp(now_ms())
    transfer(c, b, now_ms())
    for src in (a, c):
        for g in groups(src, VersionVector(), max_changes=5):
            b.apply(g, now_ms())
            before, vv = dump(pb), b.version_vector()
            again = b.apply(g, now_ms())
            assert again.cells_won == 0, g
            assert again.held == 0
            assert dump(pb) == before
            assert b.version_vector() == vv
    exchange(a, c)
    exchange(a, b)
    assert items(app, pa) == items(app, pb) == items(app, pc)
    assert [r[0][1] for r in items(app, pb)] == [0, 1, 6, 7]


# -- values ---------------------------------------------------------------


VALUES = """
CREATE TABLE vals(id INTEGER PRIMARY KEY, v, i INTEGER, r REAL, t TEXT, b BLOB);
"""


def test_values_round_trip_exactly(app, make):
    a, pa = make("a", SA, VALUES, ["vals"])
    b, pb = make("b", SB, VALUES, ["vals"])
    mb = random.Random(1).randbytes(1 << 20)
    untyped = [None, 0, -1, 1, 2 ** 63 - 1, -2 ** 63, 0.1, -0.0, 0.0, 1e308, -1e308, 5e-324, float("inf"),
               float("-inf"), 1.0, "", "héllo 😀 日本語", "nul\x00inside", "\x00", b"", b"\x00\xff", mb, "x" * (1 << 20)]
    rows = [(i, v, None, None, None, None) for i, v in enumerate(untyped)]
    rows += [(100, None, 2 ** 63 - 1, 0.1, "😀\x00日本", b""), (101, None, -2 ** 63, -0.0, "", mb),
             (102, None, 0, float("inf"), "x", b"\x00"), (103, 7, 7, 7.5, "7", b"7")]
    app.tx(pa, [("INSERT INTO vals VALUES (?, ?, ?, ?, ?, ?)", r) for r in rows])
    exchange(a, b)
    got = table_rows(app, pb, "vals", "id")
    assert got == table_rows(app, pa, "vals", "id")
    assert got[:len(untyped)] == [tuple(ident(x) for x in r) for r in rows[:len(untyped)]]
    # typed columns: int stays int, float stays float, text stays text, blob stays blob
    assert app.query(pb, "SELECT typeof(i), typeof(r), typeof(t), typeof(b) FROM vals WHERE id = 103") == [
        ("integer", "real", "text", "blob")]
    # and updates carry them too (B -> A)
    app.tx(pb, [("UPDATE vals SET v = ? WHERE id = ?", (v, i)) for i, v in enumerate(reversed(untyped))])
    exchange(a, b)
    assert table_rows(app, pa, "vals", "id") == table_rows(app, pb, "vals", "id")
    assert table_rows(app, pa, "vals", "id")[0][1] == ident(untyped[-1])


def test_an_update_that_only_changes_the_type_is_synced(app, make):
    """SQL says 1 = 1.0; the capture must still see 1 -> 1.0 or the replicas disagree on the type."""
    a, pa = make("a", SA, VALUES, ["vals"])
    b, pb = make("b", SB, VALUES, ["vals"])
    app.tx(pa, [("INSERT INTO vals(id, v, t) VALUES (?, ?, ?)", (i, v, "x")) for i, v in enumerate([1, 0, 2.0, 7])])
    exchange(a, b)
    app.tx(pa, [("UPDATE vals SET v = 1.0 WHERE id = 0", ()), ("UPDATE vals SET v = 0.0 WHERE id = 1", ()),
                ("UPDATE vals SET v = 2 WHERE id = 2", ()), ("UPDATE vals SET v = '7' WHERE id = 3", ())])
    exchange(a, b)
    assert app.query(pb, "SELECT typeof(v) FROM vals ORDER BY id") == [("real",), ("real",), ("integer",), ("text",)]
    assert table_rows(app, pb, "vals", "id") == table_rows(app, pa, "vals", "id")


# -- clocks ---------------------------------------------------------------


def _row_change(site, dbv, hlc, pk, **cols):
    return Change("items", (pk,), site, dbv, hlc, True, tuple(cols), tuple(cols.values()))


@pytest.mark.parametrize("release", ["time-catches-up", "force"])
def test_a_change_from_too_far_ahead_is_held_until_time_catches_up(app, make, release):
    b, pb = make("b", SB)
    now = now_ms()
    app.execute(pb, "INSERT INTO items(id, name) VALUES (1, 'local')")
    b.stamp(now)
    hlc_before = b.hlc()
    ahead = pack(now + 3_600_000)
    batch = Batch((_row_change(SX, 1, ahead, 5, name="from the future"),
                   _row_change(SX, 1, pack(now), 6, name="on time")), (Range(SX, 0, 1),))
    res = b.apply(batch, now)
    assert res.held == 1
    assert app.query(pb, "SELECT id FROM items ORDER BY id") == [(1,), (6,)]
    held = b.held()
    assert [(h.reason, h.table, h.hlc) for h in held] == [("skew", "items", ahead)]
    assert b.hlc() == max(hlc_before, pack(now))  # the on-time change was seen, the future one was not
    assert b.release_held(now + 1000) == 0
    assert len(b.held()) == 1 and count(app, pb) == 2 and b.hlc() < ahead
    if release == "force":
        assert b.release_held(now + 1000, force=True) == 1
    else:
        assert b.release_held(now + 7_200_000) == 1
    assert b.held() == []
    assert app.query(pb, "SELECT name FROM items WHERE id = 5") == [("from the future",)]
    assert b.hlc() >= ahead  # now seen
    # a local write after that gets a later clock and wins over it
    app.execute(pb, "UPDATE items SET name = 'later' WHERE id = 5")
    b.stamp(now + 7_200_001)
    assert b.hlc() > ahead


def test_changes_for_unknown_tables_and_columns_are_held_then_applied_once_tracked(app, make):
    a, pa = make("a", SA)
    b, pb = make("b", SB)
    now = now_ms()
    batch = Batch((Change("later", ("k",), SX, 1, pack(now), True, ("v",), ("hello",)),
                   _row_change(SX, 1, pack(now), 1, name="n", extra="e"),
                   _row_change(SX, 1, pack(now), 2, name="known")), (Range(SX, 0, 1),))
    res = b.apply(batch, now)
    assert res.held == 2
    assert sorted((h.reason, h.table) for h in b.held()) == [("unknown-column", "items"), ("unknown-table", "later")]
    # the row with a column B lacks appears with the columns B has; only the unknown cell is held
    assert app.query(pb, "SELECT id, name FROM items ORDER BY id") == [(1, "n"), (2, "known")]
    # the store keeps syncing normally meanwhile
    app.execute(pa, "INSERT INTO items(id, name) VALUES (10, 'from a')")
    exchange(a, b)
    assert app.query(pb, "SELECT id FROM items ORDER BY id") == [(1,), (2,), (10,)]
    assert b.release_held(now_ms()) == 0
    app.script(pb, "CREATE TABLE later(k TEXT PRIMARY KEY, v); ALTER TABLE items ADD COLUMN extra;")
    b.track("later")
    b.track("items")
    assert b.release_held(now_ms()) == 2
    assert b.held() == []
    assert app.query(pb, "SELECT * FROM later") == [("k", "hello")]
    assert app.query(pb, "SELECT name, extra FROM items WHERE id = 1") == [("n", "e")]


def test_a_held_change_is_held_once_however_often_it_arrives(app, make):
    b, pb = make("b", SB)
    now = now_ms()
    batch = Batch((_row_change(SX, 1, pack(now + 3_600_000), 5, name="future"),), (Range(SX, 0, 1),))
    assert b.apply(batch, now).held == 1
    b.apply(batch, now)
    b.apply(Batch(batch.changes, ()), now)
    assert len(b.held()) == 1


@pytest.mark.parametrize("reason", ["skew", "unknown-column"])
def test_a_peer_that_holds_a_change_still_passes_it_on(app, make, reason):
    """B holds a change yet counts its range as received; C, syncing only with B, must get it too."""
    b, pb = make("b", SB)
    c, pc = make("c", SC, ITEMS + "ALTER TABLE items ADD COLUMN extra;")
    now = now_ms()
    if reason == "skew":
        change = _row_change(SX, 1, pack(now + 3_600_000), 5, name="from the future")
    else:
        change = _row_change(SX, 1, pack(now), 5, name="needs extra", extra="e")
    b.apply(Batch((change, _row_change(SX, 1, pack(now), 6, name="applied")), (Range(SX, 0, 1),)), now)
    assert [h.reason for h in b.held()] == [reason]
    assert b.version_vector() == VersionVector({SX: 1})
    transfer(b, c, now)
    assert c.version_vector() == VersionVector({SX: 1})
    later = now + 7_200_000 if reason == "skew" else now
    c.release_held(later)
    assert app.query(pc, "SELECT id FROM items ORDER BY id") == [(5,), (6,)]
    # and once B can apply it, B and C agree
    if reason == "unknown-column":
        app.script(pb, "ALTER TABLE items ADD COLUMN extra;")
        b.track("items")
    assert b.release_held(later) == 1
    b.stamp(later)
    c.stamp(later)
    transfer(b, c, later)
    transfer(c, b, later)
    common = "SELECT id, name, qty, price, data, note FROM items ORDER BY id"
    assert app.query(pb, common) == app.query(pc, common)
    assert len(app.query(pb, common)) == 2


# -- bad input ------------------------------------------------------------

BAD_SCHEMA = ITEMS + """
CREATE TABLE strict_t(id INTEGER PRIMARY KEY, n INTEGER NOT NULL, s TEXT) STRICT;
CREATE TABLE uniq(id INTEGER PRIMARY KEY, u TEXT UNIQUE);
"""
H = pack(1_700_000_000_000)


def _c(**kw):
    base = dict(table="items", pk=(1,), site=SX, dbv=1, hlc=H, alive=True, columns=("name",), values=("x",))
    base.update(kw)
    return Change(**base)


GOOD = _c(pk=(50,))
RANGE = (Range(SX, 0, 1),)
BAD_BATCHES = {
    "str for dbv": (Batch((_c(dbv="1"),), RANGE), "db version"),
    "str for hlc": (Batch((_c(hlc="5"),), RANGE), "hlc"),
    "bool for hlc": (Batch((_c(hlc=True),), RANGE), "hlc"),
    "bool for dbv": (Batch((_c(dbv=True),), RANGE), "db version"),
    "bool value": (Batch((_c(values=(True,)),), RANGE), "boolean"),
    "int for site": (Batch((_c(site=5),), RANGE), "site"),
    "15-byte site": (Batch((_c(site=b"x" * 15),), RANGE), "16 bytes"),
    "15-byte range site": (Batch((GOOD,), (Range(b"x" * 15, 0, 1),)), "16 bytes"),
    "str alive": (Batch((_c(alive="yes"),), RANGE), "alive"),
    "negative dbv": (Batch((_c(dbv=-1),), RANGE), "db version"),
    "zero dbv": (Batch((_c(dbv=0),), RANGE), "db version"),
    "negative hlc": (Batch((_c(hlc=-5),), RANGE), "hlc"),
    "negative range": (Batch((GOOD,), (Range(SX, -1, 1),)), "range"),
    "inverted range": (Batch((GOOD,), (Range(SX, 3, 1),)), "range"),
    "more values than columns": (Batch((_c(values=("x", "y")),), RANGE), "columns"),
    "more columns than values": (Batch((_c(columns=("name", "qty")),), RANGE), "columns"),
    "empty primary key": (Batch((_c(pk=()),), RANGE), "primary key"),
    "list for pk": (Batch((_c(pk=[1]),), RANGE), "primary key"),
    "list for columns": (Batch((_c(columns=["name"], values=["x"]),), RANGE), "tuples"),
    "nothing to set": (Batch((_c(alive=None, columns=(), values=()),), RANGE), "existence"),
    "column twice": (Batch((_c(columns=("name", "name"), values=("x", "y")),), RANGE), "twice"),
    "empty table name": (Batch((_c(table=""),), RANGE), "table name"),
    "int table name": (Batch((_c(table=7),), RANGE), "table name"),
    "int column name": (Batch((_c(columns=(7,)),), RANGE), "column name"),
    "tuple in changes": (Batch((("items", (1,)),), RANGE), "Change"),
    "list of changes": (Batch([GOOD], RANGE), "tuples"),
    "dict value": (Batch((_c(values=({},)),), RANGE), "not a SQLite value"),
    "NaN": (Batch((_c(values=(float("nan"),)),), RANGE), "NaN"),
    "int over 64 bits": (Batch((_c(values=(1 << 63,)),), RANGE), "64 bits"),
    "value over the size limit": (Batch((_c(values=(b"\0" * (MAX_VALUE_BYTES + 1),)),), RANGE), "exceeds"),
    "too many columns": (Batch((_c(columns=tuple(f"c{i}" for i in range(MAX_COLUMNS + 1)),
                                   values=(None,) * (MAX_COLUMNS + 1)),), RANGE), f"at most {MAX_COLUMNS}"),
    "too many key columns": (Batch((_c(pk=(1,) * 33),), RANGE), "primary key"),
    "huge name": (Batch((_c(table="t" * 10_000),), RANGE), "table name"),
    "good change then a bad one": (Batch((GOOD, _c(pk=(2,), hlc=-1)), RANGE), "hlc"),
    "str key for INTEGER PRIMARY KEY": (Batch((GOOD, _c(pk=("abc",))), RANGE), "items"),
    "real key for INTEGER PRIMARY KEY": (Batch((GOOD, _c(pk=(1.5,))), RANGE), "items"),
    "str for a STRICT int column": (Batch((GOOD, _c(table="strict_t", columns=("n",), values=("x",))), RANGE),
                                    "strict_t"),
    "NULL for NOT NULL": (Batch((GOOD, _c(table="strict_t", columns=("s",), values=("s",))), RANGE), "strict_t"),
    "UNIQUE violated": (Batch((GOOD, _c(table="uniq", pk=(1,), columns=("u",), values=("same",)),
                               _c(table="uniq", pk=(2,), columns=("u",), values=("same",))), RANGE), "uniq"),
}


@pytest.mark.parametrize("name", list(BAD_BATCHES))
def test_bad_input_is_refused_with_a_clear_error_and_changes_nothing(app, make, name):
    b, pb = make("b", SB, BAD_SCHEMA, ("items", "strict_t", "uniq"))
    app.execute(pb, "INSERT INTO items(id, name) VALUES (1, 'mine')")
    b.stamp(now_ms())
    before, vv, hlc = dump(pb), b.version_vector(), b.hlc()
    batch, words = BAD_BATCHES[name]
    with pytest.raises(StoreError) as e:
        b.apply(batch, 1_700_000_000_000)
    assert words.lower() in str(e.value).lower()
    assert dump(pb) == before
    assert b.version_vector() == vv and b.hlc() == hlc
    # the store still works
    b.apply(Batch((GOOD,), RANGE), 1_700_000_000_000)
    assert app.query(pb, "SELECT name FROM items WHERE id = 50") == [("x",)]


# -- durability -----------------------------------------------------------

BUILD = textwrap.dedent("""
    import random
    from p2psync.model import Batch, Change, Range

    def build_batch(seed, n, now):
        site = bytes([0xEE]) * 16
        rnd = random.Random(seed)
        hlc = (now - 1000) << 16
        changes = tuple(Change("items", (1000 + i,), site, 2, hlc, True, ("name", "qty", "data"),
                               (f"row {i}", rnd.randrange(1 << 40), rnd.randbytes(8))) for i in range(n))
        return Batch(changes, (Range(site, 1, 2),))
""")
CHILD = BUILD + textwrap.dedent("""
    import sys
    from p2psync.store import SqliteStore
    path, seed, n, now = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    batch = build_batch(seed, n, now)
    store = SqliteStore(path, bytes([0xB2]) * 16)
    print("applying", flush=True)
    store.apply(batch, now)
    print("applied", flush=True)
""")


def _child_batch(seed: int, n: int, now: int) -> Batch:
    ns: dict = {}
    exec(BUILD, ns)
    return ns["build_batch"](seed, n, now)


@pytest.mark.parametrize("when", ["after-applying-starts", "while-writing"])
def test_a_kill_during_apply_leaves_the_store_as_before_or_after_the_batch(app, make, tmp_path, when):
    """SIGKILL a process applying an 80k-row batch; the store must hold all of the batch or none of it.

    The child spends its first ~0.7 s merging in memory before it writes, so
    besides a random 0-300 ms after "applying" we also kill 0-300 ms after
    its transaction starts spilling pages into the WAL.
    """
    n, seed = 80_000, {"after-applying-starts": 1, "while-writing": 2}[when]
    rnd = random.Random(seed)
    b, pb = make("b", SB)
    now = now_ms()
    b.apply(Batch(tuple(_row_change(SX, 1, pack(now - 2000), i, name=f"first {i}") for i in range(10)),
                  (Range(SX, 0, 1),)), now)
    b.close()
    app.disconnect(pb)
    wal = Path(f"{pb}-wal")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(pb), str(seed), str(n), str(now)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "applying"
        if when == "while-writing":
            deadline = time.monotonic() + 30
            while child.poll() is None and time.monotonic() < deadline:
                if wal.exists() and wal.stat().st_size > 64 * 1024:
                    break
                time.sleep(0.002)
        time.sleep(rnd.uniform(0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    finished = "applied" in child.stdout.read()
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL or finished
    store = SqliteStore(pb, SB)
    try:
        assert store.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = store.conn.execute("SELECT count(*) FROM items").fetchall()[0][0]
        vv = store.version_vector()
        meta = store.conn.execute("SELECT count(*) FROM _p2p_meta_items").fetchall()[0][0]
        if rows == 10:
            assert vv == VersionVector({SX: 1}), "rows from before the batch but the vector moved"
            assert meta == 10 and store.held() == []
        else:
            assert rows == 10 + n, f"{rows} rows: the batch was half applied"
            assert vv == VersionVector({SX: 2}) and meta == 10 + n
        assert store.conn.execute("SELECT applying FROM _p2p_state").fetchall() == [(0,)]
        # a re-sync brings the store to the state after the batch
        batch = _child_batch(seed, n, now)
        store.apply(batch, now)
        assert store.conn.execute("SELECT count(*) FROM items").fetchall()[0][0] == 10 + n
        assert store.version_vector() == VersionVector({SX: 2})
        c = batch.changes[rnd.randrange(n)]
        assert store.conn.execute("SELECT name, qty, data FROM items WHERE id = ?", c.pk).fetchall() == [c.values]
    finally:
        store.close()
    # the application sees the rows too, and its writes are still captured
    app.execute(pb, "UPDATE items SET name = 'after the crash' WHERE id = 1000")
    store = SqliteStore(pb, SB)
    try:
        assert store.pending() == 1
    finally:
        store.close()


# -- concurrent writes ----------------------------------------------------


@pytest.mark.parametrize("later", ["local", "remote"])
def test_a_local_write_racing_a_remote_batch_for_the_same_row_converges(app, make, later):
    a, pa = make("a", SA)
    b, pb = make("b", SB)
    app.execute(pa, "INSERT INTO items(id, name, qty, note) VALUES (1, 'orig', 0, 'n')")
    exchange(a, b)

    def write_a():
        app.execute(pa, "UPDATE items SET name = 'from a', note = 'a' WHERE id = 1")
        a.stamp(now_ms())

    def write_b():  # committed by the app, not yet stamped when A's batch arrives
        app.execute(pb, "UPDATE items SET name = 'from b', qty = 2 WHERE id = 1")

    first, second = (write_a, write_b) if later == "local" else (write_b, write_a)
    first()
    time.sleep(0.01)
    second()
    assert b.pending() == 1
    transfer(a, b, now_ms())  # B stamps its pending write inside apply, then merges
    assert b.pending() == 0
    exchange(a, b)
    expected_name = "from b" if later == "local" else "from a"
    assert app.query(pa, "SELECT name, qty, note FROM items") == [(expected_name, 2, "a")]
    assert items(app, pa) == items(app, pb)


def test_delete_beats_an_older_concurrent_update_and_a_later_insert_brings_the_row_back(app, make):
    a, pa = make("a", SA)
    b, pb = make("b", SB)
    app.tx(pa, [("INSERT INTO items(id, name, qty, note) VALUES (?, 'orig', 1, 'keep?')", (i,)) for i in (1, 2)])
    exchange(a, b)
    app.execute(pa, "UPDATE items SET name = 'updated', qty = 5")  # older
    a.stamp(now_ms())
    time.sleep(0.01)
    app.execute(pb, "DELETE FROM items WHERE id = 1")  # newer
    b.stamp(now_ms())
    exchange(a, b)
    exchange(a, b)
    assert app.query(pa, "SELECT id, name, qty FROM items") == [(2, "updated", 5)]
    assert items(app, pa) == items(app, pb)
    # an update newer than a delete does not resurrect the row either: existence is its own register
    app.execute(pb, "DELETE FROM items WHERE id = 2")
    b.stamp(now_ms())
    time.sleep(0.01)
    app.execute(pa, "UPDATE items SET note = 'newer update' WHERE id = 2")
    a.stamp(now_ms())
    exchange(a, b)
    assert count(app, pa) == 0 and count(app, pb) == 0
    # a later insert of the same keys brings the rows back with all the new values
    app.execute(pa, "INSERT INTO items(id, name) VALUES (1, 'reborn')")
    app.execute(pb, "INSERT INTO items(id, price) VALUES (2, 2.5)")
    exchange(a, b)
    exchange(a, b)
    expected = [(1, "reborn", None, None, None, None), (2, None, None, 2.5, None, None)]
    assert app.query(pa, "SELECT * FROM items ORDER BY id") == expected
    assert app.query(pb, "SELECT * FROM items ORDER BY id") == expected
