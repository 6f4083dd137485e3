"""Reading what a peer lacks: changes_since(vv) in bounded batches, from short snapshots.

For each site S where we know more than the peer (ours[S] > theirs[S]) we
walk the idx tables for entries (S, dbv) with theirs[S] < dbv <= ours[S] in
dbv order, merged across tables, and turn each entry into the changes whose
cells still carry (S, dbv). A change that brings a row into existence takes
the row's other cells along (whatever their clock), so a receiver always
creates whole rows. Batches end on db-version boundaries and carry the range
they complete; a single db version too large for one batch is sent as parts
(``more=True``) that the receiver applies together with the final part.

Clocks come from the meta tables, as of the last stamp, and values from the
application's tables, as of now. A row the application wrote after the last
stamp (its key is in a change log) no longer has the values those clocks
belong to; for each site we stop just before the first db version that has
a cell of such a row, and the rest follows once the next stamp has run.

Changes we hold (clock skew, unknown table or column) are in no meta table,
yet our version vector counts them as received, so a peer relying on that
vector would never get them from anyone: they travel in their db version's
batch like the rest (read from ``_p2p_held`` by origin and db version), for
the peer to apply or hold in turn.

No snapshot is held while a peer is waited for. ``in_snapshots`` reads in
chunks: a reader thread opens a read transaction, stages batches until the
first db-version boundary past ``CHUNK_BYTES`` and ends the transaction; it
never waits for the consumer, who takes the batches as they are staged. What
the consumer has not taken yet stays in memory up to ``STAGE_BYTES`` and goes
to an unlinked temporary file beyond, so every part of one db version comes
from one snapshot however slowly it is sent. The next chunk is read, from a
new snapshot, once the consumer has taken this one, starting where it ended
(the ranges handed out so far). A peer that stops reading (window full, slow
socket) thus holds at most one chunk, mostly on disk, and never a read
transaction: SQLite's WAL stays checkpointable and the relay holds no
Postgres transaction.
"""

from __future__ import annotations

import heapq
import itertools
import os
import tempfile
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from functools import partial

import logging

import apsw
import msgpack

from ..model import Batch, Change, Range, VersionVector
from ..model.attest import Proof
from .batching import approx_size, site_batches
from .ddl import TableSpec, q
from .merging import SiteMap

log = logging.getLogger("p2psync.store")

STAGE_BYTES = 1 << 20   # staged batches kept in memory for a consumer that lags (batch_bytes); beyond: a temp file
CHUNK_BYTES = 8 << 20   # read from one snapshot before it ends (then the next chunk, from a new one)


def pack_change(c: Change) -> bytes:
    """A change as stored aside (held) or staged on disk: msgpack of its fields."""
    return msgpack.packb([c.table, list(c.pk), c.site, c.dbv, c.hlc, c.alive, list(c.columns), list(c.values)],
                         use_bin_type=True)


def unpack_change(b: bytes) -> Change:
    t, pk, site, dbv, hlc, alive, cols, vals = msgpack.unpackb(b, raw=False)
    return Change(t, tuple(pk), site, dbv, hlc, alive, tuple(cols), tuple(vals))


# -- staging ------------------------------------------------------------------


def batch_bytes(batch: Batch) -> int:
    """Roughly how many bytes ``batch`` takes on the wire (what the staging budgets count)."""
    n = 0
    for c in batch.changes:
        n += approx_size(c.values) + approx_size(c.pk)
    return n


