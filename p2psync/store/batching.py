"""Cutting one site's changes into batches: shared by the SQLite and Postgres stores.

Batches end on db-version boundaries and carry the range (lo, hi] of the
site's versions they complete; a single db version too large for one batch
goes out as parts (``more=True``) that the receiver applies together with the
final part, which alone carries the range. The last batch of a site always
completes the range up to ``hi``, even when no change is left to send (a
site whose writes were all superseded before they reached us).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..model import Batch, Change, Range


def approx_size(values) -> int:
    """Roughly how many bytes ``values`` take on the wire."""
    n = 40 + 9 * len(values)
    for v in values:
        if type(v) is str or type(v) is bytes:
            n += len(v)
    return n


def site_batches(site: bytes, lo: int, hi: int, versions: Iterable[tuple[int, Iterable[Change]]],
                 max_changes: int, max_bytes: int) -> Iterator[tuple[Batch, bool]]:
    """(batch, more) pairs for ``versions``: (dbv, changes) in dbv order (a dbv may repeat, consecutively)."""
    changes: list[Change] = []
    size = 0
    cut = lo          # range start of the batch being built
    cur = None        # dbv being read
    for dbv, cs in versions:
        if dbv != cur:
            if changes and (len(changes) >= max_changes or size >= max_bytes):
                yield Batch(tuple(changes), (Range(site, cut, cur),)), False
                changes, size, cut = [], 0, cur
            cur = dbv
        elif len(changes) >= max_changes or size >= max_bytes:
            yield Batch(tuple(changes), ()), True
            changes, size = [], 0
        for c in cs:
            changes.append(c)
            size += approx_size(c.values) + approx_size(c.pk)
    yield Batch(tuple(changes), (Range(site, cut, hi),)), False
