"""One group as a relay process serves it: its version vector cached, and reads shared by its sessions.

How this works: after a write every session of the group wakes. Most of
them are caught up and hold the same vector, so they want the same few
changes; one that wrote the change wants nothing. ``GroupView`` keeps

* ``vv``, what the relay holds for the group: raised by this process's own
  applies (the vector each apply committed) and dropped on a NOTIFY from
  another relay process (or a lost LISTEN connection), to be read again
  once, for every session, on first need. A session whose vector covers it
  has nothing to read, and asks Postgres nothing;
* shared reads: sessions asking for what the same vector lacks, while the
  group's vector has not moved, get one read between them (the first one
  reads; the others wait for it and get its batches). It is kept for the
  ones woken later, until the vector moves. Only small reads are shared (at
  most SHARED_VERSIONS db versions missing, SHARED_CHANGES changes and
  SHARED_BYTES read); a larger catch-up is read by its session for itself,
  chunk by chunk, as before.

``vv`` only ever holds what was read or committed, so it is never ahead of
Postgres; it is dropped (not merged) when an apply that started before an
outside NOTIFY returns, so it is never behind a change a session was woken
for. Every store call runs in a worker thread under the process's slots
(one per pooled connection), so sessions wait in trio, not in threads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import trio

from ..model import Batch, VersionVector
from ..store.reading import batch_bytes

SHARED_VERSIONS = 64        # a session missing more db versions than this reads for itself
SHARED_CHANGES = 2_000      # a shared read that finds more changes than this is dropped: each session reads
SHARED_BYTES = 1 << 20      # ... or more bytes than this
MAX_SHARED = 16             # shared results kept per group (distinct starting vectors) until the vector moves

_TOO_BIG = object()


class _Pending:
    """A read in progress that other sessions wait for."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False
        self.result = None


