"""Invite codes: a one-time secret and where to find an admin, never the group secret.

A code is ``p2ps2-`` and lowercase base32 (no padding) of a msgpack array
``[2, group id, found hash, secret, expires (minutes since the epoch),
[[ip bytes, port], ...], relay]`` followed by a 4-byte keyed checksum, so a
typo is caught before any network traffic. The secret is what the joining
device proves to an admin: the invite's Noise PSK and its public id (the
hash the membership log records) both derive from it, one-way. The log
holds the PSK sealed under the epoch key, so any admin can admit the
joiner, and never the secret itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass, field

import msgpack

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INVITE_PREFIX = "p2ps2-"
INVITE_VERSION = 2
SECRET_LEN = 16
INVITE_ID_LEN = 16
MAX_ADDRESSES = 4
MAX_RELAY_LEN = 255
_CHECKSUM_LEN = 4
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


class InviteError(ValueError):
    """An invite code is malformed; the message says how."""


@dataclass(frozen=True)
class InviteCode:
    """What an invite code carries."""

    group_id: bytes
    found: bytes
    secret: bytes = field(repr=False)
    expires_ms: int
    addresses: tuple[tuple[str, int], ...] = ()
    relay: str | None = None

    @property
    def id(self) -> bytes:
        return invite_id(self.secret)

    @property
    def psk(self) -> bytes:
        return invite_psk(self.secret)


def new_invite_secret() -> bytes:
    return secrets.token_bytes(SECRET_LEN)


def invite_id(secret: bytes) -> bytes:
    """The public id of an invite (what the membership log records), one-way from its secret."""
    return hashlib.blake2b(secret, digest_size=INVITE_ID_LEN, person=b"p2ps-invite-id").digest()


def invite_psk(secret: bytes) -> bytes:
    """The Noise PSK of a joining device's handshake with an admin."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"p2psync invite", info=b"p2psync v2 join psk").derive(secret)


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_CHECKSUM_LEN, person=b"p2psync invite").digest()


def encode_invite(code: InviteCode) -> str:
    """The one-line text of an invite; ValueError if a field cannot be carried."""
    if code.relay is not None and len(code.relay) > MAX_RELAY_LEN:
        raise ValueError(f"relay address {code.relay[:40]!r}... is longer than {MAX_RELAY_LEN} characters")
    if not 0 <= code.expires_ms < (1 << 40) * 60_000:
        raise ValueError("expiry out of range")
    if any(not 0 < p < 65536 for _, p in code.addresses):
        raise ValueError("an address has no valid port")
    addrs = [[ipaddress.ip_address(h).packed, p] for h, p in code.addresses[:MAX_ADDRESSES]]
    body = msgpack.packb([INVITE_VERSION, code.group_id, code.found, code.secret, code.expires_ms // 60_000,
                          addrs, code.relay or ""], use_bin_type=True)
    raw = body + _checksum(body)
    return INVITE_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def parse_invite(text: str) -> InviteCode:
    """The invite in ``text``; InviteError saying what is wrong with it."""
    code = text.strip()
    if not code:
        raise InviteError("the invite code is empty: copy it from `p2psync invite` on an admin")
    if not code.isascii():
        bad = next(c for c in code if not c.isascii())
        raise InviteError(f"the invite code contains {bad!r}, which never appears in one")
    lowered = code.lower()
    if not lowered.startswith(INVITE_PREFIX):
        other = re.match(r"p2ps\d+-", lowered)
        if other:
            raise InviteError(
                f"invite code version {other.group()!r} is not supported by this "
                f"p2psync (it reads {INVITE_PREFIX!r}): ask an admin for a new code from this p2psync version")
        raise InviteError(f"not a p2psync invite code: it should start with {INVITE_PREFIX!r}")
    payload = lowered[len(INVITE_PREFIX):]
    for i, c in enumerate(payload):
        if c not in _B32_ALPHABET:
            pos = len(INVITE_PREFIX) + i + 1
            raise InviteError(
                f"the invite code has {code[pos - 1]!r} at character {pos}, which never "
                f"appears in one (codes use a-z and 2-7): check for a typo")
    if len(payload) * 5 // 8 < 60:
        raise InviteError("the invite code is truncated: copy the whole line")
    padded = payload.upper() + "=" * (-len(payload) % 8)
    try:
        raw = base64.b32decode(padded)
    except binascii.Error:
        raise InviteError("the invite code is truncated or has extra characters: copy the whole line") from None
    body, checksum = raw[:-_CHECKSUM_LEN], raw[-_CHECKSUM_LEN:]
    canonical = base64.b32encode(raw).decode("ascii").rstrip("=").lower()
    if canonical != payload or checksum != _checksum(body):
        raise InviteError("the invite code's checksum does not match, so it has a typo or is cut short: "
                          "copy it again from `p2psync invite`")
    try:
        fields = msgpack.unpackb(body, raw=False, use_list=True, max_array_len=16, max_bin_len=64, max_str_len=512)
        version, group_id, found, secret, expires_min, addrs, relay = fields
        if version != INVITE_VERSION:
            raise InviteError(f"invite format {version!r} is not supported by this p2psync")
        for v, n in ((group_id, 16), (found, 32), (secret, SECRET_LEN)):
            if type(v) is not bytes or len(v) != n:
                raise ValueError("bad field")
        if type(expires_min) is not int or not 0 <= expires_min < 1 << 40:
            raise ValueError("bad expiry")
        if type(addrs) is not list or len(addrs) > MAX_ADDRESSES or type(relay) is not str:
            raise ValueError("bad addresses")
        addresses = []
        for ip, port in addrs:
            if type(port) is not int or not 0 < port < 65536 or type(ip) is not bytes or len(ip) not in (4, 16):
                raise ValueError("bad address")
            addresses.append((str(ipaddress.ip_address(ip)), port))
    except InviteError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise InviteError("the invite code's checksum matches but its contents are malformed: "
                          "ask for a new code") from None
    return InviteCode(group_id, found, secret, expires_min * 60_000, tuple(addresses), relay or None)


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``24h``, ``30m``, ``7d``, ``90s``; ValueError if not one."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m:
        raise ValueError(f"{text!r} is not a duration: use e.g. 30m, 24h or 7d")
    n = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not 0 < n <= 365 * 86400:
        raise ValueError(f"{text!r}: a duration must be more than 0 and at most 365 days")
    return n
