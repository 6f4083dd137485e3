"""The relay, end to end: agent processes that never reach each other, a `p2psync relay` process, a real Postgres.

Every device runs with mDNS off and no static peers, so everything it
learns comes through the relay. Postgres is the private cluster the test
set-up starts (tests/pg_fixtures.py), or P2PSYNC_TEST_DSN; without either
these tests skip, and fail under CI=true.
"""

from __future__ import annotations

import re
import socket
import time

import psycopg
import pytest

from agents import Lab, wait_until
from relays import RelayProcess, relays  # noqa: F401  (relays: the fixture)
from wire import events_in, until_closed
from groups import device_members
from peers import signed
from peers import Identity, open_session

MARKER = "zebra-marker-7c1f"


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "lab")
    yield lab
    lab.close()


def token_of(dev) -> str:
    return dev.cli("relay-token").stdout.strip()


def relay_peer(dev) -> dict | None:
    st = dev.try_status()
    if st is None:
        return None
    return next((p for p in st["peers"] if p.get("relay")), None)


def wait_relay_connected(*devs) -> None:
    for d in devs:
        wait_until(lambda: (relay_peer(d) or {}).get("state") == "connected", what=f"{d.name} connected to the relay")


def own_dbv(dev) -> int:
    return dev.status()["version_vector"].get(dev.site, 0)


def wait_pushed(dev, before: int) -> None:
    """Until ``dev`` has stamped writes beyond db version ``before`` and the relay has all of them."""
    wait_until(lambda: own_dbv(dev) > before and (relay_peer(dev) or {}).get("we_owe") == 0,
               what=f"{dev.name}'s writes to be stored at the relay")


def test_two_devices_that_never_meet_converge_through_the_relay(lab, relays, pg_dsn):
    a, b = lab.devices(2)
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    lab.start(b, peers=[], relay=r.address)
    wait_relay_connected(a, b)
    a.transaction([("INSERT INTO items(id, name, qty) VALUES (?, ?, ?)", (i, f"a{i}", i)) for i in range(1, 21)])
    b.transaction([("INSERT INTO items(id, name, qty) VALUES (?, ?, ?)", (i, f"b{i}", i)) for i in range(101, 111)])
    rows = lab.wait_converged(a, b)
    assert len(rows) == 30
    # updates, deletes and a conflict, both ways
    a.execute("UPDATE items SET qty = 99 WHERE id = 101")
    b.execute("DELETE FROM items WHERE id = 1")
    a.execute("UPDATE items SET name = 'from a' WHERE id = 5")
    b.execute("UPDATE items SET name = 'from b' WHERE id = 5")
    rows = lab.wait_converged(a, b)
    by_id = {r[0]: r for r in rows}
    assert by_id[101][2] == 99 and 1 not in by_id and by_id[5][1] in ("from a", "from b")
    assert a.connected_peer(b) is None and b.connected_peer(a) is None, "the devices must only meet at the relay"
    assert (relay_peer(a) or {}).get("rejected_changes") == 0


def test_store_and_forward(lab, relays, pg_dsn):
    a, b = lab.devices(2)
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    wait_relay_connected(a)
    before = own_dbv(a)
    a.transaction([("INSERT INTO items(id, name) VALUES (?, ?)", (i, f"row {i}")) for i in range(1000)])
    wait_pushed(a, before)
    lab.stop(a)
    lab.start(b, peers=[], relay=r.address)
    wait_until(lambda: len(b.rows()) == 1000, what="B to receive A's 1,000 rows while A is offline")
    assert b.rows() == a.rows()


def test_the_relay_database_holds_no_plaintext(lab, relays, pg_dsn, pg_server):
    a, b = lab.devices(2, schema="CREATE TABLE secret_notes(note_key TEXT PRIMARY KEY, body_text TEXT, n INTEGER);",
                       tables=("secret_notes",))
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    lab.start(b, peers=[], relay=r.address)
    wait_relay_connected(a, b)
    a.transaction([("INSERT INTO secret_notes VALUES (?, ?, ?)", (f"key-{MARKER}-{i}", f"{MARKER} body {i}", 4242 + i))
                   for i in range(10)])
    wait_until(lambda: len(b.query("SELECT * FROM secret_notes")) == 10, what="B to receive the notes")
    dump = pg_server.pg_dump(pg_dsn)
    assert "p2p_changes" in dump and len(re.findall(r"\\x[0-9a-f]{40,}", dump)) >= 10, "the dump holds the data"
    for plaintext in ("secret_notes", "note_key", "body_text", MARKER, "key-"):
        assert plaintext not in dump, f"{plaintext!r} is readable in the relay database"
        assert plaintext.encode().hex() not in dump, f"{plaintext!r} is in the relay database as bytes"


