"""Issue 3 figures: bulk transfer, write-to-visible latency, reconnect cost; two agents on loopback."""

from __future__ import annotations

import socket
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from p2psync.store import SqliteStore

from .common import Device, count_rows, line, median
from .proxy import CountingProxy

SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL);"
BULK = 100_000


def _raw_upsert_rate(base: Path, rows) -> float:
    c = sqlite3.connect(base / "raw.db", isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute(SCHEMA)
    t0 = time.perf_counter()
    c.execute("BEGIN")
    c.executemany("INSERT INTO t VALUES (?,?,?,?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, "
                  "qty=excluded.qty, price=excluded.price", rows)
    c.execute("COMMIT")
    c.close()
    return len(rows) / (time.perf_counter() - t0)


def _tcp_rtt() -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def echo():
        c, _ = srv.accept()
        while d := c.recv(100):
            c.sendall(d)
        c.close()

    threading.Thread(target=echo, daemon=True).start()
    cl = socket.create_connection(srv.getsockname())
    cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    xs = []
    for _ in range(200):
        t0 = time.perf_counter()
        cl.sendall(b"x")
        cl.recv(1)
        xs.append(time.perf_counter() - t0)
    cl.close()
    srv.close()
    return median(xs)


def bulk_and_latency(base: Path) -> None:
    a = Device(base, "A", SCHEMA, ["t"])
    b = Device(base, "B", SCHEMA, ["t"], admin=a)
    a.start()
    b.start(peers=[a.port])
    try:
        b.wait_connected(1)
        rows = [(i, f"item {i}", i % 1000, i * 0.25) for i in range(1, BULK + 1)]
        raw = _raw_upsert_rate(base, rows)
        app = sqlite3.connect(a.db, isolation_level=None)
        t0 = time.perf_counter()
        app.execute("BEGIN")
        app.executemany("INSERT INTO t VALUES (?,?,?,?)", rows)
        app.execute("COMMIT")
        t_commit = time.perf_counter()
        seen_partial = False
        while (n := count_rows(b.db)) < BULK:
            seen_partial |= 0 < n < BULK
            time.sleep(0.005)
        dt = time.perf_counter() - t0
        print("sync over loopback (two agent processes, Noise-encrypted TCP)")
        line("raw executemany upsert of the same rows", f"{raw:,.0f} rows/s", "baseline")
        line(f"bulk: {BULK:,} rows in 1 transaction A -> B", f"{BULK / dt:,.0f} rows/s",
             f"{BULK / dt / raw * 100:.0f}% of raw upsert",
             f"target >= 100k rows/s; commit took {t_commit - t0:.2f}s; partial visible: {seen_partial}")
        # latency
        rb = sqlite3.connect(b.db)
        lat = []
        for i in range(200):
            key = 10_000_000 + i
            t0 = time.perf_counter()
            app.execute("INSERT INTO t VALUES (?, 'lat', 1, 1.0)", (key,))
            while not rb.execute("SELECT 1 FROM t WHERE id = ?", (key,)).fetchone():
                time.sleep(0.0003)
            lat.append(time.perf_counter() - t0)
            time.sleep(0.01)
        lat.sort()
        rtt = _tcp_rtt()
        p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
        line("raw loopback TCP round trip", f"{rtt * 1000:.3f} ms", "baseline")
        line("latency commit on A -> visible on B, p50", f"{p50 * 1000:.1f} ms", f"{p50 / rtt:.0f}x TCP RTT",
             "target <= 10 ms")
        line("latency commit on A -> visible on B, p99", f"{p99 * 1000:.1f} ms", f"{p99 / rtt:.0f}x TCP RTT",
             "target <= 50 ms")
    finally:
        a.stop()
        b.stop()


def reconnect(base: Path, rows_n: int = 1_000_000) -> None:
    a = Device(base, "RA", SCHEMA, ["t"])
    b = Device(base, "RB", SCHEMA, ["t"], admin=a)
    app = sqlite3.connect(a.db, isolation_level=None)
    app.execute("BEGIN")
    app.executemany("INSERT INTO t VALUES (?,?,?,?)", ((i, f"item {i}", i % 1000, i * 0.25)
                                                       for i in range(1, rows_n + 1)))
    app.execute("COMMIT")
    app.close()  # two SQLite libraries in one process must not have the file open at once
    # Bring B up to date in-process (setup, not measured).
    sa = SqliteStore(a.db, _site(a))
    sa.stamp(int(time.time() * 1000))
    sb = SqliteStore(b.db, _site(b))
    parts = []
    for batch, more in sa.changes_since(sb.version_vector(), 50_000, 1 << 30):
        parts.append(batch)
        if not more:
            changes = tuple(c for p in parts for c in p.changes)
            sb.apply(type(batch)(changes, batch.ranges), int(time.time() * 1000))
            parts = []
    sa.close()
    sb.close()
    app = sqlite3.connect(a.db, isolation_level=None)
    for i in range(10):
        app.execute("UPDATE t SET qty = qty + 1 WHERE id = ?", (i * 1000 + 1,))
    a.start()
    proxy = CountingProxy(a.port)
    b.start(peers=[proxy.port])
    try:
        t0 = time.perf_counter()
        rb = sqlite3.connect(b.db)
        while rb.execute("SELECT qty FROM t WHERE id = 9001").fetchone()[0] != (9001 % 1000) + 1:
            time.sleep(0.005)
        dt = time.perf_counter() - t0
        time.sleep(0.3)
        total = proxy.up + proxy.down
        raw = sum(len(f"item {i}") + 8 + 8 + 8 for i in range(10))
        line(f"reconnect: B missed 10 updates, A holds {rows_n:,} rows", f"{total / 1024:.1f} KiB exchanged",
             f"{total / raw:.0f}x the changed rows' raw size", f"target <= 16 KiB; caught up in {dt:.2f}s "
             f"(incl. start-up)")
    finally:
        a.stop()
        b.stop()
        proxy.close()


def _site(d: Device) -> bytes:
    import json
    return bytes.fromhex(json.loads((d.home / "device.json").read_text())["site_id"])


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bulk_and_latency(Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        reconnect(Path(tmp))
