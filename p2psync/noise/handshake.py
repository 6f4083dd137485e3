"""HandshakeState (Noise §5.3): runs one side of a handshake pattern, sans-IO.

How this works: the constructor parses the protocol name, hashes the
protocol name, the prologue and the pre-message public keys into a
SymmetricState, and checks that exactly the keys the pattern needs were
given. Each ``write_message`` / ``read_message`` then consumes the next
message pattern, token by token: ``e`` sends/receives an ephemeral public
key (in PSK handshakes also mixed into the key), ``s`` sends/receives the
static public key encrypted, ``ee``/``es``/``se``/``ss`` mix a DH output into
the chaining key, and ``psk`` mixes in the next pre-shared key; the payload
follows, encrypted once any key exists. Before touching any state, a read
checks the message length against what the tokens need, so a short or huge
message never reaches the crypto. Any error kills the HandshakeState: later
calls raise HandshakeError instead of continuing from a half-updated
transcript. After the last message, ``split()`` hands out the transport
CipherStates and ``remote_static`` / ``handshake_hash`` stay readable.
"""

from __future__ import annotations

from typing import Callable, Sequence

from . import dh as dhfuncs
from .cipher import MAX_MESSAGE_LEN, TAG_LEN, CipherState
from .dh import DHLEN
from .errors import DecryptError, HandshakeError, NoiseError
from .patterns import parse_protocol_name
from .symmetric import HASHES, SymmetricState

PSK_LEN = 32


