"""A hostile-peer harness: raw sessions to an agent or a relay, built from the project's own Noise and
protocol code, as a member (with a real member's keys), a removed device, or a stranger.

``open_session`` runs the Noise handshake as a device would and, unless told not to, the membership
exchange (heads, then whole logs if they differ), so a test can send whatever it likes next and
read what the other side answers; tests/wire.py reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio

from groups import device_members
from p2psync.identity import load_device
from p2psync.model.membership import encode_event as encode_member_event
from p2psync.net.noise_stream import NoiseStream
from p2psync.noise import agent_handshake
from p2psync.protocol import Error, FrameDecoder, Members, encode_event
from p2psync.protocol.prologue import device_prologue
from p2psync.identity import day_number
from p2psync.protocol.relay_preamble import day_ref, preamble, relay_prologue


@dataclass
class Identity:
    """What a device holds: its keys and its copy of the membership log (read from its home)."""

    site: bytes
    static_private: bytes
    group_id: bytes
    psk: bytes            # its current epoch's Noise PSK
    relay_psk: bytes
    heads: tuple
    events: tuple         # encoded membership events

    @classmethod
    def of(cls, home) -> Identity:
        device = load_device(home)
        m = device_members(home)
        epoch = m.keys.current or m.keys.all[0]     # a removed device still holds its old epochs
        return cls(device.site_id, device.static_private, device.group_id, epoch.psk(), m.keys.relay_psk,
                   m.heads, tuple(m.encoded()))


def signer_of(home):
    """The Signer a device's agent signs its versions with (its key, its group's cell key)."""
    from p2psync.group.attestation import Attestation
    att = Attestation(device_members(home), load_device(home).sign_private)
    assert att.refresh(), "the device holds no founding secret"
    return att.signer


def signed(home, changes, ranges=(), dbv: int | None = None):
    """A Batch of ``changes`` (all of one version of the device in ``home``) with that device's
    signature over them, as its agent would send it; ``ranges`` as given."""
    from p2psync.model import Batch
    signer = signer_of(home)
    d = dbv if dbv is not None else changes[0].dbv
    proof = signer.sign(d, max(c.hlc for c in changes), [x for c in changes for x in signer.leaves(c)])
    return Batch(tuple(changes), tuple(ranges), (proof.without_leaves(),))


async def open_session(who: Identity, host: str, port: int, *, relay: bool = False, exchange: bool = True,
                       psk: bytes | None = None, timeout: float = 15) -> tuple[NoiseStream, bytes]:
    """A handshaken session as ``who`` (and its membership exchange); also the bytes read past it."""
    stream = await trio.open_tcp_stream(host, port)
    if relay:
        ref = day_ref(who.relay_psk, day_number(time.time()))
        await stream.send_all(preamble(ref))
        hs = agent_handshake(True, who.static_private, psk or who.relay_psk, relay_prologue(ref))
    else:
        hs = agent_handshake(True, who.static_private, psk or who.psk, device_prologue(who.group_id))
    ns = NoiseStream(stream, hs)
    try:
        with trio.fail_after(timeout):
            await ns.do_handshake()
            extra = b""
            if exchange:
                extra = await exchange_members(ns, who)
    except BaseException:
        await ns.aclose()
        raise
    return ns, extra


async def exchange_members(ns, who: Identity) -> bytes:
    """Our side of the membership exchange; returns the bytes received past the peer's last Members."""
    dec = FrameDecoder()
    await ns.send_all(encode_event(Members(who.heads, ())))
    theirs = await _next_members(ns, dec)
    if tuple(theirs.heads) != tuple(who.heads):
        await ns.send_all(encode_event(Members(who.heads, who.events)))
        await _next_members(ns, dec)
    return bytes(dec._buf[dec._pos:])


async def _next_members(ns, dec: FrameDecoder) -> Members:
    while True:
        ev = dec.next_frame()
        if ev is None:
            data = await ns.receive_some(65536)
            if not data:
                raise EOFError("closed during the membership exchange")
            dec.feed(data)
            continue
        if type(ev) is Members:
            return ev
        if type(ev) is Error:
            raise EOFError(f"refused: {ev.code}: {ev.message}")


__all__ = ["Identity", "open_session", "exchange_members", "encode_member_event", "signer_of", "signed"]
