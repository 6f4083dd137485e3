"""A broadcast of 'something new to send': local writes stamped or remote batches applied."""

from __future__ import annotations

import trio


class ChangeBus:
    """A version counter that tasks can wait on."""

    def __init__(self) -> None:
        self.version = 0
        self._event = trio.Event()

    def notify(self) -> None:
        """Wake every waiter: new changes exist."""
        self.version += 1
        self._event.set()
        self._event = trio.Event()

    async def wait_beyond(self, seen: int) -> int:
        """Return the current version once it differs from ``seen``."""
        while self.version == seen:
            await self._event.wait()
        return self.version
