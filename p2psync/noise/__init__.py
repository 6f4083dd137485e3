"""Noise Protocol Framework (revision 34) for p2psync: handshakes and transport.

The agent uses ``Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s``: mutual static-key
authentication, with a group key as PSK mixed in before the first message
so that a peer without the group key fails on message 1 and never learns a
member's static key.

A responder that must accept one of several PSKs (key epochs, invites) is a
``MultiPskResponder`` (``multi_psk.py``).
"""

from __future__ import annotations

from typing import Sequence

from .cipher import MAX_MESSAGE_LEN, CipherState
from .errors import DecryptError, HandshakeError, NoiseError
from .handshake import HandshakeState
from .multi_psk import MAX_PSK_CANDIDATES, MultiPskResponder
from .patterns import PATTERNS
from .transport import MAX_PLAINTEXT_LEN, REKEY_INTERVAL, NoiseTransport

AGENT_PROTOCOL = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s"

__all__ = [
    "AGENT_PROTOCOL",
    "MAX_MESSAGE_LEN",
    "MAX_PLAINTEXT_LEN",
    "MAX_PSK_CANDIDATES",
    "PATTERNS",
    "REKEY_INTERVAL",
    "CipherState",
    "DecryptError",
    "HandshakeError",
    "HandshakeState",
    "MultiPskResponder",
    "NoiseError",
    "NoiseTransport",
    "agent_handshake",
    "agent_responder",
]


def agent_handshake(
    initiator: bool, static_private: bytes, group_key: bytes, prologue: bytes
) -> HandshakeState:
    """A HandshakeState for AGENT_PROTOCOL with our static key and the group key."""
    return HandshakeState(
        AGENT_PROTOCOL, initiator, prologue=prologue, s=static_private, psks=[group_key]
    )


def agent_responder(
    static_private: bytes, psks: Sequence[bytes], prologue: bytes
) -> MultiPskResponder:
    """A responder for AGENT_PROTOCOL that accepts an initiator using any of ``psks``.

    ``psks`` are tried in order (put the likeliest first); ValueError if there
    are none or more than MAX_PSK_CANDIDATES, HandshakeError if one is not 32
    bytes.
    """
    return MultiPskResponder(AGENT_PROTOCOL, s=static_private, psks=psks, prologue=prologue)
