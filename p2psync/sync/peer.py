"""What we know about one peer during a session, and the parts we are assembling.

How this works: ``known`` is what the peer holds, learnt from the peer
itself and from nobody else: it starts as the version vector in the peer's
Hello; every batch we send advances it by the ranges the batch completes
(the peer will hold those versions once it applies them); every batch the
peer sends advances it too (the peer evidently holds what it sends), so
changes that came from a peer are never echoed back to it; and the peer's
``Have`` announcements raise it to what the peer says it got from others.
``told`` mirrors the other way round: what the peer has learnt of our
holdings (our Hello, the batches either side sent, our announcements), so
``announce`` tells it only what moved.

What to send (``plan``), so that in a mesh each change crosses the LAN about
once per device: changes of the eager sites (our own writes) go at once; a
change of any other site (one we got from elsewhere) goes only once the peer
has lagged behind us on that site, without progress, for ``delay`` seconds.
The origin's own push, or another peer's, normally reaches the peer first
and its announcement stops us; if nobody brings it (the origin is away or
not connected to that peer), we do, after the delay, so delivery never
depends on one forwarder. Progress resets the wait: while the peer is
catching up on a site from someone else, we stay quiet. A false
announcement can only keep changes from the peer that made it. Parts of a multi-part
group (``more=True``) are collected until the final part, then released as
one batch to apply in one transaction; the collection is capped in changes
and in bytes (each part costs what the caller says it holds in memory), so a
hostile or broken peer cannot make us buffer without bound.
"""

from __future__ import annotations

from ..model import Batch, Change, Range, VersionVector
from ..protocol.limits import MAX_GROUP_CHANGES, MAX_STAGED_BYTES


