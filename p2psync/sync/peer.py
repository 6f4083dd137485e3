"""What we know about one peer during a session, and the parts we are assembling.

How this works: ``known`` starts as the version vector in the peer's Hello.
Every batch we send advances it by the ranges the batch completes (the peer
will hold those versions once it applies them), and every batch the peer
sends advances it too (the peer evidently holds what it sends), so changes
that came from a peer are never echoed back to it. Parts of a multi-part
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


class PeerSync:
    """Per-session sync state for one peer."""

    def __init__(self, peer_vv: VersionVector, *, max_group_changes: int = MAX_GROUP_CHANGES,
                 max_staged_bytes: int = MAX_STAGED_BYTES):
        self.known = peer_vv
        self.max_group_changes = max_group_changes
        self.max_staged_bytes = max_staged_bytes
        self._parts: list[tuple[Change, ...]] = []
        self._part_proofs: list = []
        self._staged = 0
        self._staged_bytes = 0
        self.batches_sent = self.batches_received = 0
        self.changes_sent = self.changes_received = 0

    def sent(self, batch: Batch) -> None:
        """We sent ``batch`` to the peer."""
        self.known = advance(self.known, batch.ranges)
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
