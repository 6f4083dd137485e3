"""Every decoder of peer or user input, fuzzed: only its documented errors escape, nothing is corrupted.

Each decoder gets random bytes (or text), well-formed msgpack of the wrong
shape, and structured mutations of valid inputs (bytes flipped, dropped or
inserted; one element of the decoded tree replaced, dropped or duplicated and
the whole re-encoded, so the mutation reaches the field checks behind the
parser). Whatever it is given, a decoder returns a value or raises the one
exception type its docstring names:

    protocol.codec.decode_body / FrameDecoder   LocalProtocolError
    model.membership.decode_event               MembershipError
    model.membership.MembershipLog.add          nothing (bad events are ignored or rejected)
    group.GroupMembers.load                     nothing (malformed events are counted)
    protocol.join.decode_request/decode_reply   JoinProtocolError
    identity.invites.parse_invite               InviteError
    protocol.relay_preamble.parse_preamble      BadPreamble
    sync.sealing.Sealer.open_batch              nothing (a change is opened or counted as rejected)
    noise responder / initiator / transport     NoiseError
    config.config_from_dict / parse_hostport    ConfigError

What a decoder accepts must also be what its encoder would send (a decoded
frame re-encodes to an equal frame), and garbage membership events must leave
the resolved membership exactly as the honest events alone resolve it.

Two profiles of the same properties: 100 examples each in the normal suite
(the whole file in about 15 s), and 20,000 each marked ``slow`` (``scripts/bench
slow``; P2PSYNC_FUZZ_EXAMPLES sets another count). Inputs are bounded in size;
no test asserts time.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import secrets

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from groups import make_group
from p2psync.model.attest import Proof
from p2psync.config import ConfigError, config_from_dict, parse_hostport
from p2psync.group import GroupMembers
from p2psync.identity import EpochKeys, InviteCode, InviteError, encode_invite, parse_invite
from p2psync.identity import invites as invite_format
from p2psync.identity.keys import seal_box
from p2psync.model import Batch, Change, Range, VersionVector
from p2psync.model.change import check_change
from p2psync.model import membership as mm
from p2psync.model.membership import MembershipError, MembershipLog, decode_event, encode_event as encode_member
from p2psync.noise import NoiseError, NoiseTransport, agent_handshake, agent_responder
from p2psync.protocol import (
    PROTOCOL_VERSION, Ack, BatchEvent, Error, FrameDecoder, Have, Hello, LocalProtocolError, Members, Ping, Pong,
    decode_body, encode_event,
)
from p2psync.protocol.join import (
    JoinProtocolError, JoinReply, JoinRequest, decode_reply, decode_request, encode_reply, encode_request,
    frame_length,
)
from p2psync.protocol.limits import MAX_FRAME
from p2psync.protocol.relay_preamble import PREAMBLE_LEN, RELAY_MAGIC, BadPreamble, parse_preamble, preamble
from p2psync.sync.sealing import Sealer

QUICK = settings(max_examples=100, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])
LONG = settings(QUICK, max_examples=int(os.environ.get("P2PSYNC_FUZZ_EXAMPLES", "20000")))
LONG_TIMEOUT = 1800


def two_profiles(*strategies):
    """A property as two tests: the quick profile, and the long one marked slow."""
    def make(check):
        quick = QUICK(given(*strategies)(check))
        long = pytest.mark.slow(pytest.mark.timeout(LONG_TIMEOUT)(LONG(given(*strategies)(check))))
        return quick, long
    return make


# ---- generic garbage and mutations ---------------------------------------------------

INTERESTING_BYTES = [0x00, 0x7f, 0x80, 0x90, 0x9f, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc6, 0xca, 0xcb, 0xcf, 0xd3,
                     0xd9, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xff]

scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
           | st.text(max_size=20) | st.binary(max_size=40)
           | st.sampled_from([b"\x00" * 16, b"\x01" * 32, b"\x02" * 64, "", "~", 1 << 63, -1, 0, 2 ** 31]))
msgpack_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=6) | st.binary(max_size=17), inner, max_size=4),
    max_leaves=16,
)


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    """``data`` with 1-4 bytes flipped, set to msgpack markers, dropped, inserted, duplicated or cut."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 5))
        pos = draw(st.integers(0, len(out)))
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and out:
            out[min(pos, len(out) - 1)] = draw(st.sampled_from(INTERESTING_BYTES))
        elif op == 2:
            del out[pos:pos + draw(st.integers(1, 8))]
        elif op == 3:
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 4:
            start = draw(st.integers(0, len(out)))
            out[pos:pos] = out[start:start + draw(st.integers(1, 16))]
        else:
            del out[pos:]
    return bytes(out)


