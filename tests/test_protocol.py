"""The sans-IO protocol: two real sessions wired together through in-memory bytes."""

from __future__ import annotations

import math
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psync.model import Batch, Change, Range, VersionVector
from p2psync.model.change import InvalidChange, check_batch
from p2psync.protocol import (
    CLOSED, NEED_DATA, PROTOCOL_VERSION, Ack, BatchEvent, Error, FrameDecoder, Hello,
    LocalProtocolError, Ping, Pong, RemoteProtocolError, Session, State, decode_body, encode_event,
)
from p2psync.protocol import limits
from p2psync.protocol.batchwire import _to_wire

SITE_A = bytes(range(16))
SITE_B = bytes(range(16, 32))
SITE_C = b"\xcc" * 16
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def hello(site: bytes, vv: dict | None = None, version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(version, site, b"schema-fp", 1_700_000_000_000, VersionVector(vv or {}))


def change(n: int = 1, site: bytes = SITE_A, **kw) -> Change:
    fields = dict(table="items", pk=(n,), site=site, dbv=n, hlc=n << 16, alive=True,
                  columns=("name", "qty"), values=(f"item {n}", n))
    fields.update(kw)
    return Change(**fields)


def batch(*changes: Change, ranges: tuple[Range, ...] = ()) -> Batch:
    return Batch(changes or (change(),), ranges)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


class SessionPair:
    """Two sessions joined by an in-memory link: what one sends, the other receives."""

    def __init__(self, **kw):
        self.a = Session(SITE_A, **kw)
        self.b = Session(SITE_B, **kw)
        self.now = 0.0

    def peer(self, s: Session) -> Session:
        return self.b if s is self.a else self.a

    def send(self, s: Session, event) -> list:
        """Send ``event`` from ``s``; return the events the peer then reads."""
        return self.deliver(s, s.send(event, self.now))

    def deliver(self, s: Session, data: bytes) -> list:
        peer = self.peer(s)
        peer.receive_data(data, self.now)
        return self.drain(peer)

    @staticmethod
    def drain(s: Session) -> list:
        events = []
        while (e := s.next_event()) is not NEED_DATA:
            events.append(e)
            if e is CLOSED:
                break
        return events

    def handshake(self) -> None:
        assert self.send(self.a, hello(SITE_A, {SITE_A: 5})) == [hello(SITE_A, {SITE_A: 5})]
        assert self.send(self.b, hello(SITE_B)) == [hello(SITE_B)]


@pytest.fixture
def pair() -> SessionPair:
    p = SessionPair()
    p.handshake()
    return p


def remote_error(s: Session, data: bytes) -> RemoteProtocolError:
    """Feed ``data`` to ``s`` and return the RemoteProtocolError it must raise."""
    with pytest.raises(RemoteProtocolError) as info:
        s.receive_data(data, 0.0)
        SessionPair.drain(s)
    return info.value


# ---- strategies ---------------------------------------------------------------

def _blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


values = st.one_of(
    st.none(),
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from([INT64_MIN, INT64_MAX, 0, -1, 1 << 32]),
    st.floats(allow_nan=False),
    st.sampled_from([math.inf, -math.inf, -0.0, 0.0, 5e-324]),
    st.text(max_size=40),
    st.binary(max_size=40),
)
big_values = st.builds(_blob, st.sampled_from([1 << 10, 1 << 16, 1 << 20]), st.integers(0, 99))
names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
sites = st.sampled_from([SITE_A, SITE_B, SITE_C])


@st.composite
def changes(draw, value=values):
    cols = tuple(draw(st.lists(names, unique=True, max_size=5)))
    alive = draw(st.sampled_from([None, True, False])) if cols else draw(st.booleans())
    return Change(
        table=draw(st.sampled_from(["items", "orders", "ünïcode tablé"])),
        pk=tuple(draw(st.lists(value, min_size=1, max_size=3))),
        site=draw(sites),
        dbv=draw(st.integers(1, INT64_MAX)),
        hlc=draw(st.integers(0, INT64_MAX)),
        alive=alive,
        columns=cols,
        values=tuple(draw(value) for _ in cols),
    )


@st.composite
def batch_events(draw, seq: int = 1):
    more = draw(st.booleans())
    ranges = () if more else tuple(
        Range(draw(sites), lo, lo + draw(st.integers(1, 1000)))
        for lo in draw(st.lists(st.integers(0, INT64_MAX - 1000), max_size=3))
    )
    return BatchEvent(seq, Batch(tuple(draw(st.lists(changes(), max_size=15))), ranges), more)


def same(x, y) -> bool:
    """Equal, and floats equal bit for bit (so -0.0 stays -0.0)."""
    return x == y and repr(x) == repr(y)


# ---- handshake and round trips ------------------------------------------------

def test_hello_exchange_moves_both_sides_to_syncing(pair):
    for s in (pair.a, pair.b):
        assert s.our_state is s.their_state is State.SYNCING
    assert pair.b.peer_hello == hello(SITE_A, {SITE_A: 5})
    assert pair.a.peer_hello.vv == VersionVector()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_batches_round_trip_both_ways(data):
    pair = SessionPair(window=100)
    pair.handshake()
    for seq in range(1, data.draw(st.integers(1, 4)) + 1):
        for s in (pair.a, pair.b):
            ev = data.draw(batch_events(seq))
            (got,) = pair.send(s, ev)
            assert same(got, ev)
            pair.send(pair.peer(s), Ack(seq))


@settings(max_examples=15, deadline=None)
@given(changes(value=st.one_of(values, big_values)))
def test_big_values_round_trip(c):
    pair = SessionPair()
    pair.handshake()
    ev = BatchEvent(1, Batch((c,)))
    assert pair.send(pair.a, ev) == [ev]


def test_extreme_values_survive_exactly(pair):
    vals = (INT64_MIN, INT64_MAX, -0.0, math.inf, -math.inf, 0.1, "", "žluť 🐍", b"", b"\0" * (1 << 20), None)
    cols = tuple(f"c{i}" for i in range(len(vals)))
    ev = BatchEvent(1, batch(change(columns=cols, values=vals, pk=(b"\xff", "k", -1, 2.5))))
    (got,) = pair.send(pair.a, ev)
    assert got == ev
    assert math.copysign(1.0, got.batch.changes[0].values[2]) == -1.0
    assert [type(v) for v in got.batch.changes[0].values] == [type(v) for v in vals]


def test_multi_part_group_only_last_part_carries_ranges(pair):
    r = (Range(SITE_A, 0, 2),)
    assert pair.send(pair.a, BatchEvent(1, batch(change(1)), more=True))[0].more
    assert pair.send(pair.a, BatchEvent(2, batch(change(2), ranges=r)))[0].batch.ranges == r
    with pytest.raises(LocalProtocolError, match="more=True cannot carry ranges"):
        pair.a.send(BatchEvent(3, batch(change(3), ranges=r), more=True), 0)


# ---- window, seq and ack --------------------------------------------------------

def test_window_limits_unacked_batches():
    pair = SessionPair(window=3)
    pair.handshake()
    for seq in (1, 2, 3):
        assert pair.a.can_send_batch
        pair.send(pair.a, BatchEvent(seq, batch(change(seq))))
    assert pair.a.unacked == 3 and not pair.a.can_send_batch
    with pytest.raises(LocalProtocolError) as info:
        pair.a.send(BatchEvent(4, batch()), 0)
    assert info.value.code == "window-full"
    assert pair.send(pair.b, Ack(2)) == [Ack(2)]          # cumulative: acks 1 and 2
    assert pair.a.unacked == 1 and pair.a.can_send_batch
    pair.send(pair.a, BatchEvent(4, batch()))
    pair.send(pair.b, Ack(4))
    assert pair.a.unacked == 0


def test_seq_must_follow_on(pair):
    with pytest.raises(LocalProtocolError) as info:
        pair.a.send(BatchEvent(2, batch()), 0)
    assert info.value.code == "bad-seq"
    err = remote_error(pair.b, encode_event(BatchEvent(2, batch())))
    assert err.code == "bad-seq" and "expected 1" in str(err)


def test_ack_must_cover_an_outstanding_batch(pair):
    with pytest.raises(LocalProtocolError, match="cannot send Ack 1") as info:
        pair.b.send(Ack(1), 0)                             # nothing received yet
    assert info.value.code == "bad-ack"
    pair.send(pair.a, BatchEvent(1, batch()))
    pair.send(pair.b, Ack(1))
    err = remote_error(pair.a, encode_event(Ack(1)))         # already acked
    assert err.code == "bad-ack"


def test_ack_beyond_what_was_sent_is_refused(pair):
    pair.send(pair.a, BatchEvent(1, batch()))
    assert remote_error(pair.a, encode_event(Ack(2))).code == "bad-ack"


# ---- states --------------------------------------------------------------------

def test_batch_before_hello_names_the_state():
    b = Session(SITE_B)
    err = remote_error(b, encode_event(BatchEvent(1, batch())))
    assert err.code == "unexpected-event"
    assert "peer sent Batch in state AWAIT_HELLO" in str(err)


def test_we_cannot_send_before_hello_or_batches_before_peer_hello():
    a = Session(SITE_A)
    with pytest.raises(LocalProtocolError, match="cannot send Batch in state AWAIT_HELLO"):
        a.send(BatchEvent(1, batch()), 0)
    a.send(hello(SITE_A), 0)
    with pytest.raises(LocalProtocolError, match="peer is in state AWAIT_HELLO"):
        a.send(BatchEvent(1, batch()), 0)
    assert not a.can_send_batch
    with pytest.raises(LocalProtocolError, match="cannot send Hello in state SYNCING"):
        a.send(hello(SITE_A), 0)


def test_hello_twice_from_peer(pair):
    err = remote_error(pair.b, encode_event(hello(SITE_A)))
    assert err.code == "unexpected-event" and "Hello in state SYNCING" in str(err)


def test_other_protocol_version_is_bad_version():
    err = remote_error(Session(SITE_B), encode_event(hello(SITE_A, version=PROTOCOL_VERSION + 1)))
    assert err.code == "bad-version" and f"version {PROTOCOL_VERSION + 1}" in str(err)
    # even if the rest of a future Hello looks nothing like ours
    err = remote_error(Session(SITE_B), frame(msgpack.packb([1, 7, "whatever"])))
    assert err.code == "bad-version"
    with pytest.raises(LocalProtocolError):
        Session(SITE_A).send(hello(SITE_A, version=PROTOCOL_VERSION + 1), 0)


def test_connecting_to_ourselves_is_refused():
    err = remote_error(Session(SITE_A), encode_event(hello(SITE_A)))
    assert err.code == "self-connection"


def test_peer_error_closes_their_side(pair):
    assert pair.send(pair.a, Error("schema-mismatch", "tables differ")) == [
        Error("schema-mismatch", "tables differ"), CLOSED]
    assert pair.a.our_state is State.CLOSED and pair.b.their_state is State.CLOSED
    assert pair.b.next_event() is CLOSED
    assert not pair.b.can_send_batch
    with pytest.raises(LocalProtocolError, match="cannot send Ping in state CLOSED"):
        pair.a.send(Ping(1), 0)


def test_clean_eof_and_eof_in_mid_frame(pair):
    pair.b.receive_data(b"", 0)
    assert pair.b.next_event() is CLOSED
    assert pair.b.their_state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        pair.b.receive_data(b"x", 0)

    data = encode_event(Ping(1))
    pair.a.receive_data(data[:-1], 0)
    assert pair.a.next_event() is NEED_DATA
    pair.a.receive_data(b"", 0)
    with pytest.raises(RemoteProtocolError) as info:
        pair.a.next_event()
    assert info.value.code == "truncated-frame"


def test_after_a_remote_error_only_error_can_be_sent(pair):
    err = remote_error(pair.b, b"\x00\x00\x00\x01\xc1")
    assert err.code == "bad-frame"
    for call in (lambda: pair.b.next_event(), lambda: pair.b.receive_data(b"more", 1),
                 lambda: pair.b.handle_timer(100)):
        with pytest.raises(RemoteProtocolError):
            call()
    with pytest.raises(LocalProtocolError) as info:
        pair.b.send(Ping(1), 0)
    assert info.value.code == "session-failed"
    events = pair.deliver(pair.b, pair.b.send(Error(err.code, str(err)), 0))
    assert events == [Error("bad-frame", str(err)), CLOSED]
    assert pair.b.get_timer() is None


def test_invalid_sends_change_nothing(pair):
    bad = batch(change(values=(True, 1)))
    with pytest.raises(LocalProtocolError) as info:
        pair.a.send(BatchEvent(1, bad), 0)
    assert info.value.code == "invalid-event" and "booleans" in str(info.value)
    assert pair.a.next_seq == 1 and pair.a.unacked == 0
    assert pair.send(pair.a, BatchEvent(1, batch()))[0].seq == 1


# ---- timers ---------------------------------------------------------------------

def test_heartbeat_ping_after_quiet_interval_and_pong_answer():
    pair = SessionPair(heartbeat_interval=5.0, idle_timeout=15.0)
    pair.handshake()
    assert pair.a.get_timer() == 5.0
    assert pair.a.handle_timer(4.9) == b""
    pair.now = 5.0
    data = pair.a.handle_timer(5.0)
    (ping,) = pair.deliver(pair.a, data)
    assert isinstance(ping, Ping)
    assert pair.send(pair.b, ping.response()) == [Pong(ping.token)]
    assert pair.a.get_timer() == 10.0            # next quiet interval from the Ping
    assert pair.b.get_timer() == 10.0


def test_idle_timeout_raises():
    pair = SessionPair(heartbeat_interval=5.0, idle_timeout=15.0)
    pair.handshake()
    pair.a.handle_timer(5.0)                      # a keeps pinging, b never answers
    pair.a.handle_timer(10.0)
    assert pair.a.get_timer() == 15.0
    with pytest.raises(RemoteProtocolError) as info:
        pair.a.handle_timer(15.0)
    assert info.value.code == "idle-timeout"
    assert "15" in str(info.value)
    assert pair.a.get_timer() is None


def test_received_bytes_keep_the_session_alive():
    pair = SessionPair(heartbeat_interval=5.0, idle_timeout=15.0)
    pair.handshake()
    for t in range(5, 60, 5):
        pair.now = float(t)
        for s in (pair.a, pair.b):
            data = s.handle_timer(pair.now)
            if data:
                pair.deliver(s, data)
    assert pair.a.our_state is State.SYNCING


def test_hello_timeout():
    a = Session(SITE_A, hello_timeout=10.0)
    a.send(hello(SITE_A), 100.0)
    assert a.get_timer() == 105.0
    a.handle_timer(105.0)
    assert a.get_timer() == 110.0
    with pytest.raises(RemoteProtocolError) as info:
        a.handle_timer(110.0)
    assert info.value.code == "hello-timeout"


# ---- hostile frames -------------------------------------------------------------

def test_huge_frame_header_is_refused_from_its_four_bytes():
    s = Session(SITE_B)
    with pytest.raises(RemoteProtocolError) as info:
        s.receive_data(b"\x80\x00\x00\x00", 0.0)
    assert info.value.code == "frame-too-large"
    assert str(info.value) == "peer sent a frame of 2147483648 bytes (limit 16777216); connection closed"


def test_frame_just_over_the_limit_is_refused_and_at_the_limit_is_read():
    dec = FrameDecoder()
    dec.feed(limits.MAX_FRAME.to_bytes(4, "big"))
    assert dec.next_frame() is None                      # legal length: waits for the body
    dec = FrameDecoder()
    dec.feed((limits.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(LocalProtocolError):
        dec.next_frame()


def test_frames_split_at_every_byte_decode_the_same():
    events = [hello(SITE_A), BatchEvent(1, batch(change(1), change(2))), Ack(3), Ping(4), Pong(5), Error("x", "y")]
    stream = b"".join(map(encode_event, events))
    dec, out = FrameDecoder(), []
    for i in range(len(stream)):
        dec.feed(stream[i:i + 1])
        while (e := dec.next_frame()) is not None:
            out.append(e)
    assert out == events and dec.buffered == 0


def _valid_bodies() -> dict[str, list]:
    w = _to_wire(batch(change(1), change(2), ranges=(Range(SITE_A, 0, 2),)))
    return {
        "hello": [1, PROTOCOL_VERSION, SITE_A, b"fp", 123, {SITE_C: 4}, [[3, 9, 2, b"r" * 32, b"s" * 64]]],
        "batch": [2, 1, False, *w],
        "ack": [3, 1], "ping": [4, 7], "pong": [5, 7], "error": [6, "code", "message"],
    }


def _with(body, path, value):
    """A copy of ``body`` with the element at ``path`` replaced, appended, or removed (DEL)."""
    body = _thaw(body)
    *head, last = path
    target = body
    for k in head:
        target = target[k]
    if value is DEL:
        del target[last]
    elif last == len(target):
        target.append(value)
    else:
        target[last] = value
    return body


def _thaw(x):
    if isinstance(x, (list, tuple)):
        return [_thaw(v) for v in x]
    if isinstance(x, dict):
        return {k: _thaw(v) for k, v in x.items()}
    return x


DEL = object()
NESTED = [1]
for _ in range(60):
    NESTED = [NESTED]

# (body, path into it, replacement): each must be refused as bad-frame.
BAD_FIELDS = [
    ("hello", [2], b"x" * 15), ("hello", [2], "a" * 16), ("hello", [2], None),
    ("hello", [3], "fp"), ("hello", [3], b"x" * 65), ("hello", [4], True), ("hello", [4], -1),
    ("hello", [4], 1 << 63), ("hello", [4], 1.0), ("hello", [5], [[SITE_C, 4]]), ("hello", [5], {SITE_C: True}),
    ("hello", [5], {SITE_C: -4}), ("hello", [5], {"x" * 16: 4}), ("hello", [5], {b"short": 4}),
    ("hello", [1], True), ("hello", [5], DEL), ("hello", [7], "extra"), ("hello", [6], DEL),
    ("hello", [6], "x"), ("hello", [6, 0], [3]), ("hello", [6, 0, 3], b"r" * 31), ("hello", [6, 0, 0], -1),
    ("hello", [6, 0, 4], b"s" * 63), ("hello", [6, 0, 1], -1), ("hello", [6], [[1, 9, 2, b"r" * 32, b"s" * 64]] * 65),
    ("batch", [1], True), ("batch", [1], 0), ("batch", [1], -1), ("batch", [1], 1 << 63), ("batch", [1], "1"),
    ("batch", [2], 0), ("batch", [2], None), ("batch", [3], [b"x" * 15]), ("batch", [3], ["s" * 16]),
    ("batch", [3], {}), ("batch", [4], [""]), ("batch", [4], [b"items"]), ("batch", [4], ["t" * 256]),
    ("batch", [5], [["a", "a"]]), ("batch", [5], [[1]]), ("batch", [5], ["abc"]),
    ("batch", [6], [[0]] * 8), ("batch", [6, 0], [0]), ("batch", [6, 0, 0], 1), ("batch", [6, 0, 0], -1),
    ("batch", [6, 0, 0], True), ("batch", [6, 1, 0], []), ("batch", [6, 1, 0], [[1]]), ("batch", [6, 1, 0], 5),
    ("batch", [6, 1, 0], [True]), ("batch", [6, 1, 0], [1 << 63]), ("batch", [6, 1, 0], [float("nan")]),
    ("batch", [6, 1, 0], [{"a": 1}]), ("batch", [6, 1, 0], list(range(33))),
    ("batch", [6, 2, 0], 9), ("batch", [6, 2, 0], 0.0),
    ("batch", [6, 3, 0], 0), ("batch", [6, 3, 0], -5), ("batch", [6, 3, 0], True), ("batch", [6, 3, 0], 1 << 63),
    ("batch", [6, 3, 0], (1 << 64) - 1), ("batch", [6, 4, 0], -1), ("batch", [6, 4, 0], 2.0),
    ("batch", [6, 5, 0], 1), ("batch", [6, 5, 0], "yes"), ("batch", [6, 6, 0], 3),
    ("batch", [6, 7, 0], ["only one"]), ("batch", [6, 7, 0], ["a", "b", "c"]), ("batch", [6, 7, 0], [None, True]),
    ("batch", [6, 7, 0], [None, (1 << 63)]), ("batch", [6, 7, 0], "ab"), ("batch", [6, 7], DEL),
    ("batch", [6, 8], []), ("batch", [7, 0], [0, 5, 5]), ("batch", [7, 0], [0, 5, 4]), ("batch", [7, 0], [3, 0, 1]),
    ("batch", [7, 0], [0, -1, 1]), ("batch", [7, 0], [0, 0, True]), ("batch", [7, 0], [0, 0]), ("batch", [7], {}),
    ("batch", [2], True),  # more=True with ranges
    ("batch", [9], []), ("batch", [8], DEL), ("batch", [8], {}), ("batch", [8], [[0]]),
    ("batch", [8], [[0, 1, 1, 1, b"r" * 32, b"s" * 64, b"x"]]),       # leaves: not count * 32 bytes
    ("batch", [8], [[5, 1, 1, 0, b"r" * 32, b"s" * 64, b""]]),        # no such site
    ("batch", [8], [[0, 0, 1, 0, b"r" * 32, b"s" * 64, b""]]),        # db version 0
    ("batch", [8], [[0, 1, 1, 0, b"r" * 31, b"s" * 64, b""]]),        # short root
    ("ack", [1], True), ("ack", [1], 0), ("ack", [1], -1), ("ack", [1], 1.5), ("ack", [1], 1 << 63), ("ack", [2], 1),
    ("ack", [1], DEL), ("ping", [1], -1), ("ping", [1], None), ("ping", [1], NESTED), ("pong", [1], "1"),
    ("error", [1], ""), ("error", [1], "Has Caps"), ("error", [1], "x" * 65), ("error", [1], b"code"),
    ("error", [2], "m" * 4097), ("error", [2], None), ("error", [3], "extra"),
]


@pytest.mark.parametrize("kind,path,value", BAD_FIELDS, ids=[f"{k}{p}={v!r:.20}" for k, p, v in BAD_FIELDS])
def test_wrong_field_is_bad_frame(kind, path, value):
    body = _valid_bodies()[kind]
    assert decode_body(msgpack.packb(body)) is not None          # the unmutated body is fine
    err = remote_error(Session(SITE_B), frame(msgpack.packb(_with(body, path, value))))
    assert err.code == "bad-frame", err
    assert str(err).startswith("peer sent") and str(err).endswith("connection closed")


@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"\x91", b"\x92\x03\x01\x00", b"\x90", b"\xc0", b"\x93\x07\x01\x02", b"\x92\xa1a\x01",
    msgpack.packb([3, 1]) + b"\x00",                              # extra data after the body
    b"\x91" * 5000 + b"\x01",                                      # nesting deeper than the parser allows
    msgpack.packb([4, 1])[:-1] + b"\xd4\x01\x00",                 # ext type
    b"\x92\x06\xa2\xff\xfe",                                       # invalid UTF-8
    b"\x92\x03" + b"\xdd\xff\xff\xff\xff",                         # array claiming 4 billion items
    b"\x81\xc0\xc0",                                               # map with a nil key
], ids=lambda b: b[:10].hex())
def test_garbage_bodies_are_bad_frame(body):
    assert remote_error(Session(SITE_B), frame(body)).code == "bad-frame"


# ---- the codec and the model agree -------------------------------------------------

anything = st.one_of(
    values, st.booleans(), st.just(float("nan")), st.integers(), st.lists(st.integers(), max_size=2),
    st.binary(min_size=15, max_size=17), st.text(min_size=255, max_size=257),
)


@st.composite
def maybe_invalid_changes(draw):
    def pick(valid, junk=anything):
        return draw(st.one_of(valid, junk)) if draw(st.integers(0, 9)) == 0 else draw(valid)
    cols = pick(st.lists(names, max_size=3).map(tuple), st.lists(anything, max_size=2).map(tuple))
    return Change(
        table=pick(names), pk=pick(st.lists(values, min_size=1, max_size=3).map(tuple),
                                   st.lists(anything, max_size=3).map(tuple)),
        site=pick(sites), dbv=pick(st.integers(1, INT64_MAX)), hlc=pick(st.integers(0, INT64_MAX)),
        alive=pick(st.sampled_from([None, True, False])), columns=cols,
        values=pick(st.lists(values, min_size=len(cols), max_size=len(cols)).map(tuple),
                    st.lists(anything, max_size=3).map(tuple)),
    )


def _model_accepts(b: Batch) -> bool:
    try:
        check_batch(b)
        return True
    except InvalidChange:
        return False


@settings(max_examples=300, deadline=None)
@given(st.lists(maybe_invalid_changes(), min_size=1, max_size=3))
def test_codec_accepts_exactly_what_the_model_accepts(chs):
    b = Batch(tuple(chs))
    ok = _model_accepts(b)
    try:
        data = encode_event(BatchEvent(1, b))
    except LocalProtocolError:
        assert not ok
    else:
        assert ok and decode_body(data[4:]) == BatchEvent(1, b)
    # the decoder, fed the same batch without the encoder's checks, agrees too
    try:
        body = msgpack.packb([2, 1, False, *_to_wire(b)])
    except (TypeError, ValueError, OverflowError):
        return                                     # not even representable as msgpack
    try:
        decode_body(body)
    except LocalProtocolError as e:
        assert e.code == "bad-frame" and not ok
    else:
        assert ok


# ---- Members: the membership exchange ----------------------------------------

def test_members_round_trip_before_and_after_hello():
    from p2psync.protocol import Members

    heads, events = (b"\x01" * 32, b"\x02" * 32), (b"event one", b"\x00" * 1000)
    pair = SessionPair()
    got = pair.send(pair.a, Members(heads, events))          # before Hello: the exchange comes first
    assert got == [Members(heads, events)]
    assert pair.a.our_state is State.AWAIT_HELLO and pair.b.their_state is State.AWAIT_HELLO
    pair.send(pair.a, hello(SITE_A))
    pair.send(pair.b, hello(SITE_B))
    assert pair.send(pair.b, Members((), (b"later",))) == [Members((), (b"later",))]   # pushed while syncing
    assert pair.a.their_state is State.SYNCING


@pytest.mark.parametrize("body, what", [
    ([7, [b"short"], []], "head must be 32 bytes"),
    ([7, [b"\x01" * 32] * (limits.MAX_MEMBER_HEADS + 1), []], "at most"),
    ([7, [], ["text, not bytes"]], "an event must be"),
    ([7, [], [b""]], "an event must be"),
    ([7, {}, []], "heads must be a list"),
    ([7, []], "fields"),
])
def test_malformed_members_are_bad_frames(body, what):
    err = remote_error(Session(SITE_B), frame(msgpack.packb(body)))
    assert err.code == "bad-frame" and what in str(err), str(err)


def test_members_may_not_follow_an_error():
    from p2psync.protocol import Members

    pair = SessionPair()
    pair.send(pair.a, Error("bye", "closing"))
    with pytest.raises(LocalProtocolError):
        pair.a.send(Members((), ()), 0)
