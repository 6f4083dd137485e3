"""The store seen from trio: SQLite work runs in worker threads, writes one at a time."""

from __future__ import annotations

import time
from functools import partial
from collections.abc import AsyncIterator

import trio

from ..model import Batch, VersionVector
from ..store import ApplyResult, Store


def wall_ms() -> int:
    """The wall clock in milliseconds (the only clock read the store needs)."""
    return int(time.time() * 1000)


class StoreWorker:
    """Runs store calls off the event loop; serialises the writer connection."""

    def __init__(self, store: Store):
        self.store = store
        self._write_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(4)

    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def call(self, fn, *args):
        """Run ``fn(*args)`` (a store method) in a worker thread, one writer at a time."""
        async with self._write_lock:
            return await self._run(fn, *args)

    async def stamp(self) -> int | None:
        async with self._write_lock:
            return await self._run(self.store.stamp, wall_ms())

    async def apply(self, batch: Batch, *, validated: bool = False) -> ApplyResult:
        async with self._write_lock:
            return await self._run(partial(self.store.apply, batch, wall_ms(), validated=validated))

    async def release_held(self, force: bool) -> int:
        async with self._write_lock:
            return await self._run(self.store.release_held, wall_ms(), force)

    async def data_version(self) -> int:
        async with self._write_lock:
            return await self._run(self.store.data_version)

    async def version_vector(self) -> VersionVector:
        async with self._write_lock:
            return await self._run(self.store.version_vector)

    async def held(self):
        async with self._write_lock:
            return await self._run(self.store.held)

    async def held_pauses(self) -> list:
        """Origins paused because a held budget is full (store.held_pauses); none for a store without one."""
        fn = getattr(self.store, "held_pauses", None)
        if fn is None:
            return []
        async with self._write_lock:
            return await self._run(fn)

    async def batches(self, vv: VersionVector, max_changes: int, max_bytes: int) -> AsyncIterator[tuple[Batch, bool]]:
        """What a peer with ``vv`` lacks, batch by batch, read in worker threads.

        The store reads a chunk at a time from a short snapshot and stages it
        (store/reading.py), so while we wait for the peer (window full, slow
        socket) between two batches no read transaction is open.
        """
        gen = self.store.changes_since(vv, max_changes, max_bytes)
        done = object()
        try:
            while True:
                item = await self._run(next, gen, done)
                if item is done:
                    return
                yield item
        finally:
            await self._run(gen.close)
