"""The store contract, run against both stores: SQLite (devices) and Postgres (relays).

What a peer relies on from any store it syncs with: what it is given it
passes on whole (a device fed through the store ends up with the same
rows), it keeps and reports ranges exactly (the version vector never claims
a version it does not hold), it sends only what the asker lacks, in
transactions that are never split, it takes a batch whole or not at all,
and re-applying a batch changes nothing.

Source data always comes from a real device: an application process writes
rows with stdlib sqlite3, a SqliteStore captures and stamps them, and its
batches are fed to the store under test. What comes out is applied to a
fresh device and compared with the source table.
"""

from __future__ import annotations

import os

import pytest

from p2psync.model import Batch, Change, Range, VersionVector
from p2psync.store import StoreError
from storeutil import app, join, make, now_ms, table_rows  # noqa: F401 (fixtures)


@pytest.fixture(params=["sqlite", "postgres"])
def kind(request):
    return request.param


@pytest.fixture
def make_store(kind, make, request):  # noqa: F811
    """make_store() -> a new empty store of the kind under test (a new site)."""
    opened = []  # Postgres stores; ``make`` closes the SQLite ones

    def _make():
        site = os.urandom(16)
        if kind == "sqlite":
            return make(f"under-test-{site.hex()[:8]}", site)[0]
        from p2psync.store.postgres import PostgresStore, admit_group, connect, migrate

        dsn = request.getfixturevalue("pg_dsn")
        with connect(dsn) as c:
            migrate(c)
            gid = admit_group(c, os.urandom(16), os.urandom(32), os.urandom(16), os.urandom(32))
        s = PostgresStore(dsn, gid, site)
        opened.append(s)
        return s

    yield _make
    for s in opened:
        s.close()


@pytest.fixture
def devices(make):  # noqa: F811
    """devices(name) -> (SqliteStore, db path) of a new device with the items table tracked."""
    return lambda name: make(name, os.urandom(16))


def feed(src, dst, max_changes: int = 1000, max_bytes: int = 1 << 20) -> list[list[Batch]]:
    """Everything ``dst`` lacks from ``src``, group by group (each group applied whole); the groups as parts."""
    now = now_ms()
    src.stamp(now)
    groups, parts = [], []
    for batch, more in src.changes_since(dst.version_vector(), max_changes, max_bytes):
        parts.append(batch)
        if not more:
            dst.apply(join(parts), now)
            groups.append(parts)
            parts = []
    assert not parts, "the stream ended inside a group"
    return groups


def items(app, db):  # noqa: F811
    return table_rows(app, db, "items", "id")


def test_a_store_passes_on_inserts_updates_deletes_and_conflicts_whole(make_store, devices, app):  # noqa: F811
    store = make_store()
    a, a_db = devices("a")
    b, b_db = devices("b")
    c, c_db = devices("c")
    app.tx(a_db, [("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", (i, f"n{i}", i, i / 4, bytes([i]), None))
                  for i in range(1, 51)])
    app.execute(a_db, "UPDATE items SET qty = -1 WHERE id <= 10")
    app.execute(a_db, "DELETE FROM items WHERE id BETWEEN 41 AND 45")
    feed(a, store)
    feed(store, b)
    # concurrent writes on a and b to the same rows, then both go through the store
    app.execute(a_db, "UPDATE items SET name = 'from a' WHERE id = 1")
    app.execute(b_db, "UPDATE items SET name = 'from b' WHERE id = 1")
    app.execute(b_db, "DELETE FROM items WHERE id = 2")
    app.execute(a_db, "UPDATE items SET note = 'a note' WHERE id = 2")
    app.execute(b_db, "INSERT INTO items(id, name) VALUES (100, 'b only')")
    feed(a, store)
    feed(b, store)
    feed(store, a)
    feed(store, b)
    feed(store, c)
    assert items(app, a_db) == items(app, b_db) == items(app, c_db)
    rows = {r[0][1]: tuple(v for _, v in r) for r in items(app, c_db)}  # items() tags values with their type
    assert len(rows) == 50 - 5 + 1 - (0 if 2 in rows else 1)
    assert rows[100][1] == "b only" and 41 not in rows and rows[5][2] == -1
    assert rows[1][1] in ("from a", "from b")


def test_reapplying_a_batch_changes_nothing(make_store, devices, app):  # noqa: F811
    store = make_store()
    a, a_db = devices("a")
    app.tx(a_db, [("INSERT INTO items(id, name) VALUES (?, ?)", (i, f"n{i}")) for i in range(20)])
    groups = feed(a, store)
    vv = store.version_vector()
    before = [join(g) for g in _groups(store, VersionVector())]
    for g in groups:
        store.apply(join(g), now_ms())
    assert store.version_vector() == vv
    assert [join(g) for g in _groups(store, VersionVector())] == before


def _groups(store, vv, max_changes=1000, max_bytes=1 << 20) -> list[list[Batch]]:
    out, parts = [], []
    for batch, more in store.changes_since(vv, max_changes, max_bytes):
        parts.append(batch)
        if not more:
            out.append(parts)
            parts = []
    return out


