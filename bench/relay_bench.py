"""Issue 5 figures: ingest from one device into the relay, and a new device's catch-up from the relay alone.

A private Postgres cluster (fsync on, as in production) is started for the
run, or P2PSYNC_BENCH_DSN is used. The baseline is a raw binary COPY of the
same number of rows into a plain table on the same server, measured in the
same run. One application row written is one change, sealed and stored as
one Postgres row.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from .common import PY, ROOT, Device, cli, count_rows, free_port, line, median

SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER);"
ROWS = 100_000
RUNS = 3
TX_ROWS = 1_000


def _server():
    """(admin dsn, closer) of a Postgres server for the run."""
    if os.environ.get("P2PSYNC_BENCH_DSN"):
        return os.environ["P2PSYNC_BENCH_DSN"], lambda: None
    sys.path.insert(0, str(ROOT / "tests"))
    from pg_fixtures import PgServer, find_pg_bindir

    bindir = find_pg_bindir()
    if bindir is None:
        raise SystemExit("relay bench: no Postgres server binaries (install postgresql or set P2PSYNC_BENCH_DSN)")
    server = PgServer.start_private(bindir, fsync=True)
    return server.admin_dsn, server.close


def _new_db(admin: str, name: str) -> str:
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name}")
        c.execute(f"CREATE DATABASE {name}")
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    return make_conninfo(**{**conninfo_to_dict(admin), "dbname": name})


def _raw_copy_rate(dsn: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE raw_copy(id bigint PRIMARY KEY, name text, qty bigint)")
        t0 = time.perf_counter()
        with c.transaction(), c.cursor() as cur:
            with cur.copy("COPY raw_copy FROM STDIN") as cp:
                for i in range(ROWS):
                    cp.write_row((i, f"item {i}", i % 1000))
        return ROWS / (time.perf_counter() - t0)


BATCH = 20_000


def signer_of(device_keys, members):
    """The Signer of a device of a test group (tests/groups.make_group)."""
    from p2psync.model.attest import Signer, cell_key
    key = cell_key(members.state.group, members.keys.secrets[members.found])
    return Signer(members.state.group, device_keys.site_id, device_keys.sign_private, key)


def proofs_of(signer, changes) -> tuple:
    """One proof per version of ``changes`` (whole versions: no leaves), as a device sends them."""
    by: dict[int, list] = {}
    for c in changes:
        by.setdefault(c.dbv, []).append(c)
    return tuple(signer.sign(d, max(c.hlc for c in cs), [x for c in cs for x in signer.leaves(c)]).without_leaves()
                 for d, cs in sorted(by.items()))


def _relay_side_ingest(dsn: str) -> float:
    """Seconds for a relay to store ROWS pre-sealed changes pushed by one device session.

    The device side is reduced to a client that already holds the sealed
    batches (100 transactions of 1,000 rows), so the figure is the relay's:
    Noise, decoding, checking, COPY into Postgres and commit per batch.
    """

    import trio
    from p2psync.group import Admission
    from p2psync.model import Batch, Change, Range, VersionVector
    from p2psync.net.bus import ChangeBus
    from p2psync.net.connection import Connection, SyncSettings
    from p2psync.net.noise_stream import NoiseStream
    from p2psync.net.store_worker import wall_ms as clock_ms
    from p2psync.noise import agent_handshake
    from p2psync.identity import day_number
    from p2psync.protocol.relay_preamble import day_ref, preamble, relay_prologue
    from p2psync.store import ApplyResult
    from p2psync.sync.sealing import Sealer

    sys.path.insert(0, str(ROOT / "tests"))
    from groups import make_group

    keys, (members,) = make_group(1)          # a one-device group: the pusher is its founder
    ring = members.keys
    token, site = ring.relay_psk, keys[0].site_id
    admission = (members.state.group + members.found + token).hex()
    ref = day_ref(token, day_number(time.time()))
    sealer = Sealer(lambda: ring.current, ring.by_key_id.get)
    signer = signer_of(keys[0], members)
    parts = []
    for k in range(0, ROWS, BATCH):
        changes = [Change("t", (i,), site, i // TX_ROWS + 1, (1 << 40) + i, True, ("name", "qty"),
                          (f"item {i}", i % 1000)) for i in range(k, k + BATCH)]
        parts.append((Batch(tuple(sealer.seal_changes(changes)), (Range(site, k // TX_ROWS, (k + BATCH) // TX_ROWS),),
                            proofs_of(signer, changes)), False))
    port = free_port()
    relay = subprocess.Popen([PY, "-m", "p2psync", "relay", "--dsn", dsn, "--listen", f"127.0.0.1:{port}",
                              "--allow-group", admission, "--log-level", "warning"])
    if os.environ.get("P2PSYNC_BENCH_PROFILE"):  # py-spy flame graph of the relay while it ingests
        subprocess.Popen([str(Path(PY).parent / "py-spy"), "record", "-o", os.environ["P2PSYNC_BENCH_PROFILE"],
                          "--threads", "--idle", "-d", "8", "-p", str(relay.pid), "-f", "raw"])

    class Worker:
        async def version_vector(self):
            return VersionVector()

        async def apply(self, batch, validated=False):
            return ApplyResult()

        async def batches(self, vv, max_changes, max_bytes):
            todo, parts[:] = list(parts), []
            for p in todo:
                yield p

    class Ctx:
        check_schema, schema, site_id, bus, worker = False, b"bench", site, ChangeBus(), Worker()
        wall_ms = staticmethod(clock_ms)

        def __init__(self):
            self.members = members

        def admit(self, conn):
            return Admission(None)

        def screen(self, conn, batch):
            return batch

        async def on_members(self, conn, events):
            members.take(events)

        def on_hello(self, conn, hello):
            pass

        def on_applied(self, conn, batch, result):
            pass

    async def push() -> float:
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                break
            except OSError:
                await trio.sleep(0.05)
        await stream.send_all(preamble(ref))
        ns = NoiseStream(stream, agent_handshake(True, keys[0].static_private, token, relay_prologue(ref)))
        await ns.do_handshake()
        conn = Connection(ns, Ctx(), "bench", SyncSettings())
        async with trio.open_nursery() as n:
            n.start_soon(conn.run)
            t0 = time.perf_counter()
            while await trio.to_thread.run_sync(_relay_vv, dsn, site) < ROWS // TX_ROWS:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
        return time.perf_counter() - t0

    try:
        return trio.run(push)
    finally:
        relay.terminate()
        relay.wait(15)


def _relay_vv(dsn: str, site: bytes) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT dbv FROM p2p_vv WHERE site = %s", (site,)).fetchone()
        return row[0] if row else 0


def run() -> None:
    admin, close = _server()
    relay = None
    try:
        dsn = _new_db(admin, "p2psync_bench")
        raw = _raw_copy_rate(dsn)
        pushed = median([_relay_side_ingest(dsn) for _ in range(RUNS)])
        catchups = []
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            a = Device(base, "A", SCHEMA, ["t"])
            newcomers = [Device(base, f"B{k}", SCHEMA, ["t"], admin=a) for k in range(RUNS)]
            token = cli("--home", str(a.home), "relay-token").strip()
            port = free_port()
            log = open(base / "relay.log", "ab")
            relay = subprocess.Popen([PY, "-m", "p2psync", "relay", "--dsn", dsn, "--listen", f"127.0.0.1:{port}",
                                      "--allow-group", token, "--log-level", "warning"], stdout=log, stderr=log)
            a.start(extra=["--relay", f"127.0.0.1:{port}"])
            try:
                a.wait_connected(1)
                site = bytes.fromhex(a.status()["device"]["site"])
                app = sqlite3.connect(a.db, isolation_level=None)
                t0 = time.perf_counter()
                for k in range(0, ROWS, TX_ROWS):
                    app.execute("BEGIN")
                    app.executemany("INSERT INTO t VALUES (?, ?, ?)",
                                    ((i, f"item {i}", i % 1000) for i in range(k, k + TX_ROWS)))
                    app.execute("COMMIT")
                app.close()
                while True:
                    st = a.status()
                    own = st["version_vector"].get(site.hex(), 0) if st else 0
                    if own and _relay_vv(dsn, site) >= own:
                        break
                    time.sleep(0.02)
                ingest = time.perf_counter() - t0
                a.stop()
                for b in newcomers:
                    t1 = time.perf_counter()
                    b.start(extra=["--relay", f"127.0.0.1:{port}"])
                    while count_rows(b.db) < ROWS:
                        time.sleep(0.01)
                    catchups.append(time.perf_counter() - t1)
                    b.stop()
            finally:
                a.stop()
                for b in newcomers:
                    b.stop()
        catchup = median(catchups)
        print(f"relay (agent processes, a relay process, Postgres {'external' if os.environ.get('P2PSYNC_BENCH_DSN') else 'private cluster, fsync on'})")
        line(f"raw binary COPY, {ROWS:,} rows into a plain table", f"{raw:,.0f} rows/s", "baseline")
        line(f"ingest at the relay: {ROWS:,} sealed changes pushed", f"{ROWS / pushed:,.0f} changes/s",
             f"{ROWS / pushed / raw * 100:.0f}% of raw COPY",
             f"target >= 50k changes/s; one device session, batches of {BATCH:,}; median of {RUNS}")
        line(f"end to end: {ROWS:,} rows in {ROWS // TX_ROWS} tx on A -> stored", f"{ROWS / ingest:,.0f} changes/s",
             f"{ROWS / ingest / raw * 100:.0f}% of raw COPY",
             f"{ingest:.2f} s from first commit, incl. capture, stamping, sealing")
        line(f"catch-up: new device, {ROWS:,} changes from relay", f"{catchup:.2f} s",
             f"{ROWS / catchup / raw * 100:.0f}% of raw COPY rate",
             f"target <= 5 s; from agent start, incl. start-up; median of {RUNS} "
             f"({min(catchups):.2f}-{max(catchups):.2f})")
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(15)
        close()
