"""The per-connection pump: NoiseStream <-> protocol Session <-> store.

How this works: after the Noise handshake each side first checks the
other's static key against the group's membership: a removed device is sent
the membership log (so it learns of its removal) and an Error, and nothing
else. Then both sides exchange membership heads; if they differ, each sends
its whole log once, merges the other's, and checks the peer again (a device
added a moment ago is known by now; one that is not a member is refused
before any Hello or data). Only then does each side send Hello. Five tasks
share the connection. The reader feeds received bytes to the Session and
acts on events: it answers pings and hands batches to the applier. The
applier applies complete batches in a worker thread, in order, and acks each
part once it is applied, so the next batch decodes while this one is
written. The sender streams what the peer lacks in batches while the window
allows, then waits for new local changes. The watchdog enforces the idle
timeout and queues heartbeats; the control writer writes them and the
reader's answers to Pings. Every write goes through one lock, so frames
never interleave. Any protocol error is sent to the peer as an Error, logged
with the peer's address, and closes this connection only.

Deadlines: the watchdog takes no lock and never writes, so a peer that
sends nothing for the idle timeout is dropped whatever the other tasks are
doing. Every write is cut into chunks, and a chunk that makes no progress
for the idle timeout drops the peer ("stopped reading"), as does a full
window with no Ack for that long ("stopped acknowledging").

Budgets (``protocol.limits``): frames of ``LARGE_FRAME`` bytes or more are
decoded in a worker thread (the Session hands them out with ``DECODE``), so
a hostile frame costs the event loop nothing but GIL hand-overs. What a
session holds for its peer (bytes of frames being received, staged parts of
a transaction, batches waiting to be applied and acked) is counted against
per-session limits and against one ``MemoryBudget`` shared by every session
of the process; over any of them the peer is sent an Error naming the limit.

``P2PSYNC_IDLE_TIMEOUT`` (seconds) shortens the idle timeout, and with it
the heartbeat interval, for tests.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from functools import partial

import trio

from ..protocol import (CLOSED, NEED_DATA, PROTOCOL_VERSION, Ack, BatchEvent, Error, Have, Hello, Members, Ping,
                        ProtocolError, RemoteProtocolError, Session)
from ..protocol.limits import CHANGE_COST, MAX_PROCESS_BYTES, MAX_STAGED_BYTES, MAX_UNACKED_BYTES
from ..group.members import decode_members
from . import heap
from ..protocol.session import DECODE
from ..store import StoreError
from ..sync.peer import OverBudget, PeerSync

log = logging.getLogger("p2psync.net")

RECEIVE_SIZE = 256 * 1024
APPLY_QUEUE = 1  # complete batches decoded ahead of the one being applied
MEMBERS_OFF_LOOP = 8               # membership events in one message from which they are decoded in a thread
MAX_OWN_IGNORED_EVENTS = 100       # events a peer itself signed without the right to, per session
UNKNOWN_PEER_LOG_BYTES = 1 << 20   # membership log a key not (yet) in our log may send: its admission chain
SEND_CHUNK = 64 * 1024  # writes progress chunk by chunk; one chunk per idle timeout is the slowest reader kept
DECODE_THREADS = 2      # large frames decoded at once in worker threads, over all sessions of the process
                        # (each may hold ~40 MB of decoded objects before it is refused)
CONTROL_QUEUE = 4       # Pings and Pongs waiting for the send lock; more are dropped
FORWARD_DELAY = 0.25    # s a peer may lag on another device's changes before we send them (SyncSettings)
GIL_SWITCH_INTERVAL = 0.001  # s: how long a decoding thread may keep the event loop from the GIL (default 5 ms)


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment (tests shorten timeouts); else ``default``."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if 0 < value < 3600 else default


def _env_delay(name: str, default: float) -> float:
    """Seconds in [0, 60] from the environment (the benchmark's all-eager baseline sets 0); else ``default``."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if 0 <= value <= 60 else default


def _idle_timeout() -> float:
    return _env_seconds("P2PSYNC_IDLE_TIMEOUT", 15.0)


@dataclass
class SyncSettings:
    """Tunables of a sync session."""

    heartbeat_interval: float = field(default_factory=lambda: min(5.0, _idle_timeout() / 3))
    idle_timeout: float = field(default_factory=_idle_timeout)
    hello_timeout: float = 10.0
    window: int = 8
    max_changes: int = 2000
    max_bytes: int = 1 << 20
    max_staged_bytes: int = MAX_STAGED_BYTES
    max_unacked_bytes: int = MAX_UNACKED_BYTES
    # Seconds a peer may lag behind us on a site that is not ours before we send it that site's
    # changes ourselves (sync/peer.py): normally their origin, or another peer, brings them first.
    # Each session waits between this and 1.5 times this, so forwarders rarely start together.
    forward_delay: float = field(default_factory=lambda: _env_delay("P2PSYNC_FORWARD_DELAY", FORWARD_DELAY))


class PeerClosed(Exception):
    """The connection ended; the message says why."""


class NotAMember(PeerClosed):
    """The peer is not a current member of the group (or we are not): refused before any data."""


class PeerStalled(PeerClosed):
    """The peer stopped reading or acknowledging for the idle timeout; the message says what stalled."""


class MemoryBudget:
    """Bytes that the sessions of one process hold for their peers, against one limit."""

    def __init__(self, limit: int = MAX_PROCESS_BYTES):
        self.limit, self.used = limit, 0

    def resize(self, held: int, want: int) -> int:
        """Change one session's share from ``held`` to ``want`` bytes; OverBudget if that takes the total over."""
        if want > held and self.used - held + want > self.limit:
            raise OverBudget("process-memory", f"this process already holds {self.used / (1 << 20):.1f} MiB for "
                                               f"its peers, and this session would take it over "
                                               f"{self.limit / (1 << 20):g} MiB (limit MAX_PROCESS_BYTES); "
                                               f"try again later")
        self.used += want - held
        return want


PROCESS_MEMORY = MemoryBudget()   # shared by every session of this process (agent or relay)
_decode_limiter = trio.lowlevel.RunVar("p2psync_decode_limiter")


def _decoders() -> trio.CapacityLimiter:
    """The worker-thread slots for decoding large frames, shared by the sessions of this trio run.

    The first call also shortens the interpreter's GIL switch interval: a
    thread decoding a peer's frame hands the GIL back to the event loop
    within GIL_SWITCH_INTERVAL rather than 5 ms (ping p99 under a flood of
    16 MiB frames: 36 ms instead of 47-92 ms).
    """
    try:
        return _decode_limiter.get()
    except LookupError:
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
        heap.limit_arenas()
        limiter = trio.CapacityLimiter(DECODE_THREADS)
        _decode_limiter.set(limiter)
        return limiter


async def dial(host: str, port: int, timeout: float) -> trio.SocketStream:
    """A TCP connection to host:port; OSError saying where and why if there is none within ``timeout`` s."""
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as e:
        raise OSError(f"cannot connect to {host}:{port}: {e or 'timed out'}") from e


class Connection:
    """One authenticated connection to one peer."""

    def __init__(self, stream, ctx, label: str, settings: SyncSettings, remote_static: bytes | None = None,
                 budget: MemoryBudget | None = None):
        self.stream, self.ctx, self.label, self.settings = stream, ctx, label, settings
        self.remote_static = remote_static if remote_static is not None else getattr(stream, "remote_static", None)
        self.member = None          # the peer's membership record, once admitted
        self._large_frames = 0      # frames decoded in a worker thread (see heap.trim_soon)
        self._own_ignored = 0       # membership events the peer signed without the right to, this session
        self.session = Session(ctx.site_id, heartbeat_interval=settings.heartbeat_interval,
                               idle_timeout=settings.idle_timeout, hello_timeout=settings.hello_timeout,
                               window=settings.window, offload=True)
        self.budget = budget if budget is not None else PROCESS_MEMORY
        self._held = 0              # our share of the budget
        self._unacked = 0           # cost of complete batches received, not yet applied and acked
        self._send_broken: str | None = None
        self._scope: trio.CancelScope | None = None
        self._failure: Exception | None = None
        self._control, self._control_queue = trio.open_memory_channel(CONTROL_QUEUE)   # Pings and Pongs
        self.peer: PeerSync | None = None
        self.peer_site: bytes | None = None
        self.peer_schema: bytes | None = None   # fingerprint of the tables the peer tracks (its Hello)
        self._send_lock = trio.Lock()
        self._hello = trio.Event()
        self._window = trio.Event()
        self.last_seen = trio.current_time()
        self.peer_vv = None
        self._hello_vv = None       # the vector our Hello sent (what the peer knows we hold, at first)
        self._forward_delay = settings.forward_delay * random.uniform(1.0, 1.5)
        # A worker may transform complete batches before they are applied
        # (the relay session opens sealed changes); it runs in the reader,
        # so it overlaps with the applier.
        self._prepare = getattr(ctx.worker, "prepare", None)
        self._peer_eof = False
        self.admitted = False

    def _now(self) -> float:
        return trio.current_time()

    def status(self, vv) -> dict:
        """This session as `p2psync status` shows it, given our version vector ``vv``."""
        p = self.peer
        return {
            "site": self.peer_site.hex() if self.peer_site else None,
            "last_seen_s_ago": round(self._now() - self.last_seen, 1),
            "we_owe": p.owed_to_peer(vv) if p else None,
            "they_owe": p.owed_by_peer(self.peer_vv, vv) if p else None,
            "batches_sent": p.batches_sent if p else 0,
            "batches_received": p.batches_received if p else 0,
        }

    def _who(self) -> str:
        """The peer for a log line: its address, and its name once its key is known."""
        if self.member is None:
            return f"peer {self.label}"
        try:
            return f"peer {self.label} ({self.ctx.members.who(self.member.site)})"
        except Exception:  # a context without names, or a record gone from the log
            return f"peer {self.label}"

    async def _write(self, event, what: str | None = None) -> None:
        async with self._send_lock:
            data = self.session.send(event, self._now())
            await self._send_bytes(data, what or f"a {type(event).__name__}")

    async def _send_bytes(self, data: bytes, what: str) -> None:
        """Write ``data`` (the caller holds the send lock); PeerStalled if a chunk makes no progress in time."""
        if self._send_broken is not None:
            raise trio.BrokenResourceError(self._send_broken)
        view, done, limit = memoryview(data), 0, self.settings.idle_timeout
        while done < len(view):
            chunk = view[done:done + SEND_CHUNK]
            with trio.move_on_after(limit) as stalled:
                await self.stream.send_all(chunk)
            if stalled.cancelled_caught:
                self._send_broken = f"a send to {self._who()} was cut off after {done} of {len(view)} bytes"
                self._abort(PeerStalled(
                    f"{self._who()} stopped reading: a send of {len(view)} bytes ({what}) made no progress "
                    f"for {limit:g} s ({done} bytes of it sent); connection closed"))
            done += len(chunk)

    def _abort(self, error: Exception) -> None:
        """End the connection with ``error`` (also from a task outside its nursery), and raise it here."""
        if self._failure is None:
            self._failure = error
        if self._scope is not None:
            self._scope.cancel()
        raise error

    def _account(self, strict: bool = True) -> None:
        """Bring our share of the process budget up to date; OverBudget if it would go over (and ``strict``)."""
        staged = self.peer.staged_bytes if self.peer is not None else 0
        want = self.session.buffered + staged + self._unacked
        try:
            self._held = self.budget.resize(self._held, want)
        except OverBudget:
            if strict:
                raise

    async def run(self) -> None:
        """Sync with the peer until the connection ends; raises PeerClosed with the reason."""
        try:
            await self._run()
        finally:
            if self.peer is not None:
                self.peer.drop_staged()
            self._unacked = 0
            self._held = self.budget.resize(self._held, 0)
            if self._large_frames:   # what they made us allocate is free now: give it back to the system
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await heap.trim_soon()

    async def _run(self) -> None:
        ctx = self.ctx
        try:
            with trio.fail_after(self.settings.hello_timeout):
                await self._exchange_members()
            vv = await ctx.worker.version_vector()
            yours = ()
            if self.member is not None and hasattr(ctx, "checkpoints_for"):
                yours = await ctx.checkpoints_for(self.member.site, vv[self.member.site])
            self._hello_vv = vv
            await self._write(Hello(PROTOCOL_VERSION, ctx.site_id, ctx.schema, ctx.wall_ms(), vv, yours))
            # The first task to fail records why and cancels the others, so the
            # reason leaves here as itself, not wrapped in an ExceptionGroup
            # (trio's nurseries are strict) that no handler below would match.
            send_applies, receive_applies = trio.open_memory_channel(APPLY_QUEUE)
            async with trio.open_nursery() as n:
                self._scope = n.cancel_scope
                if self._failure is not None:   # a write from outside (a membership push) stalled meanwhile
                    n.cancel_scope.cancel()
                n.start_soon(self._guard, partial(self._reader, send_applies), n.cancel_scope)
                n.start_soon(self._guard, partial(self._applier, receive_applies), n.cancel_scope)
                n.start_soon(self._guard, self._sender, n.cancel_scope)
                n.start_soon(self._guard, self._watchdog, n.cancel_scope)
                n.start_soon(self._guard, self._control_writer, n.cancel_scope)
            self._scope = None
            if self._failure is not None:
                raise self._failure
        except trio.TooSlowError:
            await self._send_error("hello-timeout", f"no membership exchange within {self.settings.hello_timeout:g} s")
            raise PeerClosed(f"peer completed no membership exchange within {self.settings.hello_timeout:g} s") from None
        except ProtocolError as e:
            await self._send_error(e.code, str(e))
            raise PeerClosed(f"protocol error: {e}") from e
        except OverBudget as e:
            await self._send_error(e.code, str(e))
            raise PeerClosed(f"{self._who()} went over a limit: {e}") from e
        except StoreError as e:
            await self._send_error("apply-failed", str(e))
            raise PeerClosed(f"could not apply a batch: {e}") from e

    # -- membership -------------------------------------------------------------

    def _refusal(self) -> str | None:
        """Why this session may not sync (now), or None."""
        if self.ctx.members.removed_self() is not None:
            return "self-removed"
        adm = self.ctx.admit(self)
        self.member = adm.member
        return adm.reason

    async def refuse(self, reason: str) -> None:
        """Tell the peer it is not (or no longer) a member, with the log that says so; then raise NotAMember."""
        members = self.ctx.members
        if self.member is not None:   # its record as the log says now (it may have been removed since admission)
            self.member = members.state.member(self.member.site) or self.member
        who = members.who(self.member.site) if self.member is not None else "an unknown device"
        if reason == "self-removed":
            raise NotAMember("this device has been removed from the group")
        if reason in ("removed", "succeeded"):
            m = self.member
            by = members.who(m.removed_by) if m.removed_by else "the membership rules"
            text = (f"{who} was removed from the group by {by}; it can no longer sync: its data stays on it. "
                    f"To take part again, ask an admin for a new invite and join as a new device"
                    if reason == "removed" else f"{who} continues under a new site id; its old keys are retired")
            with trio.move_on_after(1):
                try:
                    await self._write(Members(members.heads, tuple(members.encoded())))
                except Exception:
                    pass
            await self._send_error("not-a-member", text)
            raise NotAMember(f"refused {who} ({self.label}): {reason} from the group")
        await self._send_error("not-a-member", "this device's key is not a current member of the group here; "
                                               "if it joined a moment ago, it will be let in once its admission "
                                               "reaches this device")
        raise NotAMember(f"refused {self.label}: its static key is not a member of the group")

    async def _exchange_members(self) -> None:
        """Check the peer, swap membership logs if they differ, check again; NotAMember if refused."""
        why = self._refusal()
        if why not in (None, "unknown-device"):
            await self.refuse(why)
        members = self.ctx.members
        announced = members.heads
        await self._write(Members(announced, ()))
        theirs = await self._next_members()
        if tuple(theirs.heads) != tuple(announced):
            await self._write(Members(members.heads, tuple(members.encoded())))
            full = await self._next_members()
            if why == "unknown-device" and sum(map(len, full.events)) > UNKNOWN_PEER_LOG_BYTES:
                await self._send_error("too-large", f"a device not yet known here may send at most "
                                                    f"{UNKNOWN_PEER_LOG_BYTES} bytes of membership log")
                raise NotAMember(f"refused {self.label}: an unknown key sent more than {UNKNOWN_PEER_LOG_BYTES} "
                                 f"bytes of membership log")
            if full.events:
                await self._take_members(full.events)
        why = self._refusal()
        if why is not None:
            await self.refuse(why)
        self.admitted = True

    async def _next_event(self):
        """The peer's next event (or CLOSED): reads as needed, and decodes large frames in a worker thread."""
        session = self.session
        while True:
            ev = session.next_event()
            if ev is NEED_DATA:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                session.receive_data(data, self._now())
                self.last_seen = self._now()
                self._account()
            elif ev is DECODE:
                self._large_frames += 1
                await trio.to_thread.run_sync(session.decode_pending, limiter=_decoders())
            else:
                return ev

    async def _next_members(self) -> Members:
        """The peer's next Members event (exchange phase: nothing else may come before its Hello)."""
        while True:
            ev = await self._next_event()
            if ev is CLOSED:
                raise PeerClosed("peer closed the connection during the membership exchange")
            if type(ev) is Members:
                return ev
            if type(ev) is Error:
                if ev.code == "not-a-member":
                    raise NotAMember(f"peer refused us: {ev.message}")
                raise PeerClosed(f"peer reported an error: {ev.code}: {ev.message}")
            raise PeerClosed(f"peer sent {type(ev).__name__} before the membership exchange ended")

    async def _take_members(self, encoded: tuple[bytes, ...]) -> None:
        """Decode (off the event loop when there are many) and take in the peer's membership events.

        An honest peer passes on only events its log accepted, which every log accepts: so a
        malformed or forged event (bad signature, a signer that is no member) ends the session,
        and so do more than MAX_OWN_IGNORED_EVENTS events the peer itself signed without the
        right to. Valid events of the same message are kept (each stands on its own signature).
        """
        members = self.ctx.members
        keys = members.signing_keys()
        if len(encoded) > MEMBERS_OFF_LOOP:
            decoded = await trio.to_thread.run_sync(decode_members, list(encoded), keys, limiter=_decoders())
        else:
            decoded = decode_members(list(encoded), keys)
        if decoded.malformed:
            raise RemoteProtocolError(
                "bad-members", f"{decoded.malformed} of {len(encoded)} membership events sent were malformed "
                               f"(the first: {decoded.first_error})")
        await self.ctx.on_members(self, decoded)
        if decoded.rejected:
            raise RemoteProtocolError(
                "forged-members", f"{decoded.rejected} of {len(encoded)} membership events sent were forged "
                                  f"(a bad signature, or signed by a device that is no member) and were dropped")
        own = self.member.site if self.member is not None else None
        self._own_ignored += (decoded.ignored_by or {}).get(own, 0)
        if self._own_ignored > MAX_OWN_IGNORED_EVENTS:
            raise RemoteProtocolError(
                "members-ignored", f"sent more than {MAX_OWN_IGNORED_EVENTS} membership events it signed without "
                                   f"the right to (e.g. admin acts by a non-admin)")

    async def push_members(self, encoded: tuple[bytes, ...]) -> None:
        """Pass new membership events on to this peer (best effort: a broken connection ends anyway)."""
        try:
            await self._write(Members(self.ctx.members.heads, encoded))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, PeerClosed):
            pass

    async def _guard(self, task, scope: trio.CancelScope) -> None:
        try:
            await task()
        except Exception as e:
            if self._peer_eof and isinstance(e, (trio.BrokenResourceError, trio.ClosedResourceError)):
                return  # the peer is gone; the applier ends the connection once it has drained
            if self._failure is None:
                self._failure = e
            scope.cancel()

    async def _send_error(self, code: str, message: str) -> None:
        if self._send_broken is not None:
            return  # a write was cut off: the peer could not read an Error now
        with trio.move_on_after(1):
            try:
                await self._write(Error(code, message[:1000]))
            except Exception:  # the connection may already be gone
                pass

    async def _applier(self, applies) -> None:
        """Apply complete batches in arrival order and ack each part once it is durable.

        When the peer closes the connection, the reader closes the channel
        and what it had already received is still applied before the
        connection ends (the peer may have sent its last batch just before
        closing); acks that can no longer be delivered are dropped.
        ``_peer_eof`` marks that state: the peer sent EOF, or a write to it
        failed; from then on a broken stream only stops the task that hit it.
        """
        ctx = self.ctx
        async with applies:
            async for seq, batch, cost in applies:
                if batch is not None:
                    result = await ctx.worker.apply(batch, validated=True)  # the codec checked it
                    ctx.on_applied(self, batch, result)
                    log.debug("applied %d changes from %s", len(batch.changes), self.label)
                try:
                    await self._write(Ack(seq))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The peer hung up. Keep applying what the reader already has; it
                    # ends the connection when it reaches the end of the stream.
                    self._peer_eof = True
                finally:
                    self._unacked -= cost
                    self._account(strict=False)   # a release; the reader's next count raises if need be
        raise PeerClosed("peer closed the connection")

    async def _reader(self, applies) -> None:
        """Read frames, act on events, queue batches for the applier (closing the queue when done)."""
        session, limit = self.session, self.settings.max_unacked_bytes
        with applies:
            while True:
                ev = await self._next_event()
                if ev is CLOSED:
                    self._peer_eof = True
                    return  # closing the queue: the applier finishes it, then ends the connection
                t = type(ev)
                if t is BatchEvent:
                    # decoding (and preparing) the next batch overlaps with applying this one
                    cost = session.last_frame_size + CHANGE_COST * len(ev.batch.changes)
                    batch, cost = self.peer.received_part(ev.batch, ev.more, cost)
                    if batch is not None:
                        if self._unacked and self._unacked + cost > limit:
                            raise OverBudget("unacked-bytes", f"peer sent more than we hold waiting to be applied: "
                                                              f"{(self._unacked + cost) / (1 << 20):.1f} MiB "
                                                              f"(limit MAX_UNACKED_BYTES, {limit / (1 << 20):g} MiB)")
                        self._unacked += cost
                    self._account()
                    if batch is not None and self._prepare is not None:
                        batch = await self._prepare(batch)
                    if batch is not None:
                        batch = self.ctx.screen(self, batch)
                    await applies.send((ev.seq, batch, cost))
                elif t is Ack:
                    self._window.set()
                elif t is Have:
                    self.peer.heard(ev.vv)
                elif t is Ping:   # answered without waiting for the send lock: the reader never stops for a write
                    self._queue_control(self.session.send(ev.response(), self._now()))
                elif t is Members:
                    if ev.events:
                        await self._take_members(ev.events)
                elif t is Hello:
                    self.peer_site = ev.site_id
                    self.peer_schema = ev.schema
                    self.peer_vv = ev.vv
                    self.peer = PeerSync(ev.vv, max_staged_bytes=self.settings.max_staged_bytes,
                                         told=self._hello_vv)
                    if self.member is not None and ev.site_id != self.member.site:
                        raise RemoteProtocolError(
                            "wrong-site", f"peer says it is site {ev.site_id.hex()[:12]}, but its key belongs to "
                                          f"{self.ctx.members.who(self.member.site)}")
                    if self.ctx.check_schema and ev.schema != self.ctx.schema:
                        log.warning("peer %s tracks a different schema; changes to tables or columns "
                                    "unknown here will be held until they are tracked", self.label)
                    self.ctx.on_hello(self, ev)
                    if ev.yours and hasattr(self.ctx, "check_checkpoints"):
                        await self.ctx.check_checkpoints(self, ev.yours)
                    self._hello.set()
                elif t is Error:
                    if ev.code == "not-a-member":
                        raise NotAMember(f"peer refused us: {ev.message}")
                    raise PeerClosed(f"peer reported an error: {ev.code}: {ev.message}")

    async def _holdings(self):
        """What we hold now: the host's cached vector when it keeps one (no store call), else the store's."""
        holdings = getattr(self.ctx, "holdings", None)
        if holdings is not None:
            return await holdings()
        return await self.ctx.worker.version_vector()

    async def _sender(self) -> None:
        """Tell the peer what we hold that it has not heard of, and send what ``PeerSync.plan`` says is due;
        then wait for news (a stamp, an applied batch) or for the next site to fall due."""
        await self._hello.wait()
        s, bus, peer = self.settings, self.ctx.bus, self.peer
        eager = frozenset(getattr(self.ctx, "eager_sites", (self.ctx.site_id,)))
        seen = -1
        while True:
            seen = bus.version
            ours = await self._holdings()
            have = peer.announce(ours)
            if have is not None:
                await self._write(Have(have))
            read_from, next_due = peer.plan(ours, eager, self._now(), self._forward_delay)
            if read_from is not None:
                await self._send_due(read_from)
            with trio.move_on_at(math.inf if next_due is None else next_due):
                await bus.wait_beyond(seen)

    async def _send_due(self, read_from) -> None:
        """Send the peer what it lacks beyond ``read_from``, batch by batch, as the window allows."""
        s = self.settings
        async for batch, more in self.ctx.worker.batches(read_from, s.max_changes, s.max_bytes):
            if not batch.changes and not batch.ranges:
                continue
            while not self.session.can_send_batch:
                self._window = trio.Event()
                with trio.move_on_after(s.idle_timeout) as waiting:
                    await self._window.wait()
                if waiting.cancelled_caught:
                    raise PeerStalled(f"{self._who()} stopped acknowledging: {self.session.unacked} batches sent "
                                      f"to it unacknowledged for {s.idle_timeout:g} s; connection closed")
            await self._write(BatchEvent(self.session.next_seq, batch, more),
                              f"a batch of {len(batch.changes)} changes")
            log.debug("sent %d changes to %s", len(batch.changes), self.label)
            self.peer.sent(batch)

    async def _watchdog(self) -> None:
        """Enforce the session's deadlines (it raises on a timeout) and queue due heartbeats.

        Never takes the send lock, so a write that blocks cannot hold it up.
        """
        while True:
            deadline = self.session.get_timer()
            if deadline is None:
                await trio.sleep(0.5)
                continue
            await trio.sleep_until(deadline)
            data = self.session.handle_timer(self._now())
            if data:
                self._queue_control(data)

    def _queue_control(self, data: bytes) -> None:
        """Queue a Ping or Pong for the control writer; dropped if the queue is full.

        Their order against other frames does not matter, and dropping one is
        harmless: the queue is full only while a write waits, which the
        stall deadline watches, and liveness does not depend on answers.
        """
        try:
            self._control.send_nowait(data)
        except trio.WouldBlock:
            pass

    async def _control_writer(self) -> None:
        """Write the Pings and Pongs the watchdog and the reader queue."""
        async for data in self._control_queue:
            async with self._send_lock:
                await self._send_bytes(data, "a Ping or Pong")
