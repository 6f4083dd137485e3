"""SymmetricState (Noise §5.2): the chaining key and transcript hash of a handshake.

How this works: ``h`` hashes everything the handshake has sent (protocol name,
prologue, public keys, ciphertexts), and every handshake encryption uses ``h``
as associated data, so a single differing byte anywhere makes the next tag
fail. ``ck`` accumulates DH outputs and pre-shared keys through HKDF; every
MixKey also yields a fresh cipher key (with nonce 0). Split derives the two
transport keys from the final ``ck``. HKDF is the Noise variant (§4.3):
``temp = HMAC(ck, ikm)``, then ``out[i] = HMAC(temp, out[i-1] || byte(i))``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Callable

from .cipher import KEY_LEN, CipherState


@dataclass(frozen=True)
class HashFunction:
    """A Noise hash function: its name, HASHLEN, BLOCKLEN and hashlib constructor."""

    name: str
    hashlen: int
    blocklen: int
    new: Callable[[], "hashlib._Hash"]

    def hash(self, data: bytes) -> bytes:
        """HASH(data)."""
        h = self.new()
        h.update(data)
        return h.digest()

    def hmac(self, key: bytes, data: bytes) -> bytes:
        """HMAC-HASH(key, data) with this function's block length."""
        return hmac.new(key, data, self.new).digest()

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
        """The Noise HKDF: ``outputs`` (2 or 3) values of HASHLEN bytes."""
        temp_key = self.hmac(chaining_key, ikm)
        result: list[bytes] = []
        previous = b""
        for i in range(1, outputs + 1):
            previous = self.hmac(temp_key, previous + bytes([i]))
            result.append(previous)
        return result


HASHES: dict[str, HashFunction] = {
    "BLAKE2s": HashFunction("BLAKE2s", 32, 64, hashlib.blake2s),
    "SHA256": HashFunction("SHA256", 32, 64, hashlib.sha256),
}


class SymmetricState:
    """The running ``ck``/``h`` pair and the handshake's CipherState."""

    __slots__ = ("_hash", "ck", "h", "cipher")

    def __init__(self, protocol_name: bytes, hash_fn: HashFunction) -> None:
        self._hash = hash_fn
        if len(protocol_name) <= hash_fn.hashlen:
            h = protocol_name.ljust(hash_fn.hashlen, b"\x00")
        else:
            h = hash_fn.hash(protocol_name)
        self.ck = h
        self.h = h
        self.cipher = CipherState()

    @property
    def has_key(self) -> bool:
        """True once a DH output or PSK has been mixed in."""
        return self.cipher.has_key

    def mix_key(self, ikm: bytes) -> None:
        """Mix ``ikm`` into ``ck`` and start a new cipher key."""
        self.ck, temp_k = self._hash.hkdf(self.ck, ikm, 2)
        self.cipher.initialize_key(temp_k[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        """Set ``h = HASH(h || data)``."""
        self.h = self._hash.hash(self.h + bytes(data))

    def mix_key_and_hash(self, ikm: bytes) -> None:
        """Mix a pre-shared key into ``ck`` and ``h`` and start a new cipher key."""
        self.ck, temp_h, temp_k = self._hash.hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher.initialize_key(temp_k[:KEY_LEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """Encrypt with ``h`` as associated data, then hash the ciphertext."""
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Decrypt with ``h`` as associated data, then hash the ciphertext."""
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport CipherStates (initiator-to-responder, the reverse)."""
        temp_k1, temp_k2 = self._hash.hkdf(self.ck, b"", 2)
        return CipherState(temp_k1[:KEY_LEN]), CipherState(temp_k2[:KEY_LEN])
