"""The joining side of ``protocol.join``: find an admin, prove the invite, receive the membership log."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..identity.home import DeviceKeys
from ..identity.invites import InviteCode
from ..noise import agent_handshake
from ..protocol.join import JoinReply, JoinRequest, decode_reply, encode_request, signed_part
from ..protocol.prologue import device_prologue
from .connection import dial
from .join_io import receive_frame
from .noise_stream import HandshakeFailed, NoiseStream

log = logging.getLogger("p2psync.join")

CONNECT_TIMEOUT = 3.0
EXCHANGE_TIMEOUT = 15.0
RETRY_PAUSE = 1.0


class JoinFailed(Exception):
    """No admin admitted this device; the message says why."""


async def ask_to_join(code: InviteCode, keys: DeviceKeys, name: str, addresses: list[tuple[str, int]],
                      timeout: float, progress: Callable[[str], None]) -> JoinReply:
    """Try ``addresses`` in turn until an admin answers (admitted or refused) or ``timeout`` s pass."""
    if not addresses:
        raise JoinFailed("the invite code names no admin address; ask the admin for `p2psync invite --address "
                         "HOST:PORT`, or pass --admin HOST:PORT")
    last = "no admin answered"
    with trio.move_on_after(timeout):
        attempt = 0
        while True:
            attempt += 1
            for host, port in addresses:
                progress(f"contacting an admin at {host}:{port} (attempt {attempt})")
                try:
                    reply = await _try(code, keys, name, host, port)
                except (OSError, HandshakeFailed, trio.BrokenResourceError, trio.TooSlowError, EOFError,
                        ValueError) as e:
                    last = f"{host}:{port}: {e or type(e).__name__}"
                    log.debug("join: %s", last)
                    continue
                return reply
            await trio.sleep(RETRY_PAUSE)
    raise JoinFailed(f"no admin admitted this device within {timeout:g} s (last: {last}); is an admin's "
                     f"agent running and reachable? A used, expired or cancelled code is refused with a reason")


async def _try(code: InviteCode, keys: DeviceKeys, name: str, host: str, port: int) -> JoinReply:
    stream = await dial(host, port, CONNECT_TIMEOUT)
    ns = NoiseStream(stream, agent_handshake(True, keys.static_private, code.psk, device_prologue(code.group_id)))
    try:
        with trio.fail_after(EXCHANGE_TIMEOUT):
            try:
                await ns.do_handshake()
            except HandshakeFailed as e:
                raise HandshakeFailed(f"the device there does not accept this invite ({e}); it may not be an "
                                      f"admin of this group, or the code is older than what it remembers") from e
            sig = Ed25519PrivateKey.from_private_bytes(keys.sign_private).sign(
                signed_part(ns.handshake_hash, keys.site_id))
            await ns.send_all(encode_request(JoinRequest(keys.site_id, keys.sign_public, name, sig)))
            return decode_reply(await receive_frame(ns))
    finally:
        with trio.CancelScope(shield=True):
            await ns.aclose()
