"""The agent: one root nursery wiring listener, dialers, change watcher and control socket.

How this works: the listener accepts TCP connections and runs the Noise
handshake as responder under a deadline; each static peer gets a dialer that
connects, handshakes as initiator and reconnects with jittered exponential
backoff. Authenticated connections are keyed by the peer's static key: when
two connections to the same peer exist (both sides dialled at once) the one
initiated by the lower static key is kept, on both sides. The watcher wakes
on writes to the database files, stamps new local writes and tells every
connection there is something to send. SIGTERM/SIGINT cancel the nursery;
a batch being applied finishes first (worker threads are not abandoned).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field

import trio

from ..config import Config
from ..discovery import DiscoveryError, MdnsDiscovery, PeerGone
from ..identity import Device
from ..logsetup import setup_logging
from ..net.admission import HandshakeGate, HandshakeLimits, LogThrottle, with_suppressed
from ..net.connection import Connection, NotAMember, PeerClosed, SyncSettings, dial
from ..net.noise_stream import HandshakeFailed, NoiseStream
from ..noise import agent_handshake, agent_responder
from ..net.bus import ChangeBus
from ..net.store_worker import StoreWorker, wall_ms
from ..protocol.prologue import device_prologue
from ..protocol import Error, RemoteProtocolError, encode_event
from ..identity.succession import place_of, write_record
from ..model import VersionVector
from ..store import SqliteStore
from .control import serve_control
from .group_service import GroupService
from .relay_link import RelayState, keep_relay_session, relay_status
from .sdnotify import Notifier
from .watcher import DbWatcher

log = logging.getLogger("p2psync.agent")


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment (tests shorten timeouts); else ``default``."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if 0 < value < 3600 else default


HANDSHAKE_TIMEOUT = _env_seconds("P2PSYNC_HANDSHAKE_TIMEOUT", 10.0)
CONNECT_TIMEOUT = 5.0
HANDSHAKE_LIMITS = HandshakeLimits()   # in flight per source and in all, rate per source (net/admission.py)
HELD_RETRY_INTERVAL = 30.0
MDNS_GIVE_UP = 3600.0  # seconds of failed dialling before forgetting a discovered peer
COMMIT_VISIBLE_RETRIES = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064)
STAMP_RETRY_FIRST, STAMP_RETRY_MAX = 1.0, 30.0   # seconds before stamping again after an error, doubling


prologue = device_prologue


@dataclass
class Link:
    """A live authenticated connection."""

    conn: Connection
    scope: trio.CancelScope
    address: str
    initiator_key: bytes
    since: float
    closed: trio.Event = field(default_factory=trio.Event)


@dataclass
class DialState:
    """A peer we dial (static or discovered) and what the dialer is doing."""

    address: str
    addresses: list = field(default_factory=list)   # tried in order; for a discovered peer, discovery's list
    discovered: bool = False
    gone: bool = False
    state: str = "starting"
    last_error: str | None = None
    peer_key: bytes | None = None


class Agent:
    """A running p2psync agent for one device."""

    check_schema = True  # warn when a peer tracks other tables (see Connection)

    def __init__(self, device: Device, config: Config, settings: SyncSettings | None = None):
        self.device, self.config = device, config
        self.settings = settings or SyncSettings()
        self.store = SqliteStore(device.db_path, device.site_id,
                                 max_clock_skew_ms=int(config.max_clock_skew * 1000))
        self.worker = StoreWorker(self.store)
        self.bus = ChangeBus()
        self.site_id = device.site_id
        self.static_public = device.static_public
        self.store.track_new_columns = config.track_new_columns
        self.incarnation_notice: str | None = None   # set when this start continued under a new site id
        self.continue_reason: str | None = None      # set when this device must continue under a new site id
        self.continue_after: int | None = None
        self.on_continue = None                      # ends the run (run_agent then continues as a successor)
        self.store.on_stamped = self._record_stamp
        self._place = place_of(device.home, device.db_path)
        self._incarnation = self.store.incarnation()[0]   # fixed for this run (a successor starts a new run)
        self.schema = self.store.schema_fingerprint()
        self._schema_changes = self.store.schema_changes
        self.links: dict[bytes, Link] = {}
        self.dialers: dict[str, DialState] = {}
        self.counters = {"handshake_failures": 0, "protocol_errors": 0, "batches_applied": 0,
                         "cells_applied": 0, "changes_held": 0, "handshakes_refused_per_source": 0,
                         "handshakes_refused_rate": 0, "handshakes_refused_in_flight": 0, "stamp_errors": 0,
                         "versions_received": 0, "versions_redundant": 0,
                         "sessions_refused_full": 0}
        self.listen_address: tuple[str, int] | None = None
        self._handshakes = HandshakeGate(HANDSHAKE_LIMITS)
        self._refusal_log = LogThrottle()
        self.notifier = Notifier()
        self.relay_state: RelayState | None = None
        self.group = GroupService(self)
        self.members = self.group.members
        self.removed: str | None = None       # why this device no longer syncs, once it learns it was removed
        self._sync_scope = trio.CancelScope()
        self._unsigned_warned = False
        self._holdings: VersionVector | None = None   # our version vector as of the last news (None: read it)
        self.eager_sites = frozenset((self.site_id,))   # whose changes sessions push at once (sync/peer.py)

    wall_ms = staticmethod(wall_ms)

    def _record_stamp(self, dbv: int) -> None:
        """After every committed stamp: the home remembers it (identity/succession.py), so a database
        restored to before it is noticed at the next start. A failure to write is logged, not fatal."""
        try:
            write_record(self.device.home, self.store.site_id, self._incarnation, dbv, self._place)
        except OSError as e:
            log.error("cannot record the newest db version in %s: %s (a restored database might then go "
                      "unnoticed until peers report it)", self.device.home, e)

    # -- callbacks from connections ----------------------------------------

    def on_hello(self, conn: Connection, hello) -> None:
        self.group.last_seen[hello.site_id] = time.time()
        log.info("peer %s (%s) says hello", conn.label, self.members.who(hello.site_id))

    def admit(self, conn: Connection):
        return self.group.admit(conn)

    def screen(self, conn: Connection, batch):
        return self.group.screen(conn, batch)

    async def on_members(self, conn: Connection, events) -> None:
        await self.group.on_members(conn, events)

    def connections(self) -> list[Connection]:
        """Every live session (LAN peers and the relay)."""
        out = [link.conn for link in self.links.values()]
        if self.relay_state is not None and self.relay_state.conn is not None:
            out.append(self.relay_state.conn)
        return out

    def continue_elsewhere(self, why: str, after: int | None = None) -> None:
        """End this run, so that run_agent continues under a successor site id of our own
        (agent/incarnation.py): another copy of this device took one, or peers hold our versions past
        ``after`` that this database lacks. ``after``: the newest version shared (default: our newest)."""
        if self.continue_reason is None:
            self.continue_reason, self.continue_after = why, after
            log.warning("%s; this device continues under a new site id too", why)
            if self.on_continue is not None:
                self.on_continue()

    def stop_syncing(self, why: str) -> None:
        """This device was removed: end every session and stop dialling; status says why."""
        if self.removed is None:
            self.removed = why
            log.error("%s", why)
        self._sync_scope.cancel()
        for link in list(self.links.values()):
            link.scope.cancel()

    async def holdings(self) -> VersionVector:
        """Our version vector, kept from the last apply (its result) and read again after other news."""
        vv = self._holdings
        if vv is None:
            news = self.bus.version
            vv = await self.worker.version_vector()
            if self.bus.version == news:   # nothing happened meanwhile: what we read is current
                self._holdings = vv
        return vv

    def changed(self, vv: VersionVector | None = None) -> None:
        """Something new may be there to send: wake the sessions (``vv``: our vector now, if known)."""
        self._holdings = vv
        self.bus.notify()

    def _count_receipts(self, batch) -> None:
        """Versions received, and of them those we held already (a second copy of a change: the figure
        that says whether each change crossed the LAN about once per device)."""
        before = self._holdings
        versions = {(c.site, c.dbv) for c in batch.changes}
        self.counters["versions_received"] += len(versions)
        if before is not None:
            self.counters["versions_redundant"] += sum(1 for site, dbv in versions if dbv <= before[site])

    def on_applied(self, conn: Connection, batch, result) -> None:
        self.counters["batches_applied"] += 1
        self.counters["cells_applied"] += result.cells_won
        self.counters["changes_held"] += result.held
        self._count_receipts(batch)
        if result.held:
            log.warning("held %d changes from %s (unknown table/column or clock too far ahead); "
                        "see `p2psync status`", result.held, conn.label)
        self.changed(result.vv if result.vv else None)
        self.check_behind(conn, result)
        self.check_attested(conn, result)

    async def checkpoints_for(self, site: bytes, top: int) -> tuple:
        """What our Hello tells ``site`` of its own versions (SqliteStore.checkpoints)."""
        return await self.worker.call(self.store.checkpoints, site, top)

    async def check_checkpoints(self, conn: Connection, checkpoints) -> None:
        """A peer's view of our own versions: if it differs from ours, continue under a successor."""
        after = await self.worker.call(self.store.split_point, checkpoints)
        if after is not None:
            self.continue_elsewhere(f"{conn.label} holds versions of this device's site id with other contents than "
                                    f"its database: the database and home were rolled back together (a VM "
                                    f"snapshot) or copied", after=after)

    def check_behind(self, conn: Connection, result) -> None:
        """A peer holds versions of our own site this database lacks or holds otherwise: continue under a
        successor site id after the last version we share (agent/incarnation.py)."""
        if getattr(result, "behind", None) is not None:
            self.continue_elsewhere(f"{conn.label} holds versions of this device's site id that its database "
                                    f"does not have, or has with other contents: the database and home were rolled "
                                    f"back together (a VM snapshot) or copied", after=result.behind)

    def check_attested(self, conn: Connection, result) -> None:
        """Count, log and (for what the peer sent as its own) end the session over unattested input."""
        if not (result.refused or result.cut or result.conflicts or result.bad_proofs):
            return
        refused = sum(result.refused.values())
        self.counters["changes_unattested"] = self.counters.get("changes_unattested", 0) + refused
        self.counters["ranges_cut"] = self.counters.get("ranges_cut", 0) + len(result.cut)
        self.counters["version_conflicts"] = self.counters.get("version_conflicts", 0) + result.conflicts
        if refused:
            log.warning("refused %d changes from %s that no valid signature of their origin covers, not applied "
                        "(%s)", refused, conn.label, "; ".join(result.refusals[:3]))
        for site, (claimed, kept) in result.cut.items():
            log.warning("%s claimed versions of %s up to %d, but only up to %d are signed by it; "
                        "the version vector moved no further", conn.label, self.members.who(site), claimed, kept)
        own = getattr(conn, "peer_site", None)
        if result.bad_proofs:   # every device and relay checks proofs before keeping them: only a forger sends one
            raise RemoteProtocolError("unattested", f"sent {result.bad_proofs} version proofs whose signature does "
                                                    f"not verify; connection closed")
        if own is not None and (own in result.refused or own in result.cut):
            raise RemoteProtocolError("unattested", "sent changes or versions as its own that its signature "
                                                    "does not cover; connection closed")

    # -- connections --------------------------------------------------------

    def _handshake(self, initiator: bool, attempt: int):
        """Our side of the handshake: a dialler uses one epoch's PSK (older ones on later attempts);
        a responder accepts every epoch we hold and, at an admin, the invites it can answer."""
        pro = prologue(self.device.group_id)
        if initiator:
            psk = self.group.initiator_psk(attempt)
            if psk is None:
                raise HandshakeFailed("this device holds no key of its group yet")
            return agent_handshake(True, self.device.static_private, psk, pro), [], 1
        member_psks = self.group.member_psks()[:48]
        invites = self.group.join_candidates(self.wall_ms())
        psks = member_psks + [p for p, _ in invites]
        if not psks:
            raise HandshakeFailed("this device holds no key of its group yet")
        return agent_responder(self.device.static_private, psks, pro), invites, len(member_psks)

    async def _secure(self, stream, initiator: bool, label: str, attempt: int = 0):
        """The secured stream (and the invite a joiner used, if any), or (None, None)."""
        invites = []
        try:
            hs, invites, n_members = self._handshake(initiator, attempt)
            ns = NoiseStream(stream, hs)
        except HandshakeFailed as e:
            log.warning("connection %s %s: %s; closed", "to" if initiator else "from", label, e)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return None, None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await ns.do_handshake()
            invite = None
            if not initiator and ns.psk_index is not None and ns.psk_index >= n_members:
                invite = invites[ns.psk_index - n_members][1]
            return ns, invite
        except trio.TooSlowError:
            reason = f"no complete handshake within {HANDSHAKE_TIMEOUT:g} s"
        except HandshakeFailed as e:
            reason = str(e)
        except (trio.BrokenResourceError, OSError) as e:
            reason = f"connection broke during the handshake ({e})"
        self.counters["handshake_failures"] += 1
        log.warning("connection %s %s: %s; closed", "to" if initiator else "from", label, reason)
        with trio.CancelScope(shield=True):
            await ns.aclose()
        return None, None

    async def _handle_inbound(self, stream: trio.SocketStream) -> None:
        try:
            await self._inbound(stream)
        except Exception:  # a bug must cost one connection, never the agent
            log.exception("inbound connection failed unexpectedly; closed")
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _inbound(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            label = f"{host}:{port}"
        except OSError:
            host = label = "?"
        refused = self._handshakes.enter(host, trio.current_time())
        if refused is not None:
            self._refuse(refused, host, label)
            await stream.aclose()
            return
        try:
            ns, invite = await self._secure(stream, False, label)
        finally:
            self._handshakes.leave(host)
        if ns is None:
            return
        if invite is not None:
            try:
                await self.group.serve_join(ns, invite, label)
            finally:
                with trio.CancelScope(shield=True):
                    await ns.aclose()
            return
        await self._run_link(ns, label, initiator=False)

    def _refuse(self, refused, host: str, label: str) -> None:
        """Count and log a connection refused before its handshake (a flood is logged in part, then summed)."""
        self.counters[f"handshakes_refused_{refused.code}"] += 1
        suppressed = self._refusal_log.allow(f"{refused.code} {host}", trio.current_time())
        if suppressed is not None:
            log.warning("%s; refusing connection from %s", with_suppressed(refused.text, suppressed), label)

    async def _run_link(self, ns: NoiseStream, label: str, initiator: bool) -> None:
        remote = ns.remote_static
        try:
            if remote == self.static_public:
                log.warning("connection %s leads back to this device; closed", label)
                return
            my_init = self.static_public if initiator else remote
            preferred = min(self.static_public, remote)
            old = self.links.get(remote)
            if old is None and len(self.links) >= self.config.max_peers:
                await self._refuse_full(ns, label)
                return
            if old is not None:
                if old.initiator_key == preferred and my_init != preferred:
                    log.debug("already connected to %s via %s; dropping duplicate %s", remote.hex()[:12],
                              old.address, label)
                    return
                old.scope.cancel()
            conn = Connection(ns, self, label, self.settings)
            with trio.CancelScope() as scope:
                link = Link(conn, scope, label, my_init, time.time())
                self.links[remote] = link
                log.info("connected to %s", label)
                try:
                    await conn.run()
                except NotAMember as e:
                    self.group.counters["sessions_refused"] += 1
                    log.warning("connection with %s: %s", label, e)
                except PeerClosed as e:
                    log.info("connection with %s ended: %s", label, e)
                    if "protocol error" in str(e):
                        self.counters["protocol_errors"] += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    log.info("connection with %s lost: %s", label, e or "broken")
                except Exception:  # a bug must cost one connection, never the agent
                    log.exception("connection with %s failed unexpectedly; closed", label)
                finally:   # also when cancelled from outside (shutdown, this device removed)
                    if self.links.get(remote) is link:
                        del self.links[remote]
                        if conn.peer_site is not None:
                            self.group.last_seen[conn.peer_site] = time.time()
                    link.closed.set()
        finally:
            with trio.CancelScope(shield=True):
                await ns.aclose()

    async def _refuse_full(self, ns: NoiseStream, label: str) -> None:
        """Turn away a session over ``max_peers`` (counted; logged in part when many come)."""
        self.counters["sessions_refused_full"] += 1
        text = (f"this device already holds {len(self.links)} sessions (max_peers = {self.config.max_peers}); "
                f"changes reach it through the peers it is connected to")
        suppressed = self._refusal_log.allow("max_peers", trio.current_time())
        if suppressed is not None:
            log.warning("%s; refusing %s", with_suppressed(text, suppressed), label)
        with trio.move_on_after(1):
            try:
                await ns.send_all(encode_event(Error("too-many-peers", text)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    def _first_dial_pause(self, st: DialState) -> float:
        """Seconds before the first dial of a peer just discovered: start-up does not stampede. Of two
        devices that find each other, the one with the smaller site id dials at once (with a little
        jitter) and the other a moment later, only if it was not dialled meanwhile."""
        try:
            theirs = bytes.fromhex(st.address.removeprefix("p2psync-"))
        except ValueError:
            theirs = b""
        if st.discovered and theirs and theirs < self.site_id:
            return random.uniform(1.0, 2.0)
        return random.uniform(0.0, 0.25) if st.discovered else 0.0

    def _connected_to(self, st: DialState) -> bool:
        """Whether a session with the device behind ``st`` is up (found by its site id, before any dial)."""
        site = st.address.removeprefix("p2psync-")
        return any(link.conn.peer_site is not None and link.conn.peer_site.hex() == site
                   for link in self.links.values())

    async def _dial_loop(self, st: DialState) -> None:
        """Keep a connection to the peer behind ``st``: try its addresses in turn, back off, retry.

        A discovered peer's addresses are discovery's bounded list, newest
        first (a forged advert cannot push out the address the peer was first
        seen at, see discovery/mdns.py); a failed handshake at one address
        never removes another. A dialer for a discovered peer stops after
        failing for MDNS_GIVE_UP seconds (a partitioned peer that comes back
        within that time is found again: mDNS sends no new event for it), or
        after one failed round once the peer said goodbye: anyone on the LAN
        can send a goodbye in a peer's name, so it only ends dialling a peer
        that is really unreachable, never a live one.
        """
        backoff = 0.2
        failures = 0
        failing_since = trio.current_time()
        await trio.sleep(self._first_dial_pause(st))
        while True:
            link = self.links.get(st.peer_key) if st.peer_key else None
            if link is None and st.peer_key is None and self._connected_to(st):
                # it dialled us first: wait for that session to end (its key comes with it)
                link = next(ln for ln in self.links.values()
                            if ln.conn.peer_site is not None and ln.conn.peer_site.hex() ==
                            st.address.removeprefix("p2psync-"))
                st.peer_key = ln_key = link.conn.remote_static
                link = self.links.get(ln_key)
            if link is not None:
                st.state = "connected"
                failures = 0
                await link.closed.wait()
                failing_since = trio.current_time()
                continue
            if len(self.links) >= self.config.max_peers:
                st.state = "waiting: max_peers sessions are up"
                await trio.sleep(5.0)
                continue
            giving_up = trio.current_time() - failing_since > MDNS_GIVE_UP
            if st.discovered and ((st.gone and failures) or (failures and giving_up)):
                st.state = "gone"
                log.debug("mDNS: no longer dialling %s (%s)", st.address,
                          "it said goodbye" if st.gone else f"unreachable for {MDNS_GIVE_UP:.0f} s")
                return
            st.state = "connecting"
            started = trio.current_time()
            for host, port in list(st.addresses):
                address = f"{host}:{port}"
                try:
                    stream = await dial(host, port, CONNECT_TIMEOUT)
                except OSError as e:
                    st.last_error = str(e)
                    log.debug("dial: %s", e)
                    continue
                ns, _ = await self._secure(stream, True, address, attempt=failures)
                if ns is None:
                    st.last_error = f"handshake with {address} failed"
                    continue
                st.peer_key, st.last_error = ns.remote_static, None
                st.gone = False  # it answers, whatever a goodbye in its name said
                st.state = "connected"
                await self._run_link(ns, address, initiator=True)
                st.last_error = "connection ended"
                failures = 0
                failing_since = trio.current_time()
                break
            else:
                failures += 1
            if trio.current_time() - started > 10:
                backoff = 0.2
            st.state = "backoff"
            await trio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 30.0)

    async def _discover(self) -> None:
        host, port = self.listen_address
        interfaces = list(self.config.interfaces) or (None if host in ("0.0.0.0", "") else [host])
        disc = MdnsDiscovery(self.site_id, _Tags(self.members), port, interfaces)
        async with trio.open_nursery() as n:
            n.start_soon(self._on_discovery, disc, n)
            try:
                await disc.run()
            except DiscoveryError as e:
                log.warning("%s", e)

    async def _on_discovery(self, disc: MdnsDiscovery, nursery: trio.Nursery) -> None:
        async for ev in disc:
            if isinstance(ev, PeerGone):
                log.debug("mDNS: %s said goodbye", ev.instance)
                st = self.dialers.get(ev.instance)
                if st is not None:
                    st.gone = True
                continue
            if not ev.tag_ok:
                log.debug("mDNS: %s belongs to another group; ignored", ev.instance)
                continue
            st = self.dialers.get(ev.instance)
            if st is not None and st.state != "gone":
                st.gone = False
                st.addresses = list(ev.addresses)   # discovery's bounded, current list, newest first
                continue
            log.info("mDNS: found %s at %s", ev.instance, ", ".join(f"{h}:{p}" for h, p in ev.addresses))
            st = self.dialers[ev.instance] = DialState(ev.instance, addresses=list(ev.addresses), discovered=True)
            nursery.start_soon(self._dial_loop, st)

    # -- local changes ------------------------------------------------------

    async def _stamp(self) -> bool:
        """Stamp pending local writes and tell the peers; False after an error (logged and counted, never fatal)."""
        try:
            n = await self.worker.stamp()
        except Exception as e:   # the application holding the write lock, a full disk, the clock at its limit
            self.counters["stamp_errors"] += 1
            log.error("stamping local writes failed (will retry): %s", e)
            return False
        if self.store.schema_changes != self._schema_changes:   # the schema check changed what is tracked
            self._schema_changes = self.store.schema_changes
            self.schema = self.store.schema_fingerprint()
            if await self.worker.release_held(False):        # held cells of columns tracked now
                self.changed()
            if self.links:   # a Hello carries the schema: sessions start again, so peers' status is right
                log.info("the tracked schema changed: reconnecting to %d peers so they see it", len(self.links))
                for link in list(self.links.values()):
                    link.scope.cancel()
        if n is not None:
            log.debug("stamped local writes as db version %d", n)
            if self.store.signer is None and not self._unsigned_warned:
                self._unsigned_warned = True
                log.warning("local writes are stamped but not signed: this device does not hold its group's "
                            "founding key yet; no peer accepts them until it does (an admin's agent sends it "
                            "the key when they next meet), and they are signed then")
            self.changed()
        return True

    @staticmethod
    def _stamp_retry(ok: bool, retry: float | None) -> float | None:
        """How long to wait before stamping again unasked: never after a success, else longer each time."""
        if ok:
            return None
        return STAMP_RETRY_FIRST if retry is None else min(retry * 2, STAMP_RETRY_MAX)

    async def _watch_db(self) -> None:
        with DbWatcher(self.device.db_path) as watcher:
            last = await self.worker.data_version()
            retry = self._stamp_retry(await self._stamp(), None)
            while True:
                with trio.move_on_after(math.inf if retry is None else retry) as idle:
                    await watcher.wait_changed()
                if idle.cancelled_caught:   # stamping failed and nothing was written since: try again
                    retry = self._stamp_retry(await self._stamp(), retry)
                    continue
                # The WAL file changes a moment before the commit is published in
                # the shared-memory index (whose writes inotify cannot see), so a
                # wake-up may come just before the commit is visible: look again
                # after growing pauses, starting over whenever the files change.
                step = 0
                while True:
                    dv = await self.worker.data_version()
                    if dv != last:
                        last = dv
                        retry = self._stamp_retry(await self._stamp(), retry)
                        await self.group.reload()
                        break
                    if step == len(COMMIT_VISIBLE_RETRIES):
                        break
                    with trio.move_on_after(COMMIT_VISIBLE_RETRIES[step]) as pause:
                        await watcher.wait_changed()
                    step = step + 1 if pause.cancelled_caught else 0

    async def _reconcile(self) -> None:
        """Look for writes capture did not see: at start, then every ``reconcile_interval`` if anything
        was committed since the last look (a client with triggers off changes no schema version)."""
        last = None
        while True:
            dv = await self.worker.data_version()
            if dv != last:
                try:
                    found = await self.worker.call(self.store.reconcile, wall_ms())
                except Exception as e:   # the application holding the write lock, a full disk
                    self.counters["stamp_errors"] += 1
                    log.error("looking for writes capture missed failed (will retry): %s", e)
                    found = None
                else:
                    last = await self.worker.data_version()
                if found:
                    self.changed()
            await trio.sleep(self.config.reconcile_interval)

    async def _retry_held(self) -> None:
        while True:
            await trio.sleep(HELD_RETRY_INTERVAL)
            if await self.worker.release_held(False):
                self.changed()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    # -- control ------------------------------------------------------------

    async def _control(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "status":
            return await self.status()
        if cmd == "release":
            n = await self.worker.release_held(True)
            if n:
                self.changed()
            return {"released": n}
        if cmd == "members-changed":   # the CLI wrote membership events; pick them up now
            await self.group.reload()
            return {"ok": True}
        if cmd == "devices":
            connected = {link.conn.member.site.hex() for link in self.links.values() if link.conn.member}
            return {"last_seen": {s.hex(): t for s, t in self.group.last_seen.items()}, "connected": sorted(connected)}
        return {"error": f"unknown command {cmd!r}; known: status, release, devices"}

    async def status(self) -> dict:
        vv = await self.worker.version_vector()
        held = await self.worker.held()
        now = time.time()
        peers = []
        for key, link in self.links.items():
            peers.append({"address": link.address, "state": "connected", "key": key.hex()[:16],
                          "name": self.members.name_of(link.conn.member.site) if link.conn.member else None,
                          "connected_for_s": round(now - link.since, 1),
                          "schema_differs": link.conn.peer_schema not in (None, self.schema), **link.conn.status(vv)})
        for name, st in self.dialers.items():
            if st.state not in ("connected", "gone") and st.peer_key not in self.links:
                peers.append({"address": name, "state": st.state, "last_error": st.last_error})
        if self.relay_state is not None:
            peers.append(relay_status(self.relay_state, vv))
        counters = dict(self.counters)
        counters["relay_rejected_changes"] = self.relay_state.rejected if self.relay_state else 0
        return {
            "device": {"name": self.device.name, "site": self.site_id.hex(), "db": str(self.device.db_path)},
            "group": self.device.group_id.hex(),
            "state": "removed" if self.removed else "syncing",
            "incarnation": self.incarnation_notice,
            "membership": self.group.status(vv),
            "listen": f"{self.listen_address[0]}:{self.listen_address[1]}" if self.listen_address else None,
            "version_vector": {s.hex(): n for s, n in vv.items()},
            "tracked": [s.name for s in self.store.tracked()],
            "peers": peers,
            "held": {"count": len(held), "reasons": _count(h.reason for h in held),
                     "paused": [p.advice(self.members.who(p.site)) for p in await self.worker.held_pauses()]},
            "counters": counters,
            "authenticity": await self._authenticity(),
            "capture": await self.worker.call(self.store.capture_state),
        }

    async def _authenticity(self) -> dict:
        """What was refused for want of a valid signature, and versions signed twice (a clone or rollback)."""
        conflicts = await self.worker.call(self.store.version_conflicts)
        by_site: dict[bytes, list[int]] = {}
        for s, d in conflicts:
            m = self.members.state.member(s) if self.members.state else None
            if m is not None and m.state == "succeeded":
                continue   # that device continued under a new site id: resolved (agent/incarnation.py)
            by_site.setdefault(s, []).append(d)
        notices = [f"{self.members.who(s)} signed two different contents for db version"
                   f"{'s' if len(ds) > 1 else ''} {', '.join(map(str, ds[:5]))}{' ...' if len(ds) > 5 else ''}: "
                   f"a copy of that device (a cloned disk, a restored backup or a rolled-back VM) is running "
                   f"under its site id; sync of those versions is stopped -- see README 'Backups'"
                   for s, ds in sorted(by_site.items())]
        return {"signing": self.store.signer is not None,
                "changes_refused": self.counters.get("changes_unattested", 0),
                "ranges_cut": self.counters.get("ranges_cut", 0),
                "conflicts": notices}

    # -- lifecycle ----------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host, port = self.config.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.listen_address = listeners[0].socket.getsockname()[:2]
        signed = await self.worker.call(self.store.sign_versions)   # what a tool stamped while we were not running
        if signed:
            log.info("signed %d versions stamped while the agent was not running", signed)
        async with trio.open_nursery() as n:
            n.start_soon(trio.serve_listeners, self._handle_inbound, listeners)
            await n.start(serve_control, self.device.home / "agent.sock", self._control)
            n.start_soon(self._watch_db)
            n.start_soon(self._retry_held)
            n.start_soon(self._reconcile)
            if self.config.relay:
                h, p = self.config.relay
                self.relay_state = RelayState(f"{h}:{p}")
            n.start_soon(self._sync)
            n.start_soon(self._watchdog)
            log.info("agent %s listening on %s:%d, %d static peers", self.device.name,
                     *self.listen_address, len(self.config.peers))
            self.notifier.ready(f"listening on {self.listen_address[0]}:{self.listen_address[1]}")
            task_status.started(self.listen_address)

    async def _sync(self) -> None:
        """Dialers, the relay session and discovery: everything that reaches out to peers."""
        if self.members.removed_self() is not None:
            self.stop_syncing(self.group.removal_text())
            return
        if self.members.keys is None or self.members.keys.current is None:
            log.warning("this device holds no key of its group's current epoch yet; an admin's agent sends it "
                        "one when they next meet")
        with self._sync_scope:
            async with trio.open_nursery() as n:
                for h, p in self.config.peers:
                    st = self.dialers[f"{h}:{p}"] = DialState(f"{h}:{p}", addresses=[(h, p)])
                    n.start_soon(self._dial_loop, st)
                if self.relay_state is not None:
                    h, p = self.config.relay
                    n.start_soon(keep_relay_session, self, h, p, self.relay_state)
                if self.config.mdns:
                    n.start_soon(self._discover)
        for st in self.dialers.values():
            st.state = "stopped"
        if self.relay_state is not None:
            self.relay_state.state = "stopped"

    def close(self) -> None:
        self.store.close()


class _Tags:
    """The group's mDNS tags as discovery needs them, from the current keys."""

    def __init__(self, members):
        self.members = members

    def mdns_tag(self, day: int) -> str:
        ring = self.members.keys
        return ring.all[0].mdns_tag(day) if ring is not None and ring.all else "0" * 16

    def mdns_tags(self, day: int) -> set[str]:
        ring = self.members.keys
        return ring.mdns_tags(day) if ring is not None else set()

    def tag_keys(self) -> list[bytes]:
        ring = self.members.keys
        return [k.tag_key() for k in ring.all] if ring is not None else []


def _count(items) -> dict:
    out: dict = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def run_agent(device: Device, config: Config) -> int:
    """Run the agent until SIGTERM/SIGINT; the process exit status."""
    setup_logging(config.log_level)
    from .incarnation import ensure_incarnation
    # Batches create ~300k short-lived objects per 100k changes; the default
    # gen-0 threshold makes the collector rescan them over and over.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    reason = after = None
    while True:
        device, notice = ensure_incarnation(device, reason, after)   # before anything is sent (agent/incarnation.py)
        agent = Agent(device, config)
        agent.incarnation_notice = notice

        async def main():
            async with trio.open_nursery() as n:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    await n.start(agent.run)
                    agent.on_continue = n.cancel_scope.cancel
                    if agent.continue_reason is not None:   # decided while starting
                        n.cancel_scope.cancel()
                    async for sig in signals:
                        log.info("%s received: closing connections", signal.Signals(sig).name)
                        agent.notifier.stopping()
                        n.cancel_scope.cancel()
                        break

        try:
            trio.run(main)
        finally:
            agent.close()
        if agent.continue_reason is None:
            break
        reason, after = agent.continue_reason, agent.continue_after   # continue under a successor
        log.warning("restarting as a new site id: %s", reason)
    log.info("agent stopped")
    return 0
