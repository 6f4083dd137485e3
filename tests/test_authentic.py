"""Authentic changes (issue 10): a change counts as site S's only under S's signature, and a version
vector moves only over versions their origin signed -- against real agents, with a hostile member
built from the project's own Noise and protocol code (tests/peers.py).

A and F run agents and sync with each other; M is a member whose agent never runs: the tests speak
as M, with M's real keys, so every session is admitted and only the content is forged.
"""

from __future__ import annotations

import shutil
import time

import pytest
import trio

import wire
from agents import Lab, wait_until
from peers import Identity, open_session, signed
from p2psync.model import Batch, Change, Range, VersionVector
from p2psync.protocol import PROTOCOL_VERSION, Ack, BatchEvent, Error, Hello, encode_event

TOP = (1 << 63) - 1


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("authentic"))
    try:
        a, f, m = lab.devices(3)
        lab.start(a, peers=[f])
        lab.start(f, peers=[a])
        lab.wait_settled(a, f)
        yield lab
    finally:
        lab.close()


@pytest.fixture(autouse=True)
def show_logs_on_failure(request, lab):
    since = lab.log_offsets()
    yield
    lab.print_logs(since)


def site(dev) -> bytes:
    return bytes.fromhex(dev.site)


def vv_of(dev) -> dict[str, int]:
    return dev.status()["version_vector"]


def counters(dev) -> dict:
    return dev.status()["counters"]


def send_as(lab, dev, batches: list[Batch], wait_acks: bool = True) -> list:
    """A session to A as member ``dev``: Hello (claiming A's vector, so A sends us nothing), then
    ``batches``; the events A sent until it closed the session or acked the last batch."""
    a = lab.all[0]
    who = Identity.of(dev.home)

    async def session():
        ns, extra = await open_session(who, "127.0.0.1", a.port)
        try:
            theirs = VersionVector({bytes.fromhex(s): n for s, n in vv_of(a).items()})
            data = encode_event(Hello(PROTOCOL_VERSION, who.site, b"", int(time.time() * 1000), theirs))
            for i, b in enumerate(batches, 1):
                data += encode_event(BatchEvent(i, b, False))
            await ns.send_all(data)
            until = encode_event(Ack(len(batches))) if wait_acks else None
            got = extra + await wire.until_closed(ns, 15, until)
            return wire.events_in(got)
        finally:
            await ns.aclose()

    return trio.run(session)


def codes(events) -> list[str]:
    return [e.code for e in events if type(e) is Error]


def next_key(dev) -> int:
    rows = dev.query("SELECT coalesce(max(id), 0) FROM items")
    return rows[0][0] + 1


@pytest.mark.parametrize("whose", ["the receiver's own", "a third device's"])
def test_an_empty_batch_claiming_every_version_moves_no_vector(lab, whose):
    """An empty batch with the range (0, 2^63-1] for A's own site, or for F's: once it made A's next stamp
    overflow (A exited at every start) or made A and everyone it talks to skip F's later writes for ever."""
    a, f, m = lab.all
    target = a if whose.startswith("the receiver") else f
    before = vv_of(a).get(target.site, 0)
    cut = counters(a).get("ranges_cut", 0)
    got = send_as(lab, m, [Batch((), (Range(site(target), 0, TOP),))])
    assert not codes(got), codes(got)          # a claim about another site: refused, the session goes on
    assert vv_of(a).get(target.site, 0) == before
    assert counters(a)["ranges_cut"] == cut + 1
    assert f"claimed versions of {target.name}" in a.log() or "claimed versions of" in a.log()
    # A keeps stamping and syncing, and F's later writes still reach A
    k = next_key(a)
    a.execute("INSERT INTO items(id, name) VALUES (?, 'after the forged range, from A')", (k,))
    wait_until(lambda: f.row(k) is not None, what="A's write to reach F")
    f.execute("INSERT INTO items(id, name) VALUES (?, 'after the forged range, from F')", (k + 1,))
    wait_until(lambda: a.row(k + 1) is not None, what="F's write to reach A")
    assert vv_of(a).get(a.site, 0) > (before if target is a else 0)
    lab.check_alive()


