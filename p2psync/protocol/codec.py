"""The frame codec: events to bytes and bytes to events.

How this works: a frame is a 4-byte big-endian body length followed by a
msgpack body ``[type, field, ...]``. ``FrameDecoder`` reads the length as
soon as its 4 bytes are in and refuses one over ``MAX_FRAME`` at once, before
buffering any of the body. A complete body is unpacked with every msgpack
size limit set, then each field is checked for type and range (a bool is not
an int; ints are in [0, 2^63); byte strings have their exact lengths), and
model objects are built. The work is bounded as it is done: a body of
``LARGE_FRAME`` bytes or more has its objects counted as each array or map is
completed, and unpacking stops past ``MAX_FRAME_OBJECTS`` ("frame-objects")
or at the first map outside a Hello (only a Hello's version vector is a map;
an empty map is one byte on the wire and 64 in memory). A smaller body
cannot hold more objects than it has bytes. The counting hooks are Python
calls, so a worker thread decoding a large frame lets go of the GIL between
them. Anything wrong is ``LocalProtocolError("bad-frame")`` (or
"frame-objects"; the session turns it into a RemoteProtocolError). ``encode_event`` applies
the same checks to outgoing events, so we never send what a peer would refuse.

Batch bodies use the column-wise layout of ``batchwire``.
"""

from __future__ import annotations

import re
from typing import NoReturn

import msgpack

from ..model import VersionVector
from .batchwire import WireError, batch_from_wire, batch_to_wire, check_value_lengths
from .errors import LocalProtocolError, describe
from .events import Ack, BatchEvent, Error, Event, Have, Hello, Members, Ping, Pong, event_name
from .limits import (
    FRAME_HEADER_LEN, LARGE_FRAME, MAX_ARRAY_LEN, MAX_BIN_LEN, MAX_ERROR_CODE_LEN, MAX_ERROR_MESSAGE_LEN,
    MAX_FRAME, MAX_FRAME_OBJECTS, MAX_MAP_LEN, MAX_MEMBER_EVENT_BYTES, MAX_MEMBER_EVENTS, MAX_MEMBER_HEADS,
    MAX_CHECKPOINTS,
    MAX_SCHEMA_LEN,
    MEMBER_HASH_LEN, MAX_STR_LEN, MAX_VALUE_BYTES, MAX_VV_ENTRIES, PROTOCOL_VERSION,
    SITE_ID_LEN, U63_MAX,
)

HELLO, BATCH, ACK, PING, PONG, ERROR, MEMBERS, HAVE = 1, 2, 3, 4, 5, 6, 7, 8
_TAGS = {Hello: HELLO, BatchEvent: BATCH, Ack: ACK, Ping: PING, Pong: PONG, Error: ERROR, Members: MEMBERS,
         Have: HAVE}
_ERROR_CODE = re.compile(r"[a-z0-9][a-z0-9-]*")


class _Bad(Exception):
    """A field of an event is wrong; the message says which and how."""


# ---- encoding ---------------------------------------------------------------