def _thaw(obj):
    """A decoded msgpack tree with every tuple a list (so it can be edited in place)."""
    if isinstance(obj, (list, tuple)):
        return [_thaw(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _thaw(v) for k, v in obj.items()}
    return obj


@st.composite
def tree_mutation(draw, tree):
    """A deep copy of ``tree`` with 1-3 elements somewhere in it replaced, dropped, inserted or duplicated."""
    tree = _thaw(copy.deepcopy(tree))
    for _ in range(draw(st.integers(1, 3))):
        parent = tree
        while isinstance(parent, (list, dict)) and parent:
            keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
            k = draw(st.sampled_from(keys))
            child = parent[k]
            if isinstance(child, (list, dict)) and child and draw(st.integers(0, 9)) < 7:
                parent = child
                continue
            op = draw(st.integers(0, 3))
            if op == 0:
                del parent[k]
            elif op == 1:
                value = draw(msgpack_values)
                if isinstance(parent, list):
                    parent.insert(k, value)
                else:
                    parent[draw(st.text(max_size=6) | st.binary(max_size=17))] = value
            elif op == 2:
                parent[k] = draw(msgpack_values)
            else:
                parent[k] = copy.deepcopy(draw(st.sampled_from([parent[j] for j in keys])))
            break
    return tree


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def packable(obj) -> bytes | None:
    try:
        return pack(obj)
    except (TypeError, ValueError, OverflowError):
        return None


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def unpack_or_none(data: bytes):
    try:
        return unpack(data)
    except Exception:  # noqa: BLE001 -- any garbage: there is nothing to look at
        return None


# ---- valid protocol events ---------------------------------------------------------------

sites = st.binary(min_size=16, max_size=16)
u63 = st.integers(0, (1 << 63) - 1)
names = st.sampled_from(["items", "orders", "t", "x" * 255, "ü"]) | st.text(min_size=1, max_size=12)
sqlite_values = (st.none() | st.integers(-(1 << 63), (1 << 63) - 1) | st.floats(allow_nan=False)
                 | st.text(max_size=30) | st.binary(max_size=30))


@st.composite
def changes(draw) -> Change:
    cols = tuple(draw(st.lists(names, max_size=4, unique=True)))
    alive = draw(st.sampled_from([None, True, False]) if cols else st.booleans())
    return Change(draw(names), tuple(draw(st.lists(sqlite_values, min_size=1, max_size=3))), draw(sites),
                  draw(st.integers(1, (1 << 63) - 1)), draw(u63), alive, cols,
                  tuple(draw(sqlite_values) for _ in cols))


@st.composite
def batches(draw, with_ranges: bool = True) -> Batch:
    ranges = ()
    if with_ranges:
        ranges = tuple(Range(s, lo, lo + d) for s, lo, d in draw(st.lists(
            st.tuples(sites, st.integers(0, 1 << 40), st.integers(1, 1 << 20)), max_size=3)))
    return Batch(tuple(draw(st.lists(changes(), max_size=5))), ranges, tuple(draw(st.lists(proofs(), max_size=3))))


@st.composite
def proofs(draw) -> Proof:
    count = draw(st.integers(0, 4))
    leaves = draw(st.sampled_from([b"", b"".join(draw(st.binary(min_size=32, max_size=32)) for _ in range(count))]))
    return Proof(draw(sites), draw(st.integers(1, (1 << 63) - 1)), draw(u63), count, draw(st.binary(min_size=32,
                 max_size=32)), draw(st.binary(min_size=64, max_size=64)), leaves)


@st.composite
def batch_events(draw) -> BatchEvent:
    more = draw(st.booleans())
    return BatchEvent(draw(st.integers(1, (1 << 63) - 1)), draw(batches(with_ranges=not more)), more)


error_codes = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
valid_events = st.one_of(
    st.builds(Hello, st.just(PROTOCOL_VERSION), sites, st.binary(max_size=64), u63,
              st.dictionaries(sites, u63, max_size=4).map(VersionVector)),
    batch_events(),
    st.builds(Ack, st.integers(1, (1 << 63) - 1)),
    st.builds(Ping, u63),
    st.builds(Pong, u63),
    st.builds(Error, error_codes, st.text(max_size=100)),
    st.builds(Members, st.lists(st.binary(min_size=32, max_size=32), max_size=4).map(tuple),
              st.lists(st.binary(min_size=1, max_size=60), max_size=4).map(tuple)),
    st.builds(Have, st.dictionaries(sites, st.integers(1, (1 << 63) - 1), min_size=1, max_size=4).map(VersionVector)),
)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def check_body(body: bytes) -> None:
    """decode_body raises only LocalProtocolError; what it accepts re-encodes to an equal event."""
    try:
        ev = decode_body(body)
    except LocalProtocolError as e:
        assert e.code and e.message
        return
    again = encode_event(ev)
    assert decode_body(again[4:]) == ev


@st.composite
def mutated_valid_bodies(draw) -> bytes:
    """A valid frame body of any event type, damaged as bytes or as a msgpack tree."""
    body = encode_event(draw(valid_events))[4:]
    if draw(st.booleans()):
        return draw(byte_mutation(body))
    packed = packable(draw(tree_mutation(unpack(body))))
    return body if packed is None else packed


wrong_shapes = st.builds(lambda tag, fields: pack([tag, *fields]),
                         st.integers(0, 9) | msgpack_values, st.lists(msgpack_values, max_size=8))

test_decode_body_random_bytes, test_decode_body_random_bytes_long = \
    two_profiles(st.binary(max_size=400))(check_body)
test_decode_body_wrong_shape, test_decode_body_wrong_shape_long = two_profiles(wrong_shapes)(check_body)
test_decode_body_mutated_valid, test_decode_body_mutated_valid_long = \
    two_profiles(mutated_valid_bodies())(check_body)


@QUICK
@given(valid_events)
def test_every_valid_event_round_trips(ev):
    assert decode_body(encode_event(ev)[4:]) == ev


@st.composite
def streams(draw) -> tuple[bytes, list, list[int]]:
    """A byte stream of valid, damaged and random frames; the events of its valid prefix; cut points."""
    pieces, expected, clean = [], [], True
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 5))
        if kind <= 2:
            ev = draw(valid_events)
            pieces.append(encode_event(ev))
            if clean:
                expected.append(ev)
            continue
        clean = False
        if kind == 3:
            pieces.append(frame(draw(mutated_valid_bodies())))
        elif kind == 4:
            pieces.append(draw(byte_mutation(encode_event(draw(valid_events)))))
        else:
            pieces.append(draw(st.binary(max_size=64)))
    data = b"".join(pieces)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return data, expected, cuts


