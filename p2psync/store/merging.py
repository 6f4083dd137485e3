"""Applying remote changes to one tracked table, register by register.

For every key in the batch we load the local registers (existence and each
column: hlc, site, db version) from the meta table, let each incoming change
compete per register under the merge rule, and then write the outcome in
bulk: rows created, updated or deleted in the application table, the new
registers, index entries for the (site, dbv) pairs that won, and orphan
values for cells whose row does not exist here.
"""

from __future__ import annotations

from collections import defaultdict

import apsw

from . import digests
from ..model import Change
from ..model.merge import compare_clocks, value_wins
from .ddl import TableSpec, q
from .errors import StoreError

# A dead row keeps only the values of cells newer than its delete (the orphans);
# the value of an older cell is gone, and _local_value says so with this.
_UNKNOWN = object()


class SiteMap:
    """Site ids <-> the small integers the meta tables store."""

    def __init__(self, conn: apsw.Connection):
        self._conn = conn
        self._idx: dict[bytes, int] = {}
        self._site: dict[int, bytes] = {}
        for idx, site in conn.execute("SELECT idx, site FROM _p2p_sites"):
            self._idx[site], self._site[idx] = idx, site

    def idx(self, site: bytes) -> int:
        """The index of ``site``, registering it if new (inside a write transaction)."""
        i = self._idx.get(site)
        if i is None:
            self._conn.execute("INSERT OR IGNORE INTO _p2p_sites(site) VALUES (?)", (site,))
            i = self._conn.execute("SELECT idx FROM _p2p_sites WHERE site = ?", (site,)).fetchall()[0][0]
            self._idx[site], self._site[i] = i, site
        return i

    def idx_existing(self, site: bytes) -> int | None:
        """The index of ``site`` if it is registered, without registering it."""
        i = self._idx.get(site)
        if i is None:
            rows = self._conn.execute("SELECT idx FROM _p2p_sites WHERE site = ?", (site,)).fetchall()
            if rows:
                i = self._idx[site] = rows[0][0]
                self._site[i] = site
        return i

    def site(self, idx: int) -> bytes:
        """The site id stored as ``idx``."""
        s = self._site.get(idx)
        if s is None:
            rows = self._conn.execute("SELECT site FROM _p2p_sites WHERE idx = ?", (idx,)).fetchall()
            if not rows:
                raise StoreError(f"metadata refers to unknown site index {idx}")
            s = self._site[idx] = rows[0][0]
            self._idx[s] = idx
        return s

    def forget_uncommitted(self) -> None:
        """Drop cached entries after a rollback."""
        self.__init__(self._conn)


def _select_meta(conn: apsw.Connection, spec: TableSpec, keys: list[tuple], what: str):
    """Rows ``what`` (an expression over meta alias m) of the meta rows for ``keys`` that exist."""
    npk = len(spec.pk)
    meta = spec.obj("meta")
    if len(keys) <= 32:
        sql = f"SELECT {what} FROM {meta} m WHERE {spec.pk_where}"
        return [row for k in keys for row in conn.execute(sql, k)]
    tmp = f"_p2p_keys{npk}"
    kcols = ", ".join(f"k{i}" for i in range(npk))
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {tmp}({kcols})")
    conn.execute(f"DELETE FROM temp.{tmp}")
    conn.executemany(f"INSERT INTO temp.{tmp} VALUES ({', '.join('?' * npk)})", keys)
    on = " AND ".join(f"m.{q(c)} = k.k{i}" for i, c in enumerate(spec.pk))
    return conn.execute(f"SELECT {what} FROM temp.{tmp} k JOIN {meta} m ON {on}").fetchall()


def load_meta(conn: apsw.Connection, spec: TableSpec, keys: list[tuple]) -> dict[tuple, list]:
    """The meta registers of ``keys`` that exist here."""
    npk = len(spec.pk)
    return {tuple(r[:npk]): list(r[npk:]) for r in _select_meta(conn, spec, keys, "m.*")}


def existing_keys(conn: apsw.Connection, spec: TableSpec, keys: list[tuple]) -> set[tuple]:
    """Which of ``keys`` already have meta rows."""
    return {tuple(r) for r in _select_meta(conn, spec, keys, ", ".join(f"m.{q(c)}" for c in spec.pk))}


