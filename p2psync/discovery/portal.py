"""The one crossing from foreign threads (zeroconf's) into trio."""

from __future__ import annotations

import math
from typing import Any

import trio


class ThreadPortal:
    """Carries items posted from any thread, in order, into the trio run that created it.

    Create it inside trio; ``post`` never blocks the posting thread. Items posted
    after ``close()`` or after the trio run has finished are dropped.
    """

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._send, self.receive = trio.open_memory_channel(math.inf)

    def post(self, item: Any) -> None:
        """Queue ``item`` for ``receive``; callable from any thread, including trio's."""
        try:
            self._token.run_sync_soon(self._deliver, item)
        except trio.RunFinishedError:
            pass

    def _deliver(self, item: Any) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def close(self) -> None:
        """Stop accepting items (trio side); ``receive`` ends after those already queued."""
        self._send.close()
