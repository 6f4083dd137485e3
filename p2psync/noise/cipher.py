"""CipherState (Noise §5.1) with the ``ChaChaPoly`` cipher functions (§12.3).

How this works: a CipherState holds a 32-byte key (or none yet) and a 64-bit
counter ``n``. Each encryption uses nonce ``n`` (4 zero bytes, then ``n`` as a
little-endian 64-bit integer) and then increments it, so one key never sees a
nonce twice; a decryption that fails authentication leaves ``n`` unchanged.
The nonce 2**64-1 is reserved: Rekey encrypts 32 zero bytes under it and
keeps the first 32 bytes as the new key (§4.2), a one-way step that protects
earlier traffic if the new key leaks. ``n`` is not reset by Rekey. Without a
key, "encryption" returns its input: the first handshake messages travel in
the clear until a DH or PSK has been mixed in.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .errors import DecryptError, NoiseError

KEY_LEN = 32
TAG_LEN = 16
MAX_MESSAGE_LEN = 65535
MAX_NONCE = 2**64 - 1


def _nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


class CipherState:
    """A ChaCha20-Poly1305 key plus a message counter used as the nonce."""

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead: ChaCha20Poly1305 | None = None
        self.n = 0
        self.initialize_key(key)

    def __repr__(self) -> str:
        return f"<CipherState has_key={self.has_key} n={self.n}>"

    def initialize_key(self, key: bytes | None) -> None:
        """Use ``key`` (32 bytes, or None for no key) and reset the nonce to 0."""
        if key is not None and len(key) != KEY_LEN:
            raise NoiseError(f"cipher key must be {KEY_LEN} bytes, got {len(key)}")
        self._aead = None if key is None else ChaCha20Poly1305(bytes(key))
        self.n = 0

    @property
    def has_key(self) -> bool:
        """True once a key has been set."""
        return self._aead is not None

    def set_nonce(self, n: int) -> None:
        """Set the counter used as the next nonce."""
        if not 0 <= n <= MAX_NONCE:
            raise NoiseError(f"nonce {n} is outside 0..2**64-1")
        self.n = n

    def _check_nonce(self) -> None:
        if self.n >= MAX_NONCE:
            raise NoiseError(
                "nonce space exhausted (2**64-1 messages on one key); "
                "start a new handshake"
            )

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Ciphertext plus 16-byte tag for ``plaintext``, or the plaintext if no key."""
        if self._aead is None:
            return bytes(plaintext)
        self._check_nonce()
        ciphertext = self._aead.encrypt(_nonce(self.n), bytes(plaintext), bytes(ad))
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """The plaintext of ``ciphertext``; DecryptError if it is not authentic."""
        if self._aead is None:
            return bytes(ciphertext)
        self._check_nonce()
        if len(ciphertext) < TAG_LEN:
            raise DecryptError(
                f"ciphertext of {len(ciphertext)} bytes is shorter than the "
                f"{TAG_LEN}-byte authentication tag"
            )
        try:
            plaintext = self._aead.decrypt(
                _nonce(self.n), bytes(ciphertext), bytes(ad)
            )
        except InvalidTag:
            raise DecryptError(
                f"message with nonce {self.n} failed authentication "
                "(tampered, replayed, reordered, or wrong key)"
            ) from None
        self.n += 1
        return plaintext

    def rekey(self) -> None:
        """Replace the key by REKEY(k): ENCRYPT(k, 2**64-1, '', 32 zeros)[:32]."""
        if self._aead is None:
            raise NoiseError("cannot rekey a CipherState that has no key")
        new_key = self._aead.encrypt(_nonce(MAX_NONCE), bytes(KEY_LEN), b"")
        self._aead = ChaCha20Poly1305(new_key[:KEY_LEN])
