"""What signing every version costs (issue 10): the same sync with signing on and off, in one run.

Signing lives in the store pipeline -- stamping signs, reading attaches proofs, applying verifies
-- so the comparison runs that pipeline in one process, the way an agent drives it: an
application commits with stdlib sqlite3, A stamps, A's batches are encoded and decoded as on the
wire, B applies them. "Off" is the same stores without a signer or attestor (as before signing).
The network and Noise are the same either way and are left out, so the ratios are the worst case
an agent can see; scripts/bench sync measures the whole agents.

    bulk      100k rows in 1 transaction, and in 1,000 transactions: rows/s, target >= 90 % of off
    singles   10k single-row transactions (one signature and one verify each): rows/s
    latency   one-row commit -> applied on B: p50 and p99, target p50 <= 1 ms more than off
    relay     a relay storing 100k sealed changes in 100 transactions (PostgresStore.apply): changes/s,
              target >= 85 % of off
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, line, median

SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER);"
RUNS = 3


def _stores(base: Path, signed: bool):
    sys.path.insert(0, str(ROOT / "tests"))
    from storeutil import SigningGroup

    from p2psync.store import SqliteStore
    group = SigningGroup()
    out = []
    for name, site in (("a", b"A" * 16), ("b", b"B" * 16)):
        db = base / f"{name}-{'on' if signed else 'off'}.db"
        c = sqlite3.connect(db)
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(SCHEMA)
        c.close()
        s = SqliteStore(db, site)
        s.track("t")
        if signed:
            group.arm(s)
        out.append(s)
    return out


def _transfer(a, b, now: int) -> int:
    """A's batches to B through the wire codec, each group applied whole; changes moved."""
    from p2psync.protocol import BatchEvent, decode_body, encode_event
    n, parts = 0, []
    for batch, more in a.changes_since(b.version_vector(), 2000, 4 << 20):
        ev = decode_body(encode_event(BatchEvent(1, batch, more))[4:])
        parts.append(ev.batch)
        if not more:
            from storeutil import join
            g = join(parts)
            parts = []
            r = b.apply(g, now, validated=True)   # decoded from the wire: checked there, as in an agent
            assert not r.refused and not r.cut, r.refusals
            n += len(g.changes)
    return n


def _bulk(signed: bool, rows: int, txs: int) -> float:
    """Seconds from the first stamp to everything applied on B (the app's writes not counted)."""
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _stores(Path(tmp), signed)
        app = sqlite3.connect(a.path, isolation_level=None)
        per = rows // txs
        now = int(time.time() * 1000)
        elapsed = 0.0
        for k in range(txs):
            app.execute("BEGIN")
            app.executemany("INSERT INTO t VALUES (?, ?, ?)",
                            ((i, f"item {i}", i % 1000) for i in range(k * per, (k + 1) * per)))
            app.execute("COMMIT")
            t0 = time.perf_counter()
            a.stamp(now)           # the agent stamps each commit as it sees it
            elapsed += time.perf_counter() - t0
        t0 = time.perf_counter()
        moved = _transfer(a, b, now)
        elapsed += time.perf_counter() - t0
        app.close()
        assert moved >= rows, moved
        a.close()
        b.close()
        return elapsed


def _latency(signed: bool, n: int = 300) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _stores(Path(tmp), signed)
        app = sqlite3.connect(a.path, isolation_level=None)
        out = []
        now = int(time.time() * 1000)
        for i in range(n):
            t0 = time.perf_counter()
            app.execute("INSERT INTO t VALUES (?, ?, ?)", (i, f"item {i}", i))
            a.stamp(now)
            _transfer(a, b, now)
            out.append(time.perf_counter() - t0)
        app.close()
        a.close()
        b.close()
        return sorted(out)


