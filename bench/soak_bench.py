"""The soak (issue 9): two agents at 50 writes/s while a hostile peer cycles through every attack.

How this works. Three devices of one group are made with the CLI: A and B run agents on
loopback and sync with each other; M is a member whose agent never runs, and its keys are the
attacker's (tests/peers.py). A starts with SEED rows, so a hostile peer that asks for everything
has something to stall on. The application writes the whole time, from this process with stdlib
sqlite3: 50 single-row writes/s in all, half on A and half on B. A thread per side polls the
other database every 2 ms for the rows written there; the time from a row's commit to its first
sighting is its latency. The phases:

    quiet   30 s, no attacker: the baseline latency
    soak    P2PSYNC_SOAK_SECONDS (default 3600), the attacker cycling through ATTACKS against A;
            RSS growth is counted from the end of the warm-up (300 s, or 1/12 of the duration)
    flood   30 s, a member flooding A with maximum-size hostile frames: its p99 against quiet
    drain   writes stop; every row written must reach the other side (else it is lost)

The attacker runs in a process of its own (``attacker_main``), so that its CPU does not share
this process's GIL with the latency measurement; each attack's exceptions are caught and counted,
a dead attacker is restarted, and every process is ended by its PID at the end. A monitor samples
both agents' RSS and WAL size twice a second (each WAL is truncated once after the set-up, whose
initial sync is not the soak's), and restarts (and counts) an agent that exits. The report gives
the legitimate p99 during each attack, so a regression points at its cause.

Settings (environment): P2PSYNC_SOAK_SECONDS, P2PSYNC_SOAK_QUIET and P2PSYNC_SOAK_FLOOD (phase
lengths), P2PSYNC_SOAK_RATE (writes/s in all, 50), P2PSYNC_SOAK_SEED_ROWS (100000),
P2PSYNC_SOAK_LOG_LEVEL (the agents', warning), P2PSYNC_SOAK_KEEP=1 (keep the files; they are
kept anyway when a target is missed).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import PY, ROOT, Device, line, rss_mb

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, origin TEXT NOT NULL, pad TEXT);"
WRITE_BASE = 10_000_000          # ids of the soak's writes (A even, B odd); the seed rows are below
POLL_INTERVAL = 0.002
GIVE_UP_WAITING = 60.0           # a row not seen after this long is no longer polled for (checked at the end)
DRAIN_TIMEOUT = 120.0

AGENT_ARGS = ["--log-level", os.environ.get("P2PSYNC_SOAK_LOG_LEVEL", "warning")]
TARGET_RSS_MB, TARGET_WAL_MIB, TARGET_P99_MS, TARGET_FLOOD_RATIO = 20, 16, 100, 2.0


def _env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


# ---- the application: writers and pollers ------------------------------------------

class Writer(threading.Thread):
    """One device's application: single-row inserts at ``rate`` per second, each in its own transaction."""

    def __init__(self, dev: Device, origin: str, parity: int, rate: float):
        super().__init__(daemon=True, name=f"writer-{origin}")
        self.dev, self.origin, self.parity, self.interval = dev, origin, parity, 1 / rate
        self.pending: collections.OrderedDict[int, float | None] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.written: list[int] = []
        self.commit_s: list[float] = []
        self.errors = 0
        self.last_error = ""
        self._halt = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.dev.db, timeout=30, isolation_level=None)
        n, next_t = 0, time.monotonic()
        pad = "x" * 64
        while not self._halt.is_set():
            next_t += self.interval
            delay = next_t - time.monotonic()
            if delay > 0:
                self._halt.wait(delay)
            elif delay < -1:
                next_t = time.monotonic()      # far behind (the database was locked): no burst to catch up
            key = WRITE_BASE + 2 * n + self.parity
            n += 1
            with self.lock:
                self.pending[key] = None
            t0 = time.monotonic()
            try:
                conn.execute("INSERT INTO t (id, origin, pad) VALUES (?, ?, ?)", (key, self.origin, pad))
            except sqlite3.Error as e:
                self.errors += 1
                self.last_error = str(e)
                with self.lock:
                    del self.pending[key]
                continue
            t1 = time.monotonic()
            with self.lock:
                if key in self.pending:
                    self.pending[key] = t1
            self.written.append(key)
            self.commit_s.append(t1 - t0)
        conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(40)


class Poller(threading.Thread):
    """Watches ``dev``'s database for the rows ``writer`` commits on the other side: (commit time, latency)."""

    def __init__(self, dev: Device, writer: Writer):
        super().__init__(daemon=True, name=f"poller-{writer.origin}")
        self.dev, self.writer = dev, writer
        self.samples: list[tuple[float, float]] = []
        self.gave_up: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.dev.db, timeout=30, isolation_level=None)
        w = self.writer
        while not self._halt.wait(POLL_INTERVAL):
            with w.lock:
                if not w.pending:
                    continue
                lo = next(iter(w.pending))
            try:
                rows = conn.execute("SELECT id FROM t WHERE origin = ? AND id >= ?", (w.origin, lo)).fetchall()
            except sqlite3.Error:
                continue
            now = time.monotonic()
            with w.lock:
                for (key,) in rows:
                    t = w.pending.get(key, 0.0)
                    if t:                         # committed, and not yet seen
                        self.samples.append((t, now - t))
                        del w.pending[key]
                while w.pending:
                    key, t = next(iter(w.pending.items()))
                    if t is None or now - t < GIVE_UP_WAITING:
                        break
                    self.gave_up.append(key)
                    del w.pending[key]
        conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# ---- the monitor ------------------------------------------------------------------------