class TableMerge:
    """Merges a list of changes into one table within the caller's transaction."""

    def __init__(self, conn: apsw.Connection, spec: TableSpec, sites: SiteMap, *, digest: bool = True):
        self.conn, self.spec, self.sites = conn, spec, sites
        self.digest = digest    # refresh the digests of the rows written (store/digests.py)
        self.col_index = {c: i for i, c in enumerate(spec.cols)}
        self.cells_won = 0
        self.max_hlc = 0

    def _local_value(self, pk: tuple, i: int, alive: bool):
        """The current local value of column ``i`` (for value tie-breaks); _UNKNOWN if not kept."""
        col = self.spec.cols[i]
        if alive:
            sql = f"SELECT {q(col)} FROM {q(self.spec.name)} WHERE {self.spec.pk_where}"
            rows = self.conn.execute(sql, pk).fetchall()
        else:
            sql = f"SELECT value FROM {self.spec.obj('orphan')} WHERE {self.spec.pk_where} AND col = ?"
            rows = self.conn.execute(sql, pk + (col,)).fetchall()
        if rows:
            return rows[0][0]
        return None if alive else _UNKNOWN

    def apply(self, changes: list[Change]) -> None:
        """Merge ``changes`` (all for this table, columns already known)."""
        spec, sites = self.spec, self.sites
        ncols = len(spec.cols)
        col_index = self.col_index
        groups: dict[tuple, list[Change]] = defaultdict(list)
        for c in changes:
            groups[c.pk].append(c)
        local = load_meta(self.conn, spec, list(groups))
        nregs = 4 + 3 * ncols
        deletes, meta_rows, idx_rows = [], [], set()
        # rows to create, by the columns they set; a column nobody ever wrote (added by
        # ALTER TABLE after the row was created) takes its default, as on the origin
        inserts: dict[tuple[int, ...], list] = defaultdict(list)
        all_cols = tuple(range(ncols))
        updates: dict[tuple[int, ...], list] = defaultdict(list)
        orphan_set, orphan_del = [], []
        d_full, d_gone, d_partial = [], [], defaultdict(list)   # rows whose digests to refresh (digests.refresh)
        won = 0
        max_hlc = self.max_hlc
        has_orphans = bool(self.conn.execute(f"SELECT 1 FROM {spec.obj('orphan')} LIMIT 1").fetchall())
        site_idx: dict[bytes, int] = {}

        def idx_of(site: bytes) -> int:
            i = site_idx[site] = sites.idx(site)
            return i

        col_slots: dict[tuple[str, ...], tuple[int, ...]] = {}
        for pk, group in groups.items():
            regs = local.get(pk)
            fresh = regs is None
            if fresh and len(group) == 1:
                # Nothing local to compete with: every register takes the incoming write.
                ch = group[0]
                site = ch.site
                s_idx = site_idx.get(site) or idx_of(site)
                h, dbv = ch.hlc, ch.dbv
                if h > max_hlc:
                    max_hlc = h
                regs = [None] * nregs
                if ch.alive is not None:
                    regs[0], regs[1], regs[2], regs[3] = (1 if ch.alive else 0), h, s_idx, dbv
                slots = col_slots.get(ch.columns)
                if slots is None:
                    slots = col_slots[ch.columns] = tuple(col_index[c] for c in ch.columns)
                for i in slots:
                    b = 4 + 3 * i
                    regs[b], regs[b + 1], regs[b + 2] = h, s_idx, dbv
                won += len(slots) + (ch.alive is not None)
                idx_rows.add((s_idx, dbv) + pk)
                meta_rows.append(pk + tuple(regs))
                if ch.alive:
                    inserts[slots].append(pk + tuple(ch.values))
                    d_full.append(pk)
                elif ch.alive is None:
                    for i, v in zip(slots, ch.values):
                        orphan_set.append(pk + (spec.cols[i], v))
                continue
            if fresh:
                regs = [None] * nregs
            was_alive = regs[0] == 1
            vals: dict[int, object] = {}
            changed = False
            for ch in group:
                site = ch.site
                s_idx = site_idx.get(site) or idx_of(site)
                h, dbv = ch.hlc, ch.dbv
                if h > max_hlc:
                    max_hlc = h
                ch_won = False
                if ch.alive is not None:
                    a = 1 if ch.alive else 0
                    lh = regs[1]
                    if lh is None:
                        c = 1
                    else:
                        c = compare_clocks(lh, sites.site(regs[2]), h, site)
                        if c == 0 and value_wins(regs[0], a):
                            c = 1
                    if c > 0:
                        regs[0], regs[1], regs[2], regs[3] = a, h, s_idx, dbv
                        ch_won = True
                        won += 1
                for col, v in zip(ch.columns, ch.values):
                    i = col_index[col]
                    b = 4 + 3 * i
                    lh = regs[b]
                    if lh is None:
                        c = 1
                    else:
                        c = compare_clocks(lh, sites.site(regs[b + 1]), h, site)
                        if c == 0:
                            lv = vals[i] if i in vals else self._local_value(pk, i, was_alive)
                            if lv is _UNKNOWN:
                                # The same write again, whose value this dead row no longer
                                # keeps: take the value (a revival in this batch needs it),
                                # but nothing changed and nothing was won.
                                vals[i] = v
                                continue
                            c = 1 if value_wins(lv, v) else -1
                    if c > 0:
                        regs[b], regs[b + 1], regs[b + 2] = h, s_idx, dbv
                        vals[i] = v
                        ch_won = True
                        won += 1
                if ch_won:
                    changed = True
                    idx_rows.add((s_idx, dbv) + pk)
            if not changed:
                continue
            meta_rows.append(pk + tuple(regs))
            now_alive = regs[0] == 1
            if now_alive and not was_alive:
                row = list(pk)
                present = []
                for i in range(ncols):
                    if i in vals:
                        row.append(vals[i])
                    elif regs[4 + 3 * i] is not None:
                        lv = self._local_value(pk, i, False)
                        row.append(None if lv is _UNKNOWN else lv)
                    else:
                        continue
                    present.append(i)
                inserts[all_cols if len(present) == ncols else tuple(present)].append(row)
                d_full.append(pk)
                if has_orphans:
                    orphan_del.append(pk)
            elif now_alive:
                if vals:
                    cols = tuple(sorted(vals))
                    updates[cols].append([vals[i] for i in cols] + list(pk))
                    d_partial[sum(1 << i for i in cols)].append(pk)
            elif was_alive:
                tomb = regs[1]
                keep = [i for i in range(ncols) if regs[4 + 3 * i] is not None and regs[4 + 3 * i] > tomb]
                for i in keep:
                    v = vals[i] if i in vals else self._local_value(pk, i, True)
                    orphan_set.append(pk + (spec.cols[i], v))
                deletes.append(pk)
                d_gone.append(pk)
            else:
                tomb = regs[1]
                for i, v in vals.items():
                    if tomb is None or regs[4 + 3 * i] > tomb:
                        orphan_set.append(pk + (spec.cols[i], v))
        self.cells_won += won
        self.max_hlc = max_hlc
        self._touched = (d_full, d_gone, d_partial)
        self._write(inserts, updates, deletes, meta_rows, idx_rows, orphan_set, orphan_del)

    def _write(self, inserts, updates, deletes, meta_rows, idx_rows, orphan_set, orphan_del) -> None:
        spec, conn = self.spec, self.conn
        t, pks, npk = q(spec.name), spec.pk_list, len(spec.pk)
        try:
            if deletes:
                conn.executemany(f"DELETE FROM {t} WHERE {spec.pk_where}", deletes)
            for slots, rows in inserts.items():
                cols = [q(spec.cols[i]) for i in slots]
                upd = ", ".join(f"{c} = excluded.{c}" for c in cols)
                conflict = f"DO UPDATE SET {upd}" if cols else "DO NOTHING"
                conn.executemany(
                    f"INSERT INTO {t}({', '.join([pks] + cols)}) VALUES ({', '.join('?' * (npk + len(cols)))}) "
                    f"ON CONFLICT({pks}) {conflict}", rows)
            for cols, rows in updates.items():
                sets = ", ".join(f"{q(spec.cols[i])} = ?" for i in cols)
                conn.executemany(f"UPDATE {t} SET {sets} WHERE {spec.pk_where}", rows)
        except apsw.ConstraintError as e:
            raise StoreError(f"applying changes to table {spec.name!r} violates one of its constraints "
                             f"({e}); the batch was not applied") from e
        except apsw.MismatchError as e:
            raise StoreError(f"changes to table {spec.name!r} hold a key of the wrong type for its "
                             f"INTEGER PRIMARY KEY ({e}); the batch was not applied") from e
        if meta_rows:
            regs = ["e_a", "e_h", "e_s", "e_v"] + spec.meta_columns()
            conn.executemany(
                f"INSERT INTO {spec.obj('meta')} VALUES ({', '.join('?' * (npk + len(regs)))}) "
                f"ON CONFLICT({pks}) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in regs),
                meta_rows)
        if idx_rows:
            conn.executemany(f"INSERT OR IGNORE INTO {spec.obj('idx')} VALUES ({', '.join('?' * (2 + npk))})",
                             list(idx_rows))
        if self.digest:
            digests.refresh(conn, spec, *self._touched)
        if orphan_del:
            conn.executemany(f"DELETE FROM {spec.obj('orphan')} WHERE {spec.pk_where}", orphan_del)
        if orphan_set:
            conn.executemany(f"INSERT OR REPLACE INTO {spec.obj('orphan')} VALUES ({', '.join('?' * (npk + 2))})",
                             orphan_set)
