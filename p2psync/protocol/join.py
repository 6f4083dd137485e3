"""The join exchange: a new device asks an admin to admit it, over a Noise session keyed by an invite.

How this works (sans-IO: frames in, messages out). The joining device dials
an admin and runs the usual ``XXpsk0`` handshake with the invite's PSK
(derived from the code's one-time secret) instead of an epoch PSK; the
admin's responder accepts invite PSKs next to its epoch PSKs. Then one
request and one reply, each a frame of a 4-byte length and a msgpack body:

    JoinRequest  [1, site id, signing public key, name, signature]
    JoinReply    [1, ok, message, [encoded membership event, ...]]

The signature is the joiner's Ed25519 signature over the handshake hash and
its site id, so the admin knows the joiner holds the signing key it names
and that the request belongs to this session. The static key is the one
the handshake authenticated. On success the reply carries the whole
membership log, with the joiner's add event and a share of the epoch
secrets sealed to its static key.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from .limits import MAX_MEMBER_EVENT_BYTES, MAX_MEMBER_EVENTS, SITE_ID_LEN

JOIN_VERSION = 1
MAX_JOIN_FRAME = 16 * 1024 * 1024
MAX_NAME_LEN = 64
SIGN_PREFIX = b"p2psync join request v1\x00"


class JoinProtocolError(ValueError):
    """A join message is malformed; the message says how."""


@dataclass(frozen=True)
class JoinRequest:
    site: bytes
    sign_pub: bytes
    name: str
    signature: bytes


@dataclass(frozen=True)
class JoinReply:
    ok: bool
    message: str
    events: tuple[bytes, ...] = ()


def signed_part(handshake_hash: bytes, site: bytes) -> bytes:
    """What the joiner signs."""
    return SIGN_PREFIX + handshake_hash + site


def encode_request(r: JoinRequest) -> bytes:
    return _frame([JOIN_VERSION, r.site, r.sign_pub, r.name, r.signature])


def encode_reply(r: JoinReply) -> bytes:
    return _frame([JOIN_VERSION, r.ok, r.message[:2000], list(r.events)])


def _frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_JOIN_FRAME:
        raise JoinProtocolError(f"join message of {len(body)} bytes is over the limit {MAX_JOIN_FRAME}")
    return len(body).to_bytes(4, "big") + body


def frame_length(header: bytes) -> int:
    """The body length in a 4-byte header; JoinProtocolError if over the limit."""
    n = int.from_bytes(header, "big")
    if n > MAX_JOIN_FRAME:
        raise JoinProtocolError(f"peer announced a join message of {n} bytes (limit {MAX_JOIN_FRAME})")
    return n


def _unpack(body: bytes):
    try:
        return msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True, max_array_len=MAX_MEMBER_EVENTS,
                               max_bin_len=MAX_MEMBER_EVENT_BYTES, max_str_len=4096, max_map_len=0, max_ext_len=0)
    except Exception as e:
        raise JoinProtocolError(f"join message is not valid msgpack ({type(e).__name__})") from None


def decode_request(body: bytes) -> JoinRequest:
    obj = _unpack(body)
    if type(obj) is not tuple or len(obj) != 5 or obj[0] != JOIN_VERSION:
        raise JoinProtocolError("not a join request of this p2psync version")
    _, site, sign_pub, name, sig = obj
    if type(site) is not bytes or len(site) != SITE_ID_LEN:
        raise JoinProtocolError("join request: site id must be 16 bytes")
    if type(sign_pub) is not bytes or len(sign_pub) != 32:
        raise JoinProtocolError("join request: signing key must be 32 bytes")
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN or not name.isprintable():
        raise JoinProtocolError(f"join request: name must be 1..{MAX_NAME_LEN} printable characters")
    if type(sig) is not bytes or len(sig) != 64:
        raise JoinProtocolError("join request: signature must be 64 bytes")
    return JoinRequest(site, sign_pub, name, sig)


def decode_reply(body: bytes) -> JoinReply:
    obj = _unpack(body)
    if type(obj) is not tuple or len(obj) != 4 or obj[0] != JOIN_VERSION:
        raise JoinProtocolError("not a join reply of this p2psync version")
    _, ok, message, events = obj
    if type(ok) is not bool or type(message) is not str or type(events) is not tuple:
        raise JoinProtocolError("join reply: malformed fields")
    if any(type(e) is not bytes for e in events):
        raise JoinProtocolError("join reply: events must be byte strings")
    return JoinReply(ok, message, events)
