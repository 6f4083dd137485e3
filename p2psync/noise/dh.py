"""The ``25519`` DH functions (Noise §12.1): X25519 on raw 32-byte keys.

A shared secret of all zeros means the peer's public key is a low-order point
(no honest peer sends one); it is rejected rather than mixed into the keys.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from .errors import HandshakeError

DHLEN = 32


def generate_private() -> bytes:
    """A fresh random X25519 private key, 32 raw bytes."""
    return X25519PrivateKey.generate().private_bytes_raw()


def load_private(raw: bytes, what: str) -> X25519PrivateKey:
    """The private key in ``raw``; ``what`` names it in the error message."""
    raw = bytes(raw)
    if len(raw) != DHLEN:
        raise HandshakeError(f"{what} must be {DHLEN} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def check_public(raw: bytes, what: str) -> bytes:
    """``raw`` as bytes if it has the length of a public key."""
    raw = bytes(raw)
    if len(raw) != DHLEN:
        raise HandshakeError(f"{what} must be {DHLEN} bytes, got {len(raw)}")
    return raw


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``private``."""
    return private.public_key().public_bytes_raw()


def dh(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    """X25519(private, public); ``what`` names the DH token in errors."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise HandshakeError(
            f"DH '{what}' gave an all-zero secret: the peer's public key is a "
            "low-order point; handshake aborted"
        ) from None
