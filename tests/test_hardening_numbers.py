"""Numbers from peers and from the config are bounded (issue 9, item 8).

HLCs and db versions stay below 2^62 (a margin of 2^62 under SQLite's
64-bit maximum): a change stamped further ahead is held and never released
into the clock, whoever asks. A config value out of range is a clear error
and exit status 2, and an error while stamping local writes is logged and
retried, never fatal. Agents run as real processes on loopback (agents.py);
the hostile member speaks through tests/peers.py.
"""

from __future__ import annotations

import time

import pytest
import trio

from agents import Lab, free_port, lab, wait_until  # noqa: F401  (lab is a fixture)
from peers import Identity, signed, open_session
from p2psync.model import Batch, Change, Hlc, Range, VersionVector
from p2psync.model.hlc import MAX_DB_VERSION, MAX_HLC, ClockLimitError, pack
from p2psync.protocol import PROTOCOL_VERSION, Ack, BatchEvent, Error, FrameDecoder, Hello, encode_event
from p2psync.store import StoreError
from p2psync.store.connection import BUSY_TIMEOUT_MS
from storeutil import app, make, now_ms  # noqa: F401  (fixtures)

INT64_MAX = (1 << 63) - 1
INSERT = "INSERT INTO items(id, name) VALUES (?, ?)"
SA, SX = b"\xa1" * 16, b"\xee" * 16


# ---- the clock and the store ----------------------------------------------------------------

def test_the_clock_neither_issues_nor_takes_a_timestamp_past_its_limit() -> None:
    c = Hlc(MAX_HLC - 1, max_skew_ms=60_000)
    assert c.now(0) == MAX_HLC
    with pytest.raises(ClockLimitError, match="clock limit"):
        c.now(0)
    far = Hlc(0, max_skew_ms=1 << 60)            # a skew so large that nothing is too far ahead
    with pytest.raises(ClockLimitError, match="year 6430"):
        far.receive(INT64_MAX, 0)
    assert far.last == 0
    with pytest.raises(ClockLimitError):
        far.last = MAX_HLC + 1                     # what a forced release of a held change does
    assert far.last == 0


def test_a_release_of_a_change_stamped_past_the_limit_is_refused_and_stamping_goes_on(app, make) -> None:
    store, db = make("a", SA)
    now = now_ms()
    batch = Batch((Change("items", (5,), SX, 1, INT64_MAX, True, ("name",), ("from the end of time",)),),
                  (Range(SX, 0, 1),))
    assert store.apply(batch, now).held == 1
    with pytest.raises(ClockLimitError, match="no room for new writes"):
        store.release_held(now, force=True)
    assert [h.hlc for h in store.held()] == [INT64_MAX]          # still held, nothing applied
    assert app.query(db, "SELECT count(*) FROM items")[0][0] == 0
    assert store.hlc() < MAX_HLC
    app.execute(db, "INSERT INTO items(id, name) VALUES (1, 'after')")
    assert store.stamp(now + 1) == 1                             # the next stamp does not overflow
    assert pack(now) <= store.hlc() < MAX_HLC


def test_stamping_past_the_db_version_limit_fails_clearly_and_keeps_the_writes_pending(app, make) -> None:
    store, db = make("a", SA)
    now = now_ms()
    # A peer's batch claims this device's own db versions up to 2^63 - 1 (what a restored backup's
    # peers do, with sane numbers); the store takes them, so its next db version would overflow.
    batch = Batch((Change("items", (9,), SA, INT64_MAX, pack(now), True, ("name",), ("x",)),),
                  (Range(SA, 0, INT64_MAX),))
    store.apply(batch, now)
    app.execute(db, "INSERT INTO items(id, name) VALUES (1, 'local')")
    with pytest.raises(StoreError, match=f"db version .* past the limit {MAX_DB_VERSION}"):
        store.stamp(now)
    assert store.pending() == 1


# ---- the config ----------------------------------------------------------------------------