def _wal_bytes(db: Path) -> int:
    try:
        return os.path.getsize(str(db) + "-wal")
    except OSError:
        return 0


class Monitor(threading.Thread):
    """Samples the agents' RSS and WAL size; restarts an agent that exited (a crash) and the attacker if it died."""

    def __init__(self, devices: dict[str, Device], peers: dict[str, list[int]]):
        super().__init__(daemon=True, name="monitor")
        self.devices, self.peers = devices, peers
        self.samples: list[tuple[float, dict, dict]] = []     # (time, {name: rss MB}, {name: wal bytes})
        self.crashes: list[str] = []
        self.attacker: Attacker | None = None
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        start = time.monotonic()
        while not self._halt.wait(0.5):
            now = time.monotonic()
            rss, wal = {}, {}
            with self.lock:
                for name, d in self.devices.items():
                    if d.proc is not None and d.proc.poll() is not None:
                        code = d.proc.returncode
                        tail = (d.home / "agent.log").read_text(errors="replace").splitlines()[-5:]
                        self.crashes.append(f"{name} exited with {code} at {now - start:.0f} s: "
                                            f"{' | '.join(tail)[-300:]}")
                        d.proc = None
                        d.start(peers=self.peers[name], extra=AGENT_ARGS)
                    if d.proc is not None:
                        try:
                            rss[name] = rss_mb(d.proc.pid)
                        except OSError:
                            pass
                    wal[name] = _wal_bytes(d.db)
                if self.attacker is not None:
                    self.attacker.keep_alive()
            self.samples.append((now, rss, wal))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def rss_at(self, name: str, t: float) -> float | None:
        """The first RSS sample of ``name`` at or after time ``t``."""
        return next((r[name] for s, r, _ in self.samples if s >= t and name in r), None)


# ---- the attacker (a child process) -----------------------------------------------------

class Attacker:
    """The hostile peer's process, in ``mode`` "cycle" (every attack in turn) or "flood"."""

    def __init__(self, cfg: dict, mode: str, base: Path):
        self.cfg = {**cfg, "mode": mode, "stats": str(base / f"attacker-{mode}.json")}
        self.log_path = base / f"attacker-{mode}.log"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = False
        self._start()

    def _start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-c", "from bench.soak_bench import attacker_main; attacker_main()", json.dumps(self.cfg)],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def keep_alive(self) -> None:
        if not self._stopping and self.proc is not None and self.proc.poll() is not None:
            self.restarts += 1
            self._start()

    def stop(self) -> dict:
        """End the process by its PID; what it counted."""
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            return json.loads(Path(self.cfg["stats"]).read_text())
        except (OSError, ValueError):
            return {}


def attacker_main() -> None:
    """Entry point of the attacker process: ``python -c ... attacker_main()`` CONFIG_JSON."""
    cfg = json.loads(sys.argv[-1])
    sys.path.insert(0, str(ROOT / "tests"))
    import trio

    global _STATS_PATH
    _STATS_PATH = cfg["stats"]
    signal.signal(signal.SIGTERM, lambda *_: (save_stats(), os._exit(0)))
    trio.run(_attack, cfg)


# ---- the attacks (in the attacker process) -----------------------------------------------
#
# Each attack is a coroutine taking the _Ctx. Strangers connect from 127.0.0.2, the hostile member
# from 127.0.0.3 and the reconnect storm from 127.0.0.4, so per-address limits on A meet the
# attacker and not B (which dials from 127.0.0.1). What each attack saw is counted in STATS.

STRANGER, MEMBER, STORM = "127.0.0.2", "127.0.0.3", "127.0.0.4"
HANDSHAKE_TIMEOUT, IDLE_TIMEOUT = 10.0, 15.0      # the agent's defaults
ATTACK_BUDGET = 120.0
STATS: dict[str, dict] = {}
WINDOWS: dict[str, list] = {}     # flood kind -> [(monotonic start, end)] of its sessions (one clock for all)
_STATS_PATH: str | None = None


def save_stats() -> None:
    if _STATS_PATH:
        tmp = _STATS_PATH + ".tmp"
        Path(tmp).write_text(json.dumps({**STATS, "_windows": WINDOWS}, indent=1))
        os.replace(tmp, _STATS_PATH)


def _note(attack: str, what: str, n: int = 1) -> None:
    entry = STATS.setdefault(attack, {"runs": 0, "errors": 0})
    entry[what] = entry.get(what, 0) + n


class _Ctx:
    """What the attacker knows: A's port, the hostile member's keys and log, B's site id."""

    def __init__(self, cfg: dict):
        from peers import Identity

        from p2psync.identity import load_device
        from p2psync.protocol.prologue import device_prologue
        self.port = cfg["port"]
        self.member = Identity.of(Path(cfg["member_home"]))
        self.sign_private = load_device(Path(cfg["member_home"])).sign_private
        self.b_site = load_device(Path(cfg["b_home"])).site_id
        self.prologue = device_prologue(self.member.group_id)
        self.schema = b""
        self.rng = random.Random()
        self.frames: dict[str, bytes] = {}


