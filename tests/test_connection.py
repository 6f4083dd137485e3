"""net.Connection in-process, over an in-memory stream: what a peer sent before closing is applied."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from p2psync.model import Batch, Change, Range, VersionVector
from p2psync.net.bus import ChangeBus
from p2psync.net.connection import Connection, PeerClosed, SyncSettings
from p2psync.protocol import PROTOCOL_VERSION, BatchEvent, Hello, Members, encode_event
from p2psync.store import ApplyResult

from groups import make_group


class SlowWorker:
    """A store that takes its time to apply, and remembers what it applied."""

    def __init__(self):
        self.applied: list[Batch] = []

    async def version_vector(self):
        return VersionVector()

    async def apply(self, batch, validated=False):
        await trio.sleep(0.2)
        self.applied.append(batch)
        return ApplyResult()

    async def batches(self, vv, max_changes, max_bytes):
        return
        yield


KEYS, MEMBERS = make_group(2)


class Ctx:
    check_schema, schema = False, b""

    def __init__(self):
        self.site_id, self.bus, self.worker = KEYS[0].site_id, ChangeBus(), SlowWorker()
        self.members = MEMBERS[0]

    def admit(self, conn):
        return self.members.admit(conn.remote_static)

    def screen(self, conn, batch):
        return batch

    async def on_members(self, conn, decoded):
        self.members.take(decoded)

    @staticmethod
    def wall_ms():
        return int(time.time() * 1000)

    def on_hello(self, conn, hello):
        pass

    def on_applied(self, conn, batch, result):
        pass


@pytest.mark.parametrize("close", ["send_eof", "aclose"])
def test_batches_sent_just_before_the_peer_closes_are_applied(close):
    """The peer sends three batches and hangs up before our first apply has finished: all three apply."""
    ctx, site = Ctx(), KEYS[1].site_id
    batches = [Batch((Change("t", (i,), site, i, 1 << 20, True, ("v",), (i,)),), (Range(site, i - 1, i),))
               for i in (1, 2, 3)]
    outcome = []

    async def ours_side(conn):
        try:
            await conn.run()
        except PeerClosed as e:
            outcome.append(e)

    async def main():
        ours, theirs = trio.testing.memory_stream_pair()
        conn = Connection(ours, ctx, "peer", SyncSettings(), remote_static=KEYS[1].static_public)
        async with trio.open_nursery() as n:
            n.start_soon(ours_side, conn)
            await theirs.send_all(encode_event(Members(MEMBERS[1].heads, ())))
            await theirs.receive_some()  # our Members heads, then our Hello
            await theirs.send_all(encode_event(Hello(PROTOCOL_VERSION, site, b"", Ctx.wall_ms(), VersionVector())))
            for seq, b in enumerate(batches, 1):
                await theirs.send_all(encode_event(BatchEvent(seq, b, False)))
            await getattr(theirs, close)()

    trio.run(main)
    assert ctx.worker.applied == batches
    assert len(outcome) == 1 and "peer closed" in str(outcome[0])