@pytest.mark.parametrize("value, shown", [
    ("1e306", "max_clock_skew = 1e+306: out of range"),
    ("1e-9", "max_clock_skew = 1e-09: out of range"),
    ("1" + "0" * 30, "max_clock_skew = 10000000... (an integer of 31 digits): out of range"),
    ("1" + "0" * 5000, "invalid TOML"),
])
def test_a_config_number_out_of_range_exits_2_with_a_clear_error(lab, value, shown) -> None:
    (a,) = lab.devices(1)
    (a.home / "config.toml").write_text(f"max_clock_skew = {value}\n")
    res = a.cli("run", "--listen", a.address, "--no-mdns", check=False, timeout=30)
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr, res.stderr
    assert shown in res.stderr and "config.toml" in res.stderr, res.stderr


def test_a_listen_address_that_cannot_be_used_exits_2_with_a_clear_error(lab) -> None:
    a, b = lab.devices(2)
    lab.start(a, peers=[])
    for address in ("10.255.255.1:7733", a.address):        # not this machine's / in use
        res = b.cli("run", "--listen", address, "--no-mdns", check=False, timeout=30)
        assert res.returncode == 2, res
        assert "Traceback" not in res.stderr, res.stderr
        assert f"cannot listen on {address}" in res.stderr, res.stderr


# ---- a running agent -------------------------------------------------------------------------

async def send_as_member(who: Identity, port: int, batch: Batch) -> None:
    """Open a session to the agent at ``port`` as ``who``, send it ``batch`` and leave once it is acked."""
    ns, extra = await open_session(who, "127.0.0.1", port)
    try:
        await ns.send_all(encode_event(Hello(PROTOCOL_VERSION, who.site, b"", int(time.time() * 1000),
                                             VersionVector())))
        await ns.send_all(encode_event(BatchEvent(1, batch, False)))
        dec = FrameDecoder()
        dec.feed(extra)
        with trio.fail_after(20):
            while True:
                while (ev := dec.next_frame()) is not None:
                    if isinstance(ev, Ack) and ev.seq >= 1:
                        return
                    assert not isinstance(ev, Error), ev
                data = await ns.receive_some(65536)
                assert data, "the agent closed the session before acking the batch"
                dec.feed(data)
    finally:
        await ns.aclose()


def test_release_refuses_a_change_that_would_exhaust_the_clock_and_the_agent_syncs_on(lab) -> None:
    a, b, m = lab.devices(3)
    lab.start(a, peers=[b])
    lab.start(b, peers=[a])
    lab.wait_connected(a, b)
    member = Identity.of(m.home)       # a member whose agent never runs: the one that misbehaves
    far = signed(m.home, [Change("items", (1000,), member.site, 1, INT64_MAX, True, ("name",), ("end of time",))],
                 [Range(member.site, 0, 1)])       # signed: M's own change, only its clock is absurd
    trio.run(send_as_member, member, a.port, far)
    wait_until(lambda: a.status()["held"]["count"] == 1, what="A to hold the change stamped at 2^63 - 1")

    res = a.cli("release", check=False)
    assert res.returncode == 1, res
    assert "release refused" in res.stderr and "clock limit" in res.stderr, res.stderr
    assert a.status()["held"]["count"] == 1 and a.row(1000) is None
    # A's clock has room: its next writes are stamped and synced as ever.
    a.execute(INSERT, (1, "after the refusal"))
    wait_until(lambda: b.row(1) is not None, what="A's write after the refused release on B")
    lab.check_alive()
    assert a.counters().get("stamp_errors", 0) == 0


def test_an_error_while_stamping_is_logged_and_retried_not_fatal(lab) -> None:
    a, b = lab.devices(2)
    lab.start(a, peers=[b])
    lab.start(b, peers=[a])
    lab.wait_settled(a, b)
    hold = BUSY_TIMEOUT_MS / 1000 + 2
    for attempt in range(1, 4):
        # The application commits a row and at once takes the write lock for longer than the agent
        # waits for it, then gives up its transaction (a rollback: no commit wakes the agent after).
        c = a.connect()
        try:
            c.executescript(f"INSERT INTO items(id, name) VALUES ({attempt}, 'held up'); BEGIN IMMEDIATE;")
            time.sleep(hold)
            c.execute("ROLLBACK")
        finally:
            c.close()
        wait_until(lambda: b.row(attempt) is not None, what=f"row {attempt} on B, stamped on a retry")
        if "stamping local writes failed" in a.log():
            break
    lab.check_alive()
    assert a.running
    assert "stamping local writes failed" in a.log(), "the agent never met the locked database"
    assert a.counters()["stamp_errors"] >= 1
