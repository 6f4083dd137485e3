"""What we know about one peer during a session, and the parts we are assembling.

How this works: ``known`` starts as the version vector in the peer's Hello.
Every batch we send advances it by the ranges the batch completes (the peer
will hold those versions once it applies them), and every batch the peer
sends advances it too (the peer evidently holds what it sends), so changes
that came from a peer are never echoed back to it. Parts of a multi-part
group (``more=True``) are collected until the final part, then released as
one batch to apply in one transaction; the collection is capped so a hostile
or broken peer cannot make us buffer without bound.
"""

from __future__ import annotations

from ..model import Batch, Change, Range, VersionVector

MAX_GROUP_CHANGES = 1_000_000


class GroupTooLarge(ValueError):
    """A multi-part group exceeded the number of changes we buffer."""


def advance(vv: VersionVector, ranges: tuple[Range, ...]) -> VersionVector:
    """``vv`` after learning that ranges (lo, hi] are complete where vv[site] >= lo."""
    out = vv
    for r in ranges:
        if out[r.site] >= r.lo and r.hi > out[r.site]:
            out = out.with_entry(r.site, r.hi)
    return out


class PeerSync:
    """Per-session sync state for one peer."""

    def __init__(self, peer_vv: VersionVector, *, max_group_changes: int = MAX_GROUP_CHANGES):
        self.known = peer_vv
        self.max_group_changes = max_group_changes
        self._parts: list[tuple[Change, ...]] = []
        self._staged = 0
        self.batches_sent = self.batches_received = 0
        self.changes_sent = self.changes_received = 0

    def sent(self, batch: Batch) -> None:
        """We sent ``batch`` to the peer."""
        self.known = advance(self.known, batch.ranges)
        self.batches_sent += 1
        self.changes_sent += len(batch.changes)

    def received_part(self, batch: Batch, more: bool) -> Batch | None:
        """Take one received part; the whole group as one Batch once the final part is in."""
        self.batches_received += 1
        self.changes_received += len(batch.changes)
        self._staged += len(batch.changes)
        if self._staged > self.max_group_changes:
            raise GroupTooLarge(f"peer sent a transaction of more than {self.max_group_changes} changes "
                                f"(our limit); connection closed")
        if more:
            self._parts.append(batch.changes)
            return None
        if self._parts:
            changes = tuple(c for part in self._parts for c in part) + batch.changes
            batch = Batch(changes, batch.ranges)
        self._parts, self._staged = [], 0
        self.known = advance(self.known, batch.ranges)
        return batch

    @property
    def staged(self) -> int:
        """Changes of an incomplete group held in memory."""
        return self._staged

    def owed_to_peer(self, ours: VersionVector) -> int:
        """Db versions we hold that the peer lacks (summed over sites)."""
        return sum(max(0, n - self.known[s]) for s, n in ours.items())

    def owed_by_peer(self, theirs: VersionVector, ours: VersionVector) -> int:
        """Db versions the peer announced that we lack."""
        return sum(max(0, n - ours[s]) for s, n in theirs.items())
