"""NoiseStream: a trio Stream that encrypts another Stream with Noise.

How this works (modelled on trio.SSLStream): ``do_handshake`` runs the Noise
handshake over the transport stream, each handshake message framed by a
2-byte big-endian length. Afterwards every ``send_all`` cuts the data into
chunks of at most 65519 bytes, encrypts each into one transport message and
frames it the same way; ``receive_some`` reads one frame at a time, decrypts
it and hands out the plaintext. A frame that fails to decrypt, a frame cut
short by EOF, or any handshake error breaks the stream for good.

The handshake object is a HandshakeState or anything shaped like one, such
as the ``MultiPskResponder`` from ``agent_responder``, which accepts an
initiator using any of several PSKs; after a successful handshake
``psk_index`` says which of its PSKs the peer used (None for an initiator or
a single-PSK HandshakeState, and until the handshake has succeeded).
"""

from __future__ import annotations

import operator

import trio

from ..noise import HandshakeState, MultiPskResponder, NoiseError, NoiseTransport
from ..noise.transport import MAX_PLAINTEXT_LEN

LEN_BYTES = 2
RECEIVE_CHUNK = 65536


class HandshakeFailed(trio.BrokenResourceError):
    """The Noise handshake failed: wrong group, tampering, or a broken connection."""


class NoiseStream(trio.abc.Stream):
    """A Stream whose bytes are Noise transport messages on ``transport_stream``."""

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        handshake: HandshakeState | MultiPskResponder,
    ):
        self.transport_stream = transport_stream
        self._hs = handshake
        self._noise: NoiseTransport | None = None
        self._remote_static: bytes | None = None
        self._handshake_hash: bytes | None = None
        self._psk_index: int | None = None
        self._inbuf = bytearray()      # ciphertext frames not yet decrypted
        self._plain = bytearray()      # decrypted bytes not yet handed out
        self._handshake_lock = trio.Lock()
        self._sending = False
        self._receiving = False
        self._closed = False
        self._broken: str | None = None
        self._eof = False

    # -- handshake --------------------------------------------------------

    @property
    def remote_static(self) -> bytes | None:
        """The peer's authenticated static public key (after the handshake)."""
        return self._remote_static

    @property
    def handshake_hash(self) -> bytes | None:
        """The handshake transcript hash, for channel binding (after the handshake)."""
        return self._handshake_hash

    @property
    def psk_index(self) -> int | None:
        """Which candidate PSK the peer used (multi-PSK responder, after the handshake)."""
        return self._psk_index

    async def do_handshake(self) -> None:
        """Run the handshake if it has not run yet; HandshakeFailed if it fails."""
        async with self._handshake_lock:
            if self._noise is not None:
                return
            self._check_usable()
            try:
                while not self._hs.complete:
                    if self._hs.our_turn:
                        msg = self._hs.write_message(b"")
                        await self.transport_stream.send_all(len(msg).to_bytes(LEN_BYTES, "big") + msg)
                    else:
                        frame = await self._read_frame()
                        if frame is None:
                            raise HandshakeFailed("peer closed the connection during the handshake")
                        self._hs.read_message(frame)
            except NoiseError as e:
                self._broken = f"handshake failed: {e}"
                raise HandshakeFailed(self._broken) from e
            except trio.BrokenResourceError as e:
                self._broken = f"handshake failed: {e or 'connection broken'}"
                raise
            self._remote_static = self._hs.remote_static
            self._handshake_hash = self._hs.handshake_hash
            self._psk_index = getattr(self._hs, "psk_index", None)
            self._noise = NoiseTransport.from_handshake(self._hs)

    async def _read_frame(self) -> bytes | None:
        """One length-prefixed frame from the transport; None on clean EOF."""
        while True:
            if len(self._inbuf) >= LEN_BYTES:
                n = int.from_bytes(self._inbuf[:LEN_BYTES], "big")
                if len(self._inbuf) >= LEN_BYTES + n:
                    frame = bytes(self._inbuf[LEN_BYTES:LEN_BYTES + n])
                    del self._inbuf[:LEN_BYTES + n]
                    return frame
            if self._eof:
                if self._inbuf:
                    raise trio.BrokenResourceError("peer closed the connection in the middle of a message")
                return None
            data = await self.transport_stream.receive_some(RECEIVE_CHUNK)
            if not data:
                self._eof = True
            self._inbuf += data

    # -- Stream -----------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this NoiseStream was closed")
        if self._broken:
            raise trio.BrokenResourceError(self._broken)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_usable()
            await self.do_handshake()
            self._check_usable()
            view = memoryview(data)
            out = bytearray()
            try:
                for i in range(0, len(view), MAX_PLAINTEXT_LEN):
                    ct = self._noise.encrypt(bytes(view[i:i + MAX_PLAINTEXT_LEN]))
                    out += len(ct).to_bytes(LEN_BYTES, "big")
                    out += ct
            except NoiseError as e:
                self._broken = str(e)
                raise trio.BrokenResourceError(str(e)) from e
            if out:
                await self.transport_stream.send_all(out)
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_usable()
            await self.transport_stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            self._check_usable()
            await self.do_handshake()
            self._check_usable()
            while not self._plain:
                frame = await self._read_frame()
                if frame is None:
                    await trio.lowlevel.checkpoint()
                    return b""
                try:
                    self._plain += self._noise.decrypt(frame)
                except NoiseError as e:
                    self._broken = f"peer sent a message that failed authentication ({e}); connection closed"
                    raise trio.BrokenResourceError(self._broken) from e
            n = len(self._plain) if max_bytes is None else min(max_bytes, len(self._plain))
            out = bytes(self._plain[:n])
            del self._plain[:n]
            await trio.lowlevel.checkpoint()
            return out
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        await self.transport_stream.aclose()
