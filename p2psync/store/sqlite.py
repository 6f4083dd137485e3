"""The device store: an application's SQLite database plus p2psync metadata.

One writer connection (the agent's) does tracking, stamping and applying,
each in one IMMEDIATE transaction; reads for peers use their own connection
and snapshot. Applications keep writing through their own connections; the
triggers log their writes and ``stamp`` gives them clocks.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import apsw
import msgpack

from ..model import Batch, Change, Hlc, VersionVector
from ..model.change import check_batch
from .base import ApplyResult, HeldChange
from .connection import open_db
from .ddl import TableSpec
from .errors import StoreError
from .merging import SiteMap, TableMerge
from .reading import ChangeReader
from .stamping import stamp_table
from .tracking import inspect_table, install, load_specs

DEFAULT_MAX_SKEW_MS = 60_000
MAX_IDLE_READERS = 4


def _schema_sql() -> str:
    return resources.files("p2psync.store").joinpath("sql/schema.sql").read_text()


def _pack_change(c: Change) -> bytes:
    return msgpack.packb([c.table, list(c.pk), c.site, c.dbv, c.hlc, c.alive, list(c.columns), list(c.values)],
                         use_bin_type=True)


def _unpack_change(b: bytes) -> Change:
    t, pk, site, dbv, hlc, alive, cols, vals = msgpack.unpackb(b, raw=False)
    return Change(t, tuple(pk), site, dbv, hlc, alive, tuple(cols), tuple(vals))


class SqliteStore:
    """p2psync's view of one SQLite database."""

    def __init__(self, path: str | Path, site_id: bytes, *, max_clock_skew_ms: int = DEFAULT_MAX_SKEW_MS):
        self.path = Path(path)
        self.site_id = site_id
        self._readers: list[apsw.Connection] = []   # idle read connections, reused by changes_since
        self._reader_lock = threading.Lock()
        self._closed = False
        self.max_clock_skew_ms = max_clock_skew_ms
        self.conn = open_db(self.path)
        with self._write():
            self.conn.execute(_schema_sql()).fetchall()
            rows = self.conn.execute("SELECT site_id FROM _p2p_state").fetchall()
            if not rows:
                self.conn.execute("INSERT INTO _p2p_state(id, site_id) VALUES (1, ?)", (site_id,))
            elif rows[0][0] != site_id:
                raise StoreError(f"{self.path} is synced by another device (site {rows[0][0].hex()}); "
                                 f"each device needs its own copy of the database")
            self.conn.execute("UPDATE _p2p_state SET applying = 0")
        self.sites = SiteMap(self.conn)
        with self._write():
            self.local_idx = self.sites.idx(site_id)
        self.specs = load_specs(self.conn)

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _write(self):
        """One IMMEDIATE transaction on the writer connection."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            if hasattr(self, "sites"):
                self.sites.forget_uncommitted()
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        with self._reader_lock:
            self._closed = True
            readers, self._readers = self._readers, []
        for r in readers:
            r.close()
        self.conn.close()

    def data_version(self) -> int:
        """Changes when another connection commits (cheap; for change detection)."""
        return self.conn.execute("PRAGMA data_version").fetchall()[0][0]

    # -- membership log -----------------------------------------------------

    def member_events(self) -> list[bytes]:
        """Every membership event stored here (encoded, unverified)."""
        return [r[0] for r in self.conn.execute("SELECT data FROM _p2p_members ORDER BY id").fetchall()]

    def add_member_events(self, events: list[tuple[bytes, bytes]]) -> int:
        """Store (hash, encoded event) pairs not yet here, in one transaction; how many were new."""
        if not events:
            return 0
        with self._write():
            before = self.conn.total_changes()
            self.conn.executemany("INSERT OR IGNORE INTO _p2p_members(hash, data) VALUES (?, ?)", events)
            return self.conn.total_changes() - before

    def member_mark(self) -> int:
        """Changes whenever an event is added (by this or any other process)."""
        return self.conn.execute("SELECT coalesce(max(id), 0) FROM _p2p_members").fetchall()[0][0]

    # -- tracking ---------------------------------------------------------

    def track(self, table: str) -> TableSpec:
        """Capture every write to ``table`` from now on; existing rows become changes."""
        with self._write():
            spec = install(self.conn, inspect_table(self.conn, table), self.specs.get(table))
        self.specs[table] = spec
        return spec

    def tracked(self) -> list[TableSpec]:
        return list(self.specs.values())

    def schema_fingerprint(self) -> bytes:
        """A digest of the tracked tables' names and columns."""
        desc = sorted((s.name, list(s.pk), sorted(s.cols)) for s in self.specs.values())
        return hashlib.blake2s(json.dumps(desc).encode()).digest()[:16]

    # -- clocks and versions ----------------------------------------------

    def _state(self) -> tuple[int, int]:
        return self.conn.execute("SELECT dbv, hlc FROM _p2p_state").fetchall()[0]

    def version_vector(self) -> VersionVector:
        return VersionVector(dict(self.conn.execute("SELECT site, dbv FROM _p2p_vv").fetchall()))

    def hlc(self) -> int:
        return self._state()[1]

    def stamp(self, now_ms: int) -> int | None:
        """Give pending local writes one new db version; returns it, or None if nothing was pending."""
        with self._write():
            return self._stamp_locked(now_ms)

    def _stamp_locked(self, now_ms: int) -> int | None:
        dbv, last = self._state()
        new_dbv, top, total = dbv + 1, last, 0
        for spec in self.specs.values():
            n, top = stamp_table(self.conn, spec, site_idx=self.local_idx, dbv=new_dbv, last_hlc=top, now_ms=now_ms)
            total += n
        if not total:
            return None
        self.conn.execute("UPDATE _p2p_state SET dbv = ?, hlc = ?", (new_dbv, top))
        self.conn.execute("INSERT OR REPLACE INTO _p2p_vv VALUES (?, ?)", (self.site_id, new_dbv))
        return new_dbv

    def pending(self) -> int:
        """Logged local writes not yet stamped."""
        return sum(self.conn.execute(f"SELECT count(*) FROM {s.obj('log')}").fetchall()[0][0]
                   for s in self.specs.values())

    # -- reading ----------------------------------------------------------

    def changes_since(self, vv: VersionVector, max_changes: int = 1000,
                      max_bytes: int = 1 << 20) -> Iterator[tuple[Batch, bool]]:
        """Batches of what a peer with ``vv`` lacks, read from one snapshot."""
        conn = open_db(self.path, readonly=True)
        try:
            conn.execute("BEGIN")
            local = VersionVector(dict(conn.execute("SELECT site, dbv FROM _p2p_vv").fetchall()))
            specs = load_specs(conn)
            held = [_unpack_change(b) for (b,) in conn.execute("SELECT change FROM _p2p_held ORDER BY id")]
            yield from ChangeReader(conn, specs, local, held).batches(vv, max_changes, max_bytes)
            conn.execute("COMMIT")
        finally:
            conn.close()

    # -- applying ---------------------------------------------------------

    def apply(self, batch: Batch, now_ms: int, *, validated: bool = False) -> ApplyResult:
        """Merge a remote batch in one transaction; re-applying it changes nothing.

        ``validated=True`` skips the shape checks for batches that the wire
        codec has already checked against the same rules.
        """
        if not validated:
            try:
                check_batch(batch)
            except ValueError as e:
                raise StoreError(f"rejected batch: {e}") from e
        with self._write():
            self._catch_up_own(batch)
            self._stamp_locked(now_ms)
            clock = Hlc(self._state()[1], self.max_clock_skew_ms)
            held, ready = self._screen(batch.changes, now_ms)
            merged = self._merge(ready, clock, now_ms)
            self._store_held(held)
            vv = self.version_vector()
            for r in batch.ranges:
                if r.site != self.site_id and vv[r.site] >= r.lo and r.hi > vv[r.site]:
                    self.conn.execute("INSERT OR REPLACE INTO _p2p_vv VALUES (?, ?)", (r.site, r.hi))
                    vv = vv.with_entry(r.site, r.hi)
        return ApplyResult(cells_won=merged, held=len(held), vv=vv)

    def _catch_up_own(self, batch: Batch) -> None:
        """Take our own db versions that a peer knows and we do not (a restored backup).

        Without this the next stamps would reuse those numbers, and peers,
        whose vectors already cover them, would never ask for those writes.
        The batch brings the writes back; from now on we number after them.
        """
        dbv = self._state()[0]
        for r in batch.ranges:
            if r.site == self.site_id and r.lo <= dbv < r.hi:
                dbv = r.hi
                self.conn.execute("UPDATE _p2p_state SET dbv = ?", (dbv,))
                self.conn.execute("INSERT OR REPLACE INTO _p2p_vv VALUES (?, ?)", (self.site_id, dbv))

    def _hold_reasons(self, changes, now_ms: int) -> list[str | None]:
        """Why each change must be held ('unknown-table', 'unknown-column', 'skew'), or None."""
        limit = (now_ms + self.max_clock_skew_ms + 1) << 16  # first HLC too far ahead of now_ms
        known: dict[tuple, bool] = {}
        reasons: list[str | None] = []
        for c in changes:
            key = (c.table, len(c.pk), c.columns)
            ok = known.get(key)
            if ok is None:
                spec = self.specs.get(c.table)
                ok = known[key] = spec is not None and len(c.pk) == len(spec.pk) and spec.col_set.issuperset(c.columns)
            if not ok:
                reasons.append("unknown-table" if c.table not in self.specs else "unknown-column")
            else:
                reasons.append("skew" if c.hlc >= limit else None)
        return reasons

    def _screen(self, changes: tuple[Change, ...], now_ms: int) -> tuple[list, list]:
        """Split changes into (held (reason, change) pairs, changes ready to merge)."""
        held, ready = [], []
        for c, reason in zip(changes, self._hold_reasons(changes, now_ms)):
            if reason:
                held.append((reason, c))
            else:
                ready.append(c)
        return held, ready

    def _merge(self, changes: list[Change], clock: Hlc, now_ms: int, *, force: bool = False) -> int:
        if not changes:
            return 0
        self.conn.execute("UPDATE _p2p_state SET applying = 1")
        by_table: dict[str, list[Change]] = defaultdict(list)
        for c in changes:
            by_table[c.table].append(c)
        won, top = 0, 0
        for table, cs in by_table.items():
            m = TableMerge(self.conn, self.specs[table], self.sites)
            m.apply(cs)
            won, top = won + m.cells_won, max(top, m.max_hlc)
        if force:
            clock.last = max(clock.last, top)
        else:
            clock.receive(top, now_ms)
        self.conn.execute("UPDATE _p2p_state SET applying = 0, hlc = ?", (clock.last,))
        return won

    def _store_held(self, held: list[tuple[str, Change]]) -> None:
        """Keep changes aside, once each however often they arrive."""
        if held:
            self.conn.executemany(
                "INSERT INTO _p2p_held(reason, tbl, hlc, change) SELECT ?1, ?2, ?3, ?4 "
                "WHERE NOT EXISTS (SELECT 1 FROM _p2p_held WHERE change = ?4)",
                [(r, c.table, c.hlc, _pack_change(c)) for r, c in held])

    # -- held changes -----------------------------------------------------

    def held(self) -> list[HeldChange]:
        """Changes stored aside: unknown table or column, or clock too far ahead."""
        return [HeldChange(*r) for r in self.conn.execute("SELECT id, reason, tbl, hlc FROM _p2p_held ORDER BY id")]

    def release_held(self, now_ms: int, force: bool = False) -> int:
        """Apply held changes that can now be applied (all skewed ones if ``force``); returns how many."""
        with self._write():
            rows = self.conn.execute("SELECT id, change FROM _p2p_held ORDER BY id").fetchall()
            if not rows:
                return 0
            clock = Hlc(self._state()[1], self.max_clock_skew_ms)
            changes = [_unpack_change(blob) for _, blob in rows]
            ready, ids = [], []
            for (hid, _), c, reason in zip(rows, changes, self._hold_reasons(changes, now_ms)):
                if reason is None or (force and reason == "skew"):
                    ready.append(c)
                    ids.append((hid,))
            if ready:
                self._stamp_locked(now_ms)
                self._merge(ready, clock, now_ms, force=force)
                self.conn.executemany("DELETE FROM _p2p_held WHERE id = ?", ids)
            return len(ready)


def forget_sync_state(path: str | Path) -> list[str]:
    """Drop every p2psync table and trigger from the database at ``path`` (the application's
    tables and rows stay); returns the tables that were tracked, to track again.

    For databases synced by p2psync 0.1, whose devices join a new group: their
    rows become the new device's own changes when tracked again.
    """
    conn = open_db(Path(path))
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE name = '_p2p_tables'")]
            tracked = [r[0] for r in conn.execute("SELECT name FROM _p2p_tables")] if names else []
            objects = conn.execute("SELECT type, name FROM sqlite_master WHERE name LIKE '\\_p2p\\_%' ESCAPE '\\' "
                                   "AND type IN ('trigger', 'table')").fetchall()
            for kind, name in sorted(objects, key=lambda o: o[0] != "trigger"):
                conn.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return tracked
    finally:
        conn.close()