class OverBudget(ValueError):
    """A peer's data would take more than a limit allows; ``code`` names the limit (sent in the Error)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class GroupTooLarge(OverBudget):
    """A multi-part group exceeded the changes or bytes we stage for one transaction."""


def advance(vv: VersionVector, ranges: tuple[Range, ...]) -> VersionVector:
    """``vv`` after learning that ranges (lo, hi] are complete where vv[site] >= lo."""
    out = vv
    for r in ranges:
        if out[r.site] >= r.lo and r.hi > out[r.site]:
            out = out.with_entry(r.site, r.hi)
    return out


NOT_DUE = (1 << 63) - 1    # a read-from entry past any db version: that site is not read at all


class PeerSync:
    """Per-session sync state for one peer."""

    def __init__(self, peer_vv: VersionVector, *, max_group_changes: int = MAX_GROUP_CHANGES,
                 max_staged_bytes: int = MAX_STAGED_BYTES, told: VersionVector | None = None):
        self.known = peer_vv
        self.told = told if told is not None else VersionVector()
        self._behind: dict[bytes, tuple[int, float]] = {}   # site -> (peer's entry, since when) while it lags
        self.announced = 0          # Have announcements sent
        self.heard_count = 0        # Have announcements received
        self.max_group_changes = max_group_changes
        self.max_staged_bytes = max_staged_bytes
        self._parts: list[tuple[Change, ...]] = []
        self._part_proofs: list = []
        self._staged = 0
        self._staged_bytes = 0
        self.batches_sent = self.batches_received = 0
        self.changes_sent = self.changes_received = 0

    def heard(self, have: VersionVector) -> None:
        """The peer says it holds ``have`` (a Have): raise what we know of it, entry by entry."""
        self.heard_count += 1
        self.known = self.known.merge(have)

    def announce(self, ours: VersionVector) -> VersionVector | None:
        """The entries of ``ours`` the peer has not learnt of (a Have to send), or None; counted as told."""
        told = self.told
        moved = {s: n for s, n in ours.items() if n > told[s]}
        if not moved:
            return None
        self.told = told.merge(VersionVector(moved))
        self.announced += 1
        return VersionVector(moved)

    def plan(self, ours: VersionVector, eager: frozenset[bytes], now: float,
             delay: float) -> tuple[VersionVector | None, float | None]:
        """What to read for the peer now: (a vector to read from, or None if nothing is due; when the next
        site falls due, or None).

        For each site where we hold more than the peer: an eager site is read from the peer's entry; any
        other site only once the peer has lagged on it without progress for ``delay`` seconds, and until
        then it is set past every db version (``NOT_DUE``), so the reader skips it.
        """
        known, behind = self.known, self._behind
        read: dict[bytes, int] = dict(known.items())
        due_any, next_due = False, None
        for site, n in ours.items():
            have = known[site]
            if n <= have:
                behind.pop(site, None)
                continue
            if site in eager:
                due_any = True
                continue
            rec = behind.get(site)
            if rec is None or rec[0] != have:      # newly behind, or progress since: wait again
                rec = behind[site] = (have, now)
            due = rec[1] + delay
            if now >= due:
                due_any = True
            else:
                read[site] = NOT_DUE
                next_due = due if next_due is None else min(next_due, due)
        for site in [s for s in behind if ours[s] <= known[s]]:
            del behind[site]
        return (VersionVector(read) if due_any else None), next_due

    def sent(self, batch: Batch) -> None:
        """We sent ``batch`` to the peer."""
        self.known = advance(self.known, batch.ranges)
        self.told = advance(self.told, batch.ranges)
        self.batches_sent += 1
        self.changes_sent += len(batch.changes)

    def received_part(self, batch: Batch, more: bool, cost: int = 0) -> tuple[Batch | None, int]:
        """Take one received part costing ``cost`` bytes: (the whole group and its cost) once the final part is in.

        Until then (None, 0). GroupTooLarge if the group would go over a limit;
        nothing of it is kept then.
        """
        self.batches_received += 1
        self.changes_received += len(batch.changes)
        self._staged += len(batch.changes)
        self._staged_bytes += cost
        if self._staged > self.max_group_changes:
            self.drop_staged()
            raise GroupTooLarge("staged-changes", f"peer sent a transaction of more than {self.max_group_changes} "
                                                  f"changes (limit MAX_GROUP_CHANGES); connection closed")
        if self._staged_bytes > self.max_staged_bytes:
            mib = self.max_staged_bytes / (1 << 20)
            self.drop_staged()
            raise GroupTooLarge("staged-bytes", f"peer sent a transaction whose parts take more than {mib:g} MiB "
                                                f"here (limit MAX_STAGED_BYTES); nothing of it was applied. Split "
                                                f"it into smaller transactions on the device that wrote it; "
                                                f"connection closed")
        if more:
            self._parts.append(batch.changes)
            self._part_proofs.extend(batch.proofs)
            return None, 0
        if self._parts:
            changes = tuple(c for part in self._parts for c in part) + batch.changes
            batch = Batch(changes, batch.ranges, tuple(self._part_proofs) + batch.proofs)
        cost = self._staged_bytes
        self.drop_staged()
        self.known = advance(self.known, batch.ranges)
        self.told = advance(self.told, batch.ranges)   # the peer counts them as ours once it sent them
        return batch, cost

    def drop_staged(self) -> None:
        """Forget the parts of an incomplete group (the session is ending)."""
        self._parts, self._part_proofs, self._staged, self._staged_bytes = [], [], 0, 0

    @property
    def staged(self) -> int:
        """Changes of an incomplete group held in memory."""
        return self._staged

    @property
    def staged_bytes(self) -> int:
        """What the parts of an incomplete group cost, as the caller counted them."""
        return self._staged_bytes

    def owed_to_peer(self, ours: VersionVector) -> int:
        """Db versions we hold that the peer lacks (summed over sites)."""
        return sum(max(0, n - self.known[s]) for s, n in ours.items())

    def owed_by_peer(self, theirs: VersionVector, ours: VersionVector) -> int:
        """Db versions the peer announced that we lack."""
        return sum(max(0, n - ours[s]) for s, n in theirs.items())
