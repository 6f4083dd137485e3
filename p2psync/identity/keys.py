"""The key schedule: epoch secrets -> the keys used on the wire; HPKE boxes that carry secrets.

How this works: a group's secret material is a set of *epoch secrets*, one
per key epoch (the found event is epoch 0; every removal starts a new one).
The current epoch is the frontier of epoch events in the membership log;
concurrent epochs combine: ``EpochKeys.derive(group_id, [(hash, secret), ...])``
feeds every secret of the frontier, sorted by event hash, into HKDF-SHA256,
so the result depends on the set, not on the order anyone learnt it.
From that one epoch key come, each under its own label: the Noise PSK of
device-to-device handshakes, the mDNS tag key, the data key that seals what
a relay stores, and a public 8-byte key id that names the epoch in sealed
blobs. A relay's handshake PSK is different: it is fixed for the group's
life (``relay_psk``, from epoch 0), since a relay admits devices by their
static key in the signed membership, never by a shared secret.

Secrets travel inside membership events as RFC 9180 HPKE boxes
(X25519, HKDF-SHA256, ChaCha20-Poly1305, from ``cryptography``), each sealed
to one member's X25519 static key, with the group and the recipient's site
id as HPKE info. Small items (a device's name, an invite's PSK) are sealed
under an epoch's data key with ChaCha20-Poly1305 and prefixed with the key id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_LEN = 32
KEY_ID_LEN = 8
NONCE_LEN = 12
_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)


class BoxError(ValueError):
    """A box or sealed item cannot be opened (not for us, altered, or an epoch we do not hold)."""


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def new_secret() -> bytes:
    """A fresh random epoch secret."""
    return secrets.token_bytes(SECRET_LEN)


@dataclass(frozen=True)
class EpochKeys:
    """The keys of one epoch (a frontier of one or more concurrent epoch events)."""

    group_id: bytes
    epochs: tuple[bytes, ...]          # sorted hashes of the epoch events combined
    key: bytes = field(repr=False)

    @classmethod
    def derive(cls, group_id: bytes, secrets_by_event: list[tuple[bytes, bytes]]) -> EpochKeys:
        """The keys of the epoch made of these (event hash, secret) pairs."""
        if not secrets_by_event:
            raise ValueError("an epoch needs at least one secret")
        pairs = sorted(secrets_by_event)
        ikm = b"".join(s for _, s in pairs)   # the key depends on the secrets (in hash order), not on
        # the hashes themselves, so the found event can seal its own name under epoch 0's key
        return cls(group_id, tuple(h for h, _ in pairs), _hkdf(ikm, group_id, b"p2psync v2 epoch"))

    def _derive(self, label: bytes) -> bytes:
        return _hkdf(self.key, self.group_id, b"p2psync v2 " + label)

    def psk(self) -> bytes:
        """The 32-byte Noise pre-shared key for device-to-device handshakes in this epoch."""
        return self._derive(b"noise psk")

    def tag_key(self) -> bytes:
        """The key of the daily mDNS group tag in this epoch."""
        return self._derive(b"mdns tag")

    def data_key(self) -> bytes:
        """The key that seals what devices store at a relay in this epoch."""
        return self._derive(b"relay data")

    @property
    def key_id(self) -> bytes:
        """A public 8-byte name of this epoch's keys (prefixes sealed blobs)."""
        return self._derive(b"key id")[:KEY_ID_LEN]

    def mdns_tag(self, day: int) -> str:
        """The group's mDNS tag for UTC day number ``day`` in this epoch."""
        mac = hmac.new(self.tag_key(), day.to_bytes(8, "big", signed=True), hashlib.sha256)
        return mac.hexdigest()[:16]

    # -- small sealed items ---------------------------------------------------

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        """``plaintext`` sealed under this epoch's data key: key id, nonce, ciphertext."""
        nonce = secrets.token_bytes(NONCE_LEN)
        aead = ChaCha20Poly1305(self._derive(b"small items"))
        return self.key_id + nonce + aead.encrypt(nonce, plaintext, self.key_id + ad)

    def open(self, blob: bytes, ad: bytes) -> bytes:
        """The plaintext of a ``seal`` blob; BoxError if it does not open."""
        if len(blob) < KEY_ID_LEN + NONCE_LEN + 16 or blob[:KEY_ID_LEN] != self.key_id:
            raise BoxError("sealed under another epoch's key")
        aead = ChaCha20Poly1305(self._derive(b"small items"))
        try:
            return aead.decrypt(blob[KEY_ID_LEN:KEY_ID_LEN + NONCE_LEN], blob[KEY_ID_LEN + NONCE_LEN:],
                                blob[:KEY_ID_LEN] + ad)
        except InvalidTag:
            raise BoxError("sealed item failed authentication") from None


def relay_psk(group_id: bytes, founding_secret: bytes) -> bytes:
    """The Noise PSK of the group's sessions with relays: fixed for the group's life."""
    return _hkdf(founding_secret, group_id, b"p2psync v2 relay psk")


# -- HPKE boxes ---------------------------------------------------------------

def _box_info(group_id: bytes, site: bytes) -> bytes:
    return b"p2psync v2 box " + group_id + site


def seal_box(recipient_dh_public: bytes, payload: bytes, group_id: bytes, site: bytes) -> bytes:
    """``payload`` sealed to one member's X25519 static key (HPKE base mode)."""
    return _SUITE.encrypt(payload, X25519PublicKey.from_public_bytes(recipient_dh_public),
                          info=_box_info(group_id, site))


def open_box(dh_private: bytes, box: bytes, group_id: bytes, site: bytes) -> bytes:
    """The payload of a box sealed to us; BoxError if it is not ours or was altered."""
    try:
        return _SUITE.decrypt(box, X25519PrivateKey.from_private_bytes(dh_private), info=_box_info(group_id, site))
    except Exception:  # InvalidTag, or a malformed encapsulation
        raise BoxError("box does not open with this device's key") from None