def _relay(signed: bool, dsn: str) -> float:
    """Seconds for PostgresStore.apply of 100 batches of 1,000 sealed changes (one version each)."""
    import psycopg

    sys.path.insert(0, str(ROOT / "tests"))
    from groups import make_group

    from p2psync.model import Batch, Change, Range
    from p2psync.model.attest import Verifier
    from p2psync.store.postgres import PostgresStore, admit_group, migrate
    from p2psync.sync.sealing import Sealer
    from .relay_bench import proofs_of, signer_of
    import os

    keys, (members,) = make_group(1)
    ring, site = members.keys, keys[0].site_id
    sealer, signer = Sealer(lambda: ring.current, ring.by_key_id.get), signer_of(keys[0], members)
    with psycopg.connect(dsn, autocommit=True) as c:
        migrate(c)
        gid = admit_group(c, os.urandom(16), os.urandom(32), members.state.group, members.found)
    batches = []
    for k in range(100):
        changes = [Change("t", (i,), site, k + 1, (1 << 40) + i, True, ("name", "qty"), (f"item {i}", i % 1000))
                   for i in range(k * 1000, (k + 1) * 1000)]
        batches.append(Batch(tuple(sealer.seal_changes(changes)), (Range(site, k, k + 1),),
                             proofs_of(signer, changes) if signed else ()))
    store = PostgresStore(dsn, gid, b"R" * 16)
    if signed:
        verifier = Verifier(members.state.group, {site: m.sign_pub for site, m in members.state.members.items()})
        store.attestor = lambda: (verifier, None)
    try:
        t0 = time.perf_counter()
        for batch in batches:
            r = store.apply(batch, 0, validated=True)
            assert not r.refused and not r.cut
        return time.perf_counter() - t0
    finally:
        store.close()


def run() -> None:
    print("signed versions (store pipeline in one process: stamp -> read -> wire codec -> apply; "
          f"signing on vs off, median of {RUNS})")
    for rows, txs, label in ((100_000, 1, "bulk: 100k rows in 1 transaction"),
                             (100_000, 1000, "bulk: 100k rows in 1,000 transactions"),
                             (10_000, 10_000, "10k single-row transactions")):
        runs = RUNS if txs < 10_000 else 1
        off = median([_bulk(False, rows, txs) for _ in range(runs)])
        on = median([_bulk(True, rows, txs) for _ in range(runs)])
        line(f"{label}, signing off", f"{rows / off:,.0f} rows/s", "baseline")
        target = "target >= 90 %" if txs < 10_000 else "one signature and one verify per row"
        line(f"{label}, signing on", f"{rows / on:,.0f} rows/s", f"{off / on * 100:.0f}% of off", target)
    off, on = _latency(False), _latency(True)
    p = lambda xs, q: xs[int(len(xs) * q)] * 1000  # noqa: E731
    line("one-row commit -> applied on B, off, p50 / p99", f"{p(off, .5):.2f} / {p(off, .99):.2f} ms", "baseline")
    line("one-row commit -> applied on B, on, p50 / p99", f"{p(on, .5):.2f} / {p(on, .99):.2f} ms",
         f"p50 +{p(on, .5) - p(off, .5):.2f} ms", "target p50 <= +1 ms")
    try:
        from .relay_bench import _new_db, _server
        admin, close = _server()
    except SystemExit as e:
        print(f"  relay figures skipped: {e}")
        return
    try:
        offs = [_relay(False, _new_db(admin, f"attest_off_{i}")) for i in range(RUNS)]
        ons = [_relay(True, _new_db(admin, f"attest_on_{i}")) for i in range(RUNS)]
        off, on = median(offs), median(ons)
        line("relay stores 100k sealed changes in 100 tx, checks off", f"{100_000 / off:,.0f} changes/s", "baseline")
        line("relay stores 100k sealed changes in 100 tx, checks on", f"{100_000 / on:,.0f} changes/s",
             f"{off / on * 100:.0f}% of off", "target >= 85 %")
    finally:
        close()
