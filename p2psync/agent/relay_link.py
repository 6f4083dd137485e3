"""The device's session with a relay: the same sync session, sealed on the way out, opened on the way in.

How this works: the agent keeps one session to the relay next to its LAN
peers. It dials, sends the preamble naming its group (by today's ref of its
relay token, which changes every UTC day), and runs the Noise handshake with
the relay token as pre-shared key.
The session is an ordinary ``net.Connection`` whose store worker seals every
outgoing batch (``sync.sealing``) and opens every incoming one: a relay-
served change that fails authentication is counted, logged and left out
(with its site's range, so the device asks again later and an honest peer
can still bring it), and the rest of the batch applies in one transaction
as usual. Changes from the relay wake the LAN sessions and local changes wake
the relay session, through the agent's one ChangeBus. A relay that is full
says so (Error ``relay-busy``, "relay busy, retry in N s"): the state shows
``busy`` with its message and the next dial waits those N s (plus up to half
again, so a crowd of devices does not come back at once) instead of the
usual backoff.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, replace

import trio

from ..group import Admission
from ..net.connection import Connection, NotAMember, PeerClosed, dial
from ..net.noise_stream import HandshakeFailed, NoiseStream
from ..net.store_worker import StoreWorker, wall_ms
from ..noise import agent_handshake
from ..identity import day_number
from ..protocol.relay_preamble import day_ref, preamble, relay_prologue
from ..store import StoreError
from ..sync.sealing import Sealer, split_parts

log = logging.getLogger("p2psync.relay")

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
# Batches to a relay are bigger than between devices: each one costs the relay
# a Postgres transaction (with its fsync), so fewer is faster. (Batches from
# the relay stay small: each one is a SQLite transaction here.)
RELAY_BATCH_CHANGES = 20_000
RELAY_BATCH_BYTES = 4 << 20
PART_CHANGES = 20_000          # sealed changes per BatchEvent part
PART_BYTES = 4 << 20           # sealed bytes per BatchEvent part (frames may be 16 MiB)
BUSY_DEFAULT = 10.0            # s to wait after relay-busy when the relay names no time
BUSY_MAX = 600.0               # s at most, whatever the relay says
_BUSY = re.compile(r"peer reported an error: relay-busy: (?P<message>.*)", re.S)
_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?) s")


@dataclass
class RelayState:
    """What the agent knows about its relay session (shown by `p2psync status`)."""

    address: str
    state: str = "starting"
    last_error: str | None = None
    conn: Connection | None = None
    since: float = 0.0
    rejected: int = 0
    last_rejection: str | None = None
    busy_for: float | None = None      # s the relay asked us to wait before the next try (relay-busy)


class SealingWorker:
    """The device's store as the relay session sees it."""

    def __init__(self, worker: StoreWorker, sealer: Sealer, state: RelayState):
        self.worker, self.sealer, self.state = worker, sealer, state

    async def version_vector(self):
        return await self.worker.version_vector()

    async def prepare(self, batch):
        """The plaintext batch behind a sealed one, without what failed authentication (counted, logged)."""
        opened = await trio.to_thread.run_sync(self.sealer.open_batch, batch)
        if opened.rejected:
            self.state.rejected += opened.rejected
            self.state.last_rejection = opened.reasons[0]
            log.warning("rejected %d changes from the relay that failed authentication (%s); not applied",
                        opened.rejected, "; ".join(sorted(set(opened.reasons))))
        return opened.batch

    async def apply(self, batch, *, validated: bool = False):
        """Apply a batch that ``prepare`` opened (and checked, change by change)."""
        return await self.worker.apply(batch, validated=True)

    async def batches(self, vv, max_changes: int, max_bytes: int):
        async for batch, more in self.worker.batches(vv, max_changes, max_bytes):
            sealed = await trio.to_thread.run_sync(self.sealer.seal_changes, batch.changes)
            for part in split_parts(sealed, batch.ranges, more, PART_CHANGES, PART_BYTES, batch.proofs):
                yield part


class RelayContext:
    """The agent, as a Connection to the relay needs it."""

    check_schema = False  # the relay has no schema of its own

    def __init__(self, agent, state: RelayState):
        self.agent, self.state = agent, state
        self.site_id, self.schema, self.bus = agent.site_id, agent.schema, agent.bus
        self.members = agent.members
        ring = lambda: agent.members.keys  # noqa: E731 - the ring changes when the log does
        sealer = Sealer(lambda: ring().current if ring() else None,
                        lambda kid: ring().by_key_id.get(kid) if ring() else None)
        self.worker = SealingWorker(agent.worker, sealer, state)
        self.eager_sites = agent.eager_sites   # our own writes go to the relay at once; others' after a delay

    wall_ms = staticmethod(wall_ms)

    async def holdings(self):
        return await self.agent.holdings()

    def admit(self, conn: Connection):
        """The relay is not a member: it proved the group's relay PSK and admits us by our key."""
        return Admission(None)

    def screen(self, conn: Connection, batch):
        return self.agent.screen(conn, batch)

    async def on_members(self, conn: Connection, events) -> None:
        await self.agent.on_members(conn, events)

    def on_hello(self, conn: Connection, hello) -> None:
        log.info("%s says hello", conn.label)

    def on_applied(self, conn: Connection, batch, result) -> None:
        self.agent.on_applied(conn, batch, result)