def _frame(obj) -> bytes:
    import msgpack
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


async def _connect(ctx: _Ctx, source: str):
    import trio
    return await trio.open_tcp_stream("127.0.0.1", ctx.port, local_address=source)


def _hello(ctx: _Ctx, vv=None) -> bytes:
    """Our Hello; with an empty version vector (the default) A then sends everything it has."""
    from p2psync.model import VersionVector
    from p2psync.protocol import PROTOCOL_VERSION, Hello, encode_event
    return encode_event(Hello(PROTOCOL_VERSION, ctx.member.site, ctx.schema, int(time.time() * 1000),
                              vv or VersionVector()))


async def _member(ctx: _Ctx, source: str = MEMBER, psk: bytes | None = None, hello: bool = True,
                  up_to_date: bool = False):
    """A session to A as the hostile member: handshake, membership exchange, A's Hello read, ours sent.

    Our Hello asks for everything A has, or (``up_to_date``) claims A's own version vector."""
    import trio
    from peers import exchange_members

    from p2psync.net.noise_stream import NoiseStream
    from p2psync.noise import agent_handshake
    from p2psync.protocol import FrameDecoder, Hello
    stream = await _connect(ctx, source)
    ns = NoiseStream(stream, agent_handshake(True, ctx.member.static_private, psk or ctx.member.psk, ctx.prologue))
    try:
        with trio.fail_after(15):
            await ns.do_handshake()
            dec = FrameDecoder()
            dec.feed(await exchange_members(ns, ctx.member))
            theirs = await _next_of(ns, dec, Hello)
            if theirs is None:
                raise EOFError("closed before its Hello")
            ctx.schema = theirs.schema
            if hello:
                await ns.send_all(_hello(ctx, theirs.vv if up_to_date else None))
    except BaseException:
        await _close(ns)
        raise
    return ns, dec


async def _next_of(ns, dec, event_type):
    """The next event of ``event_type`` from A (None at EOF); EOFError if A sends an Error first."""
    from p2psync.protocol import Error
    while True:
        ev = dec.next_frame()
        if ev is None:
            data = await ns.receive_some(65536)
            if not data:
                return None
            dec.feed(data)
        elif type(ev) is event_type:
            return ev
        elif type(ev) is Error:
            raise EOFError(f"refused: {ev.code}")


async def _drain(ns, dec, timeout: float) -> tuple[list, bool]:
    """What A sends within ``timeout`` s (frames decoded), and whether it closed the session by then."""
    import trio
    events: list = []
    with trio.move_on_after(timeout):
        while True:
            try:
                data = await ns.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return events, True
            if not data:
                return events, True
            dec.feed(data)
            try:
                while (ev := dec.next_frame()) is not None:
                    events.append(ev)
            except Exception:   # noqa: BLE001 -- A's frames are not what this attack studies
                pass
    return events, False


async def _raw_closed(stream, timeout: float) -> bool:
    """True if A closes the raw TCP connection within ``timeout`` s (whatever it sends first)."""
    import trio
    with trio.move_on_after(timeout):
        while True:
            try:
                if not await stream.receive_some(65536):
                    return True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return True
    return False


async def _close(stream) -> None:
    import trio
    with trio.move_on_after(2):
        try:
            await stream.aclose()
        except Exception:   # noqa: BLE001 -- already broken
            pass


def _error_codes(events) -> str:
    from p2psync.protocol import Error
    codes = [e.code for e in events if type(e) is Error]
    return f"Error {codes[-1]}" if codes else "no Error"


async def garbage_connections(ctx: _Ctx, name: str) -> None:
    rng = ctx.rng
    for i in range(20):
        s = await _connect(ctx, STRANGER)
        try:
            if i % 2:   # random bytes, then hang up
                await s.send_all(rng.randbytes(rng.randint(1, 4096)))
            else:       # one complete handshake-sized message of garbage: A must hang up
                body = rng.randbytes(rng.randint(48, 2000))
                await s.send_all(len(body).to_bytes(2, "big") + body)
                _note(name, "closed by A" if await _raw_closed(s, 15) else "left open 15 s")
        finally:
            await _close(s)


async def stalled_handshakes(ctx: _Ctx, name: str) -> None:
    import trio

    from p2psync.noise import agent_handshake

    def message_1() -> bytes:
        m = agent_handshake(True, os.urandom(32), ctx.member.psk, ctx.prologue).write_message(b"")
        return len(m).to_bytes(2, "big") + m

    cut: list[float] = []

    async def stall(first: bytes) -> None:
        s = await _connect(ctx, STRANGER)
        t0 = time.monotonic()
        try:
            if first:
                await s.send_all(first)
            if await _raw_closed(s, HANDSHAKE_TIMEOUT + 10):
                cut.append(time.monotonic() - t0)
            else:
                _note(name, "not cut within 20 s")
        finally:
            await _close(s)

    async with trio.open_nursery() as n:
        for first in (b"", message_1()[:20], b"\xff\xff" + os.urandom(1000), message_1()) * 2:
            n.start_soon(stall, first)
    _note(name, "cut", len(cut))
    if cut:
        STATS[name]["slowest cut s"] = max(round(max(cut), 1), STATS[name].get("slowest cut s", 0))


