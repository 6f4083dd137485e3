"""Replicas that received the same changes hold the same tables, whatever the delivery.

A Hypothesis state machine in the spirit of cr-sqlite's test_sync_prop.py:
2-5 SQLite files with the same schema, each tracked by its own SqliteStore.
An application process writes to them with stdlib ``sqlite3`` (inserts,
updates of one or several columns, deletes, insert-or-replace, key changes,
multi-statement transactions) over a tiny key space, so that conflicting
updates and delete-then-reinsert happen all the time. Pairs sync partially:
a random prefix of the stream, whole groups duplicated and reordered. In the
end an all-pairs exchange must leave every table identical, row for row and
type for type, and the version vectors equal.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from p2psync.store import SqliteStore
from storeutil import App, AppError, SigningGroup, join, table_rows

# Every replica signs the versions it stamps and applies only what verifies, as agents do
# (model/attest.py): convergence must hold with manifests on.
SIGNING = SigningGroup()


def honest(result) -> None:
    """Honest delivery, however partial, duplicated or reordered, verifies in full."""
    assert not result.refused and not result.cut and not result.conflicts, result.refusals or result.cut

SCHEMA = """
CREATE TABLE t1(id INTEGER PRIMARY KEY, s TEXT, n INTEGER, r REAL, b BLOB);
CREATE TABLE t2(k TEXT, n INTEGER, v, w TEXT NOT NULL DEFAULT '', PRIMARY KEY(k, n));
"""
ORDER = {"t1": "id", "t2": "k, n"}
T1_COLS = ("s", "n", "r", "b")
T2_COLS = ("v", "w")

IDS = st.integers(0, 5)
KS = st.sampled_from(["a", "b"])
NS = st.integers(0, 2)
VALUES = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.sampled_from([2 ** 63 - 1, -2 ** 63, 0.0, -0.0, 1.0, 0.5, float("inf"), "", "x", b"", b"\x00", "é"]),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=4),
    st.binary(max_size=4),
)
TEXTS = st.text(max_size=3)


def _set(cols, vals) -> str:
    return ", ".join(f"{c} = ?" for c in cols)


@st.composite
def statements(draw):
    """One application statement on t1 or t2."""
    kind = draw(st.sampled_from(["ins1", "ins1", "rep1", "upd1", "upd1", "updn1", "del1", "dels1", "key1",
                                 "ins2", "rep2", "upd2", "upd2", "del2", "key2", "upsert2"]))
    if kind in ("ins1", "rep1"):
        verb = "INSERT OR IGNORE" if kind == "ins1" else "INSERT OR REPLACE"
        return f"{verb} INTO t1(id, s, n, r, b) VALUES (?, ?, ?, ?, ?)", (draw(IDS),) + tuple(draw(VALUES) for _ in T1_COLS)
    if kind == "upd1":
        cols = draw(st.lists(st.sampled_from(T1_COLS), min_size=1, max_size=4, unique=True))
        return f"UPDATE t1 SET {_set(cols, None)} WHERE id = ?", tuple(draw(VALUES) for _ in cols) + (draw(IDS),)
    if kind == "updn1":  # several rows at once
        col = draw(st.sampled_from(T1_COLS))
        return f"UPDATE t1 SET {col} = ? WHERE id <= ?", (draw(VALUES), draw(IDS))
    if kind == "del1":
        return "DELETE FROM t1 WHERE id = ?", (draw(IDS),)
    if kind == "dels1":
        return "DELETE FROM t1 WHERE id >= ?", (draw(IDS),)
    if kind == "key1":
        return "UPDATE OR REPLACE t1 SET id = ? WHERE id = ?", (draw(IDS), draw(IDS))
    if kind in ("ins2", "rep2"):
        verb = "INSERT OR IGNORE" if kind == "ins2" else "INSERT OR REPLACE"
        return f"{verb} INTO t2 VALUES (?, ?, ?, ?)", (draw(KS), draw(NS), draw(VALUES), draw(TEXTS))
    if kind == "upd2":
        cols = draw(st.lists(st.sampled_from(T2_COLS), min_size=1, max_size=2, unique=True))
        vals = tuple(draw(TEXTS) if c == "w" else draw(VALUES) for c in cols)
        return f"UPDATE t2 SET {_set(cols, None)} WHERE k = ? AND n = ?", vals + (draw(KS), draw(NS))
    if kind == "del2":
        return "DELETE FROM t2 WHERE k = ? AND n = ?", (draw(KS), draw(NS))
    if kind == "key2":
        return "UPDATE OR IGNORE t2 SET n = ? WHERE k = ? AND n = ?", (draw(NS), draw(KS), draw(NS))
    return ("INSERT INTO t2 VALUES (?, ?, ?, ?) ON CONFLICT(k, n) DO UPDATE SET v = excluded.v",
            (draw(KS), draw(NS), draw(VALUES), draw(TEXTS)))


class Replicas(RuleBasedStateMachine):
    app: App  # set by the test

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="p2p-conv-"))
        self.stores: list[SqliteStore] = []
        self.paths: list[Path] = []
        self.now = 1_700_000_000_000  # in the past: stamps use min(write's wall time, now)
        self.writes = 0  # successful app transactions since the last full exchange

    @initialize(sites=st.lists(st.binary(min_size=16, max_size=16), min_size=2, max_size=5, unique=True))
    def make_replicas(self, sites):
        for i, site in enumerate(sites):
            path = self.dir / f"r{i}.db"
            self.app.script(path, SCHEMA)
            store = SIGNING.arm(SqliteStore(path, site))
            store.track("t1")
            store.track("t2")
            self.stores.append(store)
            self.paths.append(path)

    def teardown(self):
        try:
            if self.stores:
                self.converge_and_check()
        finally:
            for p in self.paths:
                self.app.disconnect(p)
            for s in self.stores:
                s.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _pick(self, i: int) -> int:
        return i % len(self.stores)

    def _write(self, r, stmts, step, stamp):
        self.now += step
        i = self._pick(r)
        try:
            self.app.tx(self.paths[i], stmts)
            self.writes += 1
        except AppError as e:  # e.g. NOT NULL on t2.w; the transaction rolled back, as an app would see
            assert "constraint" in str(e).lower(), e
        if stamp:
            self.stores[i].stamp(self.now)

    # Writes are listed twice so that they outnumber syncs; time often stands still
    # (step 0), so concurrent writes on different replicas get equal HLCs.
    @rule(r=st.integers(0, 4), stmts=st.lists(statements(), min_size=1, max_size=4),
          step=st.sampled_from([0, 0, 1, 1000]), stamp=st.booleans())
    def write(self, r, stmts, step, stamp):
        self._write(r, stmts, step, stamp)

    @rule(r=st.integers(0, 4), stmts=st.lists(statements(), min_size=1, max_size=2),
          step=st.sampled_from([0, 1, 20_000]), stamp=st.booleans())
    def write_again(self, r, stmts, step, stamp):
        self._write(r, stmts, step, stamp)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), limit=st.integers(1, 8),
          stamp_first=st.sampled_from([True, True, True, False]), rnd=st.randoms(use_true_random=False))
    def sync(self, a, b, limit, stamp_first, rnd):
        src, dst = self.stores[self._pick(a)], self.stores[self._pick(b)]
        if src is dst:
            return
        self.now += 1
        if stamp_first:
            src.stamp(self.now)
            dst.stamp(self.now)
        # a random prefix of the stream: the connection may drop anywhere, even inside a group
        cut = rnd.choice([None, None, None, rnd.randint(0, 6)])
        stream = src.changes_since(dst.version_vector(), max_changes=limit, max_bytes=rnd.choice([64, 1 << 20]))
        groups, parts = [], []
        try:
            for n, (batch, more) in enumerate(stream):
                if cut is not None and n >= cut:
                    break
                parts.append(batch)
                if not more:
                    groups.append(join(parts))
                    parts = []
        finally:
            stream.close()
        # whole groups may arrive twice and out of order
        delivered = list(groups)
        for g in groups:
            if rnd.random() < 0.25:
                delivered.insert(rnd.randint(0, len(delivered)), g)
        if rnd.random() < 0.3:
            rnd.shuffle(delivered)
        for g in delivered:
            honest(dst.apply(g, self.now))

    @rule(r=st.integers(0, 4))
    def restart(self, r):
        i = self._pick(r)
        s = self.stores[i]
        s.close()
        self.stores[i] = SIGNING.arm(SqliteStore(self.paths[i], s.site_id))

    @precondition(lambda self: self.writes >= 4)
    @rule()
    def converge(self):
        self.converge_and_check()

    @invariant()
    def nothing_held(self):
        for s in self.stores:
            assert s.held() == []

    def converge_and_check(self):
        rounds = len(self.stores) + 3
        for _ in range(rounds):
            self.now += 1
            for s in self.stores:
                s.stamp(self.now)
            before = [s.version_vector() for s in self.stores]
            for src in self.stores:
                for dst in self.stores:
                    if src is not dst:
                        parts = []
                        for batch, more in src.changes_since(dst.version_vector(), max_changes=50):
                            parts.append(batch)
                            if not more:
                                honest(dst.apply(join(parts), self.now))
                                parts = []
            if [s.version_vector() for s in self.stores] == before:
                break
        else:
            raise AssertionError(f"version vectors still changing after {rounds} rounds of all-pairs sync")
        vvs = [s.version_vector() for s in self.stores]
        assert all(v == vvs[0] for v in vvs), vvs
        for table, order in ORDER.items():
            first = table_rows(self.app, self.paths[0], table, order, signed_zero=False)
            for i, p in enumerate(self.paths[1:], 1):
                got = table_rows(self.app, p, table, order, signed_zero=False)
                assert got == first, f"{table}: replica {i} differs from replica 0"
        assert all(s.pending() == 0 for s in self.stores)
        self.writes = 0


@pytest.fixture(scope="module")
def app():
    a = App()
    yield a
    a.close()


def test_replicas_converge(app):
    Replicas.app = app
    run_state_machine_as_test(Replicas, settings=settings(
        max_examples=50, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
