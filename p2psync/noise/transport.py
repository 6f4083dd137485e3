"""NoiseTransport: the two transport CipherStates of a finished handshake.

How this works: each direction has its own CipherState, whose counter is the
nonce, so a replayed, dropped or reordered message fails authentication. A
ciphertext is the plaintext plus a 16-byte tag and must fit the 65535-byte
Noise message limit, so plaintexts are capped at 65519 bytes. Every
``rekey_interval`` messages each direction replaces its key with REKEY(k)
(§11.3); both ends count the same messages, so they switch keys at the same
message without signalling. The first decryption failure closes the
transport for good: later calls raise, the peer gets no second try.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .cipher import MAX_MESSAGE_LEN, TAG_LEN, CipherState
from .errors import DecryptError, NoiseError

if TYPE_CHECKING:
    from .handshake import HandshakeState

REKEY_INTERVAL = 2**20
MAX_PLAINTEXT_LEN = MAX_MESSAGE_LEN - TAG_LEN


class NoiseTransport:
    """Encrypts outgoing and decrypts incoming transport messages for one side."""

    __slots__ = ("_send", "_recv", "_rekey_interval", "_closed_because")

    def __init__(
        self,
        send: CipherState,
        recv: CipherState,
        *,
        rekey_interval: int = REKEY_INTERVAL,
    ) -> None:
        if not send.has_key or not recv.has_key:
            raise NoiseError("transport CipherStates must both have keys")
        if not isinstance(rekey_interval, int) or rekey_interval < 1:
            raise NoiseError(
                f"rekey_interval must be a positive int, got {rekey_interval!r}"
            )
        self._send = send
        self._recv = recv
        self._rekey_interval = rekey_interval
        self._closed_because: str | None = None

    @classmethod
    def from_handshake(
        cls, hs: HandshakeState, *, rekey_interval: int = REKEY_INTERVAL
    ) -> NoiseTransport:
        """The transport for the completed handshake ``hs`` (takes its CipherStates)."""
        send, recv = hs.split()
        return cls(send, recv, rekey_interval=rekey_interval)

    @property
    def closed(self) -> bool:
        """True once a failure has made this transport unusable."""
        return self._closed_because is not None

    @property
    def sent(self) -> int:
        """How many messages have been encrypted."""
        return self._send.n

    @property
    def received(self) -> int:
        """How many messages have been decrypted successfully."""
        return self._recv.n

    def _check_open(self) -> None:
        if self._closed_because is not None:
            raise NoiseError(f"transport is closed: {self._closed_because}")

    def encrypt(self, plaintext: bytes) -> bytes:
        """The transport message carrying ``plaintext`` (at most 65519 bytes)."""
        self._check_open()
        if len(plaintext) > MAX_PLAINTEXT_LEN:
            raise NoiseError(
                f"plaintext of {len(plaintext)} bytes is too large for one Noise "
                f"message (limit {MAX_PLAINTEXT_LEN}); split it"
            )
        try:
            ciphertext = self._send.encrypt_with_ad(b"", plaintext)
        except NoiseError as exc:
            self._closed_because = str(exc)
            raise
        if self._send.n % self._rekey_interval == 0:
            self._send.rekey()
        return ciphertext

    def decrypt(self, ciphertext: bytes) -> bytes:
        """The plaintext of the peer's next message; a DecryptError closes us."""
        self._check_open()
        try:
            if len(ciphertext) > MAX_MESSAGE_LEN:
                raise DecryptError(
                    f"transport message of {len(ciphertext)} bytes exceeds the "
                    f"{MAX_MESSAGE_LEN}-byte limit"
                )
            plaintext = self._recv.decrypt_with_ad(b"", ciphertext)
        except NoiseError as exc:
            where = f"transport message {self._recv.n + 1} from the peer"
            self._closed_because = f"{where} was rejected: {exc}"
            if isinstance(exc, DecryptError):
                message = f"{self._closed_because}; transport closed"
                raise DecryptError(message) from None
            raise
        if self._recv.n % self._rekey_interval == 0:
            self._recv.rekey()
        return plaintext
