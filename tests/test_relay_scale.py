"""The relay at scale (issue 12): a bounded pool of Postgres connections, busy instead of dropped, shared reads,
relay processes that share one database.

Devices here are light devices (tests/light_devices.py: real Connections over real Noise sessions, with
real members' keys and signed versions, in this test process) against real `p2psync relay` processes and
a real Postgres; the busy test also runs a real agent. Postgres is the private cluster the test set-up
starts (tests/pg_fixtures.py), or P2PSYNC_TEST_DSN; without either these tests skip, and fail under CI=true.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import trio

from agents import Lab, wait_until
from light_devices import LightGroup, wait_for
from peers import Identity, open_session
from relays import relays  # noqa: F401  (the fixture)
from p2psync.protocol import Error, FrameDecoder
from p2psync.store.postgres import LOCK_NAMESPACE

SYNC = 30.0


class ConnectionWatch:
    """The most Postgres connections relay processes held at once (pg_stat_activity by application_name),
    sampled in a thread from the admin database while the test runs."""

    def __init__(self, admin_dsn: str, dbname: str):
        self.admin_dsn, self.dbname = admin_dsn, dbname
        self.max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as c:
            while not self._stop.is_set():
                n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                              "application_name LIKE 'p2psync-relay%%'", (self.dbname,)).fetchone()[0]
                self.max = max(self.max, n)
                self._stop.wait(0.02)

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def _dbname(dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict
    return conninfo_to_dict(dsn)["dbname"]


def _group_id(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT id FROM p2p_groups").fetchone()[0]


def _xacts(admin_dsn: str, dbname: str) -> int:
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        return c.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)).fetchone()[0]


async def _connect_all(nursery, devices, port: int, sources=None) -> None:
    # The first device alone: it brings the group's membership log, which the relay needs to count
    # the others as members (until then they are strangers, of whom a group may hold only a few at
    # once; real devices would retry, these light ones do not).
    for i, d in enumerate(devices):
        src = sources[i % len(sources)] if sources else None
        await nursery.start(d.session, "127.0.0.1", port, src)
        if i == 0:
            await wait_for(lambda: d.connected, SYNC, "the first device to get the relay's Hello")
    await wait_for(lambda: all(d.connected for d in devices), SYNC, "every device to get the relay's Hello")


def test_thirty_devices_on_a_pool_of_four_connections_are_all_served(relays, pg_dsn, pg_server):
    group = LightGroup(30)
    r = relays(pg_dsn, [group.token], args=["--pool-size", "4"])
    devs = group.devices
    sources = [f"127.0.0.{k}" for k in range(2, 12)]   # ten source addresses, three devices each
    queries = {}

    async def main():
        async with trio.open_nursery() as n:
            await _connect_all(n, devs, r.port, sources)
            # a first write reaches everyone
            site, dbv = devs[0].write("hello")
            await wait_for(lambda: all(d.has(site, dbv) for d in devs), SYNC, "the first write to reach all 30")
            # one more, counting the Postgres transactions it costs the relay
            await trio.sleep(1.5)   # Postgres publishes a backend's counts within a second of it going idle
            before = await trio.to_thread.run_sync(_xacts, pg_server.admin_dsn, _dbname(pg_dsn))
            site, dbv = devs[7].write("again")
            await wait_for(lambda: all(d.has(site, dbv) for d in devs), SYNC, "the second write to reach all 30")
            await trio.sleep(1.5)
            queries["xacts"] = await trio.to_thread.run_sync(_xacts, pg_server.admin_dsn, _dbname(pg_dsn)) - before
            assert all(d.connected and d.sessions == 1 for d in devs), [d.ended for d in devs if not d.connected]
            n.cancel_scope.cancel()

    with ConnectionWatch(pg_server.admin_dsn, _dbname(pg_dsn)) as watch:
        trio.run(main)
    assert "relay-busy" not in r.log() and "connection slots" not in r.log()
    assert 1 <= watch.max <= 4 + 1, f"the relay held {watch.max} Postgres connections (pool of 4, plus LISTEN)"
    # one write woke 30 sessions: they share one read (today's code read once per session: 30+)
    assert queries["xacts"] < 15, f"one write to 30 devices cost the relay {queries['xacts']} Postgres transactions"


def test_an_exhausted_pool_makes_new_sessions_wait_or_busy_and_never_drops_connected_ones(relays, pg_dsn, pg_server):
    group = LightGroup(4)
    a, b, c, d = group.devices
    r = relays(pg_dsn, [group.token], args=["--pool-size", "1"])
    gid = _group_id(pg_dsn)

    async def main():
        async with trio.open_nursery() as n:
            await _connect_all(n, [a, b], r.port)
            site, dbv = a.write("before")
            await wait_for(lambda: b.has(site, dbv), SYNC, "a's first write to reach b")
            # hold the group's apply lock: a's next apply takes the relay's only connection and waits on it
            lock = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_dsn, autocommit=True))
            await trio.to_thread.run_sync(lock.execute, "SELECT pg_advisory_lock(%s, %s)", (LOCK_NAMESPACE, gid))
            try:
                site, dbv = a.write("while the pool is exhausted")
                await trio.sleep(0.5)
                # a new device cannot get a connection: it is told to come back, with a time
                n.start_soon(c.session, "127.0.0.1", r.port)
                await wait_for(lambda: c.ended is not None, SYNC, "the new session to be turned away")
                assert "relay-busy" in c.ended and "retry in" in c.ended, c.ended
                assert a.connected and b.connected, f"a: {a.ended}; b: {b.ended}"
                assert not b.has(site, dbv)
            finally:
                await trio.to_thread.run_sync(lock.close)   # ends the lock: the waiting apply goes ahead
            await wait_for(lambda: b.has(site, dbv), SYNC, "the write that waited to reach b")
            site, dbv = b.write("after")
            await wait_for(lambda: a.has(site, dbv), SYNC, "b's write to reach a")
            # the pool is free again: a new device gets in and catches up
            await n.start(d.session, "127.0.0.1", r.port)
            await wait_for(lambda: d.has(site, dbv), SYNC, "a new device to catch up")
            assert a.sessions == b.sessions == 1 and a.connected and b.connected
            n.cancel_scope.cancel()

    with ConnectionWatch(pg_server.admin_dsn, _dbname(pg_dsn)) as watch:
        trio.run(main)
    assert watch.max <= 1 + 1, f"the relay held {watch.max} Postgres connections (pool of 1, plus LISTEN)"
    assert "relay busy" in r.log() and "apply-failed" not in r.log()


def test_a_write_reaches_devices_on_another_relay_process_without_reconnecting(relays, pg_dsn):
    group = LightGroup(6)
    r1 = relays(pg_dsn, [group.token], args=["--pool-size", "2"])
    r2 = relays(pg_dsn, [], args=["--pool-size", "2"])
    on1, on2 = group.devices[:3], group.devices[3:]

    async def main():
        async with trio.open_nursery() as n:
            await _connect_all(n, on1, r1.port)
            await _connect_all(n, on2, r2.port)
            for writer in (on1[0], on2[1], on1[2]):
                site, dbv = writer.write(f"from {writer.name}")
                await wait_for(lambda: all(d.has(site, dbv) for d in group.devices), SYNC,
                               f"{writer.name}'s write to reach the devices on both relays")
            assert all(d.sessions == 1 and d.connected for d in group.devices), "a session was reconnected"
            assert len({d.vv for d in group.devices}) == 1
            n.cancel_scope.cancel()

    trio.run(main)


def test_a_device_shows_relay_busy_and_retries_after_the_time_given(relays, pg_dsn, tmp_path):
    lab = Lab(tmp_path / "lab")
    try:
        a, b = lab.devices(2)
        token = a.cli("relay-token").stdout.strip()
        r = relays(pg_dsn, [token], args=["--max-sessions", "1"])
        release = threading.Event()
        held = threading.Event()

        def hold():
            async def main():
                ns, _ = await open_session(Identity.of(b.home), "127.0.0.1", r.port, relay=True)
                held.set()
                async with ns:
                    while not release.is_set():
                        await trio.sleep(0.05)
            trio.run(main)

        t = threading.Thread(target=hold, daemon=True)
        t.start()
        assert held.wait(SYNC), "the first session did not start"
        lab.start(a, peers=[], relay=r.address)

        def relay_peer():
            st = a.try_status()
            return next((p for p in st["peers"] if p.get("relay")), None) if st else None

        wait_until(lambda: (relay_peer() or {}).get("state") == "busy", what="a to show the relay as busy")
        p = relay_peer()
        assert "relay busy, retry in 10 s" in p["last_error"], p
        told = r.log().count("relay busy")
        release.set()
        t.join(10)
        time.sleep(3)   # the usual backoff would have retried many times by now
        assert (relay_peer() or {}).get("state") == "busy" and r.log().count("relay busy") == told
        wait_until(lambda: (relay_peer() or {}).get("state") == "connected", timeout=30,
                   what="a to connect once the relay has room, after the time it was given")
        assert r.log().count("relay busy") == told
    finally:
        lab.close()
