"""Issue 11 figures: what row digests cost capture and apply, and a reconciliation pass per 100k rows.

"Capture" is the whole local path of a write: the application's commit (the
triggers, which digests do not touch) plus the agent's stamp (which now also
digests the stamped rows). Baseline: the same store with digests off, in the
same run. Measured twice: signing off (a store used by tools), and signing on
(what an agent runs: stamping signs each version, applying verifies it).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import apsw

from p2psync.model import Batch
from p2psync.store import SqliteStore

from .common import ROOT, line, median

N = 100_000
SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL)"


def _store(path: Path, digests: bool, group=None) -> tuple[sqlite3.Connection, SqliteStore]:
    # stdlib sqlite3 for the application, apsw for the store, one after the other (bench/store_bench.py)
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    c.execute(SCHEMA)
    s = SqliteStore(path, os.urandom(16))
    s.keep_digests = digests
    s.track("t")
    if group is not None:
        group.arm(s)
    return c, s


def _tx(c, sql, rows=None) -> float:
    t0 = time.perf_counter()
    c.execute("BEGIN")
    c.execute(sql) if rows is None else c.executemany(sql, rows)
    c.execute("COMMIT")
    return time.perf_counter() - t0


def _stamp(s: SqliteStore) -> float:
    t0 = time.perf_counter()
    s.stamp(int(time.time() * 1000))
    return time.perf_counter() - t0


def _whole(s: SqliteStore, vv) -> Batch:
    changes, ranges, proofs = [], (), []
    for batch, _ in s.changes_since(vv, max_changes=10**9, max_bytes=1 << 40):
        changes.extend(batch.changes)
        proofs.extend(batch.proofs)
        ranges = batch.ranges or ranges
    return Batch(tuple(changes), ranges, tuple(proofs))


def _one(d: Path, digests: bool, out: dict, group=None) -> None:
    rows = [(i, f"item {i}", i % 1000, i * 0.25) for i in range(N)]
    c, s = _store(d / f"a{digests}.db", digests, group)
    _, r = _store(d / f"b{digests}.db", digests, group)
    out["insert"].append(_tx(c, "INSERT INTO t VALUES (?,?,?,?)", rows) + _stamp(s))
    batch = _whole(s, r.version_vector())
    t0 = time.perf_counter()
    res = r.apply(batch, int(time.time() * 1000))
    out["apply"].append(time.perf_counter() - t0)
    assert res.cells_won == 4 * N and not res.refused, res
    out["update"].append(_tx(c, "UPDATE t SET qty = qty + 1") + _stamp(s))
    batch = _whole(s, r.version_vector())
    t0 = time.perf_counter()
    res = r.apply(batch, int(time.time() * 1000))
    out["apply_upd"].append(time.perf_counter() - t0)
    assert res.cells_won == N and not res.refused, res
    singles = []
    for i in range(300):
        singles.append(_tx(c, "UPDATE t SET name = ? WHERE id = ?", (("x", i),)) + _stamp(s))
    out["single"].append(median(singles))
    if digests and group is None:
        t0 = time.perf_counter()
        assert s.reconcile(int(time.time() * 1000)) == []
        out["reconcile"].append(time.perf_counter() - t0)
        raw = apsw.Connection(str(d / f"a{digests}.db"))
        raw.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        raw.execute("UPDATE t SET qty = -1 WHERE id % 100 = 0")   # 1% of the rows behind capture's back
        raw.close()
        t0 = time.perf_counter()
        [f] = s.reconcile(int(time.time() * 1000))
        out["reconcile_1pct"].append(time.perf_counter() - t0)
        assert f.updated == N // 100
    c.close()
    s.close()
    r.close()


def _signing_group():
    sys.path.insert(0, str(ROOT / "tests"))
    from storeutil import SigningGroup
    return SigningGroup()


def run(reps: int = 5) -> None:
    keys = ("insert", "apply", "update", "apply_upd", "single", "reconcile", "reconcile_1pct")
    res = {(signed, dig): {k: [] for k in keys} for signed in (False, True) for dig in (False, True)}
    logging.getLogger("p2psync.store").setLevel(logging.ERROR)   # the 1% found is logged, by design
    with tempfile.TemporaryDirectory() as d:
        for rep in range(reps):
            for signed in (False, True):
                for dig in ((False, True) if rep % 2 else (True, False)):
                    sub = Path(d) / f"{rep}{signed}{dig}"
                    sub.mkdir()
                    _one(sub, dig, res[(signed, dig)], _signing_group() if signed else None)
    for signed in (False, True):
        off, on = res[(signed, False)], res[(signed, True)]
        print(f"capture with row digests, signing {'on (as an agent runs)' if signed else 'off'} (median of {reps}, "
              f"100k rows of 3 columns; baseline: digests off)")
        for key, what in (("insert", "insert 100k rows + stamp"), ("update", "update 1 column of 100k + stamp"),
                          ("single", "one 1-row transaction + stamp")):
            b, x = median(off[key]), median(on[key])
            show = (lambda v: f"{v * 1000:.2f} ms") if key == "single" else (lambda v: f"{N / v:,.0f} rows/s")
            line(f"{what}, digests off", show(b), "baseline")
            line(f"{what}, digests on", show(x), f"{x / b:.2f}x time", "target <= 1.1x")
        for key, what in (("apply", "apply 100k new rows"), ("apply_upd", "apply 100k 1-column updates")):
            b, x = median(off[key]), median(on[key])
            line(f"{what}, digests off", f"{N / b:,.0f} rows/s", "baseline")
            line(f"{what}, digests on", f"{N / x:,.0f} rows/s", f"{x / b:.2f}x time")
    on, base = res[(False, True)], median(res[(False, False)]["insert"])
    print("reconciliation (signing off)")
    rc = median(on["reconcile"])
    line("pass over 100k rows, nothing found", f"{rc * 1000:.0f} ms", f"{rc / base:.2f}x insert+stamp")
    r1 = median(on["reconcile_1pct"])
    line("pass over 100k rows, 1% found and stamped", f"{r1 * 1000:.0f} ms", f"{r1 / base:.2f}x insert+stamp")
