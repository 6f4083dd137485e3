"""Reading what a peer (agent or relay) sends on a raw test connection."""

from __future__ import annotations

import trio

from p2psync.protocol import FrameDecoder


async def until_closed(stream, timeout: float, until: bytes | None = None) -> bytes:
    """Everything received until the peer closes the connection (EOF or reset), or ``until`` shows up."""
    data = bytearray()
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            data += chunk
            if until is not None and until in data:
                break
    return bytes(data)


def events_in(data: bytes) -> list:
    """The protocol events in ``data``, a run of sync frames."""
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (ev := dec.next_frame()) is not None:
        out.append(ev)
    return out