class Staged:
    """Batches that a reader thread stages from one snapshot and a consumer takes, in order.

    The reader never waits for the consumer: a batch stays in memory while
    the batches in memory not yet taken are under ``memory_bytes`` (one is
    always allowed), and otherwise goes to an unlinked temporary file. A
    consumer that keeps up takes everything from memory as it is read; one
    that stalls leaves at most ``memory_bytes`` in memory and the rest of the
    chunk on disk.
    """

    def __init__(self, memory_bytes: int, spill_dir: str | None = None):
        self.memory_bytes, self.spill_dir = memory_bytes, spill_dir
        self.added = 0              # bytes staged in all (batch_bytes)
        self.spilled = 0            # batches written to the file
        self.complete = False       # the reader got to the end of what the peer lacks, not just of a chunk
        self._cv = threading.Condition()
        self._queue: deque = deque()    # (batch, more, size) in memory, or (None, more, (offset, length))
        self._in_memory = 0
        self._finished = False
        self._error: BaseException | None = None
        self._cancelled = False
        self._file = None
        self._end = 0

    def add(self, batch: Batch, more: bool) -> bool:
        """Stage one batch (the reader); False once the consumer has gone, to stop reading."""
        size = batch_bytes(batch)
        with self._cv:
            if self._cancelled:
                return False
            self.added += size
            if not self._in_memory or self._in_memory + size <= self.memory_bytes:
                self._queue.append((batch, more, size))
                self._in_memory += size
                self._cv.notify()
                return True
        data = msgpack.packb(([(r.site, r.lo, r.hi) for r in batch.ranges], batch.changes, batch.proofs),
                             use_bin_type=True)
        with self._cv:
            if self._cancelled:
                return False
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="p2psync-stage-", dir=self.spill_dir)
            os.pwrite(self._file.fileno(), data, self._end)
            self._queue.append((None, more, (self._end, len(data))))
            self._end += len(data)
            self.spilled += 1
            self._cv.notify()
        return True

    def finish(self, complete: bool, error: BaseException | None = None) -> None:
        """The reader is done (and its snapshot has ended)."""
        with self._cv:
            self._finished, self.complete, self._error = True, complete and error is None, error
            self._cv.notify_all()

    def take(self) -> tuple[Batch, bool] | None:
        """The next (batch, more), waiting for the reader if it has not staged it yet; None at the end."""
        with self._cv:
            while not self._queue and not self._finished:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            if not self._queue:
                return None
            batch, more, where = self._queue.popleft()
            if batch is not None:
                self._in_memory -= where
                return batch, more
            offset, length = where
            fd = self._file.fileno()
        ranges, changes, proofs = msgpack.unpackb(os.pread(fd, length, offset), raw=False, use_list=False)
        make = partial(tuple.__new__, Change)   # what Change._make does, without its checks
        return (Batch(tuple(map(make, changes)), tuple(Range(*r) for r in ranges), tuple(Proof(*p) for p in proofs)),
                more)

    def cancel(self) -> None:
        """The consumer is done: drop what is staged; a reader still running stops at its next batch."""
        with self._cv:
            self._cancelled = True
            self._queue.clear()
            self._in_memory = 0
            if self._file is not None:
                self._file.close()
                self._file = None


def stage(staged: Staged, batches: Iterator[tuple[Batch, bool]], budget: int | None = None) -> bool:
    """Stage ``batches`` up to the first db-version boundary past ``budget`` (default CHUNK_BYTES); whether
    that was all of them. ``batches`` is closed before this returns, so its snapshot can end."""
    budget = CHUNK_BYTES if budget is None else budget
    try:
        for batch, more in batches:
            if not staged.add(batch, more):
                return False
            if not more and staged.added >= budget:
                return False
        return True
    finally:
        batches.close()


def _read_in_thread(read_chunk, vv: VersionVector, staged: Staged) -> None:
    try:
        staged.finish(read_chunk(vv, staged))
    except BaseException as e:  # handed to the consumer, raised there
        staged.finish(False, e)


def in_snapshots(read_chunk: Callable[[VersionVector, Staged], bool], vv: VersionVector,
                 spill_dir: str | None = None) -> Iterator[tuple[Batch, bool]]:
    """Batches of what a peer with ``vv`` lacks, chunk by chunk.

    ``read_chunk(vv, staged)`` opens a snapshot, stages one chunk (``stage``),
    ends the snapshot and says whether it read everything. It runs in a
    thread of its own, so batches are handed out while it reads; the next
    chunk is read once this one has been taken.
    """
    while True:
        staged = Staged(STAGE_BYTES, spill_dir)
        threading.Thread(target=_read_in_thread, args=(read_chunk, vv, staged), name="p2psync-read",
                         daemon=True).start()
        try:
            while (item := staged.take()) is not None:
                for r in item[0].ranges:
                    if vv[r.site] >= r.lo and r.hi > vv[r.site]:
                        vv = vv.with_entry(r.site, r.hi)
                yield item
        finally:
            staged.cancel()
        if staged.complete:
            return


# -- reading one snapshot of a device's database -------------------------------


