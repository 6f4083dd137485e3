"""What a device sends a relay before the Noise handshake, and what binds the handshake.

A relay serves many groups and holds, for each, only its relay token (see
``KeyRing.relay_psk``), which is the pre-shared key of that group's
handshakes with the relay. To know which key to use, the relay first reads a
fixed 20-byte preamble: the magic ``P2R1`` and the group's *ref* for the
current UTC day, a keyed hash of the token and the day number
(``day_ref``). It names the group without revealing the token, and changes
every day, so an observer cannot link a device's sessions across days (or
networks, once a day has passed). The relay accepts the refs of yesterday,
today and tomorrow (clocks and midnights differ) and finds the group in a
table it computes from the tokens it holds, with no trial decryption. The
ref is also bound into the handshake's prologue, so a preamble altered in
transit makes the handshake fail.

``group_ref`` is the group's fixed handle: the key of its row in the relay's
database. Devices no longer send it.
"""

from __future__ import annotations

import hashlib
import struct

from .limits import PROTOCOL_VERSION

RELAY_MAGIC = b"P2R1"
GROUP_REF_LEN = 16
PREAMBLE_LEN = len(RELAY_MAGIC) + GROUP_REF_LEN


class BadPreamble(ValueError):
    """The first bytes of a connection are not a relay preamble."""


def group_ref(token: bytes) -> bytes:
    """The fixed handle of the group whose relay token is ``token`` (its key in the relay's database)."""
    return hashlib.blake2s(b"p2psync relay group ref", key=token, digest_size=GROUP_REF_LEN).digest()


def day_ref(token: bytes, day: int) -> bytes:
    """What a device of the group with relay token ``token`` sends as its ref on UTC day ``day``."""
    return hashlib.blake2s(b"p2psync relay day ref" + struct.pack(">q", day), key=token,
                           digest_size=GROUP_REF_LEN).digest()


def accepted_refs(token: bytes, day: int) -> tuple[bytes, ...]:
    """The refs a relay on UTC day ``day`` accepts for the group: yesterday's, today's and tomorrow's."""
    return tuple(day_ref(token, d) for d in (day - 1, day, day + 1))


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
