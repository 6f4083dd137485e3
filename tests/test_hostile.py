"""A running agent attacked over loopback TCP while a legitimate peer keeps syncing.

Agent A (the target) and agent B (a member) run as subprocesses for the
whole module, and B's application writes a row every 0.1 s throughout. The
tests connect to A as strangers (garbage, oversized lengths, stalls, the
wrong group key) and as authenticated members that break the protocol. Each
test checks what a user would see: the bad connection is closed and the
reason logged, A keeps running and keeps syncing with B. The last test
checks that every one of B's rows reached A and that A's memory stayed
bounded.

The agents run with P2PSYNC_HANDSHAKE_TIMEOUT=2 so stalled handshakes are
cut after 2 s instead of 10.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import threading
import time

import msgpack
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import wire
from peers import Identity, open_session
from agents import Lab, wait_until
from wire import events_in
from p2psync.agent.agent import prologue
from p2psync.identity import load_device
from p2psync.model import Batch, VersionVector
from p2psync.net.noise_stream import NoiseStream
from p2psync.noise import agent_handshake
from p2psync.protocol import PROTOCOL_VERSION, BatchEvent, Error, Hello, encode_event

HANDSHAKE_TIMEOUT = 2
CLOSE_WITHIN = 8.0           # generous: how long a test waits for the agent to close a connection
MAX_RSS = 200 * 1024 * 1024
TICK_BASE = 1_000_000


class Ticker(threading.Thread):
    """B's application: inserts one row every 0.1 s until stopped."""

    def __init__(self, dev):
        super().__init__(daemon=True)
        self.dev, self.count, self.error = dev, 0, None
        self._stop_event = threading.Event()

    def run(self):
        try:
            while not self._stop_event.wait(0.1):
                self.dev.execute("INSERT INTO items(id, name) VALUES (?, 'tick')", (TICK_BASE + self.count,))
                self.count += 1
        except BaseException as e:  # reported by the last test
            self.error = e

    def stop(self):
        self._stop_event.set()
        self.join(10)


