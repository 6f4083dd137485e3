"""The relay peer: the device protocol, a Postgres store, many groups, no keys to the data.

How this works: one trio nursery runs a TCP listener and a thread that
LISTENs on Postgres. Before anything is read, a connection must get past
the handshake gate (handshakes in flight per source address and in all, a
rate per source: ``net.admission``). It starts with a 20-byte preamble
naming a group by its ref of the day; the relay finds the group in its
table of refs (``RefTable``: yesterday's, today's and tomorrow's ref of
every admitted group, computed from the tokens it holds), with no Postgres
query. A ref not in the table is looked for again in Postgres (a group
admitted by another relay process; that process NOTIFYs, so this is rare)
at most once per REFRESH_INTERVAL for all refs, and is then refused from
memory for UNKNOWN_REF_TTL. The relay runs the Noise handshake with that
group's relay token as the pre-shared key: only devices holding the group
key can derive the token, so only they get through. The PSK only keeps
strangers out of the handshake; what admits a device is its static key: the
relay keeps each group's signed membership log (pinned at admission by the
hash of the group's found event, so only the founding admin's chain of
signatures counts) and lets a session sync only while the log lists the
device's key as a current member. A removed key is refused as soon as the
relay holds the removal, and open sessions of that key are closed. A
process holds at most ``SessionLimits`` sessions per device key (a new one
closes that key's oldest), per group, per group of keys its log does not
list as current members (strangers, until they are admitted), and in all.
From then on the session is an ordinary sync session (``net.Connection``)
over its group's ``PostgresStore``, seen through the group's ``GroupView``
(a cached version vector, reads shared by the group's sessions): a device
can read and write its own group's changes and nothing else.

Postgres connections: one bounded pool per process (``store.pg_pool``,
``--pool-size``) that every store call borrows from for one transaction,
and the LISTEN connection. Store calls run in worker threads under
``slots``, one per pooled connection, so waiting happens in trio. A new
session waits up to BUSY_WAIT for a slot; if none frees up (or the process
holds ``per_process`` sessions), it is sent Error ``relay-busy`` ("relay
busy, retry in N s") and closed, and the device retries after N s. Sessions
already connected only ever wait: a new session never costs one of them.

Every apply NOTIFYs ``p2psync_relay`` with the group id; each relay process
turns a notification from another process (its own are told apart by the
sender's backend pid) into a wake-up of that group's sessions, after
dropping the group's cached vector, so a change accepted by one relay
process reaches devices connected to another one. The listener thread
reconnects when Postgres restarts, and wakes every session then, since
notifications sent while it was away are lost.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import psycopg
import trio

from ..group import Admission, GroupMembers
from ..identity import day_number
from ..logsetup import setup_logging
from ..net.admission import HandshakeGate, HandshakeLimits, LogThrottle, with_suppressed
from ..net.bus import ChangeBus
from ..net.connection import Connection, NotAMember, PeerClosed, SyncSettings
from ..net.noise_stream import HandshakeFailed, NoiseStream
from ..net.store_worker import wall_ms
from ..noise import agent_handshake
from ..group.attestation import verifier_for
from ..protocol import Error, RemoteProtocolError, encode_event
from ..protocol.relay_preamble import PREAMBLE_LEN, BadPreamble, parse_preamble, relay_prologue
from ..store import StoreError
from ..store.pg_pool import APPLICATION_NAME, DEFAULT_SIZE, RelayPool
from ..store.postgres import (ADMITTED, NOTIFY_CHANNEL, PostgresStore, admit_group, connect, find_groups,
                              member_log, member_mark, migrate, relay_site_id, relay_static_private)
from .gates import Admitted, RefTable, SessionLimits, make_room
from .group_view import GroupView, RelayWorker

log = logging.getLogger("p2psync.relay")

HANDSHAKE_TIMEOUT = 10.0
HANDSHAKE_LIMITS = HandshakeLimits()
LISTEN_RETRY = 1.0
BUSY_WAIT = 5.0      # s a new session waits for a free Postgres connection before it is told the relay is busy
BUSY_RETRY = 10      # s a device told the relay is busy waits before it tries again
RELAY_FORWARD_DELAY = 0.1


@dataclass(eq=False)
class SessionEntry:
    """One device session of a group in this process, from its handshake on."""

    key: bytes                      # the device's static key
    label: str
    scope: trio.CancelScope
    conn: Connection | None = None
    closing: bool = False           # closed to make room (per-device limit); no longer counted

    @property
    def admitted(self) -> bool:
        return self.conn is not None and self.conn.admitted


@dataclass
class GroupState:
    """An admitted group as this relay process sees it."""

    id: int
    token: bytes = field(repr=False)
    members: GroupMembers
    store: PostgresStore
    view: GroupView
    bus: ChangeBus = field(default_factory=ChangeBus)
    mark: int = 0
    sessions: list[SessionEntry] = field(default_factory=list)   # oldest first
    reloading: bool = False         # a membership reload runs
    reload_again: bool = False      # ... and another NOTIFY came meanwhile
    _cached: tuple | None = field(default=None, repr=False)

    def verifier(self):
        """(Verifier, None) over the signing keys of every device the group's log ever added (the store's
        check of signed versions; the relay sees no cells, so there is no leaf hasher)."""
        st = self.members.state
        if self._cached is None or self._cached[0] is not st:
            self._cached = (st, verifier_for(st))
        return self._cached[1], None


class SessionContext:
    """What a Connection needs, for one device session of one group."""

    check_schema = False  # devices track tables; the relay stores sealed cells of any schema

    def __init__(self, relay: Relay, group: GroupState):
        self.relay, self.group, self.store = relay, group, group.store
        self.worker = RelayWorker(group.view, wall_ms)
        self.site_id = relay.site_id
        self.schema = self.store.schema_fingerprint()
        self.bus = group.bus
        self.members = group.members

    wall_ms = staticmethod(wall_ms)

    async def holdings(self):
        """What the relay holds for the group: the group's cached vector (read once for all its sessions)."""
        return await self.group.view.holdings()

    def admit(self, conn: Connection) -> Admission:
        return self.members.admit(conn.remote_static)

    def screen(self, conn: Connection, batch):
        out, refused, whose = self.members.screen(batch)
        if refused:
            log.warning("group %d: refused %d changes from %s of devices that are not members or were removed",
                        self.group.id, refused, conn.label)
        return out

    async def on_members(self, conn: Connection, decoded) -> None:
        new = self.members.take(decoded)
        if new:
            await self.group.view.run(self.store.add_member_events, self.members.pairs(new))
            await self.relay.spread(self.group, new, conn)

    def on_hello(self, conn: Connection, hello) -> None:
        log.info("device %s (site %s) of group %d says hello", conn.label, hello.site_id.hex()[:12], self.group.id)

    def on_applied(self, conn: Connection, batch, result) -> None:
        if result.cells_won or batch.ranges:
            self.bus.notify()
        if result.refused or result.cut or result.conflicts or result.bad_proofs:
            refused = sum(result.refused.values())
            self.relay.counters["changes_unattested"] = self.relay.counters.get("changes_unattested", 0) + refused
            self.relay.counters["ranges_cut"] = self.relay.counters.get("ranges_cut", 0) + len(result.cut)
            log.warning("group %d: %s sent %d changes and %d ranges its members did not sign (%s); not stored, "
                        "connection closed", self.group.id, conn.label, refused, len(result.cut),
                        "; ".join(result.refusals[:3]) or "ranges past the last signed version")
            raise RemoteProtocolError("unattested", "sent versions or ranges that no member signed; "
                                                    "connection closed")


