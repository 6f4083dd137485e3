"""What binds a device-to-device handshake to this protocol version and group."""

from __future__ import annotations

from .limits import PROTOCOL_VERSION


def device_prologue(group_id: bytes) -> bytes:
    """The Noise prologue of handshakes between devices of group ``group_id`` (joins included)."""
    return b"p2psync/" + str(PROTOCOL_VERSION).encode() + b"/" + group_id