def test_a_change_under_another_members_site_id_is_refused(lab):
    """M sends a change as F's (with F's next db version and a range): unsigned, refused; then with a
    signature of M's own key claiming to be F's, refused too, and -- a proof that does not verify is
    something no honest peer forwards -- the session is closed."""
    a, f, m = lab.all
    k = next_key(a) + 100
    dbv = vv_of(a).get(f.site, 0) + 1
    forged = Change("items", (k,), site(f), dbv, (int(time.time() * 1000) << 16), True, ("name",), ("forged as F",))
    unsigned = Batch((forged,), (Range(site(f), dbv - 1, dbv),))
    signed_by_m = signed(m.home, [forged], [Range(site(f), dbv - 1, dbv)])
    signed_by_m = Batch(signed_by_m.changes, signed_by_m.ranges,
                        tuple(p._replace(site=site(f)) for p in signed_by_m.proofs))   # M's key, F's site id
    refused = counters(a).get("changes_unattested", 0)
    got = send_as(lab, m, [unsigned, signed_by_m])
    assert codes(got) == ["unattested"], got
    assert a.row(k) is None and vv_of(a).get(f.site, 0) == dbv - 1
    assert counters(a)["changes_unattested"] == refused + 2
    assert "that no valid signature of their origin covers" in a.log()
    lab.check_alive()


def test_a_member_sending_unsigned_changes_as_its_own_is_cut_off(lab):
    a, f, m = lab.all
    k = next_key(a) + 200
    mine = Change("items", (k,), site(m), 1, (int(time.time() * 1000) << 16), True, ("name",), ("unsigned",))
    got = send_as(lab, m, [Batch((mine,), (Range(site(m), 0, 1),))], wait_acks=False)
    assert codes(got) == ["unattested"], got
    assert a.row(k) is None


def test_a_members_own_signed_change_is_applied(lab):
    """The control: the same change, signed by M as M's own, is applied (forwarding keeps working too)."""
    a, f, m = lab.all
    k = next_key(a) + 300
    start = int(vv_of(a).get(m.site, 0))
    mine = Change("items", (k,), site(m), start + 1, (int(time.time() * 1000) << 16), True, ("name",),
                  ("signed by M",))
    got = send_as(lab, m, [signed(m.home, [mine], [Range(site(m), start, start + 1)])])
    assert not codes(got), got
    assert a.row(k) is not None
    wait_until(lambda: f.row(k) is not None, what="A to forward M's signed change to F")
    assert vv_of(f).get(m.site, 0) == start + 1


def test_a_version_sent_in_part_is_not_applied(lab):
    """M signs a version of two rows and sends one of them: neither is applied, and no vector moves."""
    a, f, m = lab.all
    k = next_key(a) + 400
    start = int(vv_of(a).get(m.site, 0))
    now = int(time.time() * 1000) << 16
    rows = [Change("items", (k + i,), site(m), start + 1, now, True, ("name",), (f"row {i}",)) for i in range(2)]
    whole = signed(m.home, rows, [Range(site(m), start, start + 1)])
    part = Batch(whole.changes[:1], whole.ranges, whole.proofs)
    got = send_as(lab, m, [part], wait_acks=False)
    assert codes(got) == ["unattested"]       # M sent it as its own
    assert a.row(k) is None and int(vv_of(a).get(m.site, 0)) == start


def test_a_restored_backup_catches_up_on_its_own_versions_and_reuses_none(lab, tmp_path):
    """A is restored from a backup of itself (agent stopped, file copied back): it continues under a
    new site id (agent/incarnation.py), its later versions come back from F, verified against the old
    site's signature, and its next write is a version of the new site: no db version is reused."""
    a, f, m = lab.all
    k = next_key(a) + 500
    lab.stop(a)
    backup = tmp_path / "a-backup.db"
    shutil.copy(a.db, backup)
    lab.start(a, peers=[f])
    for i in range(3):
        a.execute("INSERT INTO items(id, name) VALUES (?, 'written after the backup')", (k + i,))
    wait_until(lambda: all(f.row(k + i) is not None for i in range(3)), what="F to get A's writes")
    old_site = a.site
    lost_top = vv_of(a).get(old_site, 0)
    lab.stop(a)
    for suffix in ("-wal", "-shm"):
        (a.db.parent / (a.db.name + suffix)).unlink(missing_ok=True)
    shutil.copy(backup, a.db)
    lab.start(a, peers=[f])
    wait_until(lambda: all(a.row(k + i) is not None for i in range(3)), what="A to get its own writes back")
    new_site = a.status()["device"]["site"]
    assert new_site != old_site
    assert vv_of(a).get(old_site, 0) >= lost_top
    a.execute("INSERT INTO items(id, name) VALUES (?, 'after the restore')", (k + 10,))
    wait_until(lambda: f.row(k + 10) is not None, what="A's new write to reach F")
    assert vv_of(f).get(old_site, 0) == lost_top              # the old site's versions: none reused
    assert vv_of(f).get(new_site, 0) >= 1
    assert a.rows() == f.rows()
    lab.check_alive()