class GroupView:
    """The cached vector and shared reads of one group's sessions in this process."""

    def __init__(self, store, slots: trio.CapacityLimiter, shared: bool = True):
        self.store, self.slots, self.shared = store, slots, shared
        self.vv: VersionVector | None = None
        self.invalidations = 0
        self._vv_read: _Pending | None = None
        self._results: dict[tuple, object] = {}
        self._pending: dict[tuple, _Pending] = {}
        self.counters = {"vv_reads": 0, "reads_skipped": 0, "reads_shared": 0, "reads_served_shared": 0,
                         "reads_own": 0}

    async def run(self, fn, *args):
        """``fn(*args)`` (a store call) in a worker thread, once a slot (a pooled connection) is free."""
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self.slots)

    # -- the cached vector ------------------------------------------------------

    def invalidate(self) -> None:
        """Another relay process wrote (or its notifications may have been lost): read the vector again."""
        self.vv = None
        self.invalidations += 1
        self._vv_read = None
        self._moved()

    def applied(self, vv: VersionVector, invalidations: int) -> None:
        """This process committed an apply that left the group at ``vv`` (it started at ``invalidations``)."""
        if self.vv is None or invalidations != self.invalidations:
            self.invalidate()   # an outside write may be missing from ``vv``: read it again when needed
            return
        merged = self.vv.merge(vv)
        if merged != self.vv:
            self.vv = merged
            self._moved()

    def _moved(self) -> None:
        self._results.clear()
        self._pending.clear()

    async def holdings(self) -> VersionVector:
        """What the relay holds for the group (cached; one read for all sessions when not).

        A read that an outside write overtook is still returned to those waiting for it (each recorded
        its bus version before asking, so the write wakes it again), but not cached.
        """
        if self.vv is not None:
            return self.vv
        p = self._vv_read
        if p is not None:
            await p.done.wait()
            if p.ok:
                return p.result
            return await self.holdings()   # the task reading for all went away: read ourselves
        p = self._vv_read = _Pending()
        started = self.invalidations
        try:
            self.counters["vv_reads"] += 1
            p.result = await self.run(self.store.version_vector)
            p.ok = True
        finally:
            if self._vv_read is p:
                self._vv_read = None
            p.done.set()
        if self.invalidations == started:
            self.vv = p.result if self.vv is None else self.vv.merge(p.result)
            self._moved()
        return p.result

    # -- reads ----------------------------------------------------------------------

    async def batches(self, vv: VersionVector, max_changes: int, max_bytes: int) -> AsyncIterator[tuple[Batch, bool]]:
        """What a peer with ``vv`` lacks, batch by batch: nothing read if it lacks nothing, a shared read if
        it lacks a little, its own read (chunk by chunk, from short snapshots) otherwise."""
        ours = await self.holdings()
        missing = sum(max(0, n - vv[s]) for s, n in ours.items())
        if missing == 0:
            self.counters["reads_skipped"] += 1
            return
        if self.shared and missing <= SHARED_VERSIONS:
            got = await self._shared(vv, max_changes, max_bytes)
            if got is not _TOO_BIG:
                for item in got:
                    yield item
                return
        self.counters["reads_own"] += 1
        gen = self.store.changes_since(vv, max_changes, max_bytes)
        done = object()
        try:
            while (item := await self.run(next, gen, done)) is not done:
                yield item
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(gen.close)

    async def _shared(self, vv: VersionVector, max_changes: int, max_bytes: int):
        """The batches of one read shared by every session asking for what ``vv`` lacks; _TOO_BIG if large."""
        key = (tuple(sorted(vv.items())), max_changes, max_bytes)
        while True:
            if key in self._results:
                self.counters["reads_served_shared"] += 1
                return self._results[key]
            p = self._pending.get(key)
            if p is not None:
                await p.done.wait()
                if p.ok:
                    self.counters["reads_served_shared"] += 1
                    return p.result
                continue   # the session reading for all went away (or failed): read ourselves
            p = self._pending[key] = _Pending()
            try:
                self.counters["reads_shared"] += 1
                p.result = await self.run(_read_small, self.store, vv, max_changes, max_bytes)
                p.ok = True
            finally:
                if self._pending.get(key) is p:
                    del self._pending[key]
                    if p.ok and len(self._results) < MAX_SHARED:
                        self._results[key] = p.result   # the vector has not moved since: still all there is
                p.done.set()
            return p.result


def _read_small(store, vv: VersionVector, max_changes: int, max_bytes: int):
    """Every batch of what ``vv`` lacks, if that is small (SHARED_CHANGES, SHARED_BYTES); else _TOO_BIG."""
    out, changes, size = [], 0, 0
    gen = store.changes_since(vv, max_changes, max_bytes)
    try:
        for batch, more in gen:
            changes += len(batch.changes)
            size += batch_bytes(batch)
            if changes > SHARED_CHANGES or size > SHARED_BYTES:
                return _TOO_BIG
            out.append((batch, more))
    finally:
        gen.close()
    return tuple(out)


class RelayWorker:
    """A session's store as its Connection sees it: the group's view, applies one at a time."""

    def __init__(self, view: GroupView, wall_ms):
        self.view, self.store, self._wall_ms = view, view.store, wall_ms
        self._write_lock = trio.Lock()

    async def version_vector(self) -> VersionVector:
        return await self.view.holdings()

    async def apply(self, batch: Batch, *, validated: bool = False):
        async with self._write_lock:
            started = self.view.invalidations
            result = await self.view.run(partial(self.store.apply, batch, self._wall_ms(), validated=validated))
            self.view.applied(result.vv, started)
            return result

    def batches(self, vv: VersionVector, max_changes: int, max_bytes: int):
        return self.view.batches(vv, max_changes, max_bytes)

    async def call(self, fn, *args):
        return await self.view.run(fn, *args)


__all__ = ["GroupView", "RelayWorker", "SHARED_VERSIONS", "SHARED_CHANGES", "SHARED_BYTES"]