def test_groups_sharing_a_relay_are_isolated(lab, relays, pg_dsn, tmp_path):
    x1, x2 = lab.devices(2)
    other = Lab(tmp_path / "other")
    try:
        y1, y2 = other.devices(2)
        assert token_of(x1) != token_of(y1)
        r = relays(pg_dsn, [token_of(x1), token_of(y1)])
        for d, lb in ((x1, lab), (x2, lab), (y1, other), (y2, other)):
            lb.start(d, peers=[], relay=r.address)
        wait_relay_connected(x1, x2, y1, y2)
        x1.execute("INSERT INTO items(id, name) VALUES (1, 'group x')")
        y1.execute("INSERT INTO items(id, name) VALUES (2, 'group y')")
        wait_until(lambda: x2.rows() == x1.rows() and y2.rows() == y1.rows(), what="each group to converge")
        time.sleep(1.0)
        assert [r[1] for r in x2.rows()] == ["group x"] and [r[1] for r in y2.rows()] == ["group y"]
        # a device of X naming Y's group (without Y's key) gets no session at all
        refused_before = _relay_log_count(r, "handshake")
        _connect_as(x1, r, other_token=token_of(y1))
        wait_until(lambda: _relay_log_count(r, "handshake") > refused_before, what="the relay to refuse the session")
        assert [r[1] for r in y1.rows()] == ["group y"]
    finally:
        other.close()


def _relay_log_count(r: RelayProcess, word: str) -> int:
    return sum(1 for line in r.log().splitlines() if "WARNING" in line and word in line)


async def _relay_handshake(dev, r: RelayProcess, ref: bytes | None = None):
    """A Noise session with the relay, as ``dev`` (its key and relay token), naming group ``ref``
    (default: ``dev``'s own group)."""
    import trio

    from p2psync.identity import load_device
    from p2psync.net.noise_stream import NoiseStream
    from p2psync.noise import agent_handshake
    from p2psync.identity import day_number
    from p2psync.protocol.relay_preamble import day_ref, preamble, relay_prologue

    device = load_device(dev.home)
    token = device_members(dev.home).keys.relay_psk
    ref = ref or day_ref(token, day_number(time.time()))
    stream = await trio.open_tcp_stream("127.0.0.1", r.port)
    await stream.send_all(preamble(ref))
    ns = NoiseStream(stream, agent_handshake(True, device.static_private, token, relay_prologue(ref)))
    try:
        with trio.fail_after(15):
            await ns.do_handshake()
    except BaseException:
        await ns.aclose()
        raise
    return ns


def _connect_as(dev, r: RelayProcess, other_token: str) -> None:
    """Open a session to the relay with ``dev``'s own key but another group's ref: the handshake must fail."""
    import trio

    from p2psync.net.noise_stream import HandshakeFailed
    from p2psync.identity import day_number
    from p2psync.protocol.relay_preamble import day_ref

    async def attempt():
        with pytest.raises((HandshakeFailed, trio.BrokenResourceError)):
            ns = await _relay_handshake(dev, r, day_ref(bytes.fromhex(other_token)[48:], day_number(time.time())))
            with trio.fail_after(15):
                await ns.receive_some(1)  # the responder's failure shows up as a closed stream

    trio.run(attempt)