class HandshakeState:
    """One party's state in a Noise handshake."""

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        *,
        prologue: bytes = b"",
        s: bytes | None = None,
        rs: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        parsed = parse_protocol_name(protocol_name)
        _check_crypto(parsed.dh, parsed.cipher, parsed.hash)
        self.protocol_name = protocol_name
        self.initiator = bool(initiator)
        self._pattern = parsed.pattern
        self._keygen: Callable[[], bytes] = dhfuncs.generate_private
        self._s = None if s is None else dhfuncs.load_private(s, "static private key s")
        self._rs = None if rs is None else dhfuncs.check_public(rs, "remote key rs")
        self._e = None
        self._re: bytes | None = None
        self._psks = [_check_psk(p, i) for i, p in enumerate(psks)]
        self._psk_used = 0
        self._index = 0
        self._failure: str | None = None
        self._ciphers: tuple[CipherState, CipherState] | None = None
        self._split_taken = False
        self._check_keys()
        self._sym = SymmetricState(protocol_name.encode("ascii"), HASHES[parsed.hash])
        self._sym.mix_hash(bytes(prologue))
        self._hash_pre_messages()

    # -- set-up ---------------------------------------------------------

    def _check_keys(self) -> None:
        p = self._pattern
        mine, theirs = (
            (p.initiator_pre, p.responder_pre)
            if self.initiator
            else (p.responder_pre, p.initiator_pre)
        )
        needs_s = "s" in mine or any("s" in m for m in p.sent_by(self.initiator))
        if needs_s and self._s is None:
            raise HandshakeError(f"pattern {p.name} needs a local static key (s)")
        if not needs_s and self._s is not None:
            raise HandshakeError(f"pattern {p.name} uses no local static key (s)")
        if "s" in theirs and self._rs is None:
            raise HandshakeError(
                f"pattern {p.name} needs the peer's static public key (rs) in advance"
            )
        if "s" not in theirs and self._rs is not None:
            raise HandshakeError(
                f"pattern {p.name} learns the peer's static key during the handshake; "
                "do not pass rs (check remote_static afterwards)"
            )
        if len(self._psks) != p.psk_count:
            raise HandshakeError(
                f"pattern {p.name} needs {p.psk_count} pre-shared key(s), "
                f"got {len(self._psks)}"
            )

    def _hash_pre_messages(self) -> None:
        p = self._pattern
        pre_messages = ((True, p.initiator_pre), (False, p.responder_pre))
        for from_initiator, tokens in pre_messages:
            for token in tokens:
                assert token == "s", f"pre-message token {token!r} is not supported"
                mine = from_initiator == self.initiator
                key = dhfuncs.public_bytes(self._s) if mine else self._rs
                self._sym.mix_hash(key)

    # -- state ----------------------------------------------------------

    @property
    def complete(self) -> bool:
        """True once every handshake message has been written or read."""
        return self._ciphers is not None

    @property
    def failed(self) -> bool:
        """True once an error has ended this handshake."""
        return self._failure is not None

    @property
    def our_turn(self) -> bool:
        """True if the next step is ``write_message`` (False: ``read_message``)."""
        return (self._index % 2 == 0) == self.initiator

    @property
    def message_index(self) -> int:
        """How many handshake messages have been written or read so far."""
        return self._index

    @property
    def local_static(self) -> bytes | None:
        """Our static public key, if the pattern uses one."""
        return None if self._s is None else dhfuncs.public_bytes(self._s)

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once known (kept after completion)."""
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """The final transcript hash ``h``, for channel binding."""
        if not self.complete:
            raise HandshakeError("the handshake hash exists only after the handshake")
        return self._sym.h

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport CipherStates ``(send, receive)`` for this side; once only."""
        if self._ciphers is None:
            raise HandshakeError("the handshake is not complete; no transport keys yet")
        if self._split_taken:
            raise HandshakeError("the transport CipherStates were already handed out")
        self._split_taken = True
        c1, c2 = self._ciphers
        return (c1, c2) if self.initiator else (c2, c1)

    def _check_step(self, writing: bool) -> tuple[str, ...]:
        if self._failure is not None:
            raise HandshakeError(f"handshake already failed: {self._failure}")
        if self.complete:
            raise HandshakeError("the handshake is already complete")
        if writing != self.our_turn:
            verb = "write" if writing else "read"
            raise HandshakeError(
                f"cannot {verb} handshake message {self._index + 1} as "
                f"{'initiator' if self.initiator else 'responder'}: it is the "
                f"{'peer' if writing else 'local side'}'s turn to send"
            )
        return self._pattern.messages[self._index]

    def _overhead(self, tokens: tuple[str, ...]) -> int:
        """Bytes a message with ``tokens`` carries besides the payload plaintext."""
        has_key = self._sym.has_key
        size = 0
        for token in tokens:
            if token == "e":
                size += DHLEN
                has_key = has_key or self._pattern.has_psk
            elif token == "s":
                size += DHLEN + (TAG_LEN if has_key else 0)
            else:
                has_key = True
        return size + (TAG_LEN if has_key else 0)

    def _fail(self, exc: NoiseError) -> HandshakeError:
        self._failure = str(exc)
        self._e = None
        if isinstance(exc, HandshakeError):
            return exc
        where = f"handshake message {self._index + 1} of {self._pattern.name}"
        if isinstance(exc, DecryptError):
            return HandshakeError(
                f"{where} failed authentication: different pre-shared key or "
                "prologue, or the message was altered; handshake aborted"
            )
        return HandshakeError(f"{where}: {exc}; handshake aborted")

    def _finish_message(self) -> None:
        self._index += 1
        if self._index == len(self._pattern.messages):
            self._ciphers = self._sym.split()
            self._e = None

    # -- messages -------------------------------------------------------

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message, carrying ``payload``."""
        tokens = self._check_step(writing=True)
        limit = MAX_MESSAGE_LEN - self._overhead(tokens)
        if len(payload) > limit:
            raise HandshakeError(
                f"handshake payload of {len(payload)} bytes is too large: message "
                f"{self._index + 1} of {self._pattern.name} allows {limit}"
            )
        try:
            out = bytearray()
            for token in tokens:
                if token == "e":
                    self._e = dhfuncs.load_private(self._keygen(), "ephemeral key")
                    out += self._mix_ephemeral(dhfuncs.public_bytes(self._e))
                elif token == "s":
                    out += self._sym.encrypt_and_hash(dhfuncs.public_bytes(self._s))
                else:
                    self._mix_token(token)
            out += self._sym.encrypt_and_hash(bytes(payload))
        except NoiseError as exc:
            error = self._fail(exc)
            if error is exc:
                raise
            raise error from exc
        self._finish_message()
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """The payload of the peer's next handshake message ``message``."""
        tokens = self._check_step(writing=False)
        message = bytes(message)
        try:
            self._check_length(tokens, len(message))
            offset = 0
            for token in tokens:
                if token == "e":
                    self._re = self._mix_ephemeral(message[offset : offset + DHLEN])
                    offset += DHLEN
                elif token == "s":
                    size = DHLEN + (TAG_LEN if self._sym.has_key else 0)
                    rs = self._sym.decrypt_and_hash(message[offset : offset + size])
                    offset += size
                    self._rs = rs
                else:
                    self._mix_token(token)
            payload = self._sym.decrypt_and_hash(message[offset:])
        except NoiseError as exc:
            error = self._fail(exc)
            if error is exc:
                raise
            raise error from exc
        self._finish_message()
        return payload

    def _check_length(self, tokens: tuple[str, ...], length: int) -> None:
        where = f"handshake message {self._index + 1} of {self._pattern.name}"
        if length > MAX_MESSAGE_LEN:
            raise HandshakeError(
                f"{where} is {length} bytes (limit {MAX_MESSAGE_LEN}); "
                "handshake aborted"
            )
        needed = self._overhead(tokens)
        if length < needed:
            raise HandshakeError(
                f"{where} is {length} bytes, shorter than the {needed} its keys and "
                "tags need (truncated?); handshake aborted"
            )

    def _mix_ephemeral(self, public: bytes) -> bytes:
        self._sym.mix_hash(public)
        if self._pattern.has_psk:
            self._sym.mix_key(public)
        return public

    def _mix_token(self, token: str) -> None:
        if token == "psk":
            psk = self._psks[self._psk_used]
            self._psk_used += 1
            self._sym.mix_key_and_hash(psk)
            return
        mine, theirs = {
            "ee": (self._e, self._re),
            "ss": (self._s, self._rs),
            "es": (self._e, self._rs) if self.initiator else (self._s, self._re),
            "se": (self._s, self._re) if self.initiator else (self._e, self._rs),
        }[token]
        if mine is None or theirs is None:
            raise HandshakeError(f"token {token!r} needs a key this side does not have")
        self._sym.mix_key(dhfuncs.dh(mine, theirs, token))


def _check_crypto(dh: str, cipher: str, hash_name: str) -> None:
    if dh != "25519":
        raise HandshakeError(f"unsupported DH function {dh!r} (only 25519)")
    if cipher != "ChaChaPoly":
        raise HandshakeError(f"unsupported cipher {cipher!r} (only ChaChaPoly)")
    if hash_name not in HASHES:
        raise HandshakeError(
            f"unsupported hash {hash_name!r} (supported: {', '.join(HASHES)})"
        )


def _check_psk(psk: bytes, index: int) -> bytes:
    psk = bytes(psk)
    if len(psk) != PSK_LEN:
        raise HandshakeError(
            f"pre-shared key {index} must be {PSK_LEN} bytes, got {len(psk)}"
        )
    return psk


def use_fixed_ephemeral_for_tests(hs: HandshakeState, private: bytes) -> None:
    """Test-only: make ``hs`` use ``private`` as its next ephemeral key."""
    key = bytes(private)
    dhfuncs.load_private(key, "test ephemeral key")
    if hs._e is not None or hs._index > 0:
        raise HandshakeError("fix the ephemeral key before the handshake starts")
    hs._keygen = lambda: key