async def wrong_psk(ctx: _Ctx, name: str) -> None:
    import trio
    for _ in range(5):
        try:
            ns, _ = await _member(ctx, STRANGER, psk=os.urandom(32), hello=False)
        except (trio.BrokenResourceError, trio.TooSlowError, EOFError, OSError):
            _note(name, "refused")
            continue
        _note(name, "ACCEPTED")
        await _close(ns)


async def stops_reading(ctx: _Ctx, name: str) -> None:
    """Hello (asking for everything), then never reads: A must drop us within its idle timeout."""
    import trio
    ns, dec = await _member(ctx)
    try:
        await trio.sleep(IDLE_TIMEOUT + 10)
        _, closed = await _drain(ns, dec, 10)
        _note(name, "dropped by A" if closed else "still open after 35 s")
    finally:
        await _close(ns)


async def never_acks(ctx: _Ctx, name: str) -> None:
    """Reads everything and answers pings, but never acks a batch (A's sender must not hold a snapshot)."""
    import trio

    from p2psync.protocol import BatchEvent, Ping, encode_event
    ns, dec = await _member(ctx)
    lock = trio.Lock()
    batches, closed = 0, False

    async def send(data: bytes) -> None:
        async with lock:
            await ns.send_all(data)

    async def pinger() -> None:
        token = 0
        while True:
            await trio.sleep(2)
            token += 1
            await send(encode_event(Ping(token)))

    async def reader(cancel) -> None:
        nonlocal batches, closed
        while True:
            data = await ns.receive_some(65536)
            if not data:
                closed = True
                cancel.cancel()
                return
            dec.feed(data)
            while (ev := dec.next_frame()) is not None:
                if type(ev) is BatchEvent:
                    batches += 1
                elif type(ev) is Ping:
                    await send(encode_event(ev.response()))

    try:
        with trio.move_on_after(30):
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(pinger)
                    n.start_soon(reader, n.cancel_scope)
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                closed = True
        _note(name, "batches received", batches)
        _note(name, "dropped by A" if closed else "held 30 s")
    finally:
        await _close(ns)


async def oversized_headers(ctx: _Ctx, name: str) -> None:
    from p2psync.protocol.limits import MAX_FRAME
    s = await _connect(ctx, STRANGER)
    try:   # 2 GiB as a frame header, but before the handshake: Noise's 2-byte length reads 0x8000
        await s.send_all(b"\x80\x00\x00\x00" + os.urandom(70_000))
        _note(name, "stranger: closed by A" if await _raw_closed(s, 15) else "stranger: left open 15 s")
    finally:
        await _close(s)
    for header in (0x80000000, MAX_FRAME + 1, 0xFFFFFFFF):
        ns, dec = await _member(ctx)
        try:
            await ns.send_all(header.to_bytes(4, "big"))
            events, closed = await _drain(ns, dec, 10)
            _note(name, f"{_error_codes(events)}{'' if closed else ' (left open)'}")
        finally:
            await _close(ns)


def _malformed_frames() -> dict[str, bytes]:
    from p2psync.model import Batch
    from p2psync.protocol import BatchEvent, encode_event
    return {
        "not msgpack": b"\x00\x00\x00\x05" + b"\xc1" * 5,
        "map instead of array": _frame({"type": 1}),
        "unknown event type": _frame([99, 1]),
        "batch with wrong field types": _frame([2, 1, "no", 1, 2, 3, 4, 5]),
        "negative seq": _frame([2, -1, False, [], [], [], [], []]),
        "batch out of sequence": encode_event(BatchEvent(7, Batch(()), False)),
        "ack of a batch never sent": _frame([3, 1_000_000]),
        "truncated body": b"\x00\x00\x01\x00\x91",
    }


async def malformed_frames(ctx: _Ctx, name: str) -> None:
    for case, data in _malformed_frames().items():
        ns, dec = await _member(ctx)
        try:
            await ns.send_all(data)
            if case == "truncated body":
                await ns.transport_stream.send_eof()
            events, closed = await _drain(ns, dec, 10)
            _note(name, f"{_error_codes(events)}{'' if closed else ' (left open)'}")
        finally:
            await _close(ns)