class Relay:
    """A running relay process."""

    def __init__(self, dsn: str, listen: tuple[str, int], settings: SyncSettings | None = None,
                 handshake_limits: HandshakeLimits = HANDSHAKE_LIMITS, session_limits: SessionLimits = SessionLimits(),
                 pool_size: int = DEFAULT_SIZE, shared_reads: bool = True):
        self.dsn, self.listen = dsn, listen
        self.pool_size, self.shared_reads = pool_size, shared_reads
        self.pool: RelayPool | None = None       # opened by run()
        self.slots: trio.CapacityLimiter | None = None
        self.sessions = 0                          # sessions this process holds, in all groups
        # What the relay sends keeps the device default (2,000 changes): a device
        # applies each batch in one SQLite transaction and must not hold the
        # write lock for long. Devices send the relay bigger batches.
        # It forwards every site's changes after a shorter wait than a device (sync/peer.py): a device
        # that also got them over its LAN says so (Have) within a round trip.
        self.settings = settings or SyncSettings(forward_delay=RELAY_FORWARD_DELAY)
        self.refs = RefTable()
        self.by_id: dict[int, GroupState] = {}
        self.listen_address: tuple[str, int] | None = None
        self._handshakes = HandshakeGate(handshake_limits)
        self.limits = session_limits
        self._refusal_log = LogThrottle()
        self._refresh_lock = trio.Lock()
        self.counters = {"handshakes_refused_per_source": 0, "handshakes_refused_rate": 0,
                         "handshakes_refused_in_flight": 0, "unknown_refs": 0, "group_table_reads": 0,
                         "sessions_refused_per_group": 0, "sessions_refused_strangers": 0,
                         "sessions_closed_per_device": 0, "sessions_refused_busy": 0}
        self.site_id = b""
        self._static = b""

    def prepare(self, admit: list[tuple[bytes, bytes, bytes, bytes]] = ()) -> list[str]:
        """Create or migrate the schema, load the relay's identity and admit groups (blocking)."""
        with connect(self.dsn) as conn:
            applied = migrate(conn)
            self.site_id = relay_site_id(conn)
            self._static = relay_static_private(conn)
            for ref, token, group_id, found in admit:
                gid = admit_group(conn, ref, token, group_id, found)
                log.info("group %d admitted (handle %s)", gid, ref.hex()[:12])
            self.refs.load(find_groups(conn), -math.inf)   # stale: the first unknown ref reads it again
        return applied

    # -- groups ---------------------------------------------------------------

    def _read_groups(self):
        try:
            with self.pool.connection() as conn:
                return find_groups(conn)
        except psycopg.Error as e:
            raise StoreError(f"cannot read the admitted groups: {str(e).strip()}") from e

    async def _db(self, fn, *args):
        """A blocking Postgres call in a worker thread, once a slot (a pooled connection) is free."""
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self.slots)

    async def reload_groups(self) -> None:
        """Read the group table again (one query) and rebuild the table of refs."""
        started = trio.current_time()
        async with self._refresh_lock:
            if self.refs.loaded_at >= started:
                return   # another task read it meanwhile
            self.counters["group_table_reads"] += 1
            rows = await self._db(self._read_groups)
            self.refs.load(rows, trio.current_time())

    async def _find(self, ref: bytes) -> Admitted | None:
        """The admitted group ``ref`` names today; Postgres is asked only as RefTable says."""
        now, day = trio.current_time(), day_number(time.time())
        found = self.refs.get(ref, day)
        if found is not None or self.refs.known_unknown(ref, now):
            return found
        if self.refs.stale(now):
            await self.reload_groups()
            found = self.refs.get(ref, day)
        if found is None:
            self.refs.mark_unknown(ref, trio.current_time())
        return found

    def _load_members(self, gid: int, known_mark: int | None = None):
        """(mark, events) of group ``gid``'s membership log; no events if its mark is still ``known_mark``."""
        try:
            with self.pool.connection() as conn, conn.transaction():
                mark = member_mark(conn, gid)
                return mark, ([] if mark == known_mark else member_log(conn, gid))
        except psycopg.Error as e:
            raise StoreError(f"cannot read group {gid}'s membership: {str(e).strip()}") from e

    async def _group(self, adm: Admitted) -> GroupState:
        """The group's state in this process (its membership log read from Postgres the first time)."""
        g = self.by_id.get(adm.id)
        if g is None:
            mark, events = await self._db(self._load_members, adm.id)
            g = self.by_id.get(adm.id)  # another connection may have loaded it meanwhile
            if g is None:
                members = GroupMembers(adm.found)
                members.load(events)
                store = PostgresStore(self.dsn, adm.id, self.site_id, pool=self.pool)
                view = GroupView(store, self.slots, shared=self.shared_reads)
                g = self.by_id[adm.id] = GroupState(adm.id, adm.token, members, store, view, mark=mark)
                store.attestor = g.verifier
        return g

    async def reload_members(self, g: GroupState) -> None:
        """Pick up membership events another relay process stored; close sessions they refuse.

        One reload per group at a time: NOTIFYs arriving meanwhile make one more run after it."""
        if g.reloading:
            g.reload_again = True
            return
        g.reloading = True
        try:
            again = True
            while again:
                g.reload_again = False
                try:
                    mark, events = await self._db(self._load_members, g.id, g.mark)
                except StoreError as e:
                    log.warning("group %d: cannot reload membership: %s", g.id, e)
                    return
                g.mark = mark
                new = g.members.load(events) if events else []
                if new:
                    await self.spread(g, new, None)
                again = g.reload_again
        finally:
            g.reloading = False

    async def spread(self, g: GroupState, new, source) -> None:
        """Pass new membership events to this process's other sessions of the group; close refused ones."""
        for ev in new:
            log.info("group %d: membership %s by site %s", g.id, ev.kind, ev.signer.hex()[:12])
        encoded = tuple(g.members.encoded(new))
        async with trio.open_nursery() as n:
            for e in list(g.sessions):
                if e.conn is not None and e.conn is not source and e.conn.admitted:
                    n.start_soon(_push, e.conn, encoded)
        for e in list(g.sessions):
            conn = e.conn
            if conn is None:
                continue
            adm = g.members.admit(conn.remote_static)
            if not adm.ok and conn.admitted:
                log.warning("group %d: closing the session with %s: its key is %s", g.id, conn.label, adm.reason)
                with trio.move_on_after(1):
                    try:
                        await conn.refuse(adm.reason)
                    except Exception:
                        pass
                e.scope.cancel()

    # -- connections ----------------------------------------------------------

    def _refused(self, counter: str, source: str, text: str, *args) -> None:
        """Count a refusal and log it (a flood from one source is logged in part, then summed)."""
        self.counters[counter] += 1
        suppressed = self._refusal_log.allow(f"{counter} {source}", trio.current_time())
        if suppressed is not None:
            log.warning(with_suppressed(text % args, suppressed))

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            label = f"{host}:{port}"
        except OSError:
            host = label = "?"
        try:
            refused = self._handshakes.enter(host, trio.current_time())
            if refused is not None:
                self._refused(f"handshakes_refused_{refused.code}", host, "%s; refusing connection from %s",
                              refused.text, label)
                return
            try:
                opened = await self._open(stream, label, host)
            finally:
                self._handshakes.leave(host)
            if opened is not None:
                await self._serve(*opened, label)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _open(self, stream, label: str, host: str):
        """(group, secured stream) once the preamble and handshake check out, else None."""
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                data = await _receive_exactly(stream, PREAMBLE_LEN)
                if not data:
                    log.debug("connection from %s closed before sending anything", label)
                    return None
                ref = parse_preamble(data)
                adm = await self._find(ref)
                if adm is None:
                    self._refused("unknown_refs", host, "connection from %s: group ref %s is not admitted here "
                                  "(or the device's clock is more than a day off); closed before the handshake",
                                  label, ref.hex()[:12])
                    return None
                ns = NoiseStream(stream, agent_handshake(False, self._static, adm.token, relay_prologue(ref)))
                await ns.do_handshake()
                return await self._group(adm), ns
        except trio.TooSlowError:
            reason = f"no preamble and handshake within {HANDSHAKE_TIMEOUT:g} s"
        except BadPreamble as e:
            reason = str(e)
        except HandshakeFailed as e:
            reason = str(e)
        except (trio.BrokenResourceError, OSError, EOFError) as e:
            reason = f"connection broke before the handshake completed ({e or type(e).__name__})"
        except StoreError as e:
            reason = f"cannot look the group up: {e}"
        log.warning("connection from %s: %s; closed", label, reason)
        return None

    def _room(self, g: GroupState, key: bytes, label: str) -> str | None:
        """Make room for a new session of ``key`` in ``g`` (closing that key's oldest if it holds too many);
        or why there is none. Both are counted and logged."""
        room = make_room(g.sessions, key, lambda k: g.members.admit(k).ok, self.limits)
        for e in room.close:
            e.closing = True
            e.scope.cancel()
            self._refused("sessions_closed_per_device", f"{g.id} {key.hex()}",
                          "group %d: device key %s holds %d sessions (limit %d per device); closing its oldest, "
                          "with %s, for the new one with %s", g.id, key.hex()[:12], room.held, self.limits.per_device,
                          e.label, label)
        if room.refusal is None:
            return None
        counter, text = room.refusal
        self._refused(counter, str(g.id), "group %d: %s; refusing %s", g.id, text, label)
        return text

    async def _busy(self, group: GroupState, label: str) -> str | None:
        """Why a new session must wait for later (the process is full, or no Postgres connection frees up
        within BUSY_WAIT), counted and logged; None if it may start."""
        why = None
        if self.sessions < self.limits.per_process:
            with trio.move_on_after(BUSY_WAIT):
                async with self.slots:
                    pass
                if self.sessions < self.limits.per_process:   # others may have started while we waited
                    return None
            why = f"all {self.pool_size} Postgres connections stayed in use for {BUSY_WAIT:g} s"
        if why is None or self.sessions >= self.limits.per_process:
            why = f"{self.sessions} sessions (limit {self.limits.per_process} per relay process)"
        self._refused("sessions_refused_busy", "busy", "group %d: relay busy: %s; asked %s to retry in %d s",
                      group.id, why, label, BUSY_RETRY)
        return why

    async def _turn_away(self, ns: NoiseStream, code: str, message: str) -> None:
        with trio.move_on_after(1):
            try:
                await ns.send_all(encode_event(Error(code, message)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.CancelScope(shield=True):
            await ns.aclose()

    async def _serve(self, group: GroupState, ns: NoiseStream, label: str) -> None:
        refused = self._room(group, ns.remote_static, label)
        if refused is not None:
            await self._turn_away(ns, "too-many-sessions", f"{refused}; try again later")
            return
        busy = await self._busy(group, label)
        if busy is not None:
            await self._turn_away(ns, "relay-busy", f"relay busy, retry in {BUSY_RETRY} s ({busy})")
            return
        self.sessions += 1
        try:
            await self._session(group, ns, label)
        finally:
            self.sessions -= 1

    async def _session(self, group: GroupState, ns: NoiseStream, label: str) -> None:
        entry = SessionEntry(ns.remote_static, label, trio.CancelScope())
        group.sessions.append(entry)
        try:
            with entry.scope:
                entry.conn = Connection(ns, SessionContext(self, group), label, self.settings)
                await entry.conn.run()
        except NotAMember as e:
            log.warning("session with %s refused: %s", label, e)
        except PeerClosed as e:
            log.info("session with %s ended: %s", label, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.info("session with %s lost: %s", label, e or "broken")
        except Exception:  # a bug costs one session, never the relay
            log.exception("session with %s failed unexpectedly; closed", label)
        finally:
            group.sessions.remove(entry)
            with trio.CancelScope(shield=True):
                await ns.aclose()

    # -- notifications ----------------------------------------------------------

    def _on_notify(self, payload: str, pid: int = 0) -> None:
        if payload == ADMITTED:   # another relay process admitted a group
            self._nursery.start_soon(self._reload_groups_logged)
            return
        if self.pool is not None and self.pool.own_pid(pid):
            return   # our own apply or membership event: its sessions were woken when it committed
        try:
            g = self.by_id.get(int(payload))
        except ValueError:
            return
        if g is not None:
            g.view.invalidate()
            g.bus.notify()
            self._nursery.start_soon(self.reload_members, g)

    async def _reload_groups_logged(self) -> None:
        try:
            await self.reload_groups()
        except StoreError as e:
            log.warning("cannot read the admitted groups: %s", e)

    def _wake_all(self) -> None:
        self._nursery.start_soon(self._reload_groups_logged)   # admissions made meanwhile went unheard
        for g in self.by_id.values():
            g.view.invalidate()
            g.bus.notify()
            self._nursery.start_soon(self.reload_members, g)

    def _listen_thread(self, stop: threading.Event, token: trio.lowlevel.TrioToken) -> None:
        """LISTEN for other relay processes' applies until ``stop``; reconnects after errors."""
        again = False  # a later connection: notifications sent meanwhile are lost, so wake every session
        while not stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                     application_name=f"{APPLICATION_NAME}-listen") as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if again:
                        log.info("listening for other relay processes again")
                        trio.from_thread.run_sync(self._wake_all, trio_token=token)
                    again = True
                    while not stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            trio.from_thread.run_sync(self._on_notify, n.payload, n.pid, trio_token=token)
            except psycopg.Error as e:
                if not stop.is_set():
                    log.warning("lost the Postgres notification connection (%s); retrying", str(e).strip())
                again = True
                stop.wait(LISTEN_RETRY)
            except trio.RunFinishedError:
                return

    async def _listen(self) -> None:
        stop = threading.Event()
        try:
            await trio.to_thread.run_sync(partial(self._listen_thread, stop, trio.lowlevel.current_trio_token()),
                                          abandon_on_cancel=True)
        finally:
            stop.set()

    # -- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host, port = self.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.listen_address = listeners[0].socket.getsockname()[:2]
        self.pool = RelayPool(self.dsn, self.pool_size)
        self.slots = trio.CapacityLimiter(self.pool_size)
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                n.start_soon(self._listen)
                n.start_soon(trio.serve_listeners, self._handle, listeners)
                log.info("relay listening on %s:%d (a pool of %d Postgres connections, at most %d sessions)",
                         *self.listen_address, self.pool_size, self.limits.per_process)
                task_status.started(self.listen_address)
        finally:
            self.counters.update(self.statistics())
            await trio.to_thread.run_sync(self.pool.close)

    def statistics(self) -> dict:
        """Postgres transactions run (connections borrowed) and how the groups' reads went, in all groups."""
        out = {"pg_borrowed": self.pool.borrowed if self.pool is not None else 0}
        for g in self.by_id.values():
            for k, v in g.view.counters.items():
                out[k] = out.get(k, 0) + v
        return out


async def _push(conn: Connection, encoded) -> None:
    with trio.move_on_after(2):
        await conn.push_members(encoded)


async def _receive_exactly(stream, n: int) -> bytes:
    """``n`` bytes; b"" if the peer closes before sending any; EOFError if it closes midway."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            if not buf:
                return b""
            raise EOFError("closed by the peer")
        buf += chunk
    return bytes(buf)


def run_relay(dsn: str, listen: tuple[str, int], admit: list[tuple[bytes, bytes]], *,
              admit_only: bool = False, log_level: str = "info", pool_size: int = DEFAULT_SIZE,
              max_sessions: int | None = None, shared_reads: bool = True) -> int:
    """Run the relay until SIGTERM/SIGINT (or just admit groups); the process exit status."""
    import signal

    setup_logging(log_level)
    limits = SessionLimits() if max_sessions is None else SessionLimits(per_process=max_sessions)
    relay = Relay(dsn, listen, session_limits=limits, pool_size=pool_size, shared_reads=shared_reads)
    applied = relay.prepare(admit)
    for name in applied:
        log.info("applied migration %s", name)
    if admit_only:
        return 0

    async def main():
        async with trio.open_nursery() as n:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await n.start(relay.run)
                async for sig in signals:
                    log.info("%s received: closing sessions", signal.Signals(sig).name)
                    n.cancel_scope.cancel()
                    break

    trio.run(main)
    counted = ", ".join(f"{k} {v}" for k, v in relay.counters.items() if v)
    log.info("relay stopped%s", f"; counters: {counted}" if counted else "")
    return 0


__all__ = ["Relay", "run_relay"]
