"""Connection limits and the relay's daily ref, against running agent and relay processes.

Attackers connect from their own loopback addresses (127.0.0.2, 127.0.3.7, ...:
Linux routes all of 127/8 to lo), so per-source limits can be told apart from
the legitimate peers, which connect from 127.0.0.1 or from an address of
their own. Each test checks what the attack costs the legitimate peers
(nothing: they connect and keep syncing) and that each refusal is logged
with the source and the limit, and counted. The figures are the defaults of
``p2psync.net.admission.HandshakeLimits`` and ``p2psync.relay.server.SessionLimits``.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import wire
from agents import Lab, wait_until
from groups import make_group
from peers import Identity, exchange_members
from relays import RelayProcess, relays  # noqa: F401  (relays: the fixture)
from test_relay import lab  # noqa: F401  (the fixture)
from p2psync.identity import day_number
from p2psync.net.noise_stream import HandshakeFailed, NoiseStream
from p2psync.noise import agent_handshake
from p2psync.protocol import Error, FrameDecoder, Members
from p2psync.protocol.prologue import device_prologue
from p2psync.protocol.relay_preamble import day_ref, group_ref, preamble, relay_prologue

HANDSHAKE_TIMEOUT = 5            # the agents' (P2PSYNC_HANDSHAKE_TIMEOUT): stalled handshakes last this long
PER_SOURCE = 8                   # HandshakeLimits defaults
RATE, BURST = 10, 40
PER_DEVICE, PER_GROUP, STRANGERS = 4, 32, 4      # SessionLimits defaults


# ---- raw connections from a chosen source address ------------------------------------------

_sources = itertools.count(1)


def new_source(net: int) -> str:
    """A loopback address not used before in this run (never 127.0.0.1), in 127.<net>.0.0/16."""
    n = next(_sources)
    return f"127.{net}.{n // 250}.{n % 250 + 2}"


async def connect_from(source: str, port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)


async def session_from(source: str, port: int, who: Identity | None = None, *, relay_ref: bytes | None = None,
                       relay_psk: bytes | None = None, static: bytes | None = None, exchange: bool = True,
                       timeout: float = 15) -> tuple[NoiseStream, bytes]:
    """A handshaken session from ``source`` as ``who`` (to an agent, or with ``relay_ref`` to a relay);
    ``static`` replaces ``who``'s static key (a stranger holding the relay PSK). Also the bytes read past
    the membership exchange (none without ``exchange``)."""
    stream = await connect_from(source, port)
    key = static or who.static_private
    if relay_ref is not None:
        await stream.send_all(preamble(relay_ref))
        hs = agent_handshake(True, key, relay_psk or who.relay_psk, relay_prologue(relay_ref))
    else:
        hs = agent_handshake(True, key, who.psk, device_prologue(who.group_id))
    ns = NoiseStream(stream, hs)
    try:
        with trio.fail_after(timeout):
            await ns.do_handshake()
            extra = await exchange_members(ns, who) if exchange else b""
    except BaseException:
        await ns.aclose()
        raise
    return ns, extra


async def first_event(ns, timeout: float = 10):
    """The first protocol event the peer sends (None if it closes first)."""
    dec = FrameDecoder()
    with trio.fail_after(timeout):
        while (ev := dec.next_frame()) is None:
            try:
                data = await ns.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            dec.feed(data)
    return ev


async def still_open(ns, for_s: float = 1.0) -> bool:
    """Not closed by the peer within ``for_s`` (whatever it sends meanwhile is read and dropped)."""
    with trio.move_on_after(for_s):
        while True:
            try:
                if not await ns.receive_some(65536):
                    return False
            except trio.BrokenResourceError:
                return False
    return True


def lines_with(text: str, *words: str) -> int:
    return sum(1 for line in text.splitlines() if all(w in line for w in words))


# ---- the decisions, without processes -------------------------------------------------------

def test_the_handshake_gate_counts_per_source_and_refills():
    from p2psync.net.admission import HandshakeGate, HandshakeLimits

    gate = HandshakeGate(HandshakeLimits(in_flight=5, in_flight_per_source=2, rate=1.0, burst=3))
    assert gate.enter("10.0.0.1", 0.0) is None and gate.enter("10.0.0.1", 0.0) is None
    assert gate.enter("10.0.0.1", 0.0).code == "per_source"            # a third at once
    gate.leave("10.0.0.1")
    assert gate.enter("10.0.0.1", 0.0) is None                         # its third token
    gate.leave("10.0.0.1")
    refused = gate.enter("10.0.0.1", 0.0)
    assert refused.code == "rate" and "10.0.0.1" in refused.text and "1/s" in refused.text
    assert gate.enter("10.0.0.1", 1.0) is None                         # a token a second
    # an IPv6 host counts by its /64; other sources have their own slots until the total is reached
    assert gate.enter("2001:db8::1", 1.0) is None and gate.enter("2001:db8::ffff", 1.0) is None
    assert gate.enter("2001:db8::2", 1.0).code == "per_source"
    assert gate.enter("10.0.0.2", 1.0) is None
    assert gate.enter("10.0.0.3", 1.0).code == "in_flight"
    assert gate.statistics()["in_flight"] == 5


def test_a_flood_of_refusals_is_logged_in_part_then_summed():
    from p2psync.net.admission import LogThrottle

    t = LogThrottle(lines=2, window=60)
    assert [t.allow("x", 0), t.allow("x", 1), t.allow("x", 2), t.allow("x", 3)] == [0, 0, None, None]
    assert t.allow("y", 3) == 0
    assert t.allow("x", 61) == 2                                        # the next line says 2 were left out


def test_the_ref_table_rotates_daily_and_remembers_unknown_refs():
    from p2psync.relay.gates import REFRESH_INTERVAL, UNKNOWN_REF_TTL, RefTable

    token = os.urandom(32)
    t = RefTable()
    t.load([(7, token, b"g" * 16, b"f" * 32)], now=0.0)
    assert [t.get(day_ref(token, d), 100) and t.get(day_ref(token, d), 100).id for d in (99, 100, 101)] == [7, 7, 7]
    assert t.get(day_ref(token, 102), 100) is None
    assert t.get(day_ref(token, 102), 101).id == 7 and t.get(day_ref(token, 99), 101) is None   # the next day
    unknown = os.urandom(16)
    assert not t.stale(REFRESH_INTERVAL / 2) and t.stale(REFRESH_INTERVAL)
    t.mark_unknown(unknown, 10.0)
    assert t.known_unknown(unknown, 10.0 + UNKNOWN_REF_TTL - 1)
    assert not t.known_unknown(unknown, 10.0 + UNKNOWN_REF_TTL)
    t.mark_unknown(unknown, 10.0)
    t.load([], now=20.0)                                                # an admission: read again
    assert not t.known_unknown(unknown, 20.0)


def test_room_for_a_session_closes_the_keys_oldest_and_keeps_strangers_few():
    from types import SimpleNamespace as S

    from p2psync.relay.gates import SessionLimits, make_room

    lim = SessionLimits(per_device=2, per_group=4, strangers_per_group=1)
    members = {b"a", b"b"}
    is_member = members.__contains__
    a1, a2 = S(key=b"a", closing=False, admitted=True), S(key=b"a", closing=False, admitted=True)
    room = make_room([a1, a2], b"a", is_member, lim)
    assert room.close == [a1] and room.refusal is None
    x = S(key=b"x", closing=False, admitted=False)
    assert make_room([a2, x], b"y", is_member, lim).refusal[0] == "sessions_refused_strangers"
    assert make_room([a2, x], b"b", is_member, lim).refusal is None        # members are not strangers
    full = [a2, x, S(key=b"b", closing=False, admitted=True), S(key=b"c", closing=False, admitted=True)]
    assert make_room(full, b"b", is_member, lim).refusal[0] == "sessions_refused_per_group"


# ---- the agent -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """Agents A and B, connected; M a member whose agent never runs (the attackers' member keys)."""
    lab = Lab(tmp_path_factory.mktemp("limits"), env={"P2PSYNC_HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT)})
    try:
        a, b, m = lab.devices(3)
        lab.start(a, peers=[b])
        lab.start(b, peers=[a])
        lab.wait_settled(a, b)
        yield lab, a, b, Identity.of(m.home)
    finally:
        lab.close()


_rows = itertools.count(1)


def assert_syncing(lab, a, b) -> None:
    """A write on B reaches A and one on A reaches B, over the link they already had."""
    lab.check_alive()
    n = next(_rows)
    b.execute("INSERT INTO items(id, name) VALUES (?, 'from B')", (n,))
    wait_until(lambda: a.row(n) is not None, what=f"B's row {n} on A")
    a.execute("UPDATE items SET qty = ? WHERE id = ?", (n, n))
    wait_until(lambda: b.row(n) == (n, "from B", n, None), what=f"A's update of row {n} on B")
    assert a.connected_peer(b)


def test_one_source_stalling_handshakes_locks_no_other_source_out(agents):
    """70 stalled handshakes from one address (more than the 64 slots all sources used to share):
    that address gets 8, and a member connecting from another address gets in at once."""
    lab, a, b, member = agents
    since = len(a.log())
    attacker, honest = new_source(0), new_source(0)

    async def attack():
        stalls = []
        try:
            for _ in range(70):
                s = await connect_from(attacker, a.port)
                await s.send_all(b"\xff\xff")        # a handshake message that never completes
                stalls.append(s)
            # every stalled connection has been accepted or refused before the member comes
            await trio.to_thread.run_sync(lambda: wait_until(
                lambda: lines_with(a.log()[since:], "too many handshakes in progress", attacker) >= 6,
                what="A to refuse the stalls it has no room for"))
            ns, _ = await session_from(honest, a.port, member)
            assert await first_event(ns) is not None, "the member's session was closed"
            await ns.aclose()
            await trio.to_thread.run_sync(assert_syncing, lab, a, b)
        finally:
            for s in stalls:
                await s.aclose()

    trio.run(attack)
    text = a.log()[since:]
    assert lines_with(text, f"too many handshakes in progress from {attacker} (limit {PER_SOURCE} per source",
                      "refusing connection from")
    assert a.counters()["handshakes_refused_per_source"] >= 70 - PER_SOURCE
    assert_syncing(lab, a, b)


def test_a_source_over_the_handshake_rate_is_refused_then_let_in_again(agents):
    lab, a, b, member = agents
    since = len(a.log())
    before = a.counters().get("handshakes_refused_rate", 0)
    flooder = new_source(0)

    async def garbage(n: int):
        for _ in range(n):
            s = await connect_from(flooder, a.port)
            body = os.urandom(64)
            try:
                await s.send_all(len(body).to_bytes(2, "big") + body)
                await wire.until_closed(s, 10)
            except trio.BrokenResourceError:
                pass
            await s.aclose()

    async def flood():
        async with trio.open_nursery() as n:     # 4 at a time: under the in-flight limit, over the rate
            for _ in range(4):
                n.start_soon(garbage, 60)
        # another address is not affected
        ns, _ = await session_from(new_source(0), a.port, member)
        assert await first_event(ns) is not None
        await ns.aclose()

    trio.run(flood)
    assert a.counters()["handshakes_refused_rate"] > before
    assert lines_with(a.log()[since:], f"handshake rate from {flooder} over its limit ({RATE}/s, bursts of {BURST})",
                      "refusing connection from")
    assert_syncing(lab, a, b)

    # the bucket refills: the same address gets a session again
    async def member_from_flooder() -> bool:
        try:
            ns, _ = await session_from(flooder, a.port, member, timeout=5)
        except (trio.BrokenResourceError, trio.TooSlowError, EOFError, OSError):
            return False
        await ns.aclose()
        return True

    wait_until(lambda: trio.run(member_from_flooder), timeout=30, interval=0.5,
               what="the flooding address to be let in again once it stops")


# ---- the relay -------------------------------------------------------------------------------

def token_of(dev) -> str:
    return dev.cli("relay-token").stdout.strip()


def relay_peer(dev) -> dict:
    st = dev.try_status() or {}
    return next((p for p in st.get("peers", ()) if p.get("relay")), {})


def wait_relay_connected(*devs, timeout: float = 20) -> None:
    for d in devs:
        wait_until(lambda: relay_peer(d).get("state") == "connected", timeout=timeout,
                   what=f"{d.name} connected to the relay")


def assert_relay_syncing(a, b) -> None:
    n = next(_rows)
    a.execute("INSERT INTO items(id, name) VALUES (?, 'via the relay')", (n,))
    wait_until(lambda: b.row(n) is not None, what=f"A's row {n} on B through the relay")


def stop_counters(r: RelayProcess) -> str:
    """Stop the relay (by PID); the counters line it logs on the way out."""
    r.stop()
    return next((line for line in reversed(r.log().splitlines()) if "relay stopped" in line), "")


def pg_sessions(dsn: str) -> int:
    """Sessions Postgres has opened to this database so far (counted by Postgres itself)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


def test_unknown_refs_are_refused_without_a_postgres_connection(lab, relays, pg_dsn):
    a, b = lab.devices(2)
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    lab.start(b, peers=[], relay=r.address)
    wait_relay_connected(a, b)
    since = len(r.log())
    before = pg_sessions(pg_dsn)

    async def knock(ref: bytes):
        s = await connect_from(new_source(1), r.port)
        try:
            await s.send_all(preamble(ref))
            await wire.until_closed(s, 15)
        except trio.BrokenResourceError:
            pass
        await s.aclose()

    same = os.urandom(16)

    async def lane(k: int):
        for i in range(30):           # in all, 100 times one unknown ref and 50 random ones
            await knock(same if (k * 30 + i) % 3 else os.urandom(16))

    async def attack():
        async with trio.open_nursery() as n:
            for k in range(5):
                n.start_soon(lane, k)

    trio.run(attack)
    wait_until(lambda: lines_with(r.log()[since:], "is not admitted here") == 150, what="the refusals in the log")
    time.sleep(1.5)                 # Postgres publishes a session's count when it ends
    opened = pg_sessions(pg_dsn) - before - 1
    assert opened < 30, f"150 unknown refs cost {opened} Postgres sessions"
    assert_relay_syncing(a, b)
    assert "unknown_refs 150" in stop_counters(r)


class RecordingProxy:
    """Forwards 127.0.0.1:port to a target port, keeping the first 20 bytes of each connection:
    what an observer on the device's network sees of its relay sessions."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.preambles: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
                s = socket.create_connection(self.target)
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(c, s, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        head = b""
        try:
            while data := src.recv(65536):
                if record and len(head) < 20:
                    head += data[:20 - len(head)]
                    if len(head) == 20:
                        self.preambles.append(head)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def clear_of_midnight() -> None:
    """Not within 30 s of a UTC midnight (the test's, the agent's and the relay's day must agree)."""
    left = 86400 - time.time() % 86400
    if left < 30 or left > 86400 - 30:
        time.sleep(left + 31 if left < 30 else 31)


def test_the_relay_ref_changes_every_day(lab, relays, pg_dsn):
    clear_of_midnight()
    a, m = lab.devices(2)
    who = Identity.of(m.home)
    token = who.relay_psk
    r = relays(pg_dsn, [token_of(a)])
    proxy = RecordingProxy(r.port)
    try:
        lab.start(a, peers=[], relay=f"127.0.0.1:{proxy.port}")
        wait_relay_connected(a)
    finally:
        proxy.close()
    day = day_number(time.time())
    sent = proxy.preambles[0]
    assert sent[4:] != group_ref(token), "the device sent the group's fixed ref"
    assert sent[4:] in {day_ref(token, d) for d in (day - 1, day, day + 1)}, "not the ref of the day"
    assert day_ref(token, day) != day_ref(token, day + 1)

    async def session(d: int) -> bool:
        try:
            ns, _ = await session_from(new_source(2), r.port, who, relay_ref=day_ref(token, d))
        except (trio.BrokenResourceError, HandshakeFailed, EOFError):
            return False
        await ns.aclose()
        return True

    since = len(r.log())
    # yesterday's, today's and tomorrow's refs open a session (clocks and midnights differ); others do not
    assert [trio.run(session, day + k) for k in (-1, 0, 1)] == [True, True, True]
    assert [trio.run(session, day + k) for k in (-3, -2, 2, 3)] == [False] * 4
    assert lines_with(r.log()[since:], "is not admitted here") == 4
    assert_alive_and_connected(r, a)


def assert_alive_and_connected(r: RelayProcess, *devs) -> None:
    assert r.running
    for d in devs:
        assert relay_peer(d).get("state") == "connected"


def test_a_group_admitted_by_another_relay_process_is_found(lab, relays, pg_dsn):
    a, = lab.devices(1)
    r = relays(pg_dsn, [])
    lab.start(a, peers=[], relay=r.address)
    wait_until(lambda: "is not admitted here" in r.log(), what="the relay to refuse a group it does not know")
    # another process admits the group (it NOTIFYs every relay process on the database)
    subprocess.run([sys.executable, "-m", "p2psync", "relay", "--dsn", pg_dsn, "--listen", "127.0.0.1:1",
                    "--allow-group", token_of(a), "--admit-only"], check=True, timeout=60, capture_output=True)
    wait_relay_connected(a, timeout=60)


def test_one_device_key_holds_at_most_four_relay_sessions(lab, relays, pg_dsn):
    a, b, m = lab.devices(3)
    who = Identity.of(m.home)
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    lab.start(b, peers=[], relay=r.address)
    wait_relay_connected(a, b)
    day = day_number(time.time())

    async def attack():
        sessions = []
        try:
            for _ in range(PER_DEVICE + 2):
                ns, _ = await session_from(new_source(3), r.port, who, relay_ref=day_ref(who.relay_psk, day))
                sessions.append(ns)
            for ns in sessions[:2]:   # the oldest are closed to make room, when the newer ones come
                with trio.move_on_after(5) as waited:
                    await wire.until_closed(ns, 10)
                assert not waited.cancelled_caught, "the oldest sessions of the key are still open"
            for ns in sessions[2:]:
                assert await still_open(ns), "a session within the limit was closed"
            await trio.to_thread.run_sync(assert_relay_syncing, a, b)
        finally:
            for ns in sessions:
                await ns.aclose()

    trio.run(attack)
    assert lines_with(r.log(), f"limit {PER_DEVICE} per device); closing its oldest") == 2
    assert_relay_syncing(b, a)
    assert "sessions_closed_per_device 2" in stop_counters(r)


def test_strangers_with_the_relay_psk_cannot_fill_a_group(lab, relays, pg_dsn):
    """Keys that are not members (a removed device holds the relay PSK) get 4 sessions at a time;
    members still get in."""
    a, b, m = lab.devices(3)
    who = Identity.of(m.home)
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    wait_relay_connected(a)
    ref = day_ref(who.relay_psk, day_number(time.time()))

    async def attack():
        sessions, first = [], []
        try:
            for _ in range(STRANGERS + 3):
                static = X25519PrivateKey.generate().private_bytes_raw()
                ns, _ = await session_from(new_source(4), r.port, who, relay_ref=ref, static=static,
                                           exchange=False)
                sessions.append(ns)
                first.append(await first_event(ns))
            assert [type(e) for e in first[:STRANGERS]] == [Members] * STRANGERS, first
            refused = first[STRANGERS:]
            assert all(type(e) is Error and e.code == "too-many-sessions" for e in refused), refused
            # a member gets in while the strangers hold their sessions
            ns, extra = await session_from(new_source(4), r.port, who, relay_ref=ref)
            sessions.append(ns)
            assert await still_open(ns, 0.5)
        finally:
            for ns in sessions:
                await ns.aclose()

    trio.run(attack)
    assert lines_with(r.log(), f"limit {STRANGERS} per group); refusing") == 3
    lab.start(b, peers=[], relay=r.address)
    wait_relay_connected(b)
    assert_relay_syncing(a, b)
    assert "sessions_refused_strangers 3" in stop_counters(r)


def test_sessions_per_group_are_bounded(relays, pg_dsn):
    """Nine members holding four sessions each: the group gets 32 at this relay process, the rest are
    refused (each costs Postgres connections, which all groups share)."""
    keys, members = make_group(9)
    ring = members[0].keys
    token = (members[0].state.group + members[0].found + ring.relay_psk).hex()
    r = relays(pg_dsn, [token])
    ids = [Identity(k.site_id, k.static_private, m.state.group, m.keys.current.psk(), ring.relay_psk, m.heads,
                    tuple(m.encoded())) for k, m in zip(keys, members)]
    ref = day_ref(ring.relay_psk, day_number(time.time()))

    async def fill():
        sessions, refused = [], []
        try:
            for who in ids:
                source = new_source(5)
                for _ in range(PER_DEVICE):
                    try:
                        ns, _ = await session_from(source, r.port, who, relay_ref=ref)
                        sessions.append(ns)
                    except EOFError as e:       # refused during the membership exchange
                        refused.append(str(e))
            assert len(sessions) == PER_GROUP and len(refused) == 9 * PER_DEVICE - PER_GROUP, refused
            assert all("too-many-sessions" in e for e in refused), refused
            for ns in sessions[-PER_DEVICE:]:
                assert await still_open(ns, 0.2)
        finally:
            for ns in sessions:
                await ns.aclose()

    trio.run(fill)
    assert lines_with(r.log(), f"(limit {PER_GROUP} per group); refusing") == 9 * PER_DEVICE - PER_GROUP
    assert f"sessions_refused_per_group {9 * PER_DEVICE - PER_GROUP}" in stop_counters(r)