def _flood_frames(ctx: _Ctx) -> dict[str, bytes]:
    """Maximum-size hostile frames (built once): the costliest to decode, and the largest of each kind."""
    if ctx.frames:
        return ctx.frames
    import msgpack

    from p2psync.model import Batch, Change, Range
    from p2psync.protocol import BatchEvent, Members, encode_event
    from p2psync.protocol.limits import MAX_FRAME
    # 1. A Batch whose primary-key column is 100,000 arrays of 80 one-element arrays: 8.1 M tuples if decoded.
    entry = b"\xdc\x00\x50" + b"\x91\xc0" * 80
    n = 100_000
    pks = b"\xdd" + n.to_bytes(4, "big") + entry * n
    body = (b"\x99\x02\x01\xc2" + b"\x91\xc4\x10" + os.urandom(16) + b"\x91\xa1t" + b"\x91\x90"
            + b"\x98\x90" + pks + b"\x90" * 6 + b"\x90" + b"\x90")
    assert len(body) <= MAX_FRAME, len(body)
    ctx.frames["one-element arrays"] = len(body).to_bytes(4, "big") + body
    # 2. Members with 10,000 forged events of 1.6 KB (valid [raw, signature] wrappers of garbage).
    events = tuple(msgpack.packb([os.urandom(1500), os.urandom(64)], use_bin_type=True) for _ in range(10_000))
    ctx.frames["Members of 10,000 garbage events"] = encode_event(Members(ctx.member.heads, events))
    # 3. A well-formed Batch of 100,000 changes from a device that is not a member (screened out, never applied).
    stranger = os.urandom(16)
    changes = tuple(Change("t", (i,), stranger, i, i, True, ("origin", "pad"), ("hostile", "h" * 90))
                    for i in range(1, 100_001))
    ctx.frames["100,000 changes of a stranger"] = encode_event(
        BatchEvent(1, Batch(changes, (Range(stranger, 0, 100_000),)), False))
    # 4. Parts of a group that never ends (more=True), 4 MiB each: sent 60 times (the staging budget).
    part = encode_event(BatchEvent(1, Batch(changes[:25_000], ()), True))
    assert part[4:7] == b"\x99\x02\x01"       # [BATCH, seq=1, ...]: seq is the 7th byte, patched per part
    ctx.frames["never-ending group of 4 MiB parts"] = part
    return ctx.frames


async def flood_once(ctx: _Ctx, kind: str, name: str) -> None:
    """A member session, otherwise well-behaved (it acks what A sends), that sends maximum-size hostile
    frames of one kind until A closes it: Members frames 10 times, a never-ending group in 60 parts, a
    batch once (its next one would be out of sequence anyway)."""
    import trio

    from p2psync.protocol import Ack, BatchEvent, Error, Ping, encode_event
    data = _flood_frames(ctx)[kind]
    try:
        ns, dec = await _member(ctx, up_to_date=True)
    except (trio.BrokenResourceError, trio.TooSlowError, EOFError, OSError):
        _note(name, "session refused")       # e.g. A's handshake rate limit per address
        await trio.sleep(0.5)
        return
    lock = trio.Lock()
    codes: list[str] = []
    closed = trio.Event()

    async def send(frame: bytes) -> None:
        async with lock:
            await ns.send_all(frame)

    async def reader() -> None:
        try:
            while data := await ns.receive_some(65536):
                dec.feed(data)
                while (ev := dec.next_frame()) is not None:
                    if type(ev) is BatchEvent:
                        await send(encode_event(Ack(ev.seq)))
                    elif type(ev) is Ping:
                        await send(encode_event(ev.response()))
                    elif type(ev) is Error:
                        codes.append(ev.code)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        closed.set()

    frames = ([data[:6] + bytes([seq]) + data[7:] for seq in range(1, 61)] if kind.startswith("never-ending")
              else [data] * (10 if kind.startswith("Members") else 1))
    prefix = "" if name == kind else f"{kind}: "
    started = time.monotonic()
    try:
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            try:
                for frame in frames:
                    if closed.is_set():
                        break
                    await send(frame)
                    _note(name, f"{prefix}frames sent")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                _note(name, f"{prefix}cut off while sending")
            with trio.move_on_after(1 if kind.startswith("Members") else 20):   # A ignores what it cannot decode
                await closed.wait()
            n.cancel_scope.cancel()
        _note(name, f"{prefix}{f'Error {codes[-1]}' if codes else 'no Error'}"
                    f"{'' if closed.is_set() else ' (left open)'}")
    finally:
        await _close(ns)
        WINDOWS.setdefault(kind, []).append((started, time.monotonic()))


async def max_frame_flood(ctx: _Ctx, name: str) -> None:
    # One after the other: A keeps one link per device, so a member's new session replaces its last one.
    for kind in _flood_frames(ctx):
        await flood_once(ctx, kind, name)


async def forged_members(ctx: _Ctx, name: str) -> None:
    """Members events A must ignore: garbage, honest events with bad signatures, admin acts signed by a non-admin."""
    import msgpack

    from p2psync.model.membership import encode_event as encode_member, make_event
    from p2psync.protocol import Members, encode_event
    rng, me, now = ctx.rng, ctx.member, int(time.time() * 1000)
    garbage = [rng.randbytes(rng.randint(1, 3000)) for _ in range(50)]
    for data in me.events[:20]:
        raw, sig = msgpack.unpackb(data)
        garbage.append(msgpack.packb([raw, bytes([sig[0] ^ 1]) + sig[1:]], use_bin_type=True))
    parents = list(me.heads)
    for kind, body in (("remove", {"site": ctx.b_site, "last": 0}), ("role", {"site": me.site, "role": "admin"}),
                       ("add", {"site": os.urandom(16), "sign": os.urandom(32), "dh": os.urandom(32),
                                "name": b"", "role": "admin", "invite": b""}),
                       ("epoch", {"boxes": {}})):
        garbage.append(encode_member(make_event(kind, me.group_id, me.site, ctx.sign_private, parents, now, body)))
    ns, dec = await _member(ctx)
    try:
        await ns.send_all(encode_event(Members(me.heads, tuple(garbage))))
        events, closed = await _drain(ns, dec, 5)
        _note(name, f"{_error_codes(events)}{', closed' if closed else ''}")
    finally:
        await _close(ns)