def check_stream(case) -> None:
    """FrameDecoder fed the stream in pieces: events, then at most one LocalProtocolError (the session closes)."""
    data, expected, cuts = case
    dec = FrameDecoder()
    got = []
    bounds = [0, *cuts, len(data)]
    try:
        for lo, hi in zip(bounds, bounds[1:]):
            dec.feed(data[lo:hi])
            while (ev := dec.next_frame()) is not None:
                got.append(ev)
    except LocalProtocolError as e:
        assert e.code and e.message
    assert got[:len(expected)] == expected
    for ev in got:   # whatever else it yielded is an event we could have sent
        encode_event(ev)


test_frame_decoder_streams, test_frame_decoder_streams_long = two_profiles(streams())(check_stream)


@QUICK
@given(st.integers(MAX_FRAME + 1, (1 << 32) - 1), st.binary(max_size=16))
def test_oversized_header_is_refused_before_the_body(n, tail):
    dec = FrameDecoder()
    dec.feed(n.to_bytes(4, "big") + tail)
    with pytest.raises(LocalProtocolError) as e:
        dec.next_frame()
    assert e.value.code == "frame-too-large"


# ---- membership events --------------------------------------------------------------------

KEYS, GROUPS = make_group(3)
ADMIN_KEYS, MEMBER_KEYS = KEYS[0], KEYS[1]
HONEST = GROUPS[0].encoded()                       # found, adds and shares, encoded, parents first
HONEST_EVENTS = [decode_event(e) for e in HONEST]
HONEST_HASHES = [e.hash for e in HONEST_EVENTS]
FOUND = HONEST_EVENTS[0]
GROUP_ID = FOUND.group
STRANGER_SIGN = secrets.token_bytes(32)


def _membership(log_or_state):
    """What the resolved membership says (everything but the DAG bookkeeping: heads, ignored, pending)."""
    s = log_or_state.state() if isinstance(log_or_state, MembershipLog) else log_or_state
    return (dict(s.members), dict(s.invites), s.epochs, s.frontier, dict(s.boxes), s.group, s.found)


HONEST_LOG = MembershipLog(FOUND.hash)
HONEST_LOG.add(HONEST_EVENTS)
HONEST_STATE = _membership(HONEST_LOG)


