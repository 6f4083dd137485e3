"""Issue 2 figures: capture overhead and apply throughput, against raw SQLite in the same run."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path

from p2psync.model import Batch
from p2psync.store import SqliteStore

from .common import line, median

N = 100_000
SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL)"
UPSERT = ("INSERT INTO t VALUES (?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
          "name=excluded.name, qty=excluded.qty, price=excluded.price")


# The "application" here uses stdlib sqlite3 and the store apsw, in one process. Two SQLite
# libraries in one process do not share file locks, so they are only ever used one after
# the other here and the store is closed last (real agents run as their own process).
def _app_db(path: Path, tracked: bool):
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    c.execute(SCHEMA)
    store = None
    if tracked:
        store = SqliteStore(path, os.urandom(16))
        store.track("t")
    return c, store


def _timed(c, sql, rows=None) -> float:
    t0 = time.perf_counter()
    c.execute("BEGIN")
    if rows is None:
        c.execute(sql)
    else:
        c.executemany(sql, rows)
    c.execute("COMMIT")
    return time.perf_counter() - t0


def _whole(parts) -> Batch:
    """All parts of a changes_since stream as one batch (ranges of the last part)."""
    changes, ranges = [], ()
    for batch, _more in parts:
        changes.extend(batch.changes)
        ranges = batch.ranges or ranges
    return Batch(tuple(changes), ranges)


def run(reps: int = 5) -> None:
    rows = [(i, f"item {i}", i % 1000, i * 0.25) for i in range(N)]
    ins_plain, ins_tracked, upd_plain, upd_tracked, stamp, apply, upsert, read, apply_upd = ([] for _ in range(9))
    with tempfile.TemporaryDirectory() as d:
        for r in range(reps):
            d_ = Path(d) / str(r)
            d_.mkdir()
            cp, _ = _app_db(d_ / "plain.db", False)
            ct, st = _app_db(d_ / "tracked.db", True)
            ins_plain.append(_timed(cp, "INSERT INTO t VALUES (?,?,?,?)", rows))
            ins_tracked.append(_timed(ct, "INSERT INTO t VALUES (?,?,?,?)", rows))
            t0 = time.perf_counter()
            st.stamp(int(time.time() * 1000))
            stamp.append(time.perf_counter() - t0)
            # apply: the 100k new rows as a remote batch into a fresh tracked replica
            _, sr = _app_db(d_ / "replica.db", True)
            t0 = time.perf_counter()
            batch = _whole(st.changes_since(sr.version_vector(), max_changes=10**9, max_bytes=1 << 40))
            read.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sr.apply(batch, int(time.time() * 1000))
            apply.append(time.perf_counter() - t0)
            cu, _ = _app_db(d_ / "upsert.db", False)
            upsert.append(_timed(cu, UPSERT, rows))
            # updates: one column of every row, captured, stamped and applied on the replica
            upd_plain.append(_timed(cp, "UPDATE t SET qty = qty + 1"))
            upd_tracked.append(_timed(ct, "UPDATE t SET qty = qty + 1"))
            st.stamp(int(time.time() * 1000))
            batch = _whole(st.changes_since(sr.version_vector(), max_changes=10**9, max_bytes=1 << 40))
            t0 = time.perf_counter()
            sr.apply(batch, int(time.time() * 1000))
            apply_upd.append(time.perf_counter() - t0)
            for x in (st, sr):
                x.close()
            for x in (cp, ct, cu):
                x.close()
    print(f"store (SQLite {sqlite3.sqlite_version} for the app, median of {reps})")
    ip, it = median(ins_plain), median(ins_tracked)
    line("insert 100k rows, plain table", f"{N / ip:,.0f} rows/s", "baseline")
    line("insert 100k rows, tracked table", f"{N / it:,.0f} rows/s", f"{it / ip:.2f}x plain time",
         "target <= 2.0x")
    up, ut = median(upd_plain), median(upd_tracked)
    line("update 1 column of 100k rows, plain", f"{N / up:,.0f} rows/s", "baseline")
    line("update 1 column of 100k rows, tracked", f"{N / ut:,.0f} rows/s", f"{ut / up:.2f}x plain time")
    line("stamp 100k logged inserts (agent side)", f"{N / median(stamp):,.0f} rows/s")
    line("read 100k rows as changes (changes_since)", f"{N / median(read):,.0f} rows/s")
    u, a = median(upsert), median(apply)
    line("raw executemany upsert, 100k rows", f"{N / u:,.0f} rows/s", "baseline")
    line("apply 100k remote row changes (new rows)", f"{N / a:,.0f} rows/s", f"{u / a * 100:.0f}% of raw upsert",
         "target >= 35%")
    line("apply 100k remote 1-column updates", f"{N / median(apply_upd):,.0f} rows/s",
         f"{u / median(apply_upd) * 100:.0f}% of raw upsert")
