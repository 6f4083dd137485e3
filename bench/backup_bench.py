"""What an online backup costs (`p2psync backup`): its time, and what a concurrent writer feels.

A tracked database (100k rows, then 1M: table ``t`` with its p2psync metadata, stamped) is
backed up while another process commits one row per transaction every ~2 ms through stdlib
sqlite3 in WAL mode, synchronous=FULL, as an application would. The writer logs each commit's
latency (BEGIN IMMEDIATE to COMMIT returned) with its start time on CLOCK_MONOTONIC, which this
process shares, so commits are sorted into the windows when a backup ran and a window of the same
length before, with no backup (the baseline).

    backup     seconds per backup (median of RUNS; integrity_check and fsync included), against
               copying the file with cp semantics + fsync (inconsistent, the raw I/O floor)
    writer     commit latency p50 / p99 / max during the backups, against the baseline window
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from .common import PY, line, median

RUNS = 5
PACE_S = 0.002
SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, note TEXT);"
WRITER = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=FULL")
out, i = open(sys.argv[2], "w"), 10**9
while True:
    t0 = time.monotonic()
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO t(id, name, qty, note) VALUES (?, 'w', 1, 'written during the bench')", (i,))
    c.execute("COMMIT")
    out.write(f"{t0:.6f} {time.monotonic() - t0:.6f}\n"); out.flush()
    i += 1
    time.sleep(%r)
""" % PACE_S


def _tracked_db(path: Path, rows: int) -> float:
    """A stamped, tracked database of ``rows`` rows at ``path``; seconds it took to build."""
    from p2psync.store import SqliteStore

    t0 = time.perf_counter()
    c = sqlite3.connect(path)
    c.execute("PRAGMA journal_mode=WAL")
    c.executescript(SCHEMA)
    c.close()
    store = SqliteStore(path, b"B" * 16)
    store.track("t")
    store.close()
    c = sqlite3.connect(path)
    c.executemany("INSERT INTO t VALUES (?, ?, ?, ?)",
                  ((i, f"item {i}", i % 1000, f"note {i} " * 8) for i in range(rows)))
    c.commit()
    c.close()
    store = SqliteStore(path, b"B" * 16)
    store.stamp(int(time.time() * 1000))
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    store.close()
    return time.perf_counter() - t0


def _raw_copy(src: Path, dest: Path) -> float:
    t0 = time.perf_counter()
    shutil.copyfile(src, dest)
    fd = os.open(dest, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - t0
    dest.unlink()
    return elapsed


def _latencies(log: Path, windows: list[tuple[float, float]]) -> list[float]:
    """Sorted latencies (s) of the commits that started inside one of ``windows``."""
    out = []
    for text in log.read_text().splitlines():
        parts = text.split()
        if len(parts) == 2:
            start, lat = float(parts[0]), float(parts[1])
            if any(a <= start <= b for a, b in windows):
                out.append(lat)
    return sorted(out)


def _pct(xs: list[float]) -> str:
    if not xs:
        return "no commits"
    q = lambda p: xs[min(len(xs) - 1, int(len(xs) * p))] * 1000  # noqa: E731
    return f"{q(.5):.2f} / {q(.99):.1f} / {xs[-1] * 1000:.1f} ms"


def _one_size(base: Path, rows: int) -> None:
    from p2psync.store.backup import backup
    from p2psync.store.connection import open_db

    db = base / f"t{rows}.db"
    built = _tracked_db(db, rows)
    size = db.stat().st_size
    label = f"{rows // 1000}k rows" if rows < 10**6 else f"{rows // 10**6}M rows"
    print(f"  {label}: {size / 2**20:.0f} MiB tracked database (built in {built:.1f} s)")
    raw = median([_raw_copy(db, base / "raw.db") for _ in range(RUNS)])
    log = base / f"writer{rows}.log"
    writer = subprocess.Popen([PY, "-c", WRITER, str(db), str(log)])
    try:
        time.sleep(1.0)                       # the writer's first commits: WAL created, warm
        times, windows, checks = [], [], []
        for k in range(RUNS):
            dest = base / f"copy{k}.db"
            start = time.monotonic()
            report = backup(db, dest)
            windows.append((start, time.monotonic()))
            times.append(report.seconds)
            conn = open_db(dest, readonly=True)
            t0 = time.perf_counter()
            conn.execute("PRAGMA integrity_check").fetchall()
            checks.append(time.perf_counter() - t0)
            conn.close()
            dest.unlink()
            time.sleep(0.3)
        busy = sum(b - a for a, b in windows)
        quiet_start = time.monotonic()
        time.sleep(max(busy, 2.0))
        quiet = [(quiet_start, time.monotonic())]
    finally:
        writer.terminate()
        writer.wait(10)
    t = median(times)
    line(f"backup, {label}", f"{t:.2f} s", f"{t / raw:.1f}x raw copy+fsync {raw:.2f} s",
         f"{size / 2**20 / t:.0f} MiB/s; integrity_check alone {median(checks):.2f} s")
    during, base_lat = _latencies(log, windows), _latencies(log, quiet)
    line("writer commit, no backup, p50 / p99 / max", _pct(base_lat), "baseline", f"{len(base_lat)} commits")
    if during and base_lat:
        ratio = (f"p50 {during[len(during) // 2] / base_lat[len(base_lat) // 2]:.1f}x, "
                 f"max {during[-1] / base_lat[-1]:.1f}x")
    else:
        ratio = ""
    line("writer commit, during backup, p50 / p99 / max", _pct(during), ratio,
         f"{len(during)} commits; target max <= ~100 ms")


def run() -> None:
    print(f"online backup (tracked database; a writer process commits a row every {PACE_S * 1000:.0f} ms; "
          f"median of {RUNS} backups)")
    with tempfile.TemporaryDirectory(dir=os.environ.get("P2PSYNC_BENCH_DIR")) as tmp:
        for rows in (100_000, 1_000_000):
            _one_size(Path(tmp), rows)
            for f in Path(tmp).glob("t*.db*"):
                f.unlink()