class Target:
    def __init__(self, lab, a, b, m, ticker):
        self.lab, self.a, self.b, self.ticker = lab, a, b, ticker
        self.member = Identity.of(m.home)      # a member whose agent never runs: the attackers' keys
        self.psk = self.member.psk
        self.prologue = prologue(load_device(a.home).group_id)
        self._ids = itertools.count(1)

    def counters(self) -> dict:
        return self.a.counters()

    def assert_healthy(self) -> None:
        """A is running, still connected to B, and a new row on B reaches A (and one on A reaches B)."""
        self.lab.check_alive()
        assert self.a.running, "the attacked agent is gone"
        n = next(self._ids)
        self.b.execute("INSERT INTO items(id, name) VALUES (?, 'from B')", (n,))
        wait_until(lambda: self.a.row(n) is not None, what=f"B's row {n} on A")
        self.a.execute("UPDATE items SET qty = ? WHERE id = ?", (n, n))
        wait_until(lambda: self.b.row(n) == (n, "from B", n, None), what=f"A's update of row {n} on B")
        assert self.a.connected_peer(self.b)
        assert self.a.rss_bytes() < MAX_RSS


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("hostile"), env={"P2PSYNC_HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT)})
    ticker = None
    try:
        a, b, m = lab.devices(3)
        lab.start(a, peers=[b])
        lab.start(b, peers=[a])
        lab.wait_settled(a, b)
        ticker = Ticker(b)
        ticker.start()
        yield Target(lab, a, b, m, ticker)
    finally:
        if ticker is not None:
            ticker.stop()
        lab.close()


@pytest.fixture(autouse=True)
def show_logs_on_failure(target):
    """Print what the agents logged during this test (pytest shows it only if the test fails)."""
    since = target.lab.log_offsets()
    yield
    target.lab.print_logs(since)


def new_log(target, since: dict) -> str:
    return target.a.log()[since["A"]:]


# ---- clients ----------------------------------------------------------------

def static_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


async def connect(dev) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", dev.port)


async def until_closed(stream, timeout: float = CLOSE_WITHIN) -> bytes:
    """Everything the agent sends until it closes the connection (EOF or reset)."""
    return _pending.pop(id(stream), b"") + await wire.until_closed(stream, timeout)


async def authenticated(target, psk: bytes | None = None) -> NoiseStream:
    """A Noise connection to A as a member, membership exchanged (or, with another ``psk``, as a stranger).

    What A sent past the exchange is kept and handed out first by ``until_closed``."""
    ns, extra = await open_session(target.member, "127.0.0.1", target.a.port, psk=psk, timeout=CLOSE_WITHIN)
    _pending[id(ns)] = extra
    return ns


_pending: dict[int, bytes] = {}


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def our_hello(site: bytes) -> bytes:
    return encode_event(Hello(PROTOCOL_VERSION, site, b"", int(time.time() * 1000), VersionVector()))


# ---- tests ------------------------------------------------------------------

def test_garbage_connections(target):
    before = target.counters()["handshake_failures"]
    rng = random.Random(1234)

    async def attack():
        for i in range(20):
            s = await connect(target.a)
            if i % 2:   # random bytes, then hang up
                await s.send_all(rng.randbytes(rng.randint(1, 4096)))
                await s.aclose()
            else:       # one complete handshake-sized message of garbage: the agent must hang up on us
                body = rng.randbytes(rng.randint(48, 2000))
                await s.send_all(len(body).to_bytes(2, "big") + body)
                await until_closed(s)
                await s.aclose()

    trio.run(attack)
    wait_until(lambda: target.counters()["handshake_failures"] >= before + 20,
               what="20 failed handshakes counted")
    target.assert_healthy()


def test_oversized_length_before_handshake(target):
    since = target.lab.log_offsets()

    async def attack():
        s = await connect(target.a)
        # 2 GiB as a protocol frame header, but the first thing read is Noise's 2-byte length (0x8000).
        await s.send_all(b"\x80\x00\x00\x00" + os.urandom(70_000))
        await until_closed(s)
        await s.aclose()

    trio.run(attack)
    wait_until(lambda: "failed authentication" in new_log(target, since), what="the failure in A's log")
    target.assert_healthy()


def test_oversized_frame_after_handshake(target):
    since = target.lab.log_offsets()
    before = target.counters()["protocol_errors"]

    async def attack():
        ns = await authenticated(target)
        await ns.send_all((0x80000000).to_bytes(4, "big"))   # a frame header claiming 2 GiB
        return await until_closed(ns)

    received = events_in(trio.run(attack))
    errors = [e for e in received if type(e) is Error]
    assert errors and errors[-1].code == "frame-too-large", received
    wait_until(lambda: re.search(r"protocol error.*2147483648", new_log(target, since)),
               what="the frame size in A's log")
    assert target.counters()["protocol_errors"] == before + 1
    target.assert_healthy()


def test_stalled_handshakes_are_cut(target):
    since = target.lab.log_offsets()
    closed_after: list[float] = []

    async def stall(first_bytes: bytes, read_reply: bool = False):
        s = await connect(target.a)
        started = trio.current_time()
        if first_bytes:
            await s.send_all(first_bytes)
        if read_reply:   # message 2 arrives; we never send message 3
            header = await s.receive_some(2)
            assert len(header) == 2
        await until_closed(s)
        closed_after.append(trio.current_time() - started)
        await s.aclose()

    def message_1() -> bytes:
        m = agent_handshake(True, static_key(), target.psk, target.prologue).write_message(b"")
        return len(m).to_bytes(2, "big") + m

    async def attack():
        async with trio.open_nursery() as n:
            n.start_soon(stall, b"")                                # nothing at all
            n.start_soon(stall, message_1()[:20])                   # part of message 1
            n.start_soon(stall, b"\xff\xff" + os.urandom(1000))     # a long message that never completes
            n.start_soon(stall, message_1(), True)                  # message 1, then silence

    trio.run(attack)
    assert len(closed_after) == 4
    assert min(closed_after) >= HANDSHAKE_TIMEOUT * 0.5, closed_after   # cut by the deadline, not at once
    wait_until(lambda: new_log(target, since).count(f"no complete handshake within {HANDSHAKE_TIMEOUT} s") >= 4,
               what="four handshake timeouts in A's log")
    target.assert_healthy()


def test_wrong_group_key(target):
    since = target.lab.log_offsets()
    before = target.counters()

    async def attack():
        with pytest.raises(trio.BrokenResourceError):
            await authenticated(target, psk=os.urandom(32))

    trio.run(attack)
    wait_until(lambda: target.counters()["handshake_failures"] == before["handshake_failures"] + 1,
               what="the failed handshake counted")
    assert "failed authentication" in new_log(target, since)
    st = target.a.status()   # no session was set up: B is still the only peer, no protocol error
    assert [p["site"] for p in st["peers"] if p["state"] == "connected"] == [target.b.site]
    assert st["counters"]["protocol_errors"] == before["protocol_errors"]
    target.assert_healthy()


def _hello_then(data):
    return lambda t: our_hello(t.member.site) + data()


MALFORMED = {
    "not msgpack": lambda t: b"\x00\x00\x00\x05" + b"\xc1" * 5,
    "map instead of array": lambda t: frame({"type": 1}),
    "hello with wrong types": lambda t: frame([1, "one", b"x" * 16, b"", 0, {}]),
    "hello with the agent's own site id": lambda t: our_hello(bytes.fromhex(t.a.site)),
    "unknown event type": lambda t: frame([99, 1]),
    "batch before hello": lambda t: encode_event(BatchEvent(1, Batch(()), False)),
    "negative seq after hello": _hello_then(lambda: frame([2, -1, False, [], [], [], [], []])),
    "batch with wrong field types after hello": _hello_then(lambda: frame([2, 1, "no", 1, 2, 3, 4, 5])),
    "batch out of sequence after hello": _hello_then(lambda: encode_event(BatchEvent(7, Batch(()), False))),
    "ack of a batch never sent after hello": _hello_then(lambda: frame([3, 1_000_000])),
    "truncated body, then eof": lambda t: b"\x00\x00\x01\x00" + b"\x91",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_frame_from_member(target, case):
    since = target.lab.log_offsets()
    before = target.counters()["protocol_errors"]
    payload = MALFORMED[case](target)

    async def attack():
        ns = await authenticated(target)
        await ns.send_all(payload)
        if case.endswith("eof"):
            await ns.transport_stream.send_eof()
        return await until_closed(ns)

    received = events_in(trio.run(attack))
    assert received and type(received[0]) is Hello        # the agent said hello, then hung up on us
    errors = [e for e in received if type(e) is Error]
    assert errors, f"no Error before the close: {received}"
    wait_until(lambda: target.counters()["protocol_errors"] == before + 1, what="the protocol error counted")
    assert "protocol error" in new_log(target, since)
    target.assert_healthy()


def test_still_syncing_with_bounded_memory_after_all_that(target):
    """A flood of stalled connections beyond the handshake limit; then every row of B is on A."""
    since = target.lab.log_offsets()

    async def flood():
        streams = []
        async with trio.open_nursery() as n:
            for _ in range(100):
                s = await connect(target.a)
                await s.send_all(b"\xff\xff")
                streams.append(s)
            # B's established connection keeps syncing while A is full of half-open handshakes.
            n.start_soon(trio.to_thread.run_sync, target.assert_healthy)
            for s in streams:
                n.start_soon(until_closed, s)
        for s in streams:
            await s.aclose()

    trio.run(flood)
    assert "too many handshakes in progress" in new_log(target, since)

    target.ticker.stop()
    assert target.ticker.error is None, target.ticker.error
    assert target.ticker.count > 10
    ticks = target.ticker.count
    wait_until(lambda: target.a.query("SELECT count(*) FROM items WHERE id >= ?", (TICK_BASE,))[0][0] == ticks,
               what=f"all {ticks} rows B wrote during the attacks on A")
    target.lab.wait_converged(target.a, target.b)
    target.assert_healthy()
    assert target.a.rss_bytes() < MAX_RSS
