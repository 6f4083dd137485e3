"""Light devices for relay scale tests and the relay-scale benchmark: many device sessions in one process.

Each is a real ``net.Connection`` over a real Noise session to the relay (the preamble of the day, the
relay PSK, the device's own static key), with a real member's keys from an in-memory group
(``groups.make_group``) and versions it signs as an agent would. What it lacks is a SQLite store: it
keeps only its version vector and when each version arrived (for latency), and its writes are one-change
versions of a plain table (the relay stores changes as given; sealing is the devices' business).
"""

from __future__ import annotations

import time

import trio

from groups import make_group
from p2psync.group import Admission
from p2psync.identity import day_number
from p2psync.model import Batch, Change, Range, VersionVector
from p2psync.model.attest import Signer, cell_key
from p2psync.net.bus import ChangeBus
from p2psync.net.connection import Connection, SyncSettings
from p2psync.net.noise_stream import NoiseStream
from p2psync.net.store_worker import wall_ms
from p2psync.noise import agent_handshake
from p2psync.protocol.relay_preamble import day_ref, preamble, relay_prologue
from p2psync.store import ApplyResult


def admission_token(members) -> str:
    """The `p2psync relay-token` of an in-memory group (what --allow-group takes)."""
    return (members.state.group + members.found + members.keys.relay_psk).hex()


class LightGroup:
    """An in-memory group of ``n`` light devices (the first its founding admin)."""

    def __init__(self, n: int):
        self.keys, self.members = make_group(n)
        self.token = admission_token(self.members[0])
        self.devices = [LightDevice(k, m, f"d{i}") for i, (k, m) in enumerate(zip(self.keys, self.members))]


class _Worker:
    def __init__(self, dev: LightDevice):
        self.dev = dev

    async def version_vector(self):
        return self.dev.vv

    async def apply(self, batch, *, validated: bool = False):
        d = self.dev
        now = time.monotonic()
        vv = d.vv
        for r in batch.ranges:
            if vv[r.site] >= r.lo and r.hi > vv[r.site]:
                for dbv in range(vv[r.site] + 1, r.hi + 1):
                    d.arrived.setdefault((r.site, dbv), now)
                vv = vv.with_entry(r.site, r.hi)
        d.vv = vv
        d.changes_received += len(batch.changes)
        d.news.notify()
        return ApplyResult(cells_won=len(batch.changes), vv=vv)

    async def batches(self, vv, max_changes, max_bytes):
        for b in list(self.dev.own):
            if b.ranges[0].lo >= vv[self.dev.site]:
                yield b, False


class LightDevice:
    """One device of a LightGroup: a session with a relay, and writes of its own."""

    def __init__(self, keys, members, name: str):
        self.keys, self.members, self.name = keys, members, name
        self.site = keys.site_id
        self.vv = VersionVector()
        self.own: list[Batch] = []
        self.arrived: dict[tuple[bytes, int], float] = {}
        self.changes_received = 0
        self.bus = ChangeBus()        # our writes, for the session's sender
        self.news = ChangeBus()       # batches received, for whoever waits on them
        self.sessions = 0             # sessions opened (a reconnection shows as a second one)
        self.conn: Connection | None = None
        self.ended: str | None = None  # why the last session ended
        group = members.state.group
        self.signer = Signer(group, self.site, keys.sign_private, cell_key(group, members.keys.secrets[members.found]))
        # the Connection's ctx
        self.check_schema, self.schema, self.site_id, self.worker = False, b"light", self.site, _Worker(self)
        self.wall_ms = wall_ms

    # -- ctx -----------------------------------------------------------------------

    def admit(self, conn):
        return Admission(None)

    def screen(self, conn, batch):
        return batch

    async def on_members(self, conn, events):
        self.members.take(events)

    def on_hello(self, conn, hello):
        pass

    def on_applied(self, conn, batch, result):
        pass

    # -- use -----------------------------------------------------------------------

    def write(self, value: str) -> tuple[bytes, int]:
        """Stamp a one-change version (signed) for the relay; its (site, dbv)."""
        dbv = self.vv[self.site] + 1
        hlc = (int(time.time() * 1000) << 16) + dbv
        c = Change("t", (f"{self.name}-{dbv}",), self.site, dbv, hlc, True, ("v",), (value,))
        proof = self.signer.sign(dbv, hlc, list(self.signer.leaves(c))).without_leaves()
        self.own.append(Batch((c,), (Range(self.site, dbv - 1, dbv),), (proof,)))
        self.vv = self.vv.with_entry(self.site, dbv)
        self.bus.notify()
        return self.site, dbv

    def has(self, site: bytes, dbv: int) -> bool:
        return self.vv[site] >= dbv

    async def session(self, host: str, port: int, source: str | None = None, *,
                      settings: SyncSettings | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """One session with the relay until it ends (``ended`` says why); started once the handshake is done."""
        token = self.members.keys.relay_psk
        ref = day_ref(token, day_number(time.time()))
        stream = await trio.open_tcp_stream(host, port, local_address=source)
        try:
            await stream.send_all(preamble(ref))
            ns = NoiseStream(stream, agent_handshake(True, self.keys.static_private, token, relay_prologue(ref)))
            with trio.fail_after(30):
                await ns.do_handshake()
        except BaseException:
            await stream.aclose()
            raise
        self.sessions += 1
        self.ended = None
        self.conn = Connection(ns, self, f"relay (as {self.name})", settings or SyncSettings())
        task_status.started()
        try:
            await self.conn.run()
        except Exception as e:   # PeerClosed and friends: the reason is what tests look at
            self.ended = str(e) or type(e).__name__
        else:
            self.ended = "closed"
        finally:
            self.conn = None
            with trio.CancelScope(shield=True):
                await ns.aclose()

    @property
    def connected(self) -> bool:
        """Past the membership exchange and the relay's Hello."""
        c = self.conn
        return c is not None and c.peer is not None


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    with trio.move_on_after(timeout) as scope:
        while not predicate():
            await trio.sleep(interval)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


__all__ = ["LightGroup", "LightDevice", "admission_token", "wait_for"]
