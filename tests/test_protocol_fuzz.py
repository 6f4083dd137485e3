"""Hostile bytes: whatever a peer sends, a session yields valid events or raises RemoteProtocolError."""

from __future__ import annotations

import copy
import random
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psync.model import Batch, Change, Range, VersionVector
from p2psync.protocol import (
    CLOSED, NEED_DATA, PROTOCOL_VERSION, Ack, BatchEvent, Error, Hello, Ping, Pong,
    RemoteProtocolError, Session, encode_event,
)

SITE_A = bytes(range(16))
SITE_B = bytes(range(16, 32))
HELLO_A = encode_event(Hello(PROTOCOL_VERSION, SITE_A, b"fp", 1, VersionVector({SITE_A: 9})))


def _random_value(rng: random.Random):
    kind = rng.randrange(6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.randint(-(1 << 63), (1 << 63) - 1)
    if kind == 2:
        return rng.choice([0.0, -0.0, 1.5, float("inf"), -1e300])
    if kind == 3:
        return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(8)))
    if kind == 4:
        return rng.randbytes(rng.randrange(20))
    return rng.randrange(100)


def _random_batch(rng: random.Random, seq: int) -> BatchEvent:
    changes = []
    for i in range(rng.randrange(6)):
        cols = tuple(rng.sample(["a", "b", "c", "d"], rng.randrange(4)))
        changes.append(Change(
            rng.choice(["items", "orders"]), (rng.randrange(1000), _random_value(rng)),
            rng.choice([SITE_A, SITE_B]), rng.randrange(1, 1 << 40), rng.randrange(1 << 62),
            rng.choice([True, False]) if not cols else rng.choice([None, True, False]),
            cols, tuple(_random_value(rng) for _ in cols),
        ))
    more = rng.random() < 0.3
    ranges = () if more else (Range(SITE_A, 0, rng.randrange(1, 100)),)
    return BatchEvent(seq, Batch(tuple(changes), ranges), more)


def _corpus(seed: int = 7) -> list[bytes]:
    """Valid frames of every event type, as a peer in SYNCING might send them after its Hello."""
    rng = random.Random(seed)
    frames = [encode_event(_random_batch(rng, 1)) for _ in range(40)]
    frames += [encode_event(e) for e in (Ack(1), Ping(5), Pong(5), Error("bad-frame", "why"), Ping(0))]
    frames.append(HELLO_A)
    return frames


CORPUS = _corpus()