@st.composite
def bodies(draw, kind: str) -> dict:
    """A body that satisfies ``kind``'s schema, with fields drawn from the group's real values or random ones."""
    body = {}
    member_sites = [k.site_id for k in KEYS]
    for key, rule in mm._SCHEMA[kind].items():
        tag = rule[0]
        if tag == "len":
            pool = member_sites if key == "site" else []
            body[key] = draw(st.sampled_from(pool) | st.binary(min_size=rule[1], max_size=rule[1])
                             if pool else st.binary(min_size=rule[1], max_size=rule[1]))
        elif tag == "max":
            body[key] = draw(st.binary(max_size=min(rule[1], 48)))
        elif tag == "u63":
            body[key] = draw(u63)
        elif tag == "role":
            body[key] = draw(st.sampled_from(mm.ROLES))
        elif tag == "invite":
            body[key] = draw(st.sampled_from([b""]) | st.binary(min_size=16, max_size=16))
        elif tag == "hashes":
            body[key] = sorted(set(draw(st.lists(st.sampled_from(HONEST_HASHES) | st.binary(min_size=32, max_size=32),
                                                 min_size=1, max_size=3))))
        else:  # boxes: garbage, or sealed properly to a member with a garbage payload
            boxes = {}
            for k in draw(st.lists(st.sampled_from(KEYS), max_size=2)):
                boxes[k.site_id] = (seal_box(k.static_public, draw(st.binary(max_size=40) | msgpack_values.map(
                    lambda v: packable(v) or b"")), GROUP_ID, k.site_id)
                    if draw(st.booleans()) else draw(st.binary(max_size=80)))
            body[key] = boxes
    return body


@st.composite
def signed_events(draw, signer_keys=None):
    """An event that decodes: any kind and body, parents among the honest events (or unknown hashes).

    Signed by ``signer_keys`` (a DeviceKeys), or else forged: a stranger's key, claiming to be a member or not."""
    kind = draw(st.sampled_from([k for k in mm.KINDS if k != "found"]) if signer_keys is not None
                else st.sampled_from(mm.KINDS))
    if signer_keys is not None:
        signer, key = signer_keys.site_id, signer_keys.sign_private
    else:
        signer = draw(st.sampled_from([k.site_id for k in KEYS]) | sites)
        key = STRANGER_SIGN
    body = draw(bodies(kind))
    if kind == "found":
        body["site"] = signer
    if kind == "successor" and body["site"] == signer:
        body["site"] = bytes(16)
    parents = [] if kind == "found" else draw(st.lists(
        st.sampled_from(HONEST_HASHES) | st.binary(min_size=32, max_size=32), min_size=1, max_size=3))
    try:
        return mm.make_event(kind, GROUP_ID, signer, key, parents, draw(u63), body)
    except MembershipError:
        assume(False)


@st.composite
def mutated_member_events(draw) -> bytes:
    """A valid encoded event damaged: its wire bytes, its signed bytes (re-wrapped), or a field of its tree."""
    data = draw(st.sampled_from(HONEST))
    how = draw(st.integers(0, 2))
    if how == 0:
        return draw(byte_mutation(data))
    raw, sig = unpack(data)
    if how == 1:
        raw = draw(byte_mutation(raw)) if draw(st.booleans()) else raw
        sig = draw(byte_mutation(sig)) if draw(st.booleans()) else sig
        return pack([raw, sig])
    tree = draw(tree_mutation(unpack(raw)))
    try:
        tree = mm._canonical(tree)      # sorted map keys, so the mutation reaches the checks behind that one
    except TypeError:                   # keys of mixed types: leave them as they are
        pass
    inner = packable(tree)
    return pack([inner if inner is not None else raw, sig])


member_garbage = st.one_of(
    st.binary(max_size=300),
    msgpack_values.map(packable).filter(bool),
    st.builds(lambda raw, sig: pack([pack(raw) if packable(raw) else b"", sig]),
              st.lists(msgpack_values, min_size=7, max_size=7), st.binary(min_size=64, max_size=64)),
    mutated_member_events(),
    signed_events().map(encode_member),
)


def check_decode_member_event(data: bytes) -> None:
    try:
        ev = decode_event(data)
    except MembershipError as e:
        assert str(e)
        return
    assert encode_member(ev) == bytes(data)


test_decode_member_event, test_decode_member_event_long = two_profiles(member_garbage)(check_decode_member_event)


def _decodable(encoded: list[bytes]) -> list:
    out = []
    for data in encoded:
        try:
            out.append(decode_event(data))
        except MembershipError:
            pass
    return out


def check_log_with_forged_events(garbage: list[bytes], order: list[int]) -> None:
    """Forged or damaged events, before, among and after the honest ones: the membership is the honest one."""
    forged = _decodable(garbage)
    assume(forged)
    mixed = list(HONEST_EVENTS)
    for i, ev in zip(order, forged):
        mixed.insert(i % (len(mixed) + 1), ev)
    log = MembershipLog(FOUND.hash)
    for ev in mixed:
        log.add([ev])
    assert _membership(log) == HONEST_STATE
    again = MembershipLog(FOUND.hash)
    again.add(forged)
    again.add(list(reversed(HONEST_EVENTS)))
    assert _membership(again) == HONEST_STATE
    assert set(HONEST_HASHES) <= {e.hash for e in log.events()}




