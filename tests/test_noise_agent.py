"""The agent's handshake (Noise_XXpsk0 with the group key) and its failure modes."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2psync.noise import (
    AGENT_PROTOCOL,
    HandshakeError,
    HandshakeState,
    NoiseError,
    NoiseTransport,
    agent_handshake,
)
from p2psync.noise.symmetric import HASHES, SymmetricState

GROUP_KEY = bytes(range(32))
PROLOGUE = b"p2psync/1"

LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 20).to_bytes(32, "little"),
]


def _private() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _pair(group_a: bytes = GROUP_KEY, group_b: bytes = GROUP_KEY, prologue_b: bytes = PROLOGUE):
    a_key, b_key = _private(), _private()
    init = agent_handshake(True, a_key, group_a, PROLOGUE)
    resp = agent_handshake(False, b_key, group_b, prologue_b)
    return init, resp, a_key, b_key


def _messages_until(init: HandshakeState, resp: HandshakeState, count: int) -> list[bytes]:
    """Run ``count`` messages normally; returns them."""
    sent = []
    for i in range(count):
        sender, receiver = (init, resp) if i % 2 == 0 else (resp, init)
        message = sender.write_message(b"hello %d" % i)
        receiver.read_message(message)
        sent.append(message)
    return sent


def _message_at(index: int, payload: bytes = b"") -> tuple[bytes, HandshakeState]:
    """Handshake message ``index`` of a fresh pair, and the side that should read it."""
    init, resp, _, _ = _pair()
    _messages_until(init, resp, index)
    sender, receiver = (init, resp) if index % 2 == 0 else (resp, init)
    return sender.write_message(payload), receiver


def test_agent_protocol_name() -> None:
    assert AGENT_PROTOCOL == "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s"
    assert agent_handshake(True, _private(), GROUP_KEY, b"").protocol_name == AGENT_PROTOCOL


def test_agent_handshake_end_to_end() -> None:
    init, resp, a_key, b_key = _pair()
    m1 = init.write_message(b"hi")
    assert resp.read_message(m1) == b"hi"
    assert resp.remote_static is None  # XX: the initiator's identity comes last
    m2 = resp.write_message(b"hello")
    assert init.read_message(m2) == b"hello"
    assert init.remote_static == _public(b_key)
    m3 = init.write_message(b"")
    assert resp.read_message(m3) == b""
    assert init.complete and resp.complete
    assert resp.remote_static == _public(a_key)
    assert init.remote_static == _public(b_key)
    assert init.local_static == _public(a_key)
    assert init.handshake_hash == resp.handshake_hash
    a, b = NoiseTransport.from_handshake(init), NoiseTransport.from_handshake(resp)
    assert b.decrypt(a.encrypt(b"change batch")) == b"change batch"
    assert a.decrypt(b.encrypt(b"ack")) == b"ack"


def test_wrong_group_key_fails_on_message_1_before_any_static_key_is_sent() -> None:
    init, resp, _, _ = _pair(group_b=bytes(reversed(GROUP_KEY)))
    m1 = init.write_message(b"")
    with pytest.raises(HandshakeError, match="handshake message 1 .*failed authentication"):
        resp.read_message(m1)
    assert resp.failed and resp.remote_static is None
    with pytest.raises(HandshakeError, match="already failed"):
        resp.write_message(b"")  # the responder never produces message 2 (its static key)
    assert resp.message_index == 0


def test_different_prologue_fails_on_message_1() -> None:
    init, resp, _, _ = _pair(prologue_b=b"p2psync/2")
    with pytest.raises(HandshakeError):
        resp.read_message(init.write_message(b""))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_every_flipped_byte_in_each_handshake_message_is_detected(index: int) -> None:
    length = len(_message_at(index, b"payload")[0])
    for position in range(length):
        message, receiver = _message_at(index, b"payload")
        tampered = bytearray(message)
        tampered[position] ^= 0x80
        with pytest.raises(NoiseError):
            receiver.read_message(bytes(tampered))
        assert receiver.failed


@pytest.mark.parametrize("index", [0, 1, 2])
def test_truncated_handshake_messages_are_rejected(index: int) -> None:
    full_length = len(_message_at(index)[0])
    for cut in sorted({0, 1, 31, 32, 33, full_length // 2, full_length - 1}):
        message, receiver = _message_at(index)
        with pytest.raises(NoiseError):
            receiver.read_message(message[:cut])
        assert receiver.failed


def test_oversized_handshake_message_is_rejected() -> None:
    init, resp, _, _ = _pair()
    with pytest.raises(HandshakeError, match="limit 65535"):
        resp.read_message(bytes(65536))
    init2, _, _, _ = _pair()
    with pytest.raises(HandshakeError, match="too large"):
        init2.write_message(bytes(65535 - 48 + 1))
    assert len(init.write_message(bytes(65535 - 48))) == 65535  # the largest message 1


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_low_order_ephemeral_from_responder_is_rejected(point: bytes) -> None:
    init, resp, _, _ = _pair()
    _messages_until(init, resp, 1)
    m2 = resp.write_message(b"")
    with pytest.raises(HandshakeError, match="low-order"):
        init.read_message(point + m2[32:])
    assert init.failed and init.remote_static is None


def test_all_zero_ephemeral_from_initiator_is_rejected() -> None:
    # A peer holding the group key crafts message 1 with an all-zero ephemeral key.
    zero = bytes(32)
    sym = SymmetricState(AGENT_PROTOCOL.encode(), HASHES["BLAKE2s"])
    sym.mix_hash(PROLOGUE)
    sym.mix_key_and_hash(GROUP_KEY)
    sym.mix_hash(zero)
    sym.mix_key(zero)
    m1 = zero + sym.encrypt_and_hash(b"")
    resp = agent_handshake(False, _private(), GROUP_KEY, PROLOGUE)
    assert resp.read_message(m1) == b""  # no DH in message 1 yet
    with pytest.raises(HandshakeError, match="low-order"):
        resp.write_message(b"")  # the 'ee' DH refuses; no message 2 leaves
    assert resp.failed


def test_calls_out_of_turn_or_after_completion_are_errors() -> None:
    init, resp, _, _ = _pair()
    with pytest.raises(HandshakeError, match="turn"):
        resp.write_message(b"")
    with pytest.raises(HandshakeError, match="turn"):
        init.read_message(bytes(64))
    with pytest.raises(HandshakeError, match="only after"):
        init.handshake_hash
    with pytest.raises(HandshakeError, match="not complete"):
        init.split()
    _messages_until(init, resp, 3)
    with pytest.raises(HandshakeError, match="already complete"):
        init.write_message(b"")
    init.split()
    with pytest.raises(HandshakeError, match="already handed out"):
        init.split()


def test_bad_agent_keys_are_refused() -> None:
    with pytest.raises(HandshakeError, match="pre-shared key 0 must be 32 bytes"):
        agent_handshake(True, _private(), b"short", PROLOGUE)
    with pytest.raises(HandshakeError, match="static private key s must be 32 bytes"):
        agent_handshake(True, b"\x01" * 16, GROUP_KEY, PROLOGUE)
