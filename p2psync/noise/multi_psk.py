"""A Noise responder that accepts any one of several pre-shared keys.

How this works with several keys: a group rotates its key (key epochs) and
admits joining devices with a per-invite PSK, so a responder may have to
accept any of several PSKs while the initiator always uses exactly one
(``agent_handshake(True, ...)``). ``agent_responder`` builds a
``MultiPskResponder`` over the candidate PSKs. In psk0 the PSK is mixed in
before ``e``, so message 1's payload (empty or not) is encrypted and its
16-byte tag authenticates the PSK: reading message 1 tries the candidates in
order, each in a fresh responder HandshakeState of its own (identical but for
the PSK, built only when its turn comes), and keeps the first whose tag
verifies. No DH happens in message 1, so a try costs building a HandshakeState
plus a few HKDFs and one AEAD check, and a failed try cannot disturb the next. ``psk_index`` then tells
which PSK the initiator used; every later step goes to that HandshakeState
alone and the other candidates are dropped. If no candidate verifies, the
responder fails with "no known pre-shared key" and is dead like any failed
HandshakeState; a malformed message 1 (wrong length) fails as it would with
one PSK, without trying the rest. At most MAX_PSK_CANDIDATES candidates are
accepted, which bounds the work one unauthenticated message can cause.
"""

from __future__ import annotations

from typing import Sequence

from .cipher import CipherState
from .errors import DecryptError, HandshakeError
from .handshake import PSK_LEN, HandshakeState
from .patterns import parse_protocol_name

MAX_PSK_CANDIDATES = 64


class MultiPskResponder:
    """A responder HandshakeState look-alike that accepts any of ``psks``; see above.

    It has the HandshakeState members NoiseStream and NoiseTransport use, plus
    ``psk_index``. ``protocol_name`` must mix its one PSK into message 1.
    """

    initiator = False

    def __init__(
        self,
        protocol_name: str,
        *,
        s: bytes | None = None,
        rs: bytes | None = None,
        psks: Sequence[bytes],
        prologue: bytes = b"",
    ) -> None:
        psks = [bytes(psk) for psk in psks]
        if not 1 <= len(psks) <= MAX_PSK_CANDIDATES:
            raise ValueError(
                f"a multi-PSK responder takes 1 to {MAX_PSK_CANDIDATES} candidate "
                f"pre-shared keys, got {len(psks)}"
            )
        pattern = parse_protocol_name(protocol_name).pattern
        if pattern.psk_count != 1 or "psk" not in pattern.messages[0]:
            raise HandshakeError(
                f"pattern {pattern.name} does not authenticate message 1 with its "
                "one pre-shared key, so message 1 cannot tell candidate PSKs apart"
            )
        for i, psk in enumerate(psks):
            if len(psk) != PSK_LEN:
                raise HandshakeError(
                    f"candidate pre-shared key {i} must be {PSK_LEN} bytes, got {len(psk)}"
                )

        def candidate(psk: bytes) -> HandshakeState:
            return HandshakeState(
                protocol_name, False, prologue=prologue, s=s, rs=rs, psks=[psk]
            )

        self.protocol_name = protocol_name
        self._make = candidate
        self._psks = psks
        self._first = candidate(psks[0])  # checks the keys now, not on message 1
        self._local_static = self._first.local_static
        self._chosen: HandshakeState | None = None
        self._psk_index: int | None = None
        self._failure: str | None = None

    # -- state ----------------------------------------------------------

    @property
    def psk_index(self) -> int | None:
        """Which candidate PSK (0-based) authenticated message 1; None before that."""
        return self._psk_index

    @property
    def candidate_count(self) -> int:
        """How many candidate PSKs are still in play (1 once one has matched)."""
        return 1 if self._chosen is not None else len(self._psks)

    @property
    def complete(self) -> bool:
        """True once every handshake message has been written or read."""
        return self._chosen is not None and self._chosen.complete

    @property
    def failed(self) -> bool:
        """True once an error has ended this handshake."""
        return self._failure is not None or (
            self._chosen is not None and self._chosen.failed
        )

    @property
    def our_turn(self) -> bool:
        """True if the next step is ``write_message`` (False: ``read_message``)."""
        return self._chosen is not None and self._chosen.our_turn

    @property
    def message_index(self) -> int:
        """How many handshake messages have been written or read so far."""
        return 0 if self._chosen is None else self._chosen.message_index

    @property
    def local_static(self) -> bytes | None:
        """Our static public key, if the pattern uses one."""
        return self._local_static

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once known."""
        return None if self._chosen is None else self._chosen.remote_static

    @property
    def handshake_hash(self) -> bytes:
        """The final transcript hash ``h``, for channel binding."""
        if self._chosen is None:
            raise HandshakeError("the handshake hash exists only after the handshake")
        return self._chosen.handshake_hash

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport CipherStates ``(send, receive)`` for this side; once only."""
        if self._chosen is None:
            raise HandshakeError("the handshake is not complete; no transport keys yet")
        return self._chosen.split()

    # -- messages -------------------------------------------------------

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise HandshakeError(f"handshake already failed: {self._failure}")

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message, carrying ``payload``."""
        if self._chosen is not None:
            return self._chosen.write_message(payload)
        self._check_alive()
        # Before message 1 it is the peer's turn: this raises without killing.
        return self._first.write_message(payload)

    def read_message(self, message: bytes) -> bytes:
        """The payload of the peer's next message; message 1 picks the PSK."""
        if self._chosen is not None:
            return self._chosen.read_message(message)
        self._check_alive()
        message = bytes(message)
        for index, psk in enumerate(self._psks):
            hs = self._first if index == 0 else self._make(psk)
            try:
                payload = hs.read_message(message)
            except HandshakeError as exc:
                if isinstance(exc.__cause__, DecryptError):
                    continue  # wrong PSK (or tampering): the next one starts afresh
                # Malformed (length): every candidate would refuse it the same way.
                self._die(str(exc))
                raise
            self._chosen, self._psk_index = hs, index
            self._drop_candidates()
            return payload
        self._die(
            f"handshake message 1 of {self.protocol_name} failed authentication "
            f"under each of the {len(self._psks)} candidate pre-shared key(s): the "
            "peer uses no known pre-shared key (or another prologue, or the message "
            "was altered); handshake aborted"
        )
        raise HandshakeError(self._failure)

    def _die(self, reason: str) -> None:
        self._failure = reason
        self._drop_candidates()

    def _drop_candidates(self) -> None:
        self._psks = []
        self._first = None
        self._make = None