class ChangeReader:
    """Reads changes from one snapshot of the database (a read transaction)."""

    def __init__(self, conn: apsw.Connection, specs: dict[str, TableSpec], local_vv: VersionVector,
                 signer=None, blocked: list[str] = ()):
        self.conn, self.specs, self.local_vv = conn, specs, local_vv
        # Tracked tables this device cannot read now (store/capture.py, a column renamed...): versions
        # with cells there are not sent until they can be, so no peer counts them as received without them.
        self.blocked = [TableSpec(name, (), ()).obj("idx") for name in blocked]
        self.signer = signer        # model.attest.Signer: check our own cells against what we signed
        self._cursors: set[apsw.Cursor] = set()
        self.sites = SiteMap(conn)
        self.unstamped = self._unstamped_versions()

    def close(self) -> None:
        """Finish every statement still open, so the read transaction can end."""
        for cur in list(self._cursors):
            cur.close()
        self._cursors.clear()

    def _rows(self, sql: str, args: tuple) -> Iterator[tuple]:
        """The rows of a query, on a cursor of its own that is closed when the generator is."""
        cur = self.conn.cursor()
        self._cursors.add(cur)
        try:
            yield from cur.execute(sql, args)
        finally:
            self._cursors.discard(cur)
            cur.close()

    def _unstamped_versions(self) -> dict[int, list[int]]:
        """Per site index, the db versions of cells of rows written since the last stamp."""
        out: dict[int, list[int]] = defaultdict(list)
        for spec in self.specs.values():
            log = spec.obj("log")
            if not self.conn.execute(f"SELECT 1 FROM {log} LIMIT 1").fetchall():
                continue
            keys = ", ".join(q(c) for c in spec.pk)
            old = ", ".join(q("old_" + c) for c in spec.pk)
            on = " AND ".join(f"m.{q(c)} = d.{q(c)}" for c in spec.pk)
            sql = (f"SELECT m.* FROM (SELECT {keys} FROM {log} UNION SELECT {old} FROM {log} "
                   f"WHERE {q('old_' + spec.pk[0])} IS NOT NULL) d JOIN {spec.obj('meta')} m ON {on}")
            npk = len(spec.pk)
            for row in self.conn.execute(sql):
                regs = row[npk:]
                for j in range(2, len(regs), 3):  # (site, dbv) of the existence register and each column
                    if regs[j + 1] is not None:
                        out[regs[j]].append(regs[j + 1])
        return out

    def _entries(self, spec: TableSpec, s_idx: int, lo: int, hi: int):
        """(dbv, table, pk, regs, base values or None) for idx entries of one site, in dbv order."""
        npk, ncols = len(spec.pk), len(spec.cols)
        base_cols = ", ".join([f"b.{q(spec.pk[0])}"] + [f"b.{q(c)}" for c in spec.cols])
        on_m = " AND ".join(f"m.{q(c)} = i.{q(c)}" for c in spec.pk)
        on_b = " AND ".join(f"b.{q(c)} = i.{q(c)}" for c in spec.pk)
        sql = (f"SELECT i.dbv, {', '.join('i.' + q(c) for c in spec.pk)}, m.e_a, m.e_h, m.e_s, m.e_v, "
               f"{', '.join('m.' + c for c in spec.meta_columns()) or 'NULL'}, {base_cols} "
               f"FROM {spec.obj('idx')} i JOIN {spec.obj('meta')} m ON {on_m} "
               f"LEFT JOIN {q(spec.name)} b ON {on_b} "
               f"WHERE i.site = ? AND i.dbv > ? AND i.dbv <= ? ORDER BY i.dbv")
        nregs = 4 + 3 * ncols
        for row in self._rows(sql, (s_idx, lo, hi)):
            pk = tuple(row[1:1 + npk])
            regs = row[1 + npk:1 + npk + (nregs if ncols else 5)]
            base = row[1 + npk + (nregs if ncols else 5):]
            yield row[0], spec.name, pk, regs, (base[1:] if base[0] is not None else None)

    def _held(self, site: bytes, lo: int, hi: int):
        """(dbv, None, change, None, None) for held changes of ``site`` with lo < dbv <= hi, in dbv order."""
        for dbv, blob in self._rows("SELECT dbv, change FROM _p2p_held WHERE site = ? AND dbv > ? AND dbv <= ? "
                                    "ORDER BY dbv, id", (site, lo, hi)):
            yield dbv, None, unpack_change(blob), None, None

    def _orphan(self, spec: TableSpec, pk: tuple, col: str):
        rows = self.conn.execute(f"SELECT value FROM {spec.obj('orphan')} WHERE {spec.pk_where} AND col = ?",
                                 pk + (col,)).fetchall()
        return rows[0][0] if rows else None

    def _changes(self, site: bytes, s_idx: int, dbv: int, table: str, pk: tuple, regs, base) -> list[Change]:
        spec = self.specs[table]
        ncols = len(spec.cols)
        if (regs[2] == s_idx and regs[3] == dbv and regs[0] == 1 and base is not None
                and regs[4::3].count(regs[1]) == ncols and regs[5::3].count(s_idx) == ncols
                and regs[6::3].count(dbv) == ncols):
            # The common case: every cell of a live row comes from this one write.
            return [Change(table, pk, site, dbv, regs[1], True, spec.cols, tuple(base))]
        alive = None
        if regs[2] == s_idx and regs[3] == dbv:
            alive = regs[0] == 1
        bring_all = alive is True
        # group cells by clock (hlc, site idx, dbv)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i in range(ncols):
            b = 4 + 3 * i
            h, s, v = regs[b], regs[b + 1], regs[b + 2]
            if h is None:
                continue
            if (s == s_idx and v == dbv) or bring_all:
                groups.setdefault((h, s, v), []).append(i)
        out = []
        own = (regs[1], s_idx, dbv)
        if alive is not None and own not in groups:
            groups[own] = []
        for (h, s, v), idxs in groups.items():
            cols, vals = [], []
            for i in idxs:
                if base is not None:
                    cols.append(spec.cols[i])
                    vals.append(base[i])
                elif regs[1] is None or regs[4 + 3 * i] > regs[1]:
                    cols.append(spec.cols[i])
                    vals.append(self._orphan(spec, pk, spec.cols[i]))
            a = alive if (h, s, v) == own else None
            if a is None and not cols:
                continue
            out.append(Change(table, pk, self.sites.site(s), v, h, a, tuple(cols), tuple(vals)))
        return out

    def version_changes(self, site: bytes, lo: int, hi: int) -> Iterator[tuple[int, list[Change]]]:
        """(dbv, the changes of that version still held here) for ``site``'s versions in (lo, hi], in order.

        What a batch would carry of each version, without the cells sent along to make rows
        whole (other versions'): what the origin signs (store.sign_versions).
        """
        s_idx = self.sites.idx_existing(site)
        if s_idx is None:
            return
        entries = heapq.merge(*(self._entries(spec, s_idx, lo, hi) for spec in self.specs.values()),
                              key=lambda e: e[0])
        for dbv, rows in itertools.groupby(entries, key=lambda e: e[0]):
            out = []
            for _, table, pk, regs, base in rows:
                out.extend(c for c in self._changes(site, s_idx, dbv, table, pk, regs, base)
                           if c.dbv == dbv and c.site == site)
            yield dbv, out

    def proof(self, site: bytes, dbv: int, leaves: bool) -> Proof | None:
        """The stored proof of (site, dbv), with its leaves if ``leaves`` (and known), or None."""
        column = "leaves" if leaves else "x''"
        rows = self.conn.execute(f"SELECT hlc, count, root, sig, {column} FROM _p2p_versions "
                                 f"WHERE site = ? AND dbv = ?", (site, dbv)).fetchall()
        return Proof(site, dbv, *rows[0]) if rows else None

    def with_proofs(self, parts: Iterator[tuple[Batch, bool]]) -> Iterator[tuple[Batch, bool]]:
        """``parts`` with the proofs of their versions on the last part of each group.

        One proof per (site, dbv) of the group's cells and per range end; its leaves go along
        only when the group has fewer of that version's cells than it signed (some superseded,
        or cells sent along to make rows whole), so a whole version costs its manifest alone.
        """
        counts: dict[tuple[bytes, int], int] = defaultdict(int)
        seen: set[Change] = set()   # a cell sent along to make a row whole may also come with its own version
        signed: dict[tuple[bytes, int], frozenset | None] = {}   # our own versions' leaves, for the check
        for batch, more in parts:
            if self.signer is not None:
                batch = self._check_own(batch, signed)
            for c in batch.changes:
                if c not in seen:
                    seen.add(c)
                    counts[(c.site, c.dbv)] += (c.alive is not None) + len(c.columns)
            if more:
                yield batch, more
                continue
            proofs = []
            for key in sorted(set(counts) | {(r.site, r.hi) for r in batch.ranges}):
                p = self.proof(*key, leaves=False)
                if p is None:
                    continue   # not signed (a database synced before signing): the receiver refuses it
                if key in counts and counts[key] != p.count:
                    p = self.proof(*key, leaves=True)
                proofs.append(p)
            counts.clear()
            seen.clear()
            signed.clear()
            yield Batch(batch.changes, batch.ranges, tuple(proofs)), False

    def _check_own(self, batch: Batch, signed: dict) -> Batch:
        """``batch`` without the cells whose value is not what their origin signed.

        Such a cell was written here behind capture's back (triggers dropped or disabled, a rebuilt
        table), over our own write or one we forward: its receivers would refuse the whole version
        (and take us for a forger if it is ours). Only that
        cell is left out -- the row's other cells and its existence still go, with the version's
        leaves, since nothing else would ever send them again -- and reconciliation stamps the new
        value as a version of its own (store/digests.py). Logged.
        """
        hasher = self.signer.leaves
        out, dropped, first = [], 0, None
        for c in batch.changes:
            key = (c.site, c.dbv)
            if key not in signed:
                p = self.proof(c.site, c.dbv, leaves=True)
                joined = p.leaves if p is not None else b""
                signed[key] = frozenset(joined[j:j + 32] for j in range(0, len(joined), 32)) if joined else None
            leaves = signed[key]
            cells = hasher(c)
            if leaves is None or leaves.issuperset(cells):
                out.append(c)
                continue
            head = 1 if c.alive is not None else 0
            if head and cells[0] not in leaves:
                dropped += 1 + len(c.columns)   # not even its existence was signed so: nothing of it goes
                first = first or c
                continue
            keep = [i for i, leaf in enumerate(cells[head:]) if leaf in leaves]
            dropped += len(c.columns) - len(keep)
            first = first or c
            if keep or head:
                out.append(c._replace(columns=tuple(c.columns[i] for i in keep),
                                      values=tuple(c.values[i] for i in keep)))
        if not dropped:
            return batch
        log.warning("%d cells of version %d of %s (first: table %r, key %r) no longer hold what was "
                    "signed for them here: they were written while capture was bypassed (triggers dropped or "
                    "disabled, a table rebuilt); they are not sent, and reconciliation syncs their new values",
                    dropped, first.dbv, first.site.hex()[:12], first.table, first.pk)
        return Batch(tuple(out), batch.ranges, batch.proofs)

    def batches(self, peer_vv: VersionVector, max_changes: int, max_bytes: int) -> Iterator[tuple[Batch, bool]]:
        """Batches of everything ``peer_vv`` lacks; (batch, more) pairs."""
        for site, hi in self.local_vv.items():
            lo = peer_vv[site]
            if hi <= lo:
                continue
            s_idx = self.sites.idx_existing(site)
            dirty = [d for d in self.unstamped.get(s_idx, ()) if lo < d <= hi]
            for idx in self.blocked if s_idx is not None else ():
                first = self.conn.execute(f"SELECT min(dbv) FROM {idx} WHERE site = ? AND dbv > ?",
                                          (s_idx, lo)).fetchall()[0][0]
                if first is not None and first <= hi:
                    dirty.append(first)
            if dirty:
                hi = min(dirty) - 1
                if hi <= lo:
                    continue
            # A site we never stored a cell of (everything it wrote was superseded before it
            # reached us) still gets its range: an empty batch completing it.
            streams = [self._entries(spec, s_idx, lo, hi) for spec in self.specs.values()] if s_idx is not None else []
            streams.append(self._held(site, lo, hi))
            entries = heapq.merge(*streams, key=lambda e: e[0])
            # a held change comes as (dbv, None, change, None, None)
            versions = ((dbv, [pk] if table is None else self._changes(site, s_idx, dbv, table, pk, regs, base))
                        for dbv, table, pk, regs, base in entries)
            yield from self.with_proofs(site_batches(site, lo, hi, versions, max_changes, max_bytes))