async def reconnect_storm(ctx: _Ctx, name: str) -> None:
    import trio
    limit = trio.CapacityLimiter(6)

    async def one() -> None:
        async with limit:
            try:
                ns, _ = await _member(ctx, STORM)
            except (trio.BrokenResourceError, trio.TooSlowError, EOFError, OSError):
                _note(name, "refused")
                return
            _note(name, "sessions")
            await _close(ns)

    async with trio.open_nursery() as n:
        for _ in range(60):
            n.start_soon(one)


ATTACKS = {
    "garbage connections": garbage_connections,
    "stalled handshakes": stalled_handshakes,
    "wrong PSK": wrong_psk,
    "member: Hello, then stops reading": stops_reading,
    "member: pings, never acks": never_acks,
    "oversized frame headers": oversized_headers,
    "member: malformed frames": malformed_frames,
    "member: max-size frame flood": max_frame_flood,
    "member: forged Members events": forged_members,
    "reconnect storm": reconnect_storm,
}


async def _guarded(name: str, attack, *args) -> None:
    """Run one attack within its budget; its own exceptions are counted, never raised."""
    import trio
    entry = STATS.setdefault(name, {"runs": 0, "errors": 0})
    started = time.monotonic()
    with trio.move_on_after(ATTACK_BUDGET) as scope:
        try:
            await attack(*args)
        except Exception as e:   # noqa: BLE001 -- the attacker's failures must never end the soak
            entry["errors"] += 1
            entry["last_error"] = f"{type(e).__name__}: {e}"[:200]
    if scope.cancelled_caught:
        _note(name, "over budget")
    entry["runs"] += 1
    if attack is not flood_once:     # (flood_once keeps its own windows)
        WINDOWS.setdefault(name, []).append((started, time.monotonic()))
    save_stats()


async def _attack(cfg: dict) -> None:
    import trio
    ctx = _Ctx(cfg)
    if cfg["mode"] == "flood":
        _flood_frames(ctx)

        for kind in itertools.cycle(_flood_frames(ctx)):     # one session at a time (see max_frame_flood)
            await _guarded(kind, flood_once, ctx, kind, kind)
    while True:
        for name, attack in ATTACKS.items():
            await _guarded(name, attack, ctx, name)
            await trio.sleep(1)


# ---- figures ----------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def _ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def _between(samples, lo: float, hi: float) -> list[float]:
    return [lat for t, lat in samples if lo <= t < hi]


