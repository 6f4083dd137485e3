"""What a device sends a relay before the Noise handshake, and what binds the handshake.

A relay serves many groups and holds, for each, only its relay token (see
``Group.relay_token``), which is the pre-shared key of that group's
handshakes with the relay. To know which key to use, the relay first reads a
fixed 20-byte preamble: the magic ``P2R1`` and the group's *ref*, a keyed
hash of the token that names the group without revealing the token. The ref
is also bound into the handshake's prologue, so a preamble altered in
transit makes the handshake fail.
"""

from __future__ import annotations

import hashlib

from .limits import PROTOCOL_VERSION

RELAY_MAGIC = b"P2R1"
GROUP_REF_LEN = 16
PREAMBLE_LEN = len(RELAY_MAGIC) + GROUP_REF_LEN


class BadPreamble(ValueError):
    """The first bytes of a connection are not a relay preamble."""


def group_ref(token: bytes) -> bytes:
    """The public name of the group whose relay token is ``token``."""
    return hashlib.blake2s(b"p2psync relay group ref", key=token, digest_size=GROUP_REF_LEN).digest()


def preamble(ref: bytes) -> bytes:
    return RELAY_MAGIC + ref


def parse_preamble(data: bytes) -> bytes:
    """The group ref in a preamble; BadPreamble if it is not one."""
    if len(data) != PREAMBLE_LEN or not data.startswith(RELAY_MAGIC):
        raise BadPreamble("not a p2psync relay preamble (a device of an older version, or not p2psync)")
    return data[len(RELAY_MAGIC):]


def relay_prologue(ref: bytes) -> bytes:
    """Binds a device-relay handshake to the protocol version and the group ref."""
    return b"p2psync-relay/" + str(PROTOCOL_VERSION).encode() + b"/" + ref
