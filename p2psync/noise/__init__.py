"""Noise Protocol Framework (revision 34) for p2psync: handshakes and transport.

The agent uses ``Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s``: mutual static-key
authentication, with the group key as PSK mixed in before the first message
so that a peer without the group key fails on message 1 and never learns a
member's static key.
"""

from __future__ import annotations

from .cipher import MAX_MESSAGE_LEN, CipherState
from .errors import DecryptError, HandshakeError, NoiseError
from .handshake import HandshakeState
from .patterns import PATTERNS
from .transport import MAX_PLAINTEXT_LEN, REKEY_INTERVAL, NoiseTransport

AGENT_PROTOCOL = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s"

__all__ = [
    "AGENT_PROTOCOL",
    "MAX_MESSAGE_LEN",
    "MAX_PLAINTEXT_LEN",
    "PATTERNS",
    "REKEY_INTERVAL",
    "CipherState",
    "DecryptError",
    "HandshakeError",
    "HandshakeState",
    "NoiseError",
    "NoiseTransport",
    "agent_handshake",
]


def agent_handshake(
    initiator: bool, static_private: bytes, group_key: bytes, prologue: bytes
) -> HandshakeState:
    """A HandshakeState for AGENT_PROTOCOL with our static key and the group key."""
    return HandshakeState(
        AGENT_PROTOCOL, initiator, prologue=prologue, s=static_private, psks=[group_key]
    )