def encode_event(event: Event) -> bytes:
    """The whole frame (length prefix and body) for ``event``; LocalProtocolError if invalid."""
    tag = _TAGS.get(type(event))
    if tag is None:
        raise LocalProtocolError("invalid-event", f"cannot send {type(event).__name__}: not a protocol event")
    name = event_name(type(event))
    try:
        body = _ENCODERS[tag](event)
        data = msgpack.packb(body)
        if tag == BATCH and len(data) > MAX_VALUE_BYTES:
            check_value_lengths(event.batch)
    except (_Bad, WireError) as e:
        raise LocalProtocolError("invalid-event", f"cannot send {name}: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise LocalProtocolError("invalid-event", f"cannot send {name}: {e}") from None
    if len(data) > MAX_FRAME:
        raise LocalProtocolError(
            "frame-too-large",
            f"cannot send {name}: it encodes to {len(data)} bytes (limit {MAX_FRAME}); send fewer changes per batch",
        )
    return len(data).to_bytes(FRAME_HEADER_LEN, "big") + data


def _encode_hello(e: Hello) -> list:
    _u63(e.protocol_version, "protocol version")
    _site(e.site_id, "site id")
    _bytes(e.schema, MAX_SCHEMA_LEN, "schema fingerprint")
    _u63(e.wall_ms, "wall clock")
    if type(e.vv) is not VersionVector:
        raise _Bad(f"vv must be a VersionVector, got {type(e.vv).__name__}")
    if len(e.vv) > MAX_VV_ENTRIES:
        raise _Bad(f"version vector has {len(e.vv)} sites (limit {MAX_VV_ENTRIES})")
    if len(e.yours) > MAX_CHECKPOINTS:
        raise _Bad(f"{len(e.yours)} checkpoints (limit {MAX_CHECKPOINTS})")
    for d, hlc, count, root, sig in e.yours:
        _u63(d, "checkpoint db version")
        _u63(hlc, "checkpoint hlc")
        _u63(count, "checkpoint count")
        _bytes(root, 32, "checkpoint root")
        _bytes(sig, 64, "checkpoint signature")
    return [HELLO, e.protocol_version, e.site_id, e.schema, e.wall_ms, dict(e.vv.items()),
            [list(c) for c in e.yours]]


def _encode_batch(e: BatchEvent) -> list:
    _u63(e.seq, "seq", lo=1)
    _bool(e.more, "more")
    wire = batch_to_wire(e.batch)
    if e.more and wire[4]:
        raise _Bad("a part with more=True cannot carry ranges (only the last part of a group does)")
    return [BATCH, e.seq, e.more, *wire]


def _members_fields(heads: object, events: object) -> None:
    if type(heads) is not tuple or len(heads) > MAX_MEMBER_HEADS:
        raise _Bad(f"heads must be a list of at most {MAX_MEMBER_HEADS} hashes, got {describe(heads)}")
    for h in heads:
        if type(h) is not bytes or len(h) != MEMBER_HASH_LEN:
            raise _Bad(f"a head must be {MEMBER_HASH_LEN} bytes, got {describe(h)}")
    if type(events) is not tuple or len(events) > MAX_MEMBER_EVENTS:
        raise _Bad(f"events must be a list of at most {MAX_MEMBER_EVENTS} events, got {describe(events)}")
    for ev in events:
        if type(ev) is not bytes or not 0 < len(ev) <= MAX_MEMBER_EVENT_BYTES:
            raise _Bad(f"an event must be 1..{MAX_MEMBER_EVENT_BYTES} bytes, got {describe(ev)}")


def _encode_members(e: Members) -> list:
    _members_fields(tuple(e.heads), tuple(e.events))
    return [MEMBERS, list(e.heads), list(e.events)]


def _decode_members(heads, events) -> Members:
    _members_fields(heads, events)
    return Members(heads, events)


def _encode_have(e: Have) -> list:
    if type(e.vv) is not VersionVector:
        raise _Bad(f"vv must be a VersionVector, got {type(e.vv).__name__}")
    if not 0 < len(e.vv) <= MAX_VV_ENTRIES:
        raise _Bad(f"a Have names 1..{MAX_VV_ENTRIES} sites, got {len(e.vv)}")
    out = []
    for s, n in e.vv.items():
        _site(s, "site id")
        _u63(n, "db version")
        out.append(s)
        out.append(n)
    return [HAVE, out]


def _decode_have(flat) -> Have:
    # site, dbv, site, dbv... (a flat array: maps are refused outside a Hello)
    if type(flat) is not tuple or not 0 < len(flat) <= 2 * MAX_VV_ENTRIES or len(flat) % 2:
        raise _Bad(f"a Have must hold 1..{MAX_VV_ENTRIES} (site, db version) pairs")
    vv = {}
    for i in range(0, len(flat), 2):
        s, n = flat[i], flat[i + 1]
        _site(s, "site id")
        _u63(n, "db version")
        if s in vv:
            raise _Bad("a Have names a site twice")
        vv[s] = n
    return Have(VersionVector(vv))


def _encode_error(e: Error) -> list:
    _error_fields(e.code, e.message)
    return [ERROR, e.code, e.message]


_ENCODERS = {
    HELLO: _encode_hello,
    HAVE: _encode_have,
    BATCH: _encode_batch,
    ACK: lambda e: [ACK, _u63(e.seq, "seq", lo=1)],
    PING: lambda e: [PING, _u63(e.token, "token")],
    PONG: lambda e: [PONG, _u63(e.token, "token")],
    ERROR: _encode_error,
    MEMBERS: _encode_members,
}


# ---- decoding ---------------------------------------------------------------

class _Refused(Exception):
    """Raised from inside the unpacker to stop it; the message is the error for the peer."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _ObjectCount:
    """msgpack hooks that count decoded objects and stop the unpacker past ``limit``."""

    def __init__(self, limit: int, maps: bool):
        self.n, self.limit, self.maps = 0, limit, maps

    def array(self, t: tuple) -> tuple:
        self.n += 1 + len(t)
        if self.n > self.limit:
            raise self._over()
        return t

    def map(self, d: dict) -> dict:
        if not self.maps:
            _no_map(d)
        self.n += 1 + 2 * len(d)
        if self.n > self.limit:
            raise self._over()
        return d

    def _over(self) -> _Refused:
        return _Refused("frame-objects", f"peer sent a frame that decodes to more than {self.limit} objects "
                                         f"(limit MAX_FRAME_OBJECTS)")


def _no_map(d: dict) -> NoReturn:
    raise _Refused("bad-frame", "peer sent a frame holding a map outside a Hello (only a Hello's version "
                                "vector is a map)")


def _tag_of(body: bytes) -> int | None:
    """The event type a body starts with, read from its first bytes without unpacking; None if not there."""
    if not body:
        return None
    first = body[0]
    at = 1 if 0x90 <= first <= 0x9F else 3 if first == 0xDC else 5 if first == 0xDD else None
    if at is None or len(body) <= at or body[at] > 0x7F:
        return None
    return body[at]


def decode_body(body: bytes, max_objects: int = MAX_FRAME_OBJECTS) -> Event:
    """The event in one frame body; LocalProtocolError("bad-frame"/"bad-version"/"frame-objects") if refused.

    Pure: safe to call from a worker thread. The work is bounded by ``max_objects``.
    """
    hooks = {}
    if len(body) >= min(LARGE_FRAME, max_objects):
        count = _ObjectCount(max_objects, maps=_tag_of(body) == HELLO)
        hooks = {"list_hook": count.array, "object_hook": count.map}
    refused = None
    try:
        obj = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=False, max_bin_len=MAX_BIN_LEN,
            max_str_len=MAX_STR_LEN, max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN, max_ext_len=0,
            **hooks,
        )
    except _Refused as e:
        refused = LocalProtocolError(e.code, str(e))
    except Exception as e:  # whatever the parser raises, the peer sent garbage
        why = f"{type(e).__name__}: {e}"[:200]
        refused = LocalProtocolError("bad-frame", f"peer sent a frame that is not valid msgpack ({why})")
    if refused is not None:  # raised out here, so it carries no context holding what was half decoded
        raise refused
    if type(obj) is not tuple or not obj or type(obj[0]) is not int:
        raise LocalProtocolError("bad-frame", "peer sent a frame that is not an array starting with an event type")
    tag, fields = obj[0], obj[1:]
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise LocalProtocolError("bad-frame", f"peer sent a frame of unknown event type {tag}")
    name, n_fields, build = decoder
    if tag == HELLO and fields and type(fields[0]) is int and fields[0] != PROTOCOL_VERSION:
        raise LocalProtocolError(
            "bad-version",
            f"peer speaks protocol version {fields[0]}, we speak {PROTOCOL_VERSION}; "
            f"run the same p2psync release on both devices",
        )
    try:
        if len(fields) != n_fields:
            raise _Bad(f"{len(fields)} fields, expected {n_fields}")
        event = build(*fields)
        if tag == BATCH and len(body) > MAX_VALUE_BYTES:
            check_value_lengths(event.batch)
        return event
    except (_Bad, WireError) as e:
        raise LocalProtocolError("bad-frame", f"peer sent a malformed {name}: {e}") from None


def _decode_hello(version, site, schema, wall_ms, vv, yours) -> Hello:
    _u63(version, "protocol version")
    _site(site, "site id")
    _bytes(schema, MAX_SCHEMA_LEN, "schema fingerprint")
    _u63(wall_ms, "wall clock")
    if type(vv) is not dict:
        raise _Bad(f"version vector must be a map, got {type(vv).__name__}")
    for s, n in vv.items():
        _site(s, "version vector site id")
        _u63(n, "version vector entry")
    if type(yours) not in (list, tuple) or len(yours) > MAX_CHECKPOINTS:
        raise _Bad(f"checkpoints must be a list of at most {MAX_CHECKPOINTS}")
    points = []
    for item in yours:
        if type(item) not in (list, tuple) or len(item) != 5:
            raise _Bad("a checkpoint must be [db version, hlc, count, root, signature]")
        d, hlc, count, root, sig = item
        _u63(d, "checkpoint db version")
        _u63(hlc, "checkpoint hlc")
        _u63(count, "checkpoint count")
        if type(root) is not bytes or len(root) != 32 or type(sig) is not bytes or len(sig) != 64:
            raise _Bad("a checkpoint needs a 32-byte root and a 64-byte signature")
        points.append((d, hlc, count, root, sig))
    return Hello(version, site, schema, wall_ms, VersionVector(vv), tuple(points))


def _decode_batch(seq, more, *wire) -> BatchEvent:
    _u63(seq, "seq", lo=1)
    _bool(more, "more")
    batch = batch_from_wire(wire)
    if more and batch.ranges:
        raise _Bad("a part with more=true carries ranges (only the last part of a group may)")
    return BatchEvent(seq, batch, more)


def _decode_error(code, message) -> Error:
    _error_fields(code, message)
    return Error(code, message)


_DECODERS = {
    HELLO: ("Hello", 6, _decode_hello),
    BATCH: ("Batch", 8, _decode_batch),
    ACK: ("Ack", 1, lambda seq: Ack(_u63(seq, "seq", lo=1))),
    PING: ("Ping", 1, lambda token: Ping(_u63(token, "token"))),
    PONG: ("Pong", 1, lambda token: Pong(_u63(token, "token"))),
    ERROR: ("Error", 2, _decode_error),
    MEMBERS: ("Members", 2, _decode_members),
    HAVE: ("Have", 1, _decode_have),
}


class FrameDecoder:
    """Turns a byte stream from the peer into events, one frame at a time."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of an event."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        self._buf += data

    def check_header(self) -> int | None:
        """Length of the next frame's body if its header is in; raises if over MAX_FRAME."""
        if self.buffered < FRAME_HEADER_LEN:
            return None
        n = int.from_bytes(self._buf[self._pos:self._pos + FRAME_HEADER_LEN], "big")
        if n > MAX_FRAME:
            raise LocalProtocolError("frame-too-large", f"peer sent a frame of {n} bytes (limit {MAX_FRAME})")
        return n

    def complete(self) -> int | None:
        """Body length of the next frame if all of it is in, else None; raises if over MAX_FRAME."""
        n = self.check_header()
        if n is None or self.buffered < FRAME_HEADER_LEN + n:
            return None
        return n

    def take_body(self) -> bytes:
        """Remove the next frame (which must be complete) and return its body, undecoded."""
        n = self.complete()
        if n is None:
            raise ValueError("take_body called without a complete frame")
        start = self._pos + FRAME_HEADER_LEN
        body = bytes(memoryview(self._buf)[start:start + n])
        self._pos = start + n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 1 << 20:
            del self._buf[:self._pos]
            self._pos = 0
        return body

    def next_frame(self) -> Event | None:
        """The next complete event, or None until more bytes arrive."""
        if self.complete() is None:
            return None
        return decode_body(self.take_body())


# ---- field checks -----------------------------------------------------------

def _u63(v: object, what: str, lo: int = 0) -> int:
    if type(v) is not int or not lo <= v <= U63_MAX:
        raise _Bad(f"{what} must be an integer in [{lo}, 2^63), got {describe(v)}")
    return v


def _bool(v: object, what: str) -> None:
    if type(v) is not bool:
        raise _Bad(f"{what} must be true or false, got {describe(v)}")


def _site(v: object, what: str) -> None:
    if type(v) is not bytes or len(v) != SITE_ID_LEN:
        raise _Bad(f"{what} must be {SITE_ID_LEN} bytes, got {describe(v)}")


def _bytes(v: object, limit: int, what: str) -> None:
    if type(v) is not bytes or len(v) > limit:
        raise _Bad(f"{what} must be a byte string of at most {limit} bytes, got {describe(v)}")


def _error_fields(code: object, message: object) -> None:
    if type(code) is not str or len(code) > MAX_ERROR_CODE_LEN or not _ERROR_CODE.fullmatch(code):
        raise _Bad(f"code must be 1..{MAX_ERROR_CODE_LEN} chars of [a-z0-9-], got {describe(code)}")
    if type(message) is not str or len(message) > MAX_ERROR_MESSAGE_LEN:
        raise _Bad(f"message must be text of at most {MAX_ERROR_MESSAGE_LEN} chars, got {describe(message)}")
