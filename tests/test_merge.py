"""The merge rule is a register merge every replica agrees on, and the HLC behaves as a clock.

``merge(a, b)`` keeps the winner of two writes to one register. For replicas
to converge whatever the delivery order, it must be commutative, associative
and idempotent, with ties decided by the data alone (site, then value).
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync.model import ClockSkewError, Hlc
from p2psync.model.hlc import pack, wall_ms
from p2psync.model.merge import Clock, compare_clocks, value_key, wins

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
FLOATS = st.floats(allow_nan=False)
VALUES = st.one_of(
    st.none(),
    INT64,
    st.sampled_from([0, 1, -1, 0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 2 ** 53, 2.0 ** 53, (1 << 63) - 1,
                     9.223372036854776e18]),
    FLOATS,
    st.text(max_size=8),
    st.binary(max_size=8),
)
SITES = st.sampled_from([bytes(16), b"\x01" * 16, b"\xff" * 16]) | st.binary(min_size=16, max_size=16)
HLCS = st.sampled_from([0, 1, pack(1000), pack(1000, 1)]) | st.integers(0, (1 << 64) - 1)
CLOCKS = st.builds(Clock, HLCS, SITES, VALUES)
# Small domains make ties (equal hlc, equal site) frequent.
NEAR_EQUAL = st.sampled_from([None, 0, 0.0, -0.0, 1, 1.0, "", b"", "1", b"1"])
TIED = st.builds(Clock, st.sampled_from([5, 6]), st.sampled_from([b"a" * 16, b"b" * 16]), NEAR_EQUAL | VALUES)
ANY_CLOCK = st.one_of(CLOCKS, TIED)


def merge(a: Clock, b: Clock) -> Clock:
    return b if wins(a, b) else a


def ident(v) -> tuple:
    """Identity of a SQLite value as a user sees it: type and exact bits (so 1 != 1.0, 0.0 != -0.0)."""
    if isinstance(v, float):
        return (float, struct.pack("<d", v))
    return (type(v), v)


def same(a: Clock, b: Clock) -> bool:
    return a.hlc == b.hlc and a.site == b.site and ident(a.value) == ident(b.value)


@settings(deadline=None, max_examples=400)
@given(ANY_CLOCK, ANY_CLOCK)
def test_merge_is_commutative(a, b):
    assert same(merge(a, b), merge(b, a))


@settings(deadline=None, max_examples=400)
@given(ANY_CLOCK, ANY_CLOCK, ANY_CLOCK)
def test_merge_is_associative(a, b, c):
    assert same(merge(merge(a, b), c), merge(a, merge(b, c)))


@settings(deadline=None, max_examples=200)
@given(ANY_CLOCK)
def test_merge_is_idempotent_and_a_write_never_beats_itself(a):
    assert same(merge(a, a), a)
    assert not wins(a, a)
    assert wins(None, a)


@settings(deadline=None, max_examples=200)
@given(st.lists(ANY_CLOCK, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_any_delivery_order_gives_the_same_winner(writes, rnd):
    def fold(ws):
        reg = None
        for w in ws:
            if wins(reg, w):
                reg = w
        return reg

    shuffled = list(writes) + list(writes[: rnd.randint(0, len(writes))])  # duplicates too
    rnd.shuffle(shuffled)
    assert same(fold(writes), fold(shuffled))


@settings(deadline=None, max_examples=200)
@given(ANY_CLOCK, ANY_CLOCK)
def test_higher_hlc_wins_then_higher_site(a, b):
    if a.hlc != b.hlc:
        assert merge(a, b).hlc == max(a.hlc, b.hlc)
    elif a.site != b.site:
        assert merge(a, b).site == max(a.site, b.site)
        assert compare_clocks(a.hlc, a.site, b.hlc, b.site) == (1 if b.site > a.site else -1)


def test_equal_clock_ties_break_on_the_greater_value():
    h, s = pack(7), b"s" * 16
    ladder = [None, -(1 << 63), -1.5, -1, 0, 0.5, 1, 1e308, float("inf"), "", "a", "b", b"", b"\x00"]
    for i, lo in enumerate(ladder):
        for hi in ladder[i + 1:]:
            assert wins(Clock(h, s, lo), Clock(h, s, hi)), (lo, hi)
            assert not wins(Clock(h, s, hi), Clock(h, s, lo)), (lo, hi)


@pytest.mark.parametrize("x, y", [(1, 1.0), (0, 0.0), (0, -0.0), (-0.0, 0.0), (2 ** 53, 2.0 ** 53),
                                  (-5, -5.0), ((1 << 63) - 1, 9.223372036854776e18)])
def test_int_and_equal_float_tie_break_is_deterministic(x, y):
    h, s = pack(7), b"s" * 16
    a, b = Clock(h, s, x), Clock(h, s, y)
    assert same(merge(a, b), merge(b, a))
    assert value_key(x) != value_key(y), "distinct SQLite values must have distinct places in the order"
    # exactly one of the two beats the other
    assert wins(a, b) != wins(b, a)


def test_hlc_now_strictly_increases_even_when_the_wall_goes_backwards():
    c = Hlc()
    seen = []
    for wall in [1000, 1000, 1000, 999, 500, 0, 1001, 1001, 2000, 10]:
        seen.append(c.now(wall))
    assert all(b > a for a, b in zip(seen, seen[1:]))
    assert wall_ms(seen[-2]) == 2000 and wall_ms(seen[-1]) == 2000  # the clock never goes back to 10


@settings(deadline=None, max_examples=100)
@given(st.lists(st.integers(0, 1 << 40), min_size=1, max_size=40))
def test_hlc_now_is_monotonic_for_any_walls(walls):
    c = Hlc()
    prev = -1
    for w in walls:
        ts = c.now(w)
        assert ts > prev and ts >= pack(w)
        prev = ts


def test_hlc_counter_carries_into_the_milliseconds():
    c = Hlc(last=pack(1000, 0xFFFF))
    ts = c.now(1000)
    assert ts == pack(1001, 0)
    assert c.now(1000) == pack(1001, 1)


def test_hlc_receive_refuses_a_timestamp_too_far_ahead_and_does_not_advance():
    c = Hlc(last=pack(1000, 3), max_skew_ms=60_000)
    before = c.last
    with pytest.raises(ClockSkewError) as e:
        c.receive(pack(1000 + 60_001), wall=1000)
    assert c.last == before
    assert "ahead" in str(e.value)
    assert c.now(1000) == pack(1000, 4)  # still issuing from where it was
    # at the limit it is accepted and advances the clock
    assert c.receive(pack(61_000, 9), wall=1000) == pack(61_000, 9)
    assert c.now(1000) > pack(61_000, 9)


def test_hlc_receive_of_an_older_timestamp_keeps_the_clock():
    c = Hlc(last=pack(5000))
    assert c.receive(pack(10), wall=5000) == pack(5000)


def test_value_key_totally_orders_sqlite_values():
    vals = [None, 0, 0.0, -0.0, 1, 1.0, -math.inf, math.inf, "x", b"x", "", b""]
    keys = {value_key(v) for v in vals}
    assert len(keys) == len({ident(v) for v in vals})
