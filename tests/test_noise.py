"""Noise: published vectors, every table pattern, transport, oracle interop, multi-PSK
responder, fuzzing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psync.noise import (
    AGENT_PROTOCOL,
    MAX_PLAINTEXT_LEN,
    MAX_PSK_CANDIDATES,
    PATTERNS,
    REKEY_INTERVAL,
    CipherState,
    DecryptError,
    HandshakeError,
    HandshakeState,
    MultiPskResponder,
    NoiseError,
    NoiseTransport,
    agent_handshake,
    agent_responder,
)
from p2psync.noise.handshake import use_fixed_ephemeral_for_tests
from p2psync.noise.patterns import parse_protocol_name


def _shared_dir() -> Path:
    env = os.environ.get("P2PSYNC_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


VECTORS_PATH = _shared_dir() / "testdata" / "noise-vectors.json"
VECTORS = json.loads(VECTORS_PATH.read_text())["vectors"]


def _hex(vector: dict, key: str) -> bytes | None:
    return bytes.fromhex(vector[key]) if key in vector else None


def _private() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _handshake_pair(name: str, psk_count: int = 0, prologue: bytes = b"p"):
    """Initiator, responder, their static keys and the PSKs, for ``name``."""
    pattern = parse_protocol_name(name).pattern
    keys = {True: _private(), False: _private()}
    psks = [os.urandom(32) for _ in range(psk_count)]
    sides = []
    for initiator in (True, False):
        mine, theirs = (
            (pattern.initiator_pre, pattern.responder_pre)
            if initiator
            else (pattern.responder_pre, pattern.initiator_pre)
        )
        sends_s = "s" in mine or any("s" in m for m in pattern.sent_by(initiator))
        sides.append(
            HandshakeState(
                name,
                initiator,
                prologue=prologue,
                s=keys[initiator] if sends_s else None,
                rs=_public(keys[not initiator]) if "s" in theirs else None,
                psks=psks,
            )
        )
    return sides[0], sides[1], keys, psks


def _run(init: HandshakeState, resp: HandshakeState, stop: int | None = None) -> list[bytes]:
    """Exchange handshake messages (up to ``stop`` of them); returns the messages sent."""
    sent = []
    while not init.complete and (stop is None or len(sent) < stop):
        sender, receiver = (init, resp) if init.our_turn else (resp, init)
        payload = b"payload %d" % len(sent)
        message = sender.write_message(payload)
        assert receiver.read_message(message) == payload
        sent.append(message)
    return sent


# -- 1. published vectors ---------------------------------------------------


@pytest.mark.parametrize(
    "vector", VECTORS, ids=[f"{v['protocol_name']}-{i}" for i, v in enumerate(VECTORS)]
)
def test_vector(vector: dict) -> None:
    sides = {}
    for side, initiator in (("init", True), ("resp", False)):
        hs = HandshakeState(
            vector["protocol_name"],
            initiator,
            prologue=_hex(vector, f"{side}_prologue"),
            s=_hex(vector, f"{side}_static"),
            rs=_hex(vector, f"{side}_remote_static"),
            psks=[bytes.fromhex(p) for p in vector.get(f"{side}_psks", [])],
        )
        use_fixed_ephemeral_for_tests(hs, _hex(vector, f"{side}_ephemeral"))
        sides[side] = hs
    init, resp = sides["init"], sides["resp"]
    messages = vector["messages"]
    transports: tuple[NoiseTransport, NoiseTransport] | None = None
    # Messages alternate initiator/responder by index, through the handshake and after it.
    for i, message in enumerate(messages):
        payload = bytes.fromhex(message["payload"])
        from_initiator = i % 2 == 0
        if not init.complete:
            sender, receiver = (init, resp) if from_initiator else (resp, init)
            ciphertext = sender.write_message(payload)
            assert ciphertext.hex() == message["ciphertext"], f"handshake message {i}"
            assert receiver.read_message(ciphertext) == payload
            continue
        if transports is None:
            assert resp.complete
            if "handshake_hash" in vector:
                assert init.handshake_hash.hex() == vector["handshake_hash"]
            assert init.handshake_hash == resp.handshake_hash
            transports = (NoiseTransport.from_handshake(init), NoiseTransport.from_handshake(resp))
        sender, receiver = transports if from_initiator else transports[::-1]
        ciphertext = sender.encrypt(payload)
        assert ciphertext.hex() == message["ciphertext"], f"transport message {i}"
        assert receiver.decrypt(ciphertext) == payload
    assert transports is not None, "vector ended before any transport message"
    if "resp_static" in vector:
        assert init.remote_static == _public(_hex(vector, "resp_static"))
    if "init_static" in vector:
        assert resp.remote_static == _public(_hex(vector, "init_static"))


def test_vectors_cover_the_expected_protocols() -> None:
    assert len(VECTORS) == 29
    assert {v["protocol_name"].split("_")[1] for v in VECTORS} >= {"NN", "XX", "IK", "KK", "KK1", "IK1"}


# -- every pattern in the table runs end to end ------------------------------


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("psk", ["", "psk0", "psk1", "psk0+psk1"])
def test_every_pattern_completes(pattern: str, psk: str) -> None:
    name = f"Noise_{pattern}{psk}_25519_ChaChaPoly_BLAKE2s"
    init, resp, keys, _ = _handshake_pair(name, psk_count=psk.count("psk"))
    sent = _run(init, resp)
    assert len(sent) == len(PATTERNS[pattern].messages)
    assert resp.complete and init.handshake_hash == resp.handshake_hash
    if init.local_static is not None:
        assert resp.remote_static == _public(keys[True])
    if resp.local_static is not None:
        assert init.remote_static == _public(keys[False])
    a, b = NoiseTransport.from_handshake(init), NoiseTransport.from_handshake(resp)
    assert b.decrypt(a.encrypt(b"hello")) == b"hello"
    if pattern not in ("N", "K", "X"):  # one-way patterns only send from the initiator
        assert a.decrypt(b.encrypt(b"back")) == b"back"


@pytest.mark.parametrize(
    "name",
    [
        "Noise_XX_448_ChaChaPoly_BLAKE2s",
        "Noise_XX_25519_AESGCM_BLAKE2s",
        "Noise_XX_25519_ChaChaPoly_BLAKE2b",
        "Noise_ZZ_25519_ChaChaPoly_BLAKE2s",
        "Noise_XXfallback_25519_ChaChaPoly_BLAKE2s",
        "Noise_XXpsk4_25519_ChaChaPoly_BLAKE2s",
        "Noise_XXpsk1+psk1_25519_ChaChaPoly_BLAKE2s",
        "Noise_XX_25519_ChaChaPoly",
        "NoiseXX",
        "",
    ],
)
def test_unsupported_or_malformed_protocol_names(name: str) -> None:
    with pytest.raises(HandshakeError):
        HandshakeState(name, True, s=_private(), psks=[bytes(32)] * 2)


def test_keys_the_pattern_does_not_fit_are_refused() -> None:
    xx = "Noise_XX_25519_ChaChaPoly_BLAKE2s"
    with pytest.raises(HandshakeError, match="needs a local static key"):
        HandshakeState(xx, True)
    with pytest.raises(HandshakeError, match="do not pass rs"):
        HandshakeState(xx, True, s=_private(), rs=_public(_private()))
    with pytest.raises(HandshakeError, match="needs the peer's static public key"):
        HandshakeState("Noise_IK_25519_ChaChaPoly_BLAKE2s", True, s=_private())
    with pytest.raises(HandshakeError, match="uses no local static key"):
        HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2s", True, s=_private())
    with pytest.raises(HandshakeError, match="needs 1 pre-shared key"):
        HandshakeState("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s", True)
    with pytest.raises(HandshakeError, match="must be 32 bytes"):
        HandshakeState("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s", True, psks=[bytes(31)])
    with pytest.raises(HandshakeError, match="must be 32 bytes"):
        HandshakeState(xx, True, s=bytes(33))


# -- 3. transport -----------------------------------------------------------


def _transports(rekey_interval: int = REKEY_INTERVAL, rekey_b: int | None = None):
    init, resp, _, _ = _handshake_pair("Noise_XX_25519_ChaChaPoly_BLAKE2s")
    _run(init, resp)
    a = NoiseTransport.from_handshake(init, rekey_interval=rekey_interval)
    b = NoiseTransport.from_handshake(resp, rekey_interval=rekey_b or rekey_interval)
    return a, b


def test_transport_round_trip_both_ways() -> None:
    a, b = _transports()
    for i in range(5):
        assert b.decrypt(a.encrypt(b"ping %d" % i)) == b"ping %d" % i
        assert a.decrypt(b.encrypt(b"pong %d" % i)) == b"pong %d" % i
    assert b.decrypt(a.encrypt(b"")) == b""
    assert (a.sent, a.received) == (6, 5)


def test_plaintext_limit_is_65519_bytes() -> None:
    a, b = _transports()
    big = os.urandom(MAX_PLAINTEXT_LEN)
    assert MAX_PLAINTEXT_LEN == 65519
    message = a.encrypt(big)
    assert len(message) == 65535
    assert b.decrypt(message) == big
    with pytest.raises(NoiseError, match="65520 bytes is too large"):
        a.encrypt(big + b"x")
    assert not a.closed  # a local size error does not burn the session
    assert b.decrypt(a.encrypt(b"after")) == b"after"


def test_oversized_or_undersized_ciphertext_is_rejected() -> None:
    for bad in (bytes(65536), bytes(15), b""):
        a, b = _transports()
        with pytest.raises(DecryptError):
            b.decrypt(bad)
        assert b.closed


def test_flipped_byte_closes_the_transport() -> None:
    a, b = _transports()
    good = a.encrypt(b"important")
    tampered = bytearray(good)
    tampered[3] ^= 0x01
    with pytest.raises(DecryptError, match="failed authentication"):
        b.decrypt(bytes(tampered))
    assert b.closed
    with pytest.raises(NoiseError, match="transport is closed"):
        b.decrypt(good)  # even the genuine message is refused now
    with pytest.raises(NoiseError, match="transport is closed"):
        b.encrypt(b"reply")


def test_replayed_message_is_rejected() -> None:
    a, b = _transports()
    first = a.encrypt(b"one")
    assert b.decrypt(first) == b"one"
    with pytest.raises(DecryptError):
        b.decrypt(first)


def test_reordered_messages_are_rejected() -> None:
    a, b = _transports()
    first, second = a.encrypt(b"1"), a.encrypt(b"2")
    with pytest.raises(DecryptError):
        b.decrypt(second)


def test_rekey_interval_is_honoured() -> None:
    assert REKEY_INTERVAL == 2**20
    a, b = _transports(rekey_interval=3)
    for i in range(10):
        assert b.decrypt(a.encrypt(b"m%d" % i)) == b"m%d" % i
        assert a.decrypt(b.encrypt(b"r%d" % i)) == b"r%d" % i
    # A receiver that rekeys later reads messages 0-2, then fails on message 3:
    # the sender changed its key after exactly 3 messages.
    a, b = _transports(rekey_interval=3, rekey_b=4)
    for i in range(3):
        assert b.decrypt(a.encrypt(b"m%d" % i)) == b"m%d" % i
    with pytest.raises(DecryptError):
        b.decrypt(a.encrypt(b"m3"))


def test_rekey_matches_cipherstate_rekey() -> None:
    key = os.urandom(32)
    sender, reference = CipherState(key), CipherState(key)
    transport = NoiseTransport(sender, CipherState(os.urandom(32)), rekey_interval=2)
    for n in range(2):
        assert transport.encrypt(b"x") == reference.encrypt_with_ad(b"", b"x")
    reference.rekey()
    assert transport.encrypt(b"y") == reference.encrypt_with_ad(b"", b"y")


def test_nonce_exhaustion_is_an_error() -> None:
    cipher = CipherState(os.urandom(32))
    cipher.set_nonce(2**64 - 2)
    cipher.encrypt_with_ad(b"", b"last")
    with pytest.raises(NoiseError, match="nonce space exhausted"):
        cipher.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(NoiseError):
        cipher.set_nonce(2**64)


def test_interop_with_noiseprotocol_oracle() -> None:
    connection = pytest.importorskip(
        "noise.connection", reason="noiseprotocol (test oracle) is not installed"
    )
    names = [
        "Noise_XX_25519_ChaChaPoly_BLAKE2s",
        "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s",
        "Noise_XXpsk3_25519_ChaChaPoly_SHA256",
        "Noise_NN_25519_ChaChaPoly_BLAKE2s",
        "Noise_NK_25519_ChaChaPoly_BLAKE2s",
        "Noise_KN_25519_ChaChaPoly_BLAKE2s",
        "Noise_KK_25519_ChaChaPoly_BLAKE2s",
        "Noise_KX_25519_ChaChaPoly_BLAKE2s",
        "Noise_XN_25519_ChaChaPoly_BLAKE2s",
        "Noise_XK_25519_ChaChaPoly_BLAKE2s",
        "Noise_IN_25519_ChaChaPoly_BLAKE2s",
        "Noise_IK_25519_ChaChaPoly_BLAKE2s",
        "Noise_IX_25519_ChaChaPoly_BLAKE2s",
        "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s",
        "Noise_NNpsk0+psk2_25519_ChaChaPoly_BLAKE2s",
    ]
    for name in names:
        for ours_initiates in (True, False):
            _interop_once(connection, name, ours_initiates)


def _interop_once(connection, name: str, ours_initiates: bool) -> None:
    ours, template, keys, psks = _handshake_pair(name, name.count("psk"), prologue=b"interop")
    if not ours_initiates:
        template, ours = ours, template
    theirs = connection.NoiseConnection.from_name(name.encode())
    (theirs.set_as_responder if ours_initiates else theirs.set_as_initiator)()
    theirs.set_prologue(b"interop")
    if template.local_static is not None:
        theirs.set_keypair_from_private_bytes(
            connection.Keypair.STATIC, keys[not ours_initiates]
        )
    if template.remote_static is not None:
        theirs.set_keypair_from_public_bytes(
            connection.Keypair.REMOTE_STATIC, template.remote_static
        )
    if "psk" in name:
        theirs.set_psks(psks=psks)
    theirs.start_handshake()
    while not ours.complete:
        if ours.our_turn:
            assert bytes(theirs.read_message(ours.write_message(b"from us"))) == b"from us"
        else:
            assert ours.read_message(theirs.write_message(b"from them")) == b"from them"
    assert theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash(), name
    transport = NoiseTransport.from_handshake(ours, rekey_interval=2)
    for i in range(5):
        assert theirs.decrypt(transport.encrypt(b"a%d" % i)) == b"a%d" % i
        assert transport.decrypt(theirs.encrypt(b"b%d" % i)) == b"b%d" % i
        if i % 2 == 1:  # we rekey every 2 messages each way; tell the oracle to follow
            theirs.rekey_outbound_cipher()
            theirs.rekey_inbound_cipher()


def test_multi_psk_responder_interops_with_noiseprotocol_initiator() -> None:
    connection = pytest.importorskip(
        "noise.connection", reason="noiseprotocol (test oracle) is not installed"
    )
    psks = [os.urandom(32) for _ in range(3)]
    for used in range(3):
        ours = agent_responder(_private(), psks, b"interop")
        theirs = connection.NoiseConnection.from_name(AGENT_PROTOCOL.encode())
        theirs.set_as_initiator()
        theirs.set_prologue(b"interop")
        their_key = _private()
        theirs.set_keypair_from_private_bytes(connection.Keypair.STATIC, their_key)
        theirs.set_psks(psks=[psks[used]])
        theirs.start_handshake()
        assert ours.read_message(theirs.write_message(b"m1")) == b"m1"
        assert ours.psk_index == used
        assert bytes(theirs.read_message(ours.write_message(b"m2"))) == b"m2"
        assert ours.read_message(theirs.write_message(b"m3")) == b"m3"
        assert ours.complete and theirs.handshake_finished
        assert ours.handshake_hash == theirs.get_handshake_hash()
        assert ours.remote_static == _public(their_key)
        transport = NoiseTransport.from_handshake(ours)
        assert theirs.decrypt(transport.encrypt(b"to them")) == b"to them"
        assert transport.decrypt(theirs.encrypt(b"to us")) == b"to us"


# -- multi-PSK responder (key epochs, invites) -------------------------------


def _agent_run(init, resp) -> None:
    while not init.complete or not resp.complete:
        sender, receiver = (init, resp) if init.our_turn else (resp, init)
        receiver.read_message(sender.write_message(b""))


def test_multi_psk_responder_matches_each_candidate() -> None:
    psks = [os.urandom(32) for _ in range(3)]
    for used, psk in enumerate(psks):
        init_key, resp_key = _private(), _private()
        init = agent_handshake(True, init_key, psk, b"p")
        resp = agent_responder(resp_key, psks, b"p")
        assert resp.psk_index is None and resp.candidate_count == 3
        assert not resp.our_turn and resp.message_index == 0
        assert resp.local_static == _public(resp_key)
        assert resp.read_message(init.write_message(b"hello")) == b"hello"
        assert resp.psk_index == used and resp.candidate_count == 1
        assert resp.our_turn and resp.remote_static is None
        _agent_run(init, resp)
        assert resp.complete and not resp.failed
        assert resp.remote_static == _public(init_key)
        assert init.remote_static == _public(resp_key)
        assert resp.handshake_hash == init.handshake_hash
        a, b = NoiseTransport.from_handshake(init), NoiseTransport.from_handshake(resp)
        assert b.decrypt(a.encrypt(b"ping")) == b"ping"
        assert a.decrypt(b.encrypt(b"pong")) == b"pong"


def test_multi_psk_responder_picks_the_first_matching_candidate() -> None:
    psk = os.urandom(32)
    init = agent_handshake(True, _private(), psk, b"p")
    resp = agent_responder(_private(), [os.urandom(32), psk, psk], b"p")
    _agent_run(init, resp)
    assert resp.psk_index == 1


def test_multi_psk_responder_refuses_an_unknown_psk_and_stays_dead() -> None:
    resp = agent_responder(_private(), [os.urandom(32) for _ in range(3)], b"p")
    m1 = agent_handshake(True, _private(), os.urandom(32), b"p").write_message(b"")
    with pytest.raises(HandshakeError, match="no known pre-shared key"):
        resp.read_message(m1)
    assert resp.failed and not resp.complete and resp.psk_index is None
    assert resp.remote_static is None and resp.candidate_count == 0
    with pytest.raises(HandshakeError, match="already failed.*no known pre-shared key"):
        resp.write_message(b"")
    with pytest.raises(HandshakeError, match="already failed"):
        resp.read_message(m1)
    with pytest.raises(HandshakeError, match="only after"):
        resp.handshake_hash
    with pytest.raises(HandshakeError, match="not complete"):
        resp.split()


def test_multi_psk_responder_with_another_prologue_finds_no_psk() -> None:
    psk = os.urandom(32)
    resp = agent_responder(_private(), [os.urandom(32), psk], b"other")
    with pytest.raises(HandshakeError, match="no known pre-shared key"):
        resp.read_message(agent_handshake(True, _private(), psk, b"p").write_message(b""))


def test_multi_psk_responder_failed_tries_leave_later_candidates_intact() -> None:
    # 63 failed tries before the right candidate; the handshake still ends with
    # the initiator's transcript hash, so no failed try touched the match.
    psk = os.urandom(32)
    wrong = [os.urandom(32) for _ in range(MAX_PSK_CANDIDATES - 1)]
    init = agent_handshake(True, _private(), psk, b"p")
    resp = agent_responder(_private(), [*wrong, psk], b"p")
    _agent_run(init, resp)
    assert resp.psk_index == MAX_PSK_CANDIDATES - 1
    assert resp.handshake_hash == init.handshake_hash


def test_multi_psk_responder_malformed_message_1_fails_like_one_psk() -> None:
    resp = agent_responder(_private(), [os.urandom(32), os.urandom(32)], b"p")
    with pytest.raises(HandshakeError, match="shorter than"):
        resp.read_message(bytes(47))
    assert resp.failed
    with pytest.raises(HandshakeError, match="already failed.*shorter than"):
        resp.read_message(bytes(48))


def test_multi_psk_responder_failure_after_message_1_kills_it() -> None:
    psk = os.urandom(32)
    init = agent_handshake(True, _private(), psk, b"p")
    resp = agent_responder(_private(), [os.urandom(32), psk], b"p")
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    m3 = bytearray(init.write_message(b""))
    m3[-1] ^= 1
    with pytest.raises(HandshakeError, match="message 3 .*failed authentication"):
        resp.read_message(bytes(m3))
    assert resp.failed and not resp.complete and resp.psk_index == 1
    with pytest.raises(HandshakeError, match="already failed"):
        resp.read_message(bytes(m3))


def test_multi_psk_responder_out_of_turn_write_does_not_kill_it() -> None:
    psk = os.urandom(32)
    resp = agent_responder(_private(), [psk], b"p")
    with pytest.raises(HandshakeError, match="turn"):
        resp.write_message(b"")
    assert not resp.failed
    init = agent_handshake(True, _private(), psk, b"p")
    _agent_run(init, resp)
    assert resp.psk_index == 0


def test_multi_psk_responder_candidate_limits() -> None:
    key = _private()
    with pytest.raises(ValueError, match="1 to 64"):
        agent_responder(key, [], b"p")
    with pytest.raises(ValueError, match="got 65"):
        agent_responder(key, [os.urandom(32)] * (MAX_PSK_CANDIDATES + 1), b"p")
    assert agent_responder(key, [os.urandom(32)] * MAX_PSK_CANDIDATES, b"p").candidate_count == 64
    with pytest.raises(HandshakeError, match="candidate pre-shared key 1 must be 32 bytes"):
        agent_responder(key, [os.urandom(32), b"short"], b"p")


def test_multi_psk_responder_refuses_patterns_whose_message_1_hides_no_psk() -> None:
    key, psk = _private(), os.urandom(32)
    for name in (
        "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s",  # message 1 is not authenticated
        "Noise_NN_25519_ChaChaPoly_BLAKE2s",
        "Noise_NNpsk0+psk2_25519_ChaChaPoly_BLAKE2s",  # two PSKs per candidate
    ):
        with pytest.raises(HandshakeError, match="does not authenticate message 1"):
            MultiPskResponder(name, s=None if "NN" in name else key, psks=[psk])
    with pytest.raises(HandshakeError, match="static private key s must be 32 bytes"):
        agent_responder(b"short", [psk], b"p")  # key errors surface at construction


def test_multi_psk_responder_other_psk_in_message_1_patterns() -> None:
    psks = [os.urandom(32) for _ in range(3)]
    for name in ("Noise_NNpsk1_25519_ChaChaPoly_BLAKE2s", "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"):
        init = HandshakeState(name, True, psks=[psks[2]])
        resp = MultiPskResponder(name, psks=psks)
        _run(init, resp)
        assert resp.complete and resp.psk_index == 2
        assert resp.handshake_hash == init.handshake_hash


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_garbage_message_1_to_multi_psk_responder_raises_only_noise_errors(data) -> None:
    psks = [os.urandom(32) for _ in range(3)]
    psk = psks[data.draw(st.integers(0, 2))]
    real = agent_handshake(True, _private(), psk, b"p").write_message(b"real payload")
    garbage = data.draw(_mutations(real))
    resp = agent_responder(_private(), psks, b"p")
    try:
        resp.read_message(garbage)
    except NoiseError:
        assert resp.failed and resp.psk_index is None
        with pytest.raises(HandshakeError, match="already failed"):
            resp.write_message(b"")
        return
    assert garbage == real  # only the authentic message 1 is accepted


# -- 4. fuzzing -------------------------------------------------------------

FUZZ_PROTOCOLS = [
    "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s",
    "Noise_XX_25519_ChaChaPoly_BLAKE2s",
    "Noise_IK_25519_ChaChaPoly_BLAKE2s",
    "Noise_KK1_25519_ChaChaPoly_BLAKE2s",
    "Noise_NNpsk2_25519_ChaChaPoly_BLAKE2s",
]


def _mutations(draw_real: bytes):
    return st.one_of(
        st.binary(max_size=300),
        st.tuples(st.binary(min_size=1, max_size=8), st.integers(65530, 65540)).map(
            lambda t: (t[0] * 65540)[: t[1]]
        ),
        st.integers(0, max(len(draw_real) - 1, 0)).map(lambda n: draw_real[:n]),
        st.tuples(st.integers(0, len(draw_real) - 1), st.integers(1, 255)).map(
            lambda f: draw_real[: f[0]] + bytes([draw_real[f[0]] ^ f[1]]) + draw_real[f[0] + 1 :]
        ),
        st.binary(min_size=1, max_size=40).map(lambda extra: draw_real + extra),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(FUZZ_PROTOCOLS))
def test_garbage_handshake_messages_raise_only_noise_errors(data, name: str) -> None:
    init, resp, _, _ = _handshake_pair(name, name.count("psk"))
    stage = data.draw(st.integers(0, len(parse_protocol_name(name).pattern.messages) - 1))
    _run(init, resp, stop=stage)
    sender, receiver = (init, resp) if init.our_turn else (resp, init)
    real = sender.write_message(b"real payload")
    garbage = data.draw(_mutations(real))
    target = data.draw(st.sampled_from([receiver, sender]))  # the sender reads out of turn
    try:
        target.read_message(garbage)
    except NoiseError:
        if target is receiver:  # a bad message from the peer ends the handshake
            assert target.failed
            with pytest.raises(HandshakeError, match="already failed"):
                target.write_message(b"")
        return
    assert target is receiver  # accepted only in turn (e.g. unauthenticated XX message 1)


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_transport_messages_raise_decrypt_error(garbage: bytes) -> None:
    a, b = _transports()
    with pytest.raises(DecryptError):
        b.decrypt(garbage)
    assert b.closed