@pytest.mark.parametrize("i", range(len(HONEST_EVENTS)))
def test_a_copy_with_a_bad_signature_does_not_shadow_the_real_event(i):
    raw, sig = unpack(HONEST[i])
    forged = decode_event(pack([raw, bytes([sig[0] ^ 1]) + sig[1:]]))
    log = MembershipLog(FOUND.hash)
    log.add(HONEST_EVENTS[:i] + [forged])
    log.add(HONEST_EVENTS)
    assert _membership(log) == HONEST_STATE


forged_lists = st.lists(member_garbage, min_size=1, max_size=6)
orders = st.lists(st.integers(0, 50), min_size=6, max_size=6)
test_log_with_forged_events, test_log_with_forged_events_long = \
    two_profiles(forged_lists, orders)(check_log_with_forged_events)


def check_log_with_admin_signed_garbage(events: list, perm: list[int]) -> None:
    """Events the real admin signed with arbitrary fields: never an error, the same state in any arrival order."""
    extra = list(events)
    first = MembershipLog(FOUND.hash)
    first.add(HONEST_EVENTS + extra)
    shuffled = HONEST_EVENTS + extra
    shuffled = [shuffled[i % len(shuffled)] for i in perm] + shuffled
    second = MembershipLog(FOUND.hash)
    for ev in reversed(shuffled):
        second.add([ev])
    a, b = first.state(), second.state()
    assert _membership(a) == _membership(b)
    assert (a.heads, dict(a.ignored), a.pending) == (b.heads, dict(b.ignored), b.pending)


test_log_with_admin_signed_garbage, test_log_with_admin_signed_garbage_long = two_profiles(
    st.lists(signed_events(ADMIN_KEYS), min_size=1, max_size=5), st.lists(st.integers(0, 30), max_size=8),
)(check_log_with_admin_signed_garbage)


def check_group_members_load(garbage: list[bytes], admin_signed: list) -> None:
    """What the agent does with a peer's Members event: malformed events counted, the rest resolved, keys derived."""
    m = GroupMembers(FOUND.hash, MEMBER_KEYS.site_id, MEMBER_KEYS.static_private)
    m.load(HONEST)
    before = m.keys.current
    encoded = list(garbage) + [encode_member(e) for e in admin_signed]
    bad = len(encoded) - len(_decodable(encoded))
    m.load(encoded)
    assert m.malformed == bad
    assert m.state is not None and m.keys is not None
    if not admin_signed:
        assert _membership(m.state) == HONEST_STATE and m.keys.current == before


test_group_members_load, test_group_members_load_long = two_profiles(
    st.lists(member_garbage, max_size=5), st.lists(signed_events(ADMIN_KEYS), max_size=2),
)(check_group_members_load)


# ---- join messages ----------------------------------------------------------------------

join_requests = st.builds(JoinRequest, sites, st.binary(min_size=32, max_size=32),
                          st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=64),
                          st.binary(min_size=64, max_size=64))
join_replies = st.builds(JoinReply, st.booleans(), st.text(max_size=100),
                         st.lists(st.sampled_from(HONEST) | st.binary(max_size=60), max_size=4).map(tuple))


@st.composite
def join_bodies(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return pack(draw(st.lists(msgpack_values, max_size=6)))
    body = (encode_request(draw(join_requests)) if draw(st.booleans()) else encode_reply(draw(join_replies)))[4:]
    if kind == 2:
        return draw(byte_mutation(body))
    return packable(draw(tree_mutation(unpack(body)))) or body


def check_join(body: bytes) -> None:
    for decode, encode in ((decode_request, encode_request), (decode_reply, encode_reply)):
        try:
            msg = decode(body)
        except JoinProtocolError as e:
            assert str(e)
            continue
        assert decode(encode(msg)[4:]) == msg
    try:
        assert frame_length(body[:4].ljust(4, b"\0")) >= 0
    except JoinProtocolError:
        pass


test_join_messages, test_join_messages_long = two_profiles(join_bodies())(check_join)


# ---- invite codes -----------------------------------------------------------------------

def _code_text(body: bytes) -> str:
    """An invite code carrying ``body``, with a correct checksum (so the body's checks are reached)."""
    raw = body + invite_format._checksum(body)
    return invite_format.INVITE_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=").lower()


valid_invites = st.builds(
    InviteCode, st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32),
    st.binary(min_size=16, max_size=16), st.integers(0, (1 << 40) - 1).map(lambda m: m * 60_000),
    st.lists(st.tuples(st.sampled_from(["127.0.0.1", "10.0.0.7", "::1", "fe80::1"]), st.integers(1, 65535)),
             max_size=4).map(tuple),
    st.none() | st.text(min_size=1, max_size=40),
)


