"""Membership with real agents and a real relay: removal cuts a device off everywhere, old keys open
nothing new, a device that missed the removal catches up, invites are single use.

Agents are processes on loopback (tests/agents.py), the relay a process on a private Postgres
(tests/pg_fixtures.py); raw sessions come from the hostile-peer harness (tests/peers.py).
"""

from __future__ import annotations

import shutil
import time

import trio

from agents import wait_until
from groups import device_members
from peers import Identity, open_session
from relays import relays  # noqa: F401  (the fixture)
from test_relay import lab, relay_peer, token_of, wait_relay_connected  # noqa: F401  (lab: the fixture)

REMOVAL_WITHIN = 1.0


def connected_sites(dev) -> set[str]:
    st = dev.try_status() or {"peers": []}
    return {p.get("site") for p in st["peers"] if p.get("state") == "connected" and not p.get("relay")}


def refused(who: Identity, port: int, relay: bool = False) -> str:
    """Open a raw session as ``who``; the reason it was refused (AssertionError if it got a Hello)."""
    from p2psync.protocol import Error, Hello
    from wire import events_in, until_closed

    async def attempt():
        try:
            ns, extra = await open_session(who, "127.0.0.1", port, relay=relay)
        except (EOFError, trio.BrokenResourceError) as e:
            return [str(e) or type(e).__name__]
        try:
            return events_in(extra + await until_closed(ns, 10))
        finally:
            await ns.aclose()

    got = trio.run(attempt)
    assert not any(type(e) is Hello for e in got), f"a session as the removed device to port {port} was let in"
    errors = [f"{e.code}: {e.message}" for e in got if type(e) is Error] + [g for g in got if type(g) is str]
    assert errors, f"no refusal from port {port}: {got}"
    return " ".join(errors)


