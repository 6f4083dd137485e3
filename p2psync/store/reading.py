"""Reading what a peer lacks: changes_since(vv) in bounded batches.

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
batch like the rest, for the peer to apply or hold in turn.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterator

import apsw

from ..model import Batch, Change, VersionVector
from .batching import site_batches
from .ddl import TableSpec, q
from .merging import SiteMap


class ChangeReader:
    """Reads changes from one snapshot of the database (a read transaction)."""

    def __init__(self, conn: apsw.Connection, specs: dict[str, TableSpec], local_vv: VersionVector,
                 held: list[Change] = ()):
        self.conn, self.specs, self.local_vv = conn, specs, local_vv
        self.sites = SiteMap(conn)
        self.held: dict[bytes, list[Change]] = defaultdict(list)
        for c in held:
            self.held[c.site].append(c)
        self.unstamped = self._unstamped_versions()

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
        for row in self.conn.execute(sql, (s_idx, lo, hi)):
            pk = tuple(row[1:1 + npk])
            regs = row[1 + npk:1 + npk + (nregs if ncols else 5)]
            base = row[1 + npk + (nregs if ncols else 5):]
            yield row[0], spec.name, pk, regs, (base[1:] if base[0] is not None else None)

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

    def batches(self, peer_vv: VersionVector, max_changes: int, max_bytes: int) -> Iterator[tuple[Batch, bool]]:
        """Batches of everything ``peer_vv`` lacks; (batch, more) pairs."""
        for site, hi in self.local_vv.items():
            lo = peer_vv[site]
            if hi <= lo:
                continue
            s_idx = self.sites.idx_existing(site)
            dirty = [d for d in self.unstamped.get(s_idx, ()) if lo < d <= hi]
            if dirty:
                hi = min(dirty) - 1
                if hi <= lo:
                    continue
            held = sorted((c for c in self.held.get(site, ()) if lo < c.dbv <= hi), key=lambda c: c.dbv)
            # A site we never stored a cell of (everything it wrote was superseded before it
            # reached us) still gets its range: an empty batch completing it.
            streams = [self._entries(spec, s_idx, lo, hi) for spec in self.specs.values()] if s_idx is not None else []
            streams.append((c.dbv, None, c, None, None) for c in held)
            entries = heapq.merge(*streams, key=lambda e: e[0])
            # a held change comes as (dbv, None, change, None, None)
            versions = ((dbv, [pk] if table is None else self._changes(site, s_idx, dbv, table, pk, regs, base))
                        for dbv, table, pk, regs, base in entries)
            yield from site_batches(site, lo, hi, versions, max_changes, max_bytes)