@st.composite
def invite_texts(draw) -> str:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.text(max_size=200))
    code = encode_invite(draw(valid_invites))
    if kind == 1:   # typos: characters replaced, dropped, inserted; case changed; cut short
        chars = list(code)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(chars) - 1))
            op = draw(st.integers(0, 3))
            if op == 0:
                chars[i] = draw(st.characters(codec="utf-8"))
            elif op == 1:
                del chars[i]
            elif op == 2:
                chars.insert(i, draw(st.sampled_from("abcxyz234567=-0189 \n\t")))
            else:
                chars = chars[:i]
            if not chars:
                break
        return "".join(chars) if draw(st.booleans()) else "".join(chars).upper()
    body = base64.b32decode(code[6:].upper() + "=" * (-len(code[6:]) % 8))[:-4]
    if kind == 2:   # the body damaged, with a checksum that matches it
        return _code_text(draw(byte_mutation(body)))
    if kind == 3:
        return _code_text(packable(draw(tree_mutation(unpack(body)))) or body)
    return _code_text(pack(draw(st.lists(msgpack_values, max_size=9))))


def check_invite(text: str) -> None:
    try:
        code = parse_invite(text)
    except InviteError as e:
        assert str(e)
        return
    assert parse_invite(encode_invite(code)) == code


test_invite_codes, test_invite_codes_long = two_profiles(invite_texts())(check_invite)


# ---- the relay preamble -------------------------------------------------------------------

preambles = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=16, max_size=16).map(preamble),
    st.binary(min_size=16, max_size=16).map(preamble).flatmap(byte_mutation),
    st.binary(max_size=30).map(lambda b: RELAY_MAGIC + b),
)


def check_preamble(data: bytes) -> None:
    try:
        ref = parse_preamble(data)
    except BadPreamble as e:
        assert str(e)
        return
    assert len(data) == PREAMBLE_LEN and preamble(ref) == data


test_relay_preamble, test_relay_preamble_long = two_profiles(preambles)(check_preamble)


# ---- sealed changes -----------------------------------------------------------------------

EPOCH = EpochKeys.derive(b"G" * 16, [(b"", b"s" * 32)])
OLD_EPOCH = EpochKeys.derive(b"G" * 16, [(b"", b"o" * 32)])
UNKNOWN_EPOCH = EpochKeys.derive(b"G" * 16, [(b"", b"u" * 32)])
HELD = {EPOCH.key_id: EPOCH, OLD_EPOCH.key_id: OLD_EPOCH}


ANY = object()     # a sealed change that may open or be rejected


def new_sealer(current=EPOCH) -> Sealer:
    return Sealer(lambda: current, HELD.get)


def seal_plaintext(keys: EpochKeys, ref: bytes, site: bytes, dbv: int, hlc: int, plain: bytes) -> Change:
    """A sealed change with any plaintext, as a member holding the key could make it."""
    e = new_sealer(keys)._epoch(keys)
    kid = keys.key_id
    ad = kid + ref + site + dbv.to_bytes(8, "big", signed=True) + hlc.to_bytes(8, "big", signed=True)
    nonce = os.urandom(12)
    return Change("~", (ref,), site, dbv, hlc, None, ("~",), (kid + nonce + e.aead.encrypt(nonce, plain, ad),))


@st.composite
def sealed_items(draw) -> tuple[Change, Change | None]:
    """(a sealed change as a batch from the relay carries it, the plaintext change it must open to, or None)."""
    kind = draw(st.integers(0, 5))
    c = draw(changes())
    sealed = new_sealer(draw(st.sampled_from([EPOCH, OLD_EPOCH]))).seal_changes([c])[0]
    if kind == 0:      # honest
        return sealed, c
    if kind == 1:      # sealed under an epoch this device never held
        return new_sealer(UNKNOWN_EPOCH).seal_changes([c])[0], None
    if kind == 2:      # the relay altered a byte of the blob, the ref, or the version
        field = draw(st.sampled_from(["blob", "ref", "site", "dbv", "hlc"]))
        if field == "blob":
            blob = draw(byte_mutation(sealed.values[0]))
            assume(len(blob) > 0)
            return sealed._replace(values=(blob,)), (c if blob == sealed.values[0] else None)
        if field == "ref":
            ref = draw(st.binary(min_size=16, max_size=16))
            return sealed._replace(pk=(ref,)), (c if ref == sealed.pk[0] else None)
        if field == "site":
            site = draw(sites)
            return sealed._replace(site=site), (c if site == c.site else None)
        n = draw(u63.filter(bool))
        new = sealed._replace(**{field: n})
        return new, (c if getattr(new, field) == getattr(c, field) else None)
    if kind == 3:      # not in the sealed form at all
        return c, None
    # authentic plaintexts of any shape, from a hostile member holding the key: the row ref is made to
    # match the (table, key) they name where there are such, so the checks behind it are reached
    if kind == 4:
        tree = draw(tree_mutation([c.table, list(c.pk), c.alive, list(c.columns), list(c.values)]))
        plain = packable(tree) or b""
    else:
        plain = draw(st.binary(max_size=80) | msgpack_values.map(lambda v: packable(v) or b""))
        tree = unpack_or_none(plain)
    ref = draw(st.binary(min_size=16, max_size=16))
    if isinstance(tree, list) and len(tree) >= 2 and isinstance(tree[1], list):
        try:
            ref = new_sealer().row_ref(tree[0], tuple(tree[1]))
        except (TypeError, ValueError, OverflowError):
            pass
    return seal_plaintext(EPOCH, ref, c.site, c.dbv, c.hlc, plain), ANY


