"""Issue 12 figures: one relay process, Postgres at its default max_connections (100), default limits,
1,000 device sessions in 100 groups of 10 from 50 source addresses in 127.0.0.0/8.

The devices are light devices (tests/light_devices.py): real Connections over real Noise sessions with
real members' keys and signed one-change versions, all in this process; no real agents (on a 2-core
machine the 1,000 sessions already share the cores with the relay and Postgres). Each round writes once
in every group at the same moment; a write's latency is until the last of its group's nine other devices
holds it. The baseline is the same relay with shared reads off (P2PSYNC_RELAY_SHARED_READS=0: every
woken session reads for itself, as before issue 12), measured in the same run. Postgres transactions per
write come from pg_stat_database (xact_commit) over the rounds.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import threading
import time

from .common import PY, ROOT, free_port, line

GROUPS, PER_GROUP, SOURCES, ROUNDS = 100, 10, 50, 5


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) * 1024
    return 0


class _Watch(threading.Thread):
    def __init__(self, admin: str, db: str):
        super().__init__(daemon=True)
        self.admin, self.db, self.max, self.stop = admin, db, 0, threading.Event()

    def run(self):
        import psycopg
        with psycopg.connect(self.admin, autocommit=True) as c:
            while not self.stop.is_set():
                n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                              "application_name LIKE 'p2psync-relay%%'", (self.db,)).fetchone()[0]
                self.max = max(self.max, n)
                self.stop.wait(0.05)


def _one(server, shared: bool) -> dict:
    """Run the whole scenario once against a fresh database; its figures."""
    import psycopg
    import trio
    from light_devices import LightGroup, wait_for

    db = f"p2psync_scale_{'shared' if shared else 'own'}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {db}")
        c.execute(f"CREATE DATABASE {db}")
    dsn = server.dsn(db)
    groups = [LightGroup(PER_GROUP) for _ in range(GROUPS)]
    argv = [PY, "-m", "p2psync", "relay", "--dsn", dsn, "--admit-only"]
    for g in groups:
        argv += ["--allow-group", g.token]
    subprocess.run(argv, check=True, capture_output=True)
    port = free_port()
    env = {**os.environ, "P2PSYNC_RELAY_SHARED_READS": "1" if shared else "0"}
    relay = subprocess.Popen([PY, "-m", "p2psync", "relay", "--dsn", dsn, "--listen", f"127.0.0.1:{port}",
                              "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watch = _Watch(server.admin_dsn, db)
    watch.start()
    out: dict = {}

    def xacts():
        with psycopg.connect(server.admin_dsn, autocommit=True) as c:
            return c.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (db,)).fetchone()[0]

    async def main():
        devices = [d for g in groups for d in g.devices]
        for _ in range(200):
            try:
                (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
                break
            except OSError:
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        out["rss_idle"] = _rss(relay.pid)
        async with trio.open_nursery() as n:
            t0 = time.perf_counter()
            retries = [0]

            async def keep(d, src):
                # as a device's dialer: a refused or broken handshake is tried again after a short backoff
                for _ in range(30):
                    try:
                        await d.session("127.0.0.1", port, src)
                        return
                    except Exception:
                        retries[0] += 1
                        await trio.sleep(random.uniform(0.2, 1.0))

            for i, d in enumerate(devices):
                n.start_soon(keep, d, f"127.0.0.{2 + i % SOURCES}")
                if i % 50 == 49:
                    await trio.sleep(0.05)
            with trio.move_on_after(120):
                await wait_for(lambda: all(d.connected for d in devices), 120, "every session")
            out["connected"] = sum(d.connected for d in devices)
            out["connect_s"] = time.perf_counter() - t0
            out["refused"] = sorted({d.ended for d in devices if d.ended})[:3]
            out["retries"] = retries[0]
            await trio.sleep(2)
            out["rss"] = _rss(relay.pid)
            await trio.sleep(1.5)
            before = await trio.to_thread.run_sync(xacts)
            lat = []
            for r in range(ROUNDS):
                t = time.monotonic()
                # writes and receivers among the devices that are connected (the figure above says how many)
                written = [(g, g.devices[r % PER_GROUP].write(f"round {r}")) for g in groups
                           if g.devices[r % PER_GROUP].connected]
                with trio.move_on_after(60):
                    await wait_for(lambda: all(d.has(*w) for g, w in written for d in g.devices if d.connected),
                                   60, f"round {r}")
                for g, w in written:
                    got = [d.arrived.get(w) for d in g.devices if d.site != w[0] and d.connected]
                    lat.append(max(got) - t if got and None not in got else float("inf"))
                await trio.sleep(0.3)
            await trio.sleep(1.5)
            out["xacts_per_write"] = (await trio.to_thread.run_sync(xacts) - before) / (ROUNDS * GROUPS)
            out["lat"] = lat
            out["reconnected"] = sum(d.sessions > 1 for d in devices)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        relay.terminate()
        try:
            err = relay.communicate(timeout=30)[1].decode(errors="replace")
        except subprocess.TimeoutExpired:
            relay.kill()
            err = ""
        watch.stop.set()
        watch.join(5)
    out["max_pg"] = watch.max
    out["log_warnings"] = [ln for ln in err.splitlines() if "WARNING" in ln][:3]
    return out


def run() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import psycopg
    from pg_fixtures import PgServer, find_pg_bindir

    if os.environ.get("P2PSYNC_BENCH_DSN"):
        raise SystemExit("relay-scale bench: needs a private cluster (it sets max_connections to 100)")
    bindir = find_pg_bindir()
    if bindir is None:
        raise SystemExit("relay-scale bench: no Postgres server binaries (install postgresql)")
    server = PgServer.start_private(bindir, fsync=True)
    try:
        with psycopg.connect(server.admin_dsn, autocommit=True) as c:
            c.execute("ALTER SYSTEM SET max_connections = 100")   # Postgres' default (the test cluster has 200)
        server.restart()
        with psycopg.connect(server.admin_dsn, autocommit=True) as c:
            maxc = c.execute("SHOW max_connections").fetchone()[0]
        base = _one(server, shared=False)
        new = _one(server, shared=True)
    finally:
        server.close()
    n = GROUPS * PER_GROUP
    print(f"relay scale (one relay process, default limits and pool; Postgres max_connections={maxc}, fsync on; "
          f"{n:,} light device sessions, {GROUPS} groups of {PER_GROUP}, {SOURCES} source addresses; "
          f"{ROUNDS} rounds of one write per group)")
    line("sessions connected", f"{new['connected']:,} of {n:,}", f"{new['connected'] / n * 100:.0f}% of target",
         f"in {new['connect_s']:.1f} s, all started at once; {new['retries']} handshakes retried (gate); "
         f"sessions ended: {new['refused'] or 'none'}")
    for name, r in (("per-session reads (baseline)", base), ("shared reads", new)):
        p50, p99 = statistics.median(r["lat"]), _pct(r["lat"], 99)
        ratio = "baseline" if r is base else \
            f"{p50 / statistics.median(base['lat']):.2f}x / {p99 / _pct(base['lat'], 99):.2f}x of baseline"
        line(f"write -> all 9 others, {name}", f"p50 {p50 * 1000:.0f} / p99 {p99 * 1000:.0f} ms", ratio,
             f"{len(r['lat'])} writes")
    line("Postgres transactions per write, per-session reads", f"{base['xacts_per_write']:.1f}", "baseline")
    line("Postgres transactions per write, shared reads", f"{new['xacts_per_write']:.1f}",
         f"{new['xacts_per_write'] / base['xacts_per_write']:.2f}x of baseline", "pg_stat_database xact_commit")
    per = (new["rss"] - new["rss_idle"]) / max(1, new["connected"])
    line("relay RSS per session", f"{per / 1024:.0f} KiB", f"idle relay {new['rss_idle'] / 2**20:.0f} MiB",
         f"{new['rss'] / 2**20:.0f} MiB with {new['connected']:,} sessions")
    line("max Postgres connections of the relay", f"{new['max_pg']}", "pool 10 + LISTEN = 11 allowed",
         f"baseline run: {base['max_pg']}")
    if new["log_warnings"]:
        print("  relay warnings (first 3):", *new["log_warnings"], sep="\n    ")
