"""Sessions under stalled, greedy and hostile peers: deadlines, memory budgets, the event loop's CPU.

Two kinds of test. In-process ones run a real ``net.Connection`` against a
scripted peer over trio's lockstep or memory streams, with timeouts of a
second, where what matters is timing (a peer that freezes, stops reading or
stops acknowledging while we have a lot to send) or budgets small enough to
reach quickly. The others attack a real agent process over loopback as a
member (tests/peers.py): agent A, agent F (a peer that gets SIGSTOPped), and
members M and N whose agents never run (their keys are the attackers'). The
agents run with P2PSYNC_IDLE_TIMEOUT=3, so a stalled peer must be gone within
a few seconds. No test asserts speed beyond generous bounds.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import time
import tracemalloc

import pytest
import trio
import trio.testing

import wire
from agents import Lab, wait_until
from groups import device_members, make_group
from peers import Identity, exchange_members, open_session
from p2psync.model import Batch, Change, Range, VersionVector
from p2psync.net.bus import ChangeBus
from p2psync.net.connection import Connection, MemoryBudget, PeerClosed, PeerStalled, SyncSettings
from p2psync.net.noise_stream import NoiseStream
from p2psync.noise import agent_handshake
from p2psync.protocol import PROTOCOL_VERSION, Ack, BatchEvent, Error, FrameDecoder, Hello, LocalProtocolError, Members
from p2psync.protocol import Ping, RemoteProtocolError, Session, decode_body, encode_event, limits
from p2psync.protocol.session import DECODE
from p2psync.protocol.prologue import device_prologue
from p2psync.store import ApplyResult

IDLE = 1.0                      # in-process sessions
SLACK = 5.0                     # "dropped within the idle timeout + 5 s"
AGENT_IDLE = 3                  # the agents' P2PSYNC_IDLE_TIMEOUT
KEYS, MEMBERS = make_group(3)


# ---- in-process: a Connection and a scripted peer ------------------------------

class Worker:
    """A store with ``n_batches`` of ``value_bytes`` each to send; applying waits for ``release`` (if set)."""

    def __init__(self, n_batches: int = 0, value_bytes: int = 1000, release: trio.Event | None = None):
        site = KEYS[0].site_id
        self.to_send = [Batch((Change("items", (i,), site, i, 1 << 20, True, ("note",), ("x" * value_bytes,)),),
                              (Range(site, i - 1, i),)) for i in range(1, n_batches + 1)]
        self.release, self.applied = release, []
        self.vv = VersionVector({site: n_batches} if n_batches else {})

    async def version_vector(self):
        return self.vv   # what it holds: its own versions 1..n (a session sends only what its store holds)

    async def apply(self, batch, validated=False):
        if self.release is not None:
            await self.release.wait()
        self.applied.append(batch)
        return ApplyResult()

    async def batches(self, vv, max_changes, max_bytes):
        for b in self.to_send:
            yield b, False


class Ctx:
    check_schema, schema = False, b""

    def __init__(self, worker):
        self.site_id, self.bus, self.worker, self.members = KEYS[0].site_id, ChangeBus(), worker, MEMBERS[0]

    def admit(self, conn):
        return self.members.admit(conn.remote_static)

    def screen(self, conn, batch):
        return batch

    async def on_members(self, conn, events):
        pass

    @staticmethod
    def wall_ms():
        return int(time.time() * 1000)

    def on_hello(self, conn, hello):
        pass

    def on_applied(self, conn, batch, result):
        pass


def settings(**kw) -> SyncSettings:
    return SyncSettings(**{"idle_timeout": IDLE, "heartbeat_interval": 0.3, "hello_timeout": 5, **kw})


class ScriptedPeer:
    """The other end, written by hand: it does the membership exchange and Hello, then what the test says."""

    def __init__(self, stream, me: int = 1):
        self.stream, self.me, self.dec, self.events = stream, me, FrameDecoder(), []

    async def read_until(self, kind) -> None:
        while not any(type(e) is kind for e in self.events):
            await self.read_some()

    async def read_some(self) -> None:
        data = await self.stream.receive_some(1 << 20)
        if not data:
            raise EOFError("closed")
        self.dec.feed(data)
        while (ev := self.dec.next_frame()) is not None:
            self.events.append(ev)

    async def hello(self) -> None:
        """Exchange membership heads and Hellos (reading while sending: a lockstep stream blocks a lone writer)."""
        async with trio.open_nursery() as n:
            n.start_soon(self.read_until, Hello)
            await self.stream.send_all(encode_event(Members(MEMBERS[self.me].heads, ())))
        await self.stream.send_all(encode_event(Hello(PROTOCOL_VERSION, KEYS[self.me].site_id, b"",
                                                      Ctx.wall_ms(), VersionVector())))

    async def ping_forever(self, every: float = 0.1) -> None:
        for token in range(1, 1 << 30):
            await self.stream.send_all(encode_event(Ping(token)))
            await trio.sleep(every)

    async def read_forever(self) -> None:
        try:
            while True:
                await self.read_some()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def run_until_dropped(conn: Connection, peer_script, limit: float) -> tuple[PeerClosed, float]:
    """Run ``conn`` against ``peer_script`` until it ends; (why, seconds from the peer's Hello)."""
    outcome: list = []
    started: list[float] = []

    async def ours():
        try:
            await conn.run()
        except PeerClosed as e:
            outcome.append(e)

    async def theirs():
        await peer_script(started)
        await trio.sleep_forever()

    with trio.fail_after(limit):
        async with trio.open_nursery() as n:
            n.start_soon(theirs)
            await ours()
            n.cancel_scope.cancel()
    assert outcome, "the connection ended without PeerClosed"
    return outcome[0], trio.current_time() - started[0]


def test_frozen_peer_is_dropped_while_our_send_is_blocked():
    """The peer says Hello and then neither reads nor sends (SIGSTOP): the idle timeout fires anyway."""
    async def main():
        ours, theirs = trio.testing.lockstep_stream_pair()
        conn = Connection(ours, Ctx(Worker(20)), "frozen-peer", settings(), remote_static=KEYS[1].static_public)
        peer = ScriptedPeer(theirs)

        async def script(started):
            await peer.hello()
            started.append(trio.current_time())   # from here on: frozen

        return await run_until_dropped(conn, script, IDLE + SLACK)

    why, after = trio.run(main)
    # the idle timeout, or (if the machine stalls us past both deadlines at once) the blocked write's own
    assert "nothing received from peer" in str(why) or "stopped reading" in str(why), why
    assert after < IDLE + SLACK


def test_peer_that_stops_reading_is_dropped_and_named():
    """The peer keeps pinging but never reads what we send: dropped, and the log says what stalled."""
    async def main():
        ours, theirs = trio.testing.lockstep_stream_pair()
        conn = Connection(ours, Ctx(Worker(20, 100_000)), "deaf-peer", settings(),
                          remote_static=KEYS[1].static_public)
        peer = ScriptedPeer(theirs)

        async def script(started):
            await peer.hello()
            started.append(trio.current_time())
            await peer.ping_forever()

        return await run_until_dropped(conn, script, IDLE + SLACK)

    why, after = trio.run(main)
    assert isinstance(why, PeerStalled), why
    assert "deaf-peer" in str(why) and "stopped reading: a send of" in str(why) and "made no progress" in str(why)
    assert after < IDLE + SLACK


def test_peer_that_never_acknowledges_is_dropped():
    """The peer reads everything and pings, but never acks: once the window is full, it is dropped."""
    async def main():
        ours, theirs = trio.testing.memory_stream_pair()
        conn = Connection(ours, Ctx(Worker(20)), "mute-peer", settings(), remote_static=KEYS[1].static_public)
        peer = ScriptedPeer(theirs)

        async def script(started):
            await peer.hello()
            started.append(trio.current_time())
            async with trio.open_nursery() as n:
                n.start_soon(peer.read_forever)
                await peer.ping_forever()

        result = await run_until_dropped(conn, script, IDLE + SLACK)
        return result, sum(type(e) is BatchEvent for e in peer.events)

    (why, after), batches = trio.run(main)
    assert isinstance(why, PeerStalled) and "stopped acknowledging: 8 batches" in str(why), why
    assert batches == 8 and after < IDLE + SLACK


def part(seq: int, n_changes: int, site: bytes, more: bool = True, first_pk: int = 0) -> bytes:
    changes = tuple(Change("items", (first_pk + i,), site, 1, 1 << 20, True, ("name",), ("p",))
                    for i in range(n_changes))
    return encode_event(BatchEvent(seq, Batch(changes, () if more else (Range(site, 0, 1),)), more))


def errors_in(events) -> list[Error]:
    return [e for e in events if type(e) is Error]


def test_batches_waiting_to_be_applied_are_capped_in_bytes():
    """While our store is busy, a peer that keeps sending whole batches goes over MAX_UNACKED_BYTES."""
    limit = 200_000

    async def main():
        ours, theirs = trio.testing.memory_stream_pair()
        worker = Worker(release=trio.Event())   # applying never finishes
        conn = Connection(ours, Ctx(worker), "greedy-peer", settings(max_unacked_bytes=limit),
                          remote_static=KEYS[1].static_public)
        peer = ScriptedPeer(theirs)

        async def script(started):
            await peer.hello()
            started.append(trio.current_time())
            for seq in range(1, 4):             # each costs ~1000 * CHANGE_COST > limit / 3
                await theirs.send_all(part(seq, 1000, KEYS[1].site_id, more=False, first_pk=seq * 1000))
            await peer.read_until(Error)

        result = await run_until_dropped(conn, script, 10)
        return result, peer.events, worker

    (why, _), events, worker = trio.run(main)
    err = errors_in(events)
    assert err and err[0].code == "unacked-bytes" and "MAX_UNACKED_BYTES" in err[0].message, events
    assert "went over a limit" in str(why)
    assert worker.applied == []            # nothing of it half applied
    assert conn_budget_is_released()


def conn_budget_is_released() -> bool:
    from p2psync.net.connection import PROCESS_MEMORY
    return PROCESS_MEMORY.used == 0


def test_process_budget_is_shared_by_sessions():
    """Two sessions each stage parts within their own limit; together they go over the process's budget."""
    budget = MemoryBudget(3_000_000)
    staged_each = 2_000_000 // limits.CHANGE_COST          # changes costing ~2 MB per session

    async def main():
        conns, peers, results = [], [], {}
        for me in (1, 2):
            ours, theirs = trio.testing.memory_stream_pair()
            conns.append(Connection(ours, Ctx(Worker()), f"peer-{me}", settings(idle_timeout=30, heartbeat_interval=5),
                                    remote_static=KEYS[me].static_public, budget=budget))
            peers.append(ScriptedPeer(theirs, me))

        async def run(i):
            try:
                await conns[i].run()
            except PeerClosed as e:
                results[i] = e

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for i in (0, 1):
                    n.start_soon(run, i)
                for i, p in enumerate(peers):
                    await p.hello()
                # the first peer stages its parts and has them acked
                for seq in (1, 2):
                    await peers[0].stream.send_all(part(seq, staged_each // 2, KEYS[1].site_id, first_pk=seq << 20))
                await peers[0].read_until(Ack)
                while max((e.seq for e in peers[0].events if type(e) is Ack), default=0) < 2:
                    await peers[0].read_some()
                held_by_first = budget.used
                # the second goes over what is left
                for seq in (1, 2):
                    await peers[1].stream.send_all(part(seq, staged_each // 2, KEYS[2].site_id, first_pk=seq << 21))
                await peers[1].read_until(Error)
                while 1 not in results:
                    await trio.sleep(0.01)
                assert 0 not in results                      # the first session is untouched
                await peers[0].stream.send_all(part(3, 1, KEYS[1].site_id, more=False, first_pk=99))
                while max((e.seq for e in peers[0].events if type(e) is Ack), default=0) < 3:
                    await peers[0].read_some()
                n.cancel_scope.cancel()
        return held_by_first, peers, conns

    held_by_first, peers, conns = trio.run(main)
    assert held_by_first > 1_500_000
    err = errors_in(peers[1].events)
    assert err and err[0].code == "process-memory" and "MAX_PROCESS_BYTES" in err[0].message, peers[1].events
    assert [len(b.changes) for b in conns[0].ctx.worker.applied] == [2 * (staged_each // 2) + 1]
    assert conns[1].ctx.worker.applied == []                # nothing of the refused group applied
    assert budget.used == 0                                 # both sessions gave their share back


# ---- the codec: work bounded before it is done -------------------------------

def nested_arrays(body_bytes: int) -> bytes:
    """A Batch body whose sites field is arrays of 100,000 one-element arrays: 28x its size in memory."""
    n_inner = 100_000
    inner = b"\xdd" + n_inner.to_bytes(4, "big") + b"\x91\x00" * n_inner
    k = max(1, body_bytes // len(inner))
    return b"\x99\x02\x01\xc2" + b"\xdd" + k.to_bytes(4, "big") + inner * k + b"\x90" * 5


def test_a_frame_of_tiny_arrays_is_refused_at_the_objects_budget():
    body = nested_arrays(3_800_000)
    with pytest.raises(LocalProtocolError) as e:
        decode_body(body)
    assert e.value.code == "frame-objects" and "MAX_FRAME_OBJECTS" in e.value.message


def test_a_large_frame_of_empty_maps_stops_at_the_first_map():
    body = b"\x99\x02\x01\xc2\xdd" + (100_000).to_bytes(4, "big") + b"\x80" * 100_000 + b"\x90" * 5
    with pytest.raises(LocalProtocolError) as e:
        decode_body(body)
    assert e.value.code == "bad-frame" and "map outside a Hello" in e.value.message


@pytest.mark.parametrize("body_bytes", [3_800_000, 1_000_000])   # over the objects budget; under it, then invalid
def test_a_refused_frame_is_freed_at_once(body_bytes):
    """Nothing keeps a refused frame or what was decoded of it, not even a cycle for the GC to find later."""
    body = nested_arrays(body_bytes)
    frame = len(body).to_bytes(4, "big") + body
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            s = Session(KEYS[0].site_id, offload=True)
            s.send(Hello(PROTOCOL_VERSION, KEYS[0].site_id, b"", 1, VersionVector()), 0)
            s.receive_data(encode_event(Hello(PROTOCOL_VERSION, KEYS[1].site_id, b"", 1, VersionVector())) + frame, 0)
            assert type(s.next_event()) is Hello and s.next_event() is DECODE
            s.decode_pending()
            with pytest.raises(RemoteProtocolError):
                s.next_event()
            del s
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        gc.enable()
    assert held < len(frame), f"{held} bytes still held after three refused frames of {len(frame)}"


def test_our_largest_batches_fit_the_objects_budget():
    """20,000 changes of 14 values each (what a device sends a relay) decode; so does a big Hello."""
    site = os.urandom(16)
    cols = tuple(f"c{i}" for i in range(14))
    changes = tuple(Change("t", (i,), site, i + 1, 1 << 40, True, cols, tuple(range(14))) for i in range(20_000))
    ev = decode_body(encode_event(BatchEvent(1, Batch(changes, (Range(site, 0, 20_000),)), False))[4:])
    assert len(ev.batch.changes) == 20_000
    vv = VersionVector({os.urandom(16): i + 1 for i in range(limits.MAX_VV_ENTRIES)})
    hello = decode_body(encode_event(Hello(PROTOCOL_VERSION, site, b"", 1, vv))[4:])
    assert hello.vv == vv


# ---- against a real agent ----------------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("hardening"), env={"P2PSYNC_IDLE_TIMEOUT": str(AGENT_IDLE)})
    try:
        a, f, m, n = lab.devices(4)
        lab.start(a, peers=[f])
        lab.start(f, peers=[a])
        lab.wait_settled(a, f)
        yield lab
    finally:
        lab.close()


@pytest.fixture(autouse=True)
def show_logs_on_failure(request):
    if "lab" not in request.fixturenames:
        yield
        return
    lab = request.getfixturevalue("lab")
    since = lab.log_offsets()
    yield
    lab.print_logs(since)


def hello_of(who: Identity, vv: VersionVector | None = None) -> bytes:
    return encode_event(Hello(PROTOCOL_VERSION, who.site, b"", int(time.time() * 1000), vv or VersionVector()))


def new_log(dev, since: dict) -> str:
    return dev.log()[since[dev.name]:]


def test_flood_of_hostile_frames_leaves_other_peers_their_latency(lab):
    """M sends 16 MiB frames of tiny arrays, reconnecting after each; N's pings keep being answered quickly."""
    a, _, m, n = lab.all
    attacker, probe = Identity.of(m.home), Identity.of(n.home)
    body = nested_arrays(limits.MAX_FRAME - 64)
    hostile = len(body).to_bytes(4, "big") + body
    rtts: list[float] = []
    codes: list[str] = []

    async def flood():
        for _ in range(3):
            ns, extra = await open_session(attacker, "127.0.0.1", a.port)
            await ns.send_all(hello_of(attacker) + hostile)
            got = wire.events_in(extra + await wire.until_closed(ns, 30))
            codes.extend(e.code for e in got if type(e) is Error)
            await ns.aclose()

    async def measure(done: trio.Event):
        ns, extra = await open_session(probe, "127.0.0.1", a.port)
        await ns.send_all(hello_of(probe))
        dec, sent = FrameDecoder(), {}
        dec.feed(extra)

        async def pings():
            for token in range(1, 1 << 30):
                sent[token] = time.perf_counter()
                await ns.send_all(encode_event(Ping(token)))
                await trio.sleep(0.02)

        async with trio.open_nursery() as nn:
            nn.start_soon(pings)
            while not done.is_set():
                while (ev := dec.next_frame()) is not None:
                    if type(ev).__name__ == "Pong" and ev.token in sent:
                        rtts.append(time.perf_counter() - sent.pop(ev.token))
                with trio.move_on_after(0.5):
                    dec.feed(await ns.receive_some(65536))
            nn.cancel_scope.cancel()
        await ns.aclose()

    async def main():
        done = trio.Event()
        async with trio.open_nursery() as nn:
            nn.start_soon(measure, done)
            await trio.sleep(0.5)
            await flood()
            done.set()

    trio.run(main)
    assert codes == ["frame-objects"] * 3, codes
    assert len(rtts) > 20
    assert max(rtts) < 0.75, f"a ping waited {max(rtts):.2f} s for its answer while the flood was decoded"
    assert a.rss_bytes() < 200 * 1024 * 1024      # a refused frame is freed at once (it cost 450 MiB decoded)
    lab.check_alive()


def test_transaction_staged_over_its_byte_budget_is_refused_and_nothing_applied(lab):
    """M sends parts of one transaction (more=True) whose cost passes MAX_STAGED_BYTES: Error, nothing applied."""
    a = lab.all[0]
    attacker = Identity.of(lab.all[2].home)
    per_part = 20_000
    parts = limits.MAX_STAGED_BYTES // (per_part * limits.CHANGE_COST) + 2
    since = lab.log_offsets()

    async def attack():
        ns, extra = await open_session(attacker, "127.0.0.1", a.port)
        data = hello_of(attacker) + b"".join(part(seq, per_part, attacker.site, first_pk=5_000_000 + seq * per_part)
                                             for seq in range(1, parts + 1))
        async with trio.open_nursery() as nn:
            nn.start_soon(ns.send_all, data)
            got = extra + await wire.until_closed(ns, 30)
            nn.cancel_scope.cancel()
        await ns.aclose()
        return wire.events_in(got)

    received = trio.run(attack)
    err = errors_in(received)
    assert err and err[0].code == "staged-bytes" and "MAX_STAGED_BYTES" in err[0].message, received[-3:]
    acked = max((e.seq for e in received if type(e) is Ack), default=0)
    assert 0 < acked < parts                       # parts under the budget were staged and acked
    wait_until(lambda: "went over a limit" in new_log(a, since), what="the refusal in A's log")
    assert a.query("SELECT count(*) FROM items WHERE id >= 5000000")[0][0] == 0
    lab.check_alive()


def bulk(dev, rows: int = 8, value: int = 6 << 20, base: int = 7_000_000) -> None:
    """Rows of ``value`` bytes each: more than the window can keep in socket buffers."""
    dev.transaction([("INSERT OR REPLACE INTO items(id, name, note) VALUES (?, 'bulk', ?)",
                      (base + i, f"{i:08d}" * (value // 8))) for i in range(rows)])


async def open_slow_reader(who: Identity, port: int) -> NoiseStream:
    """A member's session whose socket has a tiny receive buffer (so the agent's writes back up quickly)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    ns = NoiseStream(trio.SocketStream(sock), agent_handshake(True, who.static_private, who.psk,
                                                              device_prologue(who.group_id)))
    with trio.fail_after(15):
        await ns.do_handshake()
        await exchange_members(ns, who)
    return ns


def test_member_that_stops_reading_is_dropped_within_the_idle_timeout(lab):
    """N says Hello and keeps pinging, but never reads what A sends it: A drops it and logs what stalled."""
    a = lab.all[0]
    who = Identity.of(lab.all[3].home)
    bulk(a, base=7_100_000)
    since = lab.log_offsets()

    async def attack():
        ns = await open_slow_reader(who, a.port)
        await ns.send_all(hello_of(who))
        started = trio.current_time()
        try:
            with trio.fail_after(AGENT_IDLE + SLACK + 5):
                for token in range(1, 1 << 30):
                    await ns.send_all(encode_event(Ping(token)))
                    if "stopped reading" in new_log(a, since):
                        return trio.current_time() - started
                    await trio.sleep(0.25)
        finally:
            await ns.aclose()

    after = trio.run(attack)
    assert after < AGENT_IDLE + SLACK
    line = next(ln for ln in new_log(a, since).splitlines() if "stopped reading" in ln)
    assert "a send of" in line and "made no progress for 3 s" in line and lab.all[3].site[:12] in line, line
    lab.check_alive()


def test_frozen_agent_is_dropped_within_the_idle_timeout(lab):
    """F is SIGSTOPped while A has a lot to send it: A drops F within the idle timeout, and F catches up later."""
    a, f = lab.all[0], lab.all[1]
    since = lab.log_offsets()
    os.kill(f.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        bulk(a, base=7_200_000)
        wait_until(lambda: not a.connected_peer(f), timeout=AGENT_IDLE + SLACK + 5, interval=0.1,
                   what="A to drop the frozen F")
        assert time.monotonic() - stopped < AGENT_IDLE + SLACK
        log = new_log(a, since)
        assert "nothing received from peer" in log or "stopped reading" in log, log[-2000:]
    finally:
        os.kill(f.pid, signal.SIGCONT)
    lab.wait_converged(a, f, timeout=60)


# ---- hostile membership events (after admission) ------------------------------

def members_attack(lab, events: list[bytes]) -> tuple[list[str], bool, str]:
    """M, admitted, sends ``events`` in one Members message (and no Hello, so that A sends it no batches
    that could race the Error): the Error codes A sends, whether A closed the session, what A logged."""
    a, _, m, _ = lab.all
    attacker = Identity.of(m.home)
    since = lab.log_offsets()

    async def main():
        ns, extra = await open_session(attacker, "127.0.0.1", a.port)
        try:
            await ns.send_all(encode_event(Members(attacker.heads, tuple(events))))
            data = extra + await wire.until_closed(ns, 10, until=None)
            return data, True
        except trio.TooSlowError:
            return b"", False
        finally:
            await ns.aclose()

    data, closed = trio.run(main)
    codes = [e.code for e in wire.events_in(data) if type(e) is Error]
    return codes, closed, new_log(a, since)


def signed_by(home, kind: str, parents, body: dict) -> bytes:
    from p2psync.identity import load_device
    from p2psync.model.membership import encode_event as encode_member, make_event
    d = load_device(home)
    return encode_member(make_event(kind, d.group_id, d.site_id, d.sign_private, parents, int(time.time() * 1000),
                                    body))


def test_members_message_of_garbage_is_refused_in_one_line_and_the_session_closed(lab):
    """10,000 garbage events (16 MiB) once took a second on A's event loop and a log line each, and left
    the session open; now: decoded off the loop, one Error, one log line, session closed."""
    import msgpack
    garbage = [msgpack.packb([os.urandom(1500), os.urandom(64)], use_bin_type=True) for _ in range(5_000)]
    codes, closed, log = members_attack(lab, garbage)
    assert codes == ["bad-members"] and closed, codes
    assert "5000 of 5000 membership events sent were malformed" in log
    assert log.count("malformed") <= 3, log[-2000:]
    lab.check_alive()


def test_forged_membership_event_is_dropped_and_the_session_closed(lab):
    """A removal of F in A's name but signed by M: not kept, not passed on, and M's session ends."""
    a, f, m, _ = lab.all
    from p2psync.model.membership import decode_event, encode_event as encode_member, make_event
    from p2psync.identity import load_device
    attacker, dm, da = Identity.of(m.home), load_device(m.home), load_device(a.home)
    forged = encode_member(make_event("remove", dm.group_id, da.site_id, dm.sign_private, list(attacker.heads),
                                      int(time.time() * 1000), {"site": load_device(f.home).site_id, "last": 0}))
    codes, closed, log = members_attack(lab, [forged])
    assert codes == ["forged-members"] and closed, codes
    assert decode_event(forged).hash not in {ev.hash for ev in device_members(a.home).log.events()}
    assert device_members(a.home).state.member(load_device(f.home).site_id).state == "current"
    lab.wait_settled(a, f)   # F is still a member: A still syncs with it
    lab.check_alive()


def test_member_signing_admin_acts_without_the_right_is_cut_off_past_a_budget(lab):
    """M is no admin: each event it signs for an admin act is ignored (kept, counted); past
    MAX_OWN_IGNORED_EVENTS in a session the session closes."""
    from p2psync.net.connection import MAX_OWN_IGNORED_EVENTS
    a, _, m, _ = lab.all
    attacker = Identity.of(m.home)
    events = [signed_by(m.home, "invite", list(attacker.heads),
                        {"id": os.urandom(16), "expires": 1 << 50, "role": "member", "psk": b""})
              for _ in range(MAX_OWN_IGNORED_EVENTS + 1)]
    codes, closed, _ = members_attack(lab, events)
    assert codes == ["members-ignored"] and closed, codes
    lab.check_alive()