def _worst_minute_p99(samples, lo: float, hi: float) -> float:
    by_minute: dict[int, list[float]] = collections.defaultdict(list)
    for t, lat in samples:
        if lo <= t < hi:
            by_minute[int((t - lo) // 60)].append(lat)
    return max((pct(v, 0.99) for v in by_minute.values() if len(v) >= 20), default=float("nan"))


def _missing(dev: Device, origin: str, keys: list[int]) -> int:
    c = sqlite3.connect(dev.db, timeout=30)
    try:
        have = {k for (k,) in c.execute("SELECT id FROM t WHERE origin = ?", (origin,))}
    finally:
        c.close()
    return sum(1 for k in keys if k not in have)


def _stop_agent(d: Device) -> int | None:
    """SIGTERM the agent by PID; its exit status (SIGKILL after 10 s)."""
    if d.proc is None:
        return None
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(10)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
    code = d.proc.returncode
    d.proc = None
    return code


# ---- the run ----------------------------------------------------------------------------

def soak(base: Path) -> bool:
    """The whole soak in ``base``; True if it met every target."""
    duration = _env("P2PSYNC_SOAK_SECONDS", 3600)
    warmup = min(300.0, duration / 12)
    quiet_s = _env("P2PSYNC_SOAK_QUIET", 30)
    flood_s = _env("P2PSYNC_SOAK_FLOOD", 30)
    rate = _env("P2PSYNC_SOAK_RATE", 50)
    seed = int(_env("P2PSYNC_SOAK_SEED_ROWS", 100_000))
    print(f"soak: agents A and B on loopback, {rate:g} single-row writes/s ({rate / 2:g} on each); "
          f"{quiet_s:g} s quiet, {duration:g} s with a hostile peer attacking A (warm-up {warmup:.0f} s), "
          f"{flood_s:g} s of max-size frame flood", flush=True)

    a = Device(base, "A", SCHEMA, ["t"])
    b = Device(base, "B", SCHEMA, ["t"], admin=a)
    m = Device(base, "M", SCHEMA, ["t"], admin=a)      # the hostile member: its agent never runs
    c = sqlite3.connect(a.db, isolation_level=None)
    c.execute("BEGIN")
    c.executemany("INSERT INTO t (id, origin, pad) VALUES (?, 'seed', ?)",
                  ((i, f"seed row {i:08d} " + "p" * 80) for i in range(1, seed + 1)))
    c.execute("COMMIT")
    c.close()
    peers = {"A": [b.port], "B": [a.port]}
    writers: list[Writer] = []
    pollers: list[Poller] = []
    monitor = Monitor({"A": a, "B": b}, peers)
    attacker: Attacker | None = None
    cfg = {"port": a.port, "member_home": str(m.home), "b_home": str(b.home), "a_home": str(a.home),
           "seed": seed}
    phases: dict[str, tuple[float, float]] = {}
    stats: dict[str, dict] = {}
    try:
        a.start(peers=peers["A"], extra=AGENT_ARGS)
        b.start(peers=peers["B"], extra=AGENT_ARGS)
        b.wait_connected(1, timeout=60)
        t0 = time.monotonic()
        while _count(b.db) < seed:
            if time.monotonic() - t0 > 300:
                raise RuntimeError("B did not receive A's seed rows within 300 s")
            time.sleep(0.2)
        line(f"set-up: {seed:,} seed rows A -> B", f"{time.monotonic() - t0:.1f} s")
        for d in (a, b):     # the WAL high-water mark of the set-up is not the soak's: start from empty
            _truncate_wal(d.db)
        monitor.start()
        wa, wb = Writer(a, "A", 0, rate / 2), Writer(b, "B", 1, rate / 2)
        writers = [wa, wb]
        pollers = [Poller(b, wa), Poller(a, wb)]
        for th in writers + pollers:
            th.start()

        start = time.monotonic()
        time.sleep(quiet_s)
        phases["quiet"] = (start, time.monotonic())

        start = time.monotonic()
        attacker = monitor.attacker = Attacker(cfg, "cycle", base)
        last_report = start
        while (now := time.monotonic()) - start < duration:
            time.sleep(min(5.0, duration - (now - start)))
            if time.monotonic() - last_report >= 300:
                last_report = time.monotonic()
                _progress(monitor, pollers, start, last_report)
        monitor.attacker = None
        stats["cycle"] = attacker.stop()
        stats["cycle"]["_restarts"] = attacker.restarts
        phases["soak"] = (start, time.monotonic())
        phases["warm"] = (start, start + warmup)

        start = time.monotonic()
        attacker = monitor.attacker = Attacker(cfg, "flood", base)
        time.sleep(flood_s)
        monitor.attacker = None
        stats["flood"] = attacker.stop()
        stats["flood"]["_restarts"] = attacker.restarts
        attacker = None
        phases["flood"] = (start, time.monotonic())

        for w in writers:
            w.stop()
        t0 = time.monotonic()
        while any(w.pending for w in writers) and time.monotonic() - t0 < DRAIN_TIMEOUT:
            time.sleep(0.1)
        drained = time.monotonic() - t0
        for p in pollers:
            p.stop()
        counters = {}
        for name, d in (("A", a), ("B", b)):
            st = d.status() or {}
            counters[name] = st.get("counters", {})
        monitor.stop()
        lost = {"A": _missing(b, "A", wa.written), "B": _missing(a, "B", wb.written)}
        return _report(phases, writers, pollers, monitor, stats, lost, drained, counters, (a, b))
    finally:
        if attacker is not None:
            attacker.stop()
        for th in writers:
            th.stop()
        for p in pollers:
            p.stop()
        if monitor.is_alive():
            monitor.stop()
        for d in (a, b):
            _stop_agent(d)


def _truncate_wal(db: Path) -> None:
    c = sqlite3.connect(db, timeout=30)
    try:
        for _ in range(50):
            if c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0 and _wal_bytes(db) == 0:
                return
            time.sleep(0.1)
        print(f"  (could not truncate {db.name}-wal: {_wal_bytes(db) / 2**20:.1f} MiB at the start)", flush=True)
    finally:
        c.close()


def _count(db: Path) -> int:
    c = sqlite3.connect(db, timeout=30)
    try:
        return c.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        c.close()


def _progress(monitor: Monitor, pollers: list[Poller], start: float, now: float) -> None:
    lats = [lat for p in pollers for t, lat in p.samples if t >= now - 300]
    _, rss, wal = monitor.samples[-1] if monitor.samples else (0, {}, {})
    print(f"    [{now - start:5.0f} s] last 5 min p99 {_ms(pct(lats, 0.99))}, RSS A {rss.get('A', 0):.0f} MB "
          f"B {rss.get('B', 0):.0f} MB, WAL A {wal.get('A', 0) / 2**20:.1f} MiB, crashes {len(monitor.crashes)}",
          flush=True)


def _report(phases, writers, pollers, monitor, stats, lost, drained, counters, devices) -> bool:
    samples = [s for p in pollers for s in p.samples]
    quiet = _between(samples, *phases["quiet"])
    soak_l = _between(samples, *phases["soak"])
    flood = _between(samples, *phases["flood"])
    q50, q99 = pct(quiet, 0.5), pct(quiet, 0.99)
    s50, s99 = pct(soak_l, 0.5), pct(soak_l, 0.99)
    f99 = pct(flood, 0.99)
    worst = _worst_minute_p99(samples, *phases["soak"])
    ok = True

    def verdict(good: bool) -> str:
        nonlocal ok
        ok &= good
        return "" if good else "MISSED"

    line("quiet: write -> visible on the other side, p50", _ms(q50), "baseline", f"{len(quiet)} writes")
    line("quiet: write -> visible on the other side, p99", _ms(q99), "baseline")
    line("under attack: write -> visible, p50", _ms(s50), f"{s50 / q50:.1f}x quiet", f"{len(soak_l)} writes")
    line("under attack: write -> visible, p99", _ms(s99), f"{s99 / q99:.1f}x quiet",
         f"target <= {TARGET_P99_MS} ms {verdict(s99 * 1000 <= TARGET_P99_MS)}")
    line("under attack: worst p99 of any minute", _ms(worst), f"{worst / q99:.1f}x quiet",
         f"target <= {TARGET_P99_MS} ms {verdict(worst * 1000 <= TARGET_P99_MS)}")
    line("flood of max-size frames: p99", _ms(f99), f"{f99 / q99:.1f}x quiet p99",
         f"target <= {TARGET_FLOOD_RATIO:g}x {verdict(f99 / q99 <= TARGET_FLOOD_RATIO)}; p50 {_ms(pct(flood, 0.5))}")
    warm_end, soak_end = phases["warm"][1], phases["soak"][1]
    for name in ("A", "B"):
        r0, r1 = monitor.rss_at(name, warm_end), _last_rss(monitor, name, soak_end)
        peak = max((r[name] for t, r, _ in monitor.samples if name in r and t <= soak_end), default=float("nan"))
        fpeak = max((r[name] for t, r, _ in monitor.samples if name in r and t >= phases["flood"][0]),
                    default=float("nan"))
        growth = (r1 - r0) if r0 is not None and r1 is not None else float("nan")
        who = "A (attacked)" if name == "A" else "B"
        line(f"RSS growth after warm-up, {who}", f"{growth:+.1f} MB", f"{r0 or 0:.0f} -> {r1 or 0:.0f} MB",
             f"target <= {TARGET_RSS_MB} MB {verdict(growth <= TARGET_RSS_MB)}; peak {peak:.0f} MB, "
             f"in the flood {fpeak:.0f} MB")
    for name in ("A", "B"):
        wal = max((w.get(name, 0) for _, _, w in monitor.samples), default=0) / 2**20
        line(f"max WAL size, {name}", f"{wal:.1f} MiB", "", f"target <= {TARGET_WAL_MIB} MiB "
             f"{verdict(wal <= TARGET_WAL_MIB)}")
    n = sum(len(w.written) for w in writers)
    n_lost = sum(lost.values())
    line("lost writes (written, never on the other side)", f"{n_lost} of {n:,}", "",
         f"target 0 {verdict(n_lost == 0)}; all arrived {drained:.1f} s after the last write"
         + (f"; lost from A {lost['A']}, from B {lost['B']}" if n_lost else ""))
    line("agent crashes", str(len(monitor.crashes)) if monitor.crashes else "none", "",
         f"target none {verdict(not monitor.crashes)}")
    for crash in monitor.crashes[:5]:
        print(f"      {crash}")
    commit = [x for w in writers for x in w.commit_s]
    errors = sum(w.errors for w in writers)
    line("application commit time, p99 / max", f"{_ms(pct(commit, 0.99))} / {_ms(max(commit, default=0))}", "",
         f"{errors} failed writes" + (f" ({writers[0].last_error or writers[1].last_error})" if errors else ""))
    for d in devices:
        size = (d.home / "agent.log").stat().st_size / 2**20
        line(f"agent log, {d.home.name[5:]}", f"{size:.1f} MiB", "", "")
    for mode, label in (("cycle", "p99 during"), ("flood", "flood p99 during")):
        windows = stats.get(mode, {}).pop("_windows", {})
        for kind, spans in windows.items():
            if mode == "cycle" and kind not in ATTACKS:
                continue                    # the kinds of frame within the cycle's flood attack
            lats = [lat for t, lat in samples if any(lo <= t < hi for lo, hi in spans)]
            line(f"  {label}: {kind}"[:46], _ms(pct(lats, 0.99)), f"{pct(lats, 0.99) / q99:.1f}x quiet p99",
                 f"{len(lats)} writes in {sum(hi - lo for lo, hi in spans):.0f} s")
    for mode in ("cycle", "flood"):
        st = stats.get(mode, {})
        restarts = st.pop("_restarts", 0)
        if restarts:
            line(f"attacker ({mode}) restarted", str(restarts), "", "it died; see attacker-*.log")
        for name, s in st.items():
            notes = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("runs", "errors", "last_error"))
            err = f"{s.get('errors', 0)} attacker errors"
            if s.get("errors"):
                err += f" (last: {s.get('last_error', '')[:60]})"
            line(f"  {mode}: {name}", f"{s.get('runs', 0)} runs", err, notes)
    for name, cnt in counters.items():
        shown = {k: v for k, v in cnt.items() if v}
        print(f"  counters of {name}: {json.dumps(shown)}", flush=True)
    return ok


def _last_rss(monitor: Monitor, name: str, t: float) -> float | None:
    return next((r[name] for s, r, _ in reversed(monitor.samples) if s <= t and name in r), None)


def run() -> None:
    base = Path(tempfile.mkdtemp(prefix="p2psync-soak-"))
    keep = bool(os.environ.get("P2PSYNC_SOAK_KEEP"))
    ok = False
    try:
        ok = soak(base)
    finally:
        if keep or not ok:
            print(f"  (soak files kept in {base}: agent logs in home-*/agent.log, attacker-*.log)", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)


__all__ = ["run", "attacker_main"]