def check_open_batch(items, ranges) -> None:
    """Every sealed change opens to exactly what was sealed, or is counted as rejected; never an exception."""
    wire = Batch(tuple(s for s, _ in items), tuple(ranges))
    batch = decode_body(encode_event(BatchEvent(1, wire, False))[4:]).batch   # what the codec lets through
    sealer = new_sealer()
    result = sealer.open_batch(batch)
    assert len(result.batch.changes) + result.rejected == len(batch.changes)
    opened = list(result.batch.changes)
    bad_sites = set()
    for (_, expected), got in zip(items, batch.changes):
        if expected is ANY and opened and (opened[0].site, opened[0].dbv, opened[0].hlc) == (got.site, got.dbv,
                                                                                              got.hlc) \
                and sealer.row_ref(opened[0].table, opened[0].pk) == got.pk[0]:
            check_change(opened.pop(0))    # a member sealed a well-formed change: it opens to a valid one
        elif expected is not None and expected is not ANY:
            assert opened and opened.pop(0) == expected
        else:
            bad_sites.add(got.site)
    assert not opened
    assert not {r.site for r in result.batch.ranges} & bad_sites


test_open_sealed_batch, test_open_sealed_batch_long = two_profiles(
    st.lists(sealed_items(), max_size=5),
    st.lists(st.builds(lambda s, lo: Range(s, lo, lo + 1), sites, st.integers(0, 1 << 40)), max_size=2),
)(check_open_batch)


# ---- Noise handshakes --------------------------------------------------------------------

PROLOGUE = b"p2psync-fuzz"
PSKS = [hashlib.sha256(b"psk%d" % i).digest() for i in range(3)]
RESPONDER_STATIC = hashlib.sha256(b"responder").digest()
INITIATOR_STATIC = hashlib.sha256(b"initiator").digest()


def _responder():
    return agent_responder(RESPONDER_STATIC, PSKS, PROLOGUE)


def _valid_message_1(psk=PSKS[1], payload=b"") -> tuple:
    hs = agent_handshake(True, INITIATOR_STATIC, psk, PROLOGUE)
    return hs, hs.write_message(payload)


def _reject_or_read(hs, message: bytes) -> bool:
    """True if ``hs`` read ``message``; only a NoiseError may say no."""
    try:
        hs.read_message(message)
        return True
    except NoiseError as e:
        assert str(e)
        assert hs.failed
        return False


noise_messages = st.one_of(st.binary(max_size=200), st.binary(min_size=65530, max_size=65540))


@st.composite
def message_1_cases(draw) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(noise_messages)
    _, m = _valid_message_1(draw(st.sampled_from(PSKS + [bytes(32)])), draw(st.binary(max_size=40)))
    return m if kind == 1 else draw(byte_mutation(m))


def check_responder_message_1(message: bytes) -> None:
    r = _responder()
    if _reject_or_read(r, message):
        try:   # the responder answers next; a hostile ephemeral key must fail as a NoiseError, too
            r.write_message(b"")
        except NoiseError:
            assert r.failed


test_responder_message_1, test_responder_message_1_long = two_profiles(message_1_cases())(check_responder_message_1)


def _forged_message_1(e_public: bytes, payload: bytes) -> bytes:
    """Message 1 of a member that holds the PSK but sends any 32 bytes as its ephemeral key."""
    hs = agent_handshake(True, INITIATOR_STATIC, PSKS[0], PROLOGUE)
    hs._mix_token("psk")
    hs._mix_ephemeral(e_public)
    return e_public + hs._sym.encrypt_and_hash(payload)


LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"), bytes.fromhex(
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"), b"\xff" * 32]


@QUICK
@given(st.sampled_from(LOW_ORDER) | st.binary(min_size=32, max_size=32), st.binary(max_size=20))
def test_member_with_any_ephemeral_key(e_public, payload):
    check_responder_message_1(_forged_message_1(e_public, payload))


