"""Convergence with schema changes: the replicas of test_convergence, plus random migrations.

On random replicas, at random moments: a column added to t1 (each device runs the
same migrations in the same order, at its own pace), a table rebuilt in one
transaction the way migration tools do it (with a data migration inside), writes
to the new columns, and writes made with triggers turned off. Devices on an older
schema meanwhile hold only the cells of columns they lack. In the end every device
has run every migration, and the tables must be identical.
"""

from __future__ import annotations

import apsw
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule, run_state_machine_as_test

from storeutil import App
from test_convergence import IDS, VALUES, Replicas, statements

EXTRA = ('x1 TEXT', "x2 INTEGER DEFAULT 7")
T1_BASE = "id INTEGER PRIMARY KEY, s TEXT, n INTEGER, r REAL, b BLOB"


class SchemaReplicas(Replicas):

    def __init__(self):
        super().__init__()
        self.extra = [0] * 5      # extra columns each replica has added (at most 5 replicas)

    def _add_column(self, i: int) -> None:
        self.app.execute(self.paths[i], f"ALTER TABLE t1 ADD COLUMN {EXTRA[self.extra[i]]}")
        self.extra[i] += 1

    @rule(r=st.integers(0, 4), stamp=st.booleans())
    def add_column(self, r, stamp):
        i = self._pick(r)
        if self.extra[i] < len(EXTRA):
            self._add_column(i)
            if stamp:
                self.stores[i].stamp(self.now)

    @rule(r=st.integers(0, 4), key=IDS, value=VALUES, which=st.integers(0, 1))
    def write_extra(self, r, key, value, which):
        i = self._pick(r)
        if self.extra[i] > which:
            col = EXTRA[which].split()[0]
            self.app.execute(self.paths[i], f"INSERT INTO t1(id, {col}) VALUES (?, ?) "
                                            f"ON CONFLICT(id) DO UPDATE SET {col} = excluded.{col}", (key, value))
            self.writes += 1

    @rule(r=st.integers(0, 4), migrate=st.sampled_from([None, 0, 3]), stamp=st.booleans())
    def rebuild(self, r, migrate, stamp):
        """Copy, drop, rename in one transaction (sqlite-utils, Alembic batch mode, Django)."""
        i = self._pick(r)
        cols = ", ".join([T1_BASE] + list(EXTRA[:self.extra[i]]))   # the same schema, defaults included
        data = "" if migrate is None else f"UPDATE t1_new SET n = coalesce(n, 0) + 1 WHERE id >= {migrate};"
        self.app.script(self.paths[i], f"BEGIN; CREATE TABLE t1_new({cols}); INSERT INTO t1_new SELECT * FROM t1; "
                                       f"{data} DROP TABLE t1; ALTER TABLE t1_new RENAME TO t1; COMMIT;")
        self.writes += 1
        if stamp:
            self.stores[i].stamp(self.now)

    @rule(r=st.integers(0, 4), stmt=statements())
    def write_behind_capture(self, r, stmt):
        """A client with triggers off (SQLITE_DBCONFIG_ENABLE_TRIGGER): nothing logged, no schema change."""
        i = self._pick(r)
        conn = apsw.Connection(str(self.paths[i]))
        try:
            conn.set_busy_timeout(5000)
            conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
            conn.execute(*stmt)
            self.writes += 1
        except apsw.ConstraintError:
            pass
        finally:
            conn.close()

    @invariant()
    def nothing_held(self):
        for s in self.stores:   # a device on an older schema holds the cells of the columns it lacks
            assert {h.reason for h in s.held()} <= {"unknown-column"}

    def converge_and_check(self):
        top = max(self.extra[:len(self.stores)], default=0)
        for i in range(len(self.stores)):
            while self.extra[i] < top:      # every device runs every migration in the end
                self._add_column(i)
        for s in self.stores:
            self.now += 1
            s.stamp(self.now)               # the schema check tracks the new columns
            s.release_held(self.now)        # (the agent does this when the tracked schema changed)
            s.reconcile(self.now)           # the writes made with triggers off
        super().converge_and_check()
        for s in self.stores:
            assert s.held() == []
            assert s.reconcile(self.now) == []   # nothing left that capture did not see


def test_replicas_converge_through_schema_changes():
    app = App()
    try:
        SchemaReplicas.app = app
        run_state_machine_as_test(SchemaReplicas, settings=settings(
            max_examples=60, stateful_step_count=50, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
    finally:
        app.close()
