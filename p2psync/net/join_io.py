"""Reading and writing join messages on a secured stream (the I/O around ``protocol.join``)."""

from __future__ import annotations

from ..protocol.join import frame_length


async def receive_frame(stream) -> bytes:
    """One length-prefixed join message body; EOFError if the peer closes first."""
    header = await _exactly(stream, 4)
    return await _exactly(stream, frame_length(header))


async def _exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


__all__ = ["receive_frame"]
