"""The one exception hierarchy of the Noise layer.

Every failure caused by bytes from the peer (wrong length, bad tag, invalid
public key, wrong pre-shared key) and every misuse of the API surfaces as a
``NoiseError`` subclass; callers never see ``IndexError`` or ``ValueError``.
"""

from __future__ import annotations


class NoiseError(Exception):
    """Base class of every error raised by ``p2psync.noise``."""


class HandshakeError(NoiseError):
    """The handshake cannot continue; the HandshakeState is dead afterwards."""


class DecryptError(NoiseError):
    """A message failed authentication: tampered, replayed, reordered or wrong key."""