def test_changes_altered_in_postgres_are_rejected_and_never_applied(lab, relays, pg_dsn):
    a, b = lab.devices(2)
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    wait_relay_connected(a)
    before = own_dbv(a)
    for i in range(1, 6):
        a.execute("INSERT INTO items(id, name, qty) VALUES (?, ?, ?)", (i, f"original {i}", i))
        wait_until(lambda: own_dbv(a) == before + i, what="each insert stamped as its own db version")
    wait_pushed(a, before)
    lab.stop(a)
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        rows = pg.execute("SELECT site, dbv, ident, body FROM p2p_changes ORDER BY dbv, ident").fetchall()
        by_dbv: dict[int, list] = {}
        for row in rows:
            by_dbv.setdefault(row[1], []).append(row)
        # db version 2: flip one byte of its ciphertext
        site, dbv, ident, body = by_dbv[before + 2][0]
        blob = bytearray(body)  # 0x00 and the sealed bytes (see p2psync/store/postgres.py)
        blob[len(blob) // 2] ^= 0x01
        pg.execute("UPDATE p2p_changes SET body = %s WHERE site = %s AND dbv = %s AND ident = %s",
                   (bytes(blob), site, dbv, ident))
        # db versions 3 and 4: swap their rows' refs (each ciphertext now sits under the other row's name)
        (s3, d3, _, b3), (s4, d4, _, b4) = by_dbv[before + 3][0], by_dbv[before + 4][0]
        pg.execute("UPDATE p2p_changes SET body = %s WHERE site = %s AND dbv = %s", (b4, s3, d3))
        pg.execute("UPDATE p2p_changes SET body = %s WHERE site = %s AND dbv = %s", (b3, s4, d4))
    lab.start(b, peers=[], relay=r.address)
    wait_until(lambda: len(b.rows()) >= 2 and (relay_peer(b) or {}).get("rejected_changes", 0) >= 3,
               what="B to apply the intact rows and reject the altered changes")
    time.sleep(1.0)
    rows = {row[0]: row for row in b.rows()}
    for i in (1, 5):
        assert rows[i] == (i, f"original {i}", i, None), "intact rows arrive"
    assert not {2, 3, 4} & set(rows), "altered changes are never applied"
    st = relay_peer(b)
    assert st["rejected_changes"] == 3 and "authentication" in st["last_rejection"]
    assert b.counters()["relay_rejected_changes"] == 3
    assert "failed authentication" in b.log()
    text = b.cli("status").stdout
    assert "failed authentication" in text
    # B does not count those versions as received
    assert b.status()["version_vector"].get(a.site, 0) < before + 2, "B must not claim the versions it rejected"
    # an honest peer still brings the real rows
    lab.start(a, peers=[b], relay=r.address)
    wait_until(lambda: b.rows() == a.rows(), what="A to bring B the real rows directly")


def test_two_relay_processes_on_one_database(lab, relays, pg_dsn):
    a, b = lab.devices(2)
    tok = token_of(a)
    r1 = relays(pg_dsn, [tok])
    r2 = relays(pg_dsn, [])   # the admission made by r1 is in the database
    lab.start(a, peers=[], relay=r1.address)
    lab.start(b, peers=[], relay=r2.address)
    wait_relay_connected(a, b)
    for i in range(5):
        a.execute("INSERT INTO items(id, name) VALUES (?, 'a')", (i,))
        b.execute("INSERT INTO items(id, name) VALUES (?, 'b')", (100 + i,))
        time.sleep(0.05)
    rows = lab.wait_converged(a, b)
    assert len(rows) == 10
    # promptly: a write on A reaches B through the other relay process without any reconnect
    t0 = time.monotonic()
    a.execute("INSERT INTO items(id, name) VALUES (999, 'late')")
    wait_until(lambda: b.row(999) is not None, timeout=10, what="A's write to reach B via relay 2")
    assert "connected to relay" in b.log() and b.log().count("connected to relay") == 1, "B never reconnected"
    print(f"A -> relay 1 -> Postgres NOTIFY -> relay 2 -> B in {time.monotonic() - t0:.3f} s")


def test_relay_restart_and_postgres_restart_lose_nothing(lab, relays, pg_dsn, pg_server):
    from conftest import require

    require(pg_server.can_restart, "the Postgres server is external (P2PSYNC_TEST_DSN); cannot restart it")
    a, b = lab.devices(2)
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    lab.start(b, peers=[], relay=r.address)
    wait_relay_connected(a, b)
    a.execute("INSERT INTO items(id, name) VALUES (1, 'before')")
    lab.wait_converged(a, b)

    r.stop()
    a.execute("INSERT INTO items(id, name) VALUES (2, 'while the relay is down')")
    b.execute("INSERT INTO items(id, name) VALUES (3, 'while the relay is down')")
    r.start()
    rows = lab.wait_converged(a, b, timeout=60)
    assert {row[0] for row in rows} == {1, 2, 3}

    pg_server.restart()
    a.execute("INSERT INTO items(id, name) VALUES (4, 'after postgres restarted')")
    b.execute("UPDATE items SET name = 'b after restart' WHERE id = 1")
    rows = lab.wait_converged(a, b, timeout=60)
    assert {row[0] for row in rows} == {1, 2, 3, 4}
    assert dict((row[0], row[1]) for row in rows)[1] == "b after restart"
    assert r.running, "the relay survives a Postgres restart"


def _closed_without_answer(port: int, data: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        s.settimeout(15)
        try:
            return s.recv(100) == b""
        except ConnectionResetError:  # closed with our bytes unread
            return True


def test_the_relay_refuses_strangers_and_garbage(relays, pg_dsn, lab):
    a, = lab.devices(1)
    r = relays(pg_dsn, [token_of(a)])
    assert _closed_without_answer(r.port, b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
    assert _closed_without_answer(r.port, b"P2R1" + bytes(16))  # an unknown group
    wait_until(lambda: "not admitted" in r.log() and "not a p2psync relay preamble" in r.log(),
               what="the relay to log both refusals")
    lab.start(a, peers=[], relay=r.address)
    wait_relay_connected(a)


def _member_session(dev, r: RelayProcess, payload: bytes, until: bytes | None = None) -> bytes:
    """An authenticated session to the relay as a member of ``dev``'s group: send ``payload``,
    read until the relay closes (or until ``until`` shows up in what it sent)."""
    import trio

    async def session() -> bytes:
        ns, extra = await open_session(Identity.of(dev.home), "127.0.0.1", r.port, relay=True)
        await ns.send_all(payload)
        data = extra + await until_closed(ns, 20, until)
        await ns.aclose()
        return data

    return trio.run(session)


def test_a_member_breaking_the_protocol_costs_only_its_session(lab, relays, pg_dsn):
    from p2psync.model import Batch, Change, Range, VersionVector
    from p2psync.protocol import PROTOCOL_VERSION, Ack, BatchEvent, Error, Hello, encode_event

    a, b, m = lab.devices(3)       # m: a member whose agent never runs; the buggy member speaks as m
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    lab.start(b, peers=[], relay=r.address)
    wait_relay_connected(a, b)

    site = bytes.fromhex(m.site)
    hello = encode_event(Hello(PROTOCOL_VERSION, site, b"", int(time.time() * 1000), VersionVector()))
    # garbage after a valid hello: the relay answers with an Error and closes this session only
    received = events_in(_member_session(m, r, hello + b"\x00\x00\x00\x05" + b"\xc1" * 5))
    assert any(type(e) is Error for e in received), received
    # an unsigned change: refused by the relay (not stored), the session closed
    plain = Change("items", (77,), site, 1, (int(time.time() * 1000) << 16), True, ("name",), ("unsealed",))
    received = events_in(_member_session(
        m, r, hello + encode_event(BatchEvent(1, Batch((plain,), (Range(site, 0, 1),)), False))))
    assert [e.code for e in received if type(e) is Error] == ["unattested"], received
    # a buggy member pushing a signed but unsealed change: stored (the relay cannot tell), rejected by every device
    _member_session(m, r, hello + encode_event(BatchEvent(1, signed(m.home, [plain], [Range(site, 0, 1)]), False)),
                    until=encode_event(Ack(1)))
    wait_until(lambda: (relay_peer(b) or {}).get("rejected_changes", 0) >= 1, what="B to reject the unsealed change")
    assert b.row(77) is None and a.row(77) is None
    assert "not a sealed change" in (relay_peer(b) or {}).get("last_rejection", "")
    # the relay and both devices carry on
    a.execute("INSERT INTO items(id, name) VALUES (1, 'still syncing')")
    wait_until(lambda: b.row(1) is not None, what="sync through the relay to continue")
    assert r.running
    assert "protocol error" in r.log()


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "relay needs --dsn"),
    (["--dsn", "host=127.0.0.1 dbname=x", "--allow-group", "abc"], 2, "a relay token is 160 hex digits"),
    (["--dsn", "host=127.0.0.1 port=1 dbname=x user=x"], 1, "cannot connect to Postgres"),
])
def test_relay_command_errors_are_clear(args, code, message, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "P2PSYNC_RELAY_DSN"}
    r = subprocess.run([sys.executable, "-m", "p2psync", "relay", "--listen", "127.0.0.1:7999", *args],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == code and message in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr


# ---- authentic changes through the relay (issue 10) --------------------------------------

def relay_vv(pg_dsn, site: bytes) -> int:
    with psycopg.connect(pg_dsn) as c:
        row = c.execute("SELECT max(dbv) FROM p2p_vv WHERE site = %s", (site,)).fetchone()
    return row[0] or 0


def test_the_relay_refuses_ranges_and_changes_no_member_signed(lab, relays, pg_dsn):
    """A relay-token holder that is a member sends the relay an empty batch claiming every version of A,
    then a change under A's site id: both refused, the relay's vector does not move, its session closes."""
    from p2psync.model import Batch, Change, Range, VersionVector
    from p2psync.protocol import PROTOCOL_VERSION, BatchEvent, Error, Hello, encode_event

    a, b, m = lab.devices(3)
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    lab.start(b, peers=[], relay=r.address)
    wait_relay_connected(a, b)
    a.execute("INSERT INTO items(id, name) VALUES (1, 'real')")
    wait_until(lambda: b.row(1) is not None, what="A's write to reach B through the relay")
    a_site = bytes.fromhex(a.site)
    before = relay_vv(pg_dsn, a_site)
    hello = encode_event(Hello(PROTOCOL_VERSION, bytes.fromhex(m.site), b"", int(time.time() * 1000),
                               VersionVector()))
    for batch in (Batch((), (Range(a_site, 0, (1 << 63) - 1),)),
                  Batch((Change("~", (b"r" * 16,), a_site, before + 1, 1 << 40, None, ("~",), (b"x" * 40,)),),
                        (Range(a_site, before, before + 1),))):
        got = events_in(_member_session(m, r, hello + encode_event(BatchEvent(1, batch, False))))
        assert [e.code for e in got if type(e) is Error] == ["unattested"], got
    assert relay_vv(pg_dsn, a_site) == before
    assert "did not sign" in r.log()
    a.execute("INSERT INTO items(id, name) VALUES (2, 'still syncing')")
    wait_until(lambda: b.row(2) is not None, what="sync through the relay to go on")


def test_a_version_the_relay_serves_in_part_is_not_applied_and_comes_whole_from_a_lan_peer(lab, relays, pg_dsn):
    """The relay's database loses one of the three rows of A's transaction: B, syncing only through the
    relay, applies none of it, says so, and gets the whole transaction once it meets A on the LAN."""
    a, b = lab.devices(2)
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[], relay=r.address)
    wait_relay_connected(a)
    before = own_dbv(a)
    a.transaction([("INSERT INTO items(id, name) VALUES (?, ?)", (i, f"row {i}")) for i in (1, 2, 3)])
    wait_pushed(a, before)
    dbv = own_dbv(a)
    site = bytes.fromhex(a.site)

    def stored() -> int:   # "we owe 0" means sent; the relay commits a moment later
        with psycopg.connect(pg_dsn) as c:
            return c.execute("SELECT count(*) FROM p2p_changes WHERE site = %s AND dbv = %s", (site, dbv)).fetchone()[0]

    wait_until(lambda: stored() == 3, what="the relay to store A's transaction")
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        gone = c.execute("DELETE FROM p2p_changes WHERE ctid IN (SELECT ctid FROM p2p_changes WHERE site = %s "
                         "AND dbv = %s LIMIT 1)", (bytes.fromhex(a.site), dbv)).rowcount
    assert gone == 1
    lab.start(b, peers=[], relay=r.address)
    wait_relay_connected(b)
    wait_until(lambda: b.status()["counters"].get("changes_unattested", 0) >= 2, what="B to refuse the part")
    assert [b.row(i) for i in (1, 2, 3)] == [None] * 3
    assert b.status()["version_vector"].get(a.site, 0) < dbv
    assert "do not match what" in b.log()
    lab.stop(b)
    lab.start(b, peers=[a], relay=r.address)
    wait_until(lambda: all(b.row(i) is not None for i in (1, 2, 3)), what="B to get the whole version from A")