@st.composite
def message_3_cases(draw) -> tuple:
    """A responder that has read message 1 and written 2, and what a hostile initiator sends as message 3."""
    i, m1 = _valid_message_1(PSKS[2])
    r = _responder()
    r.read_message(m1)
    m2 = r.write_message(b"")
    i.read_message(m2)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        m3 = draw(noise_messages)
    elif kind == 1:
        m3 = draw(byte_mutation(i.write_message(draw(st.binary(max_size=40)))))
    elif kind == 2:  # any 32 bytes as the static key (low-order points included), then garbage
        s = draw(st.sampled_from(LOW_ORDER) | st.binary(min_size=32, max_size=32))
        m3 = i._sym.encrypt_and_hash(s) + draw(st.binary(min_size=16, max_size=40))
    else:
        m3 = i.write_message(b"")
    return r, m3


def check_responder_message_3(case) -> None:
    r, m3 = case
    if _reject_or_read(r, m3):
        assert r.complete and r.remote_static is not None


test_responder_message_3, test_responder_message_3_long = two_profiles(message_3_cases())(check_responder_message_3)


@st.composite
def message_2_cases(draw) -> tuple:
    """An initiator (the agent dialling out) that sent message 1, and what a hostile listener answers."""
    i, m1 = _valid_message_1(PSKS[0])
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return i, draw(noise_messages)
    r = _responder()
    r.read_message(m1)
    m2 = r.write_message(draw(st.binary(max_size=40)))
    return i, (m2 if kind == 1 else draw(byte_mutation(m2)))


def check_initiator_message_2(case) -> None:
    i, m2 = case
    if _reject_or_read(i, m2):
        i.write_message(b"")


test_initiator_message_2, test_initiator_message_2_long = two_profiles(message_2_cases())(check_initiator_message_2)


def _transports() -> tuple[NoiseTransport, NoiseTransport]:
    i, m1 = _valid_message_1(PSKS[0])
    r = _responder()
    r.read_message(m1)
    i.read_message(r.write_message(b""))
    r.read_message(i.write_message(b""))
    return NoiseTransport.from_handshake(i), NoiseTransport.from_handshake(r)


@st.composite
def transport_cases(draw) -> list[bytes]:
    sender, _ = _transports()
    msgs = [sender.encrypt(draw(st.binary(max_size=50))) for _ in range(draw(st.integers(0, 3)))]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 2))
        if kind == 0:
            msgs.insert(draw(st.integers(0, len(msgs))), draw(noise_messages))
        elif kind == 1 and msgs:
            j = draw(st.integers(0, len(msgs) - 1))
            msgs[j] = draw(byte_mutation(msgs[j]))
        elif msgs:   # replayed or reordered
            msgs.insert(draw(st.integers(0, len(msgs))), draw(st.sampled_from(msgs)))
    return msgs


def check_transport(msgs: list[bytes]) -> None:
    _, receiver = _transports()   # fresh keys: every message above is foreign to it or out of order
    for m in msgs:
        try:
            receiver.decrypt(m)
        except NoiseError:
            assert receiver.closed
            with pytest.raises(NoiseError):
                receiver.decrypt(m)
            return


test_transport_decrypt, test_transport_decrypt_long = two_profiles(transport_cases())(check_transport)


# ---- config --------------------------------------------------------------------------------

toml_values = st.recursive(
    st.booleans() | st.integers(-(1 << 63), (1 << 63) - 1) | st.floats() | st.text(max_size=30)
    | st.sampled_from(["127.0.0.1:7733", "[::1]:1", "0.0.0.0:0", "host:65536", "a..b:1", "[x]:1", ":", "1e306",
                       1e306, -0.0, 1e-320]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
config_keys = st.sampled_from(["listen", "peers", "interfaces", "relay", "log_level", "mdns", "max_clock_skew",
                               "max_clock_skw", "port", ""]) | st.text(max_size=10)


def check_config(data: dict) -> None:
    try:
        config_from_dict(data, "config.toml")
    except ConfigError as e:
        assert "config.toml" in str(e)


def check_hostport(text: str) -> None:
    try:
        host, port = parse_hostport(text, "--peer")
    except ConfigError as e:
        assert str(e)
        return
    assert type(host) is str and 0 < port < 65536


test_config, test_config_long = two_profiles(st.dictionaries(config_keys, toml_values, max_size=4))(check_config)
test_hostport, test_hostport_long = two_profiles(
    st.text(max_size=40) | st.from_regex(r"\[?[0-9a-f:.]{0,20}\]?:[0-9]{0,7}", fullmatch=True))(check_hostport)