async def keep_relay_session(agent, host: str, port: int, state: RelayState) -> None:
    """Keep a session with the relay at host:port: dial, back off, retry, forever."""
    address = f"{host}:{port}"
    backoff = 0.2
    while True:
        ring = agent.members.keys
        token = ring.relay_psk if ring is not None else None
        if token is None:
            state.state, state.last_error = "waiting", "this device holds no key of its group yet"
            await trio.sleep(5)
            continue
        ref = day_ref(token, day_number(time.time()))
        state.state = "connecting"
        started = trio.current_time()
        try:
            stream = await dial(host, port, CONNECT_TIMEOUT)
        except OSError as e:
            state.last_error = str(e)
            log.debug("relay: %s", e)
        else:
            ns = NoiseStream(stream, agent_handshake(True, agent.device.static_private, token, relay_prologue(ref)))
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await stream.send_all(preamble(ref))
                    await ns.do_handshake()
            except (trio.TooSlowError, HandshakeFailed, trio.BrokenResourceError, OSError) as e:
                state.last_error = (f"relay {address} refused us or is not a relay for this group "
                                    f"({type(e).__name__}: {e or 'timed out'}); has it admitted our relay token?")
                log.warning("relay: %s", state.last_error)
                with trio.CancelScope(shield=True):
                    await ns.aclose()
            else:
                state.busy_for = None
                await _run_session(agent, ns, address, state)
                if state.busy_for is not None:
                    state.state = "busy"
                    await trio.sleep(state.busy_for * random.uniform(1.0, 1.5))
                    backoff = 0.2
                    continue
                if trio.current_time() - started > 10:
                    backoff = 0.2
        state.state = "backoff"
        await trio.sleep(backoff * random.uniform(0.5, 1.5))
        backoff = min(backoff * 2, 30.0)


async def _run_session(agent, ns: NoiseStream, address: str, state: RelayState) -> None:
    settings = replace(agent.settings, max_changes=RELAY_BATCH_CHANGES, max_bytes=RELAY_BATCH_BYTES)  # what we send
    conn = Connection(ns, RelayContext(agent, state), f"relay {address}", settings)
    state.conn, state.state, state.last_error, state.since = conn, "connected", None, trio.current_time()
    log.info("connected to relay %s", address)
    try:
        await conn.run()
    except NotAMember as e:
        state.last_error = f"refused: {e}"
        log.warning("relay %s: %s", address, e)
    except PeerClosed as e:
        state.last_error = f"session ended: {e}"
        busy = relay_busy(str(e))
        if busy is not None:
            state.busy_for, message = busy
            state.last_error = f"relay {address} is busy: {message}"
            log.warning("relay %s is busy; trying again in %g s (it said: %s)", address, state.busy_for, message)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        state.last_error = f"session lost: {e or 'broken'}"
    except StoreError as e:
        state.last_error = f"store error: {e}"
    except Exception:  # a bug must cost one session, never the agent
        log.exception("relay session with %s failed unexpectedly; closed", address)
        state.last_error = "internal error (see log)"
    finally:
        state.conn = None
        log.info("relay %s: %s", address, state.last_error or "session closed")
        with trio.CancelScope(shield=True):
            await ns.aclose()


def relay_busy(reason: str) -> tuple[float, str] | None:
    """(seconds to wait, the relay's message) if a session ended because the relay said it is busy, else None."""
    m = _BUSY.search(reason)
    if m is None:
        return None
    message = m.group("message").strip()
    n = _RETRY_IN.search(message)
    return min(float(n.group(1)) if n else BUSY_DEFAULT, BUSY_MAX), message


def relay_status(state: RelayState, vv) -> dict:
    """The relay's entry in `p2psync status`."""
    c = state.conn
    out = {"address": state.address, "relay": True, "state": state.state if c is None else "connected",
           "rejected_changes": state.rejected}
    if state.last_rejection:
        out["last_rejection"] = state.last_rejection
    if c is None:
        out["last_error"] = state.last_error
        return out
    out["connected_for_s"] = round(trio.current_time() - state.since, 1)
    out.update(c.status(vv))
    return out