def test_the_vector_advances_only_over_contiguous_ranges(make_store):
    store = make_store()
    site = os.urandom(16)
    ch = Change("items", (1,), site, 5, 1 << 20, True, ("name",), ("x",))
    store.apply(Batch((ch,), (Range(site, 4, 5),)), now_ms())  # versions 1..4 missing
    assert store.version_vector()[site] == 0
    store.apply(Batch((), (Range(site, 0, 4),)), now_ms())
    assert store.version_vector()[site] == 4
    store.apply(Batch((ch,), (Range(site, 4, 5),)), now_ms())
    assert store.version_vector()[site] == 5


def test_only_what_the_asker_lacks_is_sent(make_store, devices, app):  # noqa: F811
    store = make_store()
    a, a_db = devices("a")
    for i in range(1, 6):  # five transactions, five db versions
        app.execute(a_db, "INSERT INTO items(id, name) VALUES (?, ?)", (i, f"n{i}"))
        a.stamp(now_ms())
    feed(a, store)
    site = a.site_id
    assert store.version_vector()[site] == 5
    sent = [c for g in _groups(store, VersionVector({site: 3})) for p in g for c in p.changes]
    assert sorted(c.pk[0] for c in sent) == [4, 5]
    assert all(c.dbv in (4, 5) for c in sent)
    assert not [c for g in _groups(store, store.version_vector()) for p in g for c in p.changes]


@pytest.mark.parametrize("max_changes", [1, 7, 1000])
def test_batches_end_on_transaction_boundaries_and_big_ones_come_in_parts(make_store, devices, app, max_changes):  # noqa: F811
    store = make_store()
    a, a_db = devices("a")
    app.tx(a_db, [("INSERT INTO items(id, name) VALUES (?, ?)", (i, "big")) for i in range(30)])
    a.stamp(now_ms())
    app.execute(a_db, "INSERT INTO items(id, name) VALUES (100, 'small')")
    a.stamp(now_ms())
    feed(a, store, max_changes=max_changes)
    groups = _groups(store, VersionVector(), max_changes=max_changes)
    group_of: dict[int, int] = {}
    for i, g in enumerate(groups):
        assert all(not p.ranges for p in g[:-1]), "only a group's last part carries ranges"
        assert all(len(p.changes) <= max_changes for p in g)
        for p in g:
            for c in p.changes:
                assert group_of.setdefault(c.dbv, i) == i, f"transaction {c.dbv} split across groups"
    if max_changes < 30:
        assert any(len(g) > 1 for g in groups), "the 30-row transaction came in parts"
    c, c_db = devices("c")
    feed(store, c, max_changes=max_changes)
    assert items(app, c_db) == items(app, a_db)


def test_a_bad_batch_is_refused_whole_and_changes_nothing(make_store):
    store = make_store()
    site = os.urandom(16)
    good = Change("items", (1,), site, 1, 1 << 20, True, ("name",), ("x",))
    bad = Change("items", (2,), site, 1, 1 << 20, True, ("name",), (float("nan"),))
    with pytest.raises(StoreError):
        store.apply(Batch((good, bad), (Range(site, 0, 1),)), now_ms())
    assert store.version_vector()[site] == 0
    assert not [c for g in _groups(store, VersionVector()) for p in g for c in p.changes]


def test_a_site_with_nothing_left_to_send_still_gets_its_range(make_store):
    store = make_store()
    site = os.urandom(16)
    store.apply(Batch((), (Range(site, 0, 3),)), now_ms())
    groups = _groups(store, VersionVector())
    assert [r for g in groups for p in g for r in p.ranges] == [Range(site, 0, 3)]


def test_a_change_that_arrives_twice_before_its_range_goes_out_once(make_store):
    """A change can reach a store ahead of its range (it came along in another site's batch)."""
    store = make_store()
    s, t = os.urandom(16), os.urandom(16)
    ahead = Change("items", (7,), t, 3, 1 << 20, None, ("name",), ("from t",))
    own = Change("items", (8,), s, 1, 1 << 20, True, ("name",), ("from s",))
    store.apply(Batch((own, ahead), (Range(s, 0, 1),)), now_ms())
    store.apply(Batch((ahead,), (Range(t, 0, 3),)), now_ms())
    sent = [c for g in _groups(store, VersionVector()) for p in g for c in p.changes]
    assert sorted((c.site == t, c.pk) for c in sent) == [(False, (8,)), (True, (7,))]


def test_changes_shaped_like_sealed_ones_round_trip_whatever_their_value(make_store):
    """A relay stores sealed changes compactly; a member sending that shape with other values loses nothing."""
    store = make_store()
    site = os.urandom(16)
    odd = (Change("~", (b"r" * 16,), site, 1, 1 << 20, None, ("~",), ("text, not bytes",)),
           Change("~", (b"s" * 16,), site, 1, 1 << 20, None, ("~",), (None,)),
           Change("~", (b"t" * 40,), site, 1, 1 << 20, None, ("~",), (b"long key",)))
    store.apply(Batch(odd, (Range(site, 0, 1),)), now_ms())
    sent = [c for g in _groups(store, VersionVector()) for p in g for c in p.changes]
    assert sorted(sent) == sorted(odd)
