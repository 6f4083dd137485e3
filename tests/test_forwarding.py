"""What a session sends a peer (sync/peer.py): its own writes at once, others' only when nobody else brings them.

Pure tests of ``PeerSync.plan``/``announce``/``heard`` (the rule every session runs), and of the
``Have`` event on the wire. The mesh tests with real agents are in test_lan_mesh.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from p2psync.model import Batch, Range, VersionVector
from p2psync.protocol import Have, LocalProtocolError, decode_body, encode_event
from p2psync.sync.peer import NOT_DUE, PeerSync

ME, A, B, C = (bytes([i]) * 16 for i in (1, 2, 3, 4))
EAGER = frozenset((ME,))
DELAY = 0.25


def vv(**entries) -> VersionVector:
    names = {"me": ME, "a": A, "b": B, "c": C}
    return VersionVector({names[k]: n for k, n in entries.items()})


def test_own_writes_are_due_at_once_and_others_only_after_the_delay():
    peer = PeerSync(vv(me=3, a=5))
    read, next_due = peer.plan(vv(me=4, a=6), EAGER, now=10.0, delay=DELAY)
    assert read is not None and read[ME] == 3          # our own new version: read from the peer's entry
    assert read[A] == NOT_DUE and next_due == 10.0 + DELAY   # A's: not yet
    read, _ = peer.plan(vv(me=3, a=6), EAGER, now=10.0 + DELAY / 2, delay=DELAY)
    assert read is None                                 # nothing due (our own was sent meanwhile: known says so)
    read, next_due = peer.plan(vv(me=3, a=6), EAGER, now=10.0 + DELAY, delay=DELAY)
    assert read is not None and read[A] == 5 and next_due is None


def test_a_peer_that_hears_of_it_elsewhere_is_not_sent_it():
    peer = PeerSync(vv(a=5))
    assert peer.plan(vv(a=6), EAGER, now=0.0, delay=DELAY)[0] is None
    peer.heard(vv(a=6))                                 # it got A's version 6 from A itself
    read, next_due = peer.plan(vv(a=6), EAGER, now=DELAY * 2, delay=DELAY)
    assert read is None and next_due is None


def test_progress_from_elsewhere_restarts_the_wait_and_a_stall_ends_it():
    peer = PeerSync(vv(a=0))
    peer.plan(vv(a=100), EAGER, now=0.0, delay=DELAY)
    for step in range(1, 8):                            # catching up from someone else, a little at a time
        peer.heard(vv(a=step * 10))
        assert peer.plan(vv(a=100), EAGER, now=step * DELAY * 0.9, delay=DELAY)[0] is None
    stalled_at = 7 * DELAY * 0.9
    read, _ = peer.plan(vv(a=100), EAGER, now=stalled_at + DELAY, delay=DELAY)
    assert read is not None and read[A] == 70           # no progress for the delay: we send the rest


def test_what_we_send_and_what_the_peer_sends_count_as_known_both_ways():
    peer = PeerSync(vv(a=1), told=vv(a=1))
    peer.sent(Batch((), (Range(B, 0, 4),)))
    assert peer.known[B] == 4 and peer.told[B] == 4
    whole, _ = peer.received_part(Batch((), (Range(C, 0, 2),)), more=False)
    assert whole is not None and peer.known[C] == 2 and peer.told[C] == 2
    assert peer.announce(vv(a=1, b=4, c=2)) is None     # the peer knows all of that already
    assert peer.announce(vv(a=3, b=4, c=2)) == vv(a=3)  # only what moved
    assert peer.announce(vv(a=3, b=4, c=2)) is None


@settings(max_examples=200, deadline=None)
@given(ours=st.dictionaries(st.sampled_from([ME, A, B, C]), st.integers(0, 50)),
       known=st.dictionaries(st.sampled_from([ME, A, B, C]), st.integers(0, 50)),
       waited=st.floats(0, 1))
def test_the_plan_never_reads_what_the_peer_holds_and_always_sends_eventually(ours, known, waited):
    peer = PeerSync(VersionVector(known))
    o = VersionVector(ours)
    read, next_due = peer.plan(o, EAGER, now=0.0, delay=DELAY)
    lacking = {s for s, n in o.items() if n > peer.known[s]}
    if read is not None:
        for s in o:
            assert read[s] >= peer.known[s]             # never reads from below what the peer holds
    if ME in lacking:
        assert read is not None and read[ME] == peer.known[ME]
    # after the delay, everything the peer lacks is due (delivery never waits on another forwarder)
    later, _ = peer.plan(o, EAGER, now=DELAY + waited, delay=DELAY)
    if lacking:
        assert later is not None and all(later[s] == peer.known[s] for s in lacking)
    else:
        assert later is None and next_due is None


def test_have_round_trips_and_hostile_haves_are_refused():
    ev = Have(vv(a=7, b=1 << 40))
    assert decode_body(encode_event(ev)[4:]) == ev
    import msgpack
    for bad in ([8, [A]], [8, [A, 1, A, 2]], [8, [b"x" * 15, 1]], [8, [A, -1]], [8, [A, True]], [8, []],
                [8, [A, 1 << 63]]):
        with pytest.raises(LocalProtocolError):
            decode_body(msgpack.packb(bad))
    with pytest.raises(LocalProtocolError):
        encode_event(Have(VersionVector()))