def test_removed_device_is_cut_off_everywhere_and_the_rest_keep_syncing(lab, relays, pg_dsn, tmp_path):
    a, b, c = lab.devices(3)
    old_home = tmp_path / "c-old-home"
    shutil.copytree(c.home, old_home)           # C's keys and epochs as they are now: a thief's copy
    shutil.copy(c.db, tmp_path / "c-old.db")
    r = relays(pg_dsn, [token_of(a)])
    lab.start(a, peers=[b, c], relay=r.address)
    lab.start(b, peers=[a, c], relay=r.address)
    lab.start(c, peers=[a, b], relay=r.address)
    lab.wait_connected(a, b, c, a)
    wait_relay_connected(a, b, c)
    c.execute("INSERT INTO items(id, name) VALUES (1, 'from C before')")
    lab.wait_converged(a, b, c)

    t0 = time.monotonic()
    a.cli("remove", "C")
    def still_open():
        left = [f"{d.name} with C" for d in (a, b) if c.site in connected_sites(d)]
        left += [f"C with {s[:12]}" for s in connected_sites(c)]
        if (relay_peer(c) or {}).get("state") == "connected":
            left.append("C with the relay")
        return left

    deadline = time.monotonic() + 5
    while (left := still_open()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not left, f"sessions still open 5 s after the removal: {left}"
    took = time.monotonic() - t0
    assert took <= REMOVAL_WITHIN + 0.5, f"closing C's sessions took {took:.2f} s"   # polling through `status`
    st = c.status()
    assert st["state"] == "removed" and "removed from the group by A" in st["membership"]["removed"]
    assert "removed from the group" in c.log()
    assert "REMOVED  this device was removed" in c.cli("status").stdout

    # C keeps its data, but its later writes reach nobody; A and B keep syncing both ways
    c.execute("INSERT INTO items(id, name) VALUES (2, 'from C after')")
    a.execute("INSERT INTO items(id, name) VALUES (3, 'from A after')")
    b.execute("INSERT INTO items(id, name) VALUES (4, 'from B after')")
    wait_until(lambda: a.row(4) and b.row(3), what="A and B to keep syncing")
    time.sleep(1.5)
    assert a.row(2) is None and b.row(2) is None
    assert c.row(1) is not None and c.row(3) is None
    wait_until(lambda: (relay_peer(a) or {}).get("we_owe") == 0 and (relay_peer(b) or {}).get("we_owe") == 0,
               what="A's and B's writes at the relay")

    # C cannot reconnect, not even with its old home (all its old keys and epochs)
    wait_until(lambda: "refused" in a.log() and "removed" in a.log(), what="A to log the refusal")
    thief = Identity.of(old_home)
    for dev in (a, b):
        assert "not-a-member" in refused(thief, dev.port)
    assert "not-a-member" in refused(thief, r.port, relay=True)

    # what A wrote after the removal is sealed under a key C never had
    import psycopg

    with psycopg.connect(pg_dsn) as pg:
        rows = pg.execute("SELECT body FROM p2p_changes WHERE site = %s ORDER BY dbv DESC LIMIT 1",
                          (bytes.fromhex(a.site),)).fetchall()
    assert rows
    sealed = bytes(rows[0][0])[1:]       # SEALED_MARK, then key id || nonce || ciphertext
    old_ring = device_members(old_home).keys
    assert sealed[:8] not in old_ring.by_key_id
    assert device_members(a.home).keys.current.key_id == sealed[:8]


def test_a_device_offline_during_the_removal_learns_the_new_epoch_and_catches_up(lab):
    a, b, c, d = lab.devices(4)
    lab.start(a, peers=[b, c, d])
    lab.start(b, peers=[a, c, d])
    lab.start(c, peers=[a, b])
    lab.wait_connected(a, b, c)
    a.cli("remove", "C")
    for i in range(1, 21):
        (a if i % 2 else b).execute("INSERT INTO items(id, name) VALUES (?, 'while D was away')", (i,))
    lab.wait_converged(a, b)
    old_epoch = device_members(d.home).keys.current.key_id
    lab.start(d, peers=[a, b])
    rows = lab.wait_converged(a, b, d)
    assert len(rows) == 20
    ring = device_members(d.home).keys
    assert ring.current.key_id != old_epoch and ring.current.key_id == device_members(a.home).keys.current.key_id
    d.execute("INSERT INTO items(id, name) VALUES (100, 'from D')")
    wait_until(lambda: a.row(100) and b.row(100), what="D's write on A and B")
    assert c.site not in connected_sites(d)
    assert d.status()["membership"]["members"] == 3


def _join(lab, dev, code, *extra):
    return dev.cli("join", code, "--db", str(dev.db), "--name", dev.name, "--timeout", "20s", *extra, check=False)


def test_invites_are_single_use_expire_and_can_be_cancelled(lab):
    (a,) = lab.devices(1)
    extra = [lab._new_device(n, "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)") for n in "BCDEF"]
    b, c, d, e, f = extra
    lab.start(a, peers=[])
    code = lab.invite(a)
    assert _join(lab, b, code).returncode == 0
    second = _join(lab, c, code)
    assert second.returncode == 1 and "already used" in second.stderr, second.stderr
    short = lab.invite(a, "--expires", "1s")
    time.sleep(1.5)
    r = _join(lab, d, short)
    assert r.returncode == 1 and "expired" in r.stderr, r.stderr
    code = lab.invite(a)
    invite_id = [i["id"] for i in __import__("json").loads(a.cli("invites", "--json").stdout)][-1]
    a.cli("invites", "--cancel", invite_id)
    r = _join(lab, e, code)
    assert r.returncode == 1 and "cancelled" in r.stderr, r.stderr
    r = _join(lab, f, code[:-3] + ("aaa" if code[-3:] != "aaa" else "bbb"))
    assert r.returncode == 2 and "typo" in r.stderr, r.stderr
    for dev in (c, d, e, f):
        assert not (dev.home / "device.json").exists()
    devices = a.cli("devices", "--json").stdout
    assert '"B"' in devices and '"C"' not in devices


def test_the_code_carries_no_group_secret_and_any_admin_can_admit(lab):
    from p2psync.identity import parse_invite

    a, b = lab.devices(2)
    a.cli("role", "B", "admin")
    lab.start(a, peers=[b])
    lab.start(b, peers=[a])
    wait_until(lambda: device_members(b.home).state.is_admin(bytes.fromhex(b.site)), what="B to learn it is admin")
    code = lab.invite(a)                       # A's invite, while A is stopped: B admits
    lab.stop(a)
    ring = device_members(a.home).keys
    parsed = parse_invite(code)
    secrets_ = set(ring.secrets.values()) | {k.psk() for k in ring.all} | {k.key for k in ring.all} | {ring.relay_psk}
    assert parsed.secret not in secrets_ and parsed.psk not in secrets_
    for s in secrets_:
        assert s.hex() not in code and s.hex()[:16] not in code
    (n,) = [lab._new_device("N", "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, note TEXT)")]
    wait_until(lambda: device_members(b.home).state.invites, what="B to hold A's invite")
    time.sleep(0.5)
    r = _join(lab, n, code, "--admin", b.address)
    assert r.returncode == 0 and "added by B" in r.stdout, r.stderr
    n.cli("track", "items")
    lab.start(n, peers=[b])
    b.execute("INSERT INTO items(id, name) VALUES (1, 'to the newcomer')")
    wait_until(lambda: n.row(1), what="the row on N")


def test_events_from_a_non_admin_are_ignored_and_counted(lab):
    from p2psync.group import actions
    from p2psync.identity import load_device
    from p2psync.store import SqliteStore

    a, b = lab.devices(2)
    # B (a member, not an admin) signs a removal of A and puts it in its own log
    dev_b = load_device(b.home)
    members = device_members(b.home)
    forged = actions._sign(dev_b, members, "remove", {"site": bytes.fromhex(a.site), "last": 0}, int(time.time() * 1000))
    store = SqliteStore(dev_b.db_path, dev_b.site_id)
    store.add_member_events(members.pairs([forged]))
    store.close()
    lab.start(a, peers=[b])
    lab.start(b, peers=[a])
    lab.wait_connected(a, b)
    wait_until(lambda: a.status()["membership"]["ignored_events"] == 1, what="A to count the ignored event")
    assert a.status()["state"] == "syncing" and b.status()["state"] == "syncing"
    b.execute("INSERT INTO items(id, name) VALUES (1, 'still fine')")
    wait_until(lambda: a.row(1), what="sync to go on")


def test_a_database_synced_before_membership_founds_a_new_group_keeping_its_rows(lab, tmp_path):
    """Upgrading from 0.1: a database that carries another device's sync state is refused as it is,
    and with --reset-sync-state its rows stay and become the new device's own changes."""
    from p2psync.store import SqliteStore

    (a,) = lab.devices(1)
    a.execute("INSERT INTO items(id, name) VALUES (1, 'kept')")
    new_home = tmp_path / "new-home"
    r = a.cli("--home", str(new_home), "init", "--db", str(a.db), "--name", "A2", check=False)
    assert r.returncode == 1 and "synced by another device" in r.stderr, r.stderr
    r = a.cli("--home", str(new_home), "init", "--db", str(a.db), "--name", "A2", "--reset-sync-state")
    assert "tracking again: items" in r.stdout
    assert a.rows() == [(1, "kept", None, None)]
    from p2psync.identity import load_device

    dev = load_device(new_home)
    store = SqliteStore(dev.db_path, dev.site_id)
    try:
        assert store.stamp(int(time.time() * 1000)) == 1      # the kept row is this device's change now
    finally:
        store.close()