def run_peer_bytes(data: bytes, *, after_hello: bool, chunk: int = 0) -> list:
    """Feed ``data`` to a fresh session; return its events. Only RemoteProtocolError may escape."""
    s = Session(SITE_B)
    s.send(Hello(PROTOCOL_VERSION, SITE_B, b"fp", 1, VersionVector()), 0.0)
    if after_hello:
        data = HELLO_A + data
    events = []
    try:
        pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
        for piece in pieces + [b""]:
            s.receive_data(piece, 0.0)
            while (e := s.next_event()) is not NEED_DATA:
                if e is CLOSED:
                    return events
                events.append(e)
    except RemoteProtocolError as e:
        assert e.code and str(e)
    return events


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """A damaged copy of ``frame``: flipped, dropped, inserted or duplicated bytes, length fixed or not."""
    body = bytearray(frame[4:])
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(body) + 1)
        if op == 0 and body:
            body[min(pos, len(body) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and body:
            body[min(pos, len(body) - 1)] = rng.choice([0x00, 0xc0, 0xc2, 0xc3, 0xcf, 0xd3, 0xdc, 0xdd, 0xff, 0x7f])
        elif op == 2:
            del body[pos:pos + rng.randrange(1, 8)]
        elif op == 3:
            body[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        else:
            body[pos:pos] = body[rng.randrange(len(body) + 1):][:rng.randrange(1, 16)]
    out = _frame(bytes(body))
    if rng.random() < 0.1:   # a wrong length prefix
        out = rng.randbytes(4) + out[4:]
    return out


_ODD_VALUES = [None, True, False, 0, -1, 1 << 63, (1 << 64) - 1, -(1 << 63), 1.5, float("nan"), "", "x" * 300,
               b"", b"\x00" * 15, b"\x00" * 16, [], [0], [[]], {}, {b"\x00" * 16: 1}, 2 ** 31]


def mutate_structure(rng: random.Random, frame: bytes) -> bytes:
    """``frame`` with one element somewhere in its msgpack tree replaced, dropped or duplicated."""
    body = msgpack.unpackb(frame[4:], strict_map_key=False)
    for _ in range(rng.randrange(1, 3)):
        parent = body
        while True:
            if not parent:
                break
            i = rng.randrange(len(parent))
            child = parent[i]
            if isinstance(child, list) and child and rng.random() < 0.7:
                parent = child
                continue
            op = rng.randrange(4)
            if op == 0:
                del parent[i]
            elif op == 1:
                parent.insert(i, copy.deepcopy(rng.choice(_ODD_VALUES)))
            else:
                parent[i] = copy.deepcopy(rng.choice(_ODD_VALUES)) if op == 2 else _random_value(rng)
            break
    return _frame(msgpack.packb(body))


# ---- Hypothesis -----------------------------------------------------------------

fuzz_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz_settings
@given(st.binary(max_size=400), st.booleans(), st.integers(0, 7))
def test_random_bytes(data, after_hello, chunk):
    run_peer_bytes(data, after_hello=after_hello, chunk=chunk)


@fuzz_settings
@given(st.binary(max_size=400), st.booleans())
def test_random_bodies_with_a_valid_length(body, after_hello):
    run_peer_bytes(_frame(body), after_hello=after_hello)


@fuzz_settings
@given(st.randoms(use_true_random=False), st.sampled_from(CORPUS))
def test_mutated_valid_frames(rng, frame):
    run_peer_bytes(mutate(rng, frame), after_hello=True)


@fuzz_settings
@given(st.randoms(use_true_random=False), st.sampled_from(CORPUS))
def test_valid_frames_with_one_field_replaced(rng, frame):
    run_peer_bytes(mutate_structure(rng, frame), after_hello=True)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=4) | st.binary(max_size=17), inner,
                                                                max_size=4),
    max_leaves=20,
)


@settings(fuzz_settings, max_examples=150)
@given(st.integers(0, 8), st.lists(msgpack_values, max_size=8), st.booleans())
def test_well_formed_msgpack_of_the_wrong_shape(tag, fields, after_hello):
    run_peer_bytes(_frame(msgpack.packb([tag, *fields])), after_hello=after_hello)


def test_valid_stream_in_any_chunking_yields_every_event():
    events = [_random_batch(random.Random(1), 1), Ping(3), Pong(4), Error("done", "bye")]
    data = b"".join(map(encode_event, events))
    for chunk in (0, 1, 3, 64):
        assert run_peer_bytes(data, after_hello=True, chunk=chunk)[1:] == events


# ---- long run -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fuzz_loop_100k_inputs():
    rng = random.Random(20240611)
    n, kinds = 100_000, [0, 0, 0, 0]
    started = time.perf_counter()
    for _ in range(n):
        k = rng.choice([0, 1, 2, 2, 3, 3, 3])
        if k == 0:
            data = _frame(rng.randbytes(rng.randrange(64)))
        elif k == 1:
            data = rng.randbytes(rng.randrange(64))
        elif k == 2:
            data = mutate(rng, rng.choice(CORPUS))
        else:
            data = mutate_structure(rng, rng.choice(CORPUS))
        kinds[k] += 1
        run_peer_bytes(data, after_hello=rng.random() < 0.9, chunk=rng.choice([0, 0, 0, 1, 5]))
    print(f"\n{n} fuzz inputs ({kinds[0]} random bodies, {kinds[1]} random streams, {kinds[2]} byte-mutated "
          f"and {kinds[3]} field-mutated valid frames) in {time.perf_counter() - started:.1f} s")
