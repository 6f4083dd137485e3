"""The device store: an application's SQLite database plus p2psync metadata.

One writer connection (the agent's) does tracking, stamping and applying,
each in one IMMEDIATE transaction; reads for peers use connections of their
own (kept idle between reads) and short snapshots (store/reading.py).
Applications keep writing through their own connections; the triggers log
their writes and ``stamp`` gives them clocks.

Held changes (unknown table or column, clock too far ahead) live in
``_p2p_held``, indexed by digest (held once however often they arrive), by
origin and db version (read for peers with the rest of that version), by
clock and by table (released in chunks). Triggers keep the bytes held per
table and in all; a change that would go past ``max_held_table_bytes`` or
``max_held_bytes`` is not stored and its origin's vector does not advance
over that batch, so nothing is lost: the origin's versions come again on a
later session. ``_p2p_held_paused`` records which origin and table, for
``status``, until that origin's vector advances again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import apsw

from ..model import Batch, Change, Hlc, VersionVector
from ..model.attest import Proof, Signer, Verifier, attest
from ..model.change import check_batch
from .base import ApplyResult, HeldChange
from . import digests
from .capture import Problem, check_table
from .connection import open_db
from .ddl import TableSpec
from .errors import StoreError
from .merging import SiteMap, TableMerge
from .reading import ChangeReader, Staged, in_snapshots, pack_change, stage, unpack_change
from .stamping import stamp_table
from .tracking import inspect_table, install, load_specs

log = logging.getLogger("p2psync.store")

DEFAULT_MAX_SKEW_MS = 60_000
MAX_IDLE_READERS = 4
HELD_TABLE_BYTES = 64 << 20     # held changes kept per table (bytes of their stored form)
HELD_TOTAL_BYTES = 256 << 20    # and for all tables together
RELEASE_CHUNK = 2000            # held changes released per write transaction
MAX_CHECKPOINTS = 64            # proofs of a peer's own versions in our Hello (protocol/limits.py)
FOUND_KEPT = 20                 # reconciliation findings kept for `status`
INT64_MAX = (1 << 63) - 1


def _schema_sql() -> str:
    return resources.files("p2psync.store").joinpath("sql/schema.sql").read_text()


def _held_row(reason: str, c: Change) -> tuple:
    """(reason, tbl, hlc, change, site, dbv, digest, size): a change as _p2p_held stores it."""
    blob = pack_change(c)
    return reason, c.table, c.hlc, blob, c.site, c.dbv, hashlib.blake2b(blob, digest_size=16).digest(), len(blob)


_INSERT_HELD = ("INSERT INTO _p2p_held(reason, tbl, hlc, change, site, dbv, digest, size) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(digest) DO NOTHING")


def _upgrade_held(conn: apsw.Connection) -> bool:
    """Rename a _p2p_held made before held rows had an origin, digest and size to _p2p_held_old; whether one was."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(_p2p_held)")}
    if not cols or "digest" in cols:
        return False
    conn.execute("ALTER TABLE _p2p_held RENAME TO _p2p_held_old")
    return True


def _move_old_held(conn: apsw.Connection) -> None:
    """Copy the rows of _p2p_held_old into the new _p2p_held, then drop it."""
    rows = conn.cursor().execute("SELECT reason, change FROM _p2p_held_old ORDER BY id")
    conn.executemany(_INSERT_HELD, (_held_row(reason, unpack_change(blob)) for reason, blob in rows))
    conn.execute("DROP TABLE _p2p_held_old")


@dataclass(frozen=True)
class Found:
    """Writes to one table that capture did not see, found by reconciliation and synced as new writes."""

    table: str
    why: str          # what bypassed capture, as far as we can tell
    inserted: int
    updated: int
    deleted: int
    at_ms: int
    dbv: int | None   # the db version they were stamped as

    def sentence(self) -> str:
        rows = self.inserted + self.updated + self.deleted
        return (f"{rows} row{'s' if rows != 1 else ''} of table {self.table!r} written while capture was bypassed "
                f"({self.why}) were found and synced as this device's writes ({self.inserted} inserted, "
                f"{self.updated} updated, {self.deleted} deleted)")


@dataclass(frozen=True)
class HeldPause:
    """An origin whose vector stopped advancing: its changes to ``table`` did not fit the held budget."""

    table: str
    site: bytes
    reason: str
    budget: int       # the limit that was full, in bytes

    def advice(self, origin: str) -> str:
        """One sentence for `status` saying what to do; ``origin`` names the device that wrote the changes."""
        size = f"{self.budget >> 20} MiB" if self.budget >= 1 << 20 else f"{max(1, self.budget >> 10)} KiB"
        full = f"the {size} kept for such changes is full"
        track = f"upgrade the application on this device and run `p2psync track {self.table}`"
        if self.reason == "unknown-table":
            return (f"Sync from {origin} is paused: it writes table {self.table!r}, which this device does not "
                    f"track, and {full}; {track}.")
        if self.reason == "unknown-column":
            return (f"Sync from {origin} is paused: it writes columns of table {self.table!r} that this device "
                    f"does not have, and {full}; {track}.")
        return (f"Sync from {origin} is paused: its changes to table {self.table!r} are stamped too far ahead of "
                f"this device's clock, and {full}; correct the clock on {origin}, or run `p2psync release` here.")


class SqliteStore:
    """p2psync's view of one SQLite database."""

    def __init__(self, path: str | Path, site_id: bytes, *, max_clock_skew_ms: int = DEFAULT_MAX_SKEW_MS,
                 max_held_table_bytes: int = HELD_TABLE_BYTES, max_held_bytes: int = HELD_TOTAL_BYTES):
        self.path = Path(path)
        # Set by the agent once it holds the group's keys (model/attest.py): ``signer`` signs every
        # version we stamp; ``attestor()`` gives (Verifier, leaf hasher) and makes ``apply`` take
        # only what verifies. Without them (tools, tests of the store alone) nothing is signed or checked.
        self.signer: Signer | None = None
        self.attestor = None
        self.site_id = site_id
        self._readers: list[apsw.Connection] = []   # idle read connections, reused by changes_since
        self._reader_lock = threading.Lock()
        self._closed = False
        self.max_clock_skew_ms = max_clock_skew_ms
        self.max_held_table_bytes, self.max_held_bytes = max_held_table_bytes, max_held_bytes
        self._held_checked: bytes | None = None     # schema fingerprint when unknown-* held changes were last tried
        # Called (in the writing thread) with our newest db version once a transaction that stamped
        # one has committed: the agent keeps it in the home, to notice a restored database (identity/succession.py).
        self.on_stamped = None
        self._stamped: int | None = None
        self.conn = open_db(self.path)
        with self._write():
            old_held = _upgrade_held(self.conn)
            self.conn.execute(_schema_sql()).fetchall()
            if old_held:
                _move_old_held(self.conn)
            if "incarnation" not in {r[1] for r in self.conn.execute("PRAGMA table_info(_p2p_state)")}:
                self.conn.execute("ALTER TABLE _p2p_state ADD COLUMN incarnation BLOB")   # made before incarnations
            self.conn.execute("UPDATE _p2p_state SET incarnation = randomblob(16) WHERE incarnation IS NULL")
            rows = self.conn.execute("SELECT site_id FROM _p2p_state").fetchall()
            if not rows:
                self.conn.execute("INSERT INTO _p2p_state(id, site_id, incarnation) VALUES (1, ?, randomblob(16))",
                                  (site_id,))
            elif rows[0][0] != site_id:
                raise StoreError(f"{self.path} is synced by another device (site {rows[0][0].hex()}); "
                                 f"each device needs its own copy of the database")
            self.conn.execute("UPDATE _p2p_state SET applying = 0")
        self.sites = SiteMap(self.conn)
        digests.register(self.conn)
        self.specs = load_specs(self.conn)
        # The schema check (store/capture.py), run by every stamp when PRAGMA schema_version moved:
        self.track_new_columns = True            # columns added to a tracked table are tracked at once
        self.keep_digests = True                 # off only to measure what digests cost (bench/capture_bench.py)
        self.problems: dict[str, Problem] = {}   # tracked tables this device cannot sync now, and why
        self.untracked_columns: dict[str, tuple[str, ...]] = {}   # added columns left untracked (config)
        self.found: deque[Found] = deque(maxlen=FOUND_KEPT)       # writes reconciliation found, newest last
        self.found_total = 0                     # rows found since start
        self.schema_changes = 0                  # times the check changed what is tracked (agents re-read specs)
        self._schema_seen: int | None = None
        with self._write():
            self.local_idx = self.sites.idx(site_id)
            for spec in self.specs.values():
                if not digests.exists(self.conn, spec):   # tracked by an older p2psync
                    self.conn.execute(digests.table_sql(spec))
                    digests.fill(self.conn, spec)

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
            self._stamped = None
            raise
        self.conn.execute("COMMIT")
        stamped, self._stamped = self._stamped, None
        if stamped is not None and self.on_stamped is not None:
            self.on_stamped(stamped)

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
        stale = self._check_capture()
        dbv = self._stamp_pending(now_ms)
        if stale:
            # Capture of these tables was missing or out of date: what was written meanwhile differs from
            # the digests. Logged now, stamped as one more version.
            found = self._reconcile_tables(stale, None, now_ms)
            if found:
                dbv = self._stamp_pending(now_ms)
                self._note_found(found, dbv)
        return dbv

    def _stamp_pending(self, now_ms: int) -> int | None:
        dbv, last = self._state()
        new_dbv, top, total = dbv + 1, last, 0
        for spec in self.specs.values():
            n, top = stamp_table(self.conn, spec, site_idx=self.local_idx, dbv=new_dbv, last_hlc=top, now_ms=now_ms,
                                 digest=self.keep_digests)
            total += n
        if not total:
            if self.signer is not None and dbv and self._unsigned():
                self._sign_own()   # stamped while no signer was set: signed at the next stamp, pending or not
            return None
        self.conn.execute("UPDATE _p2p_state SET dbv = ?, hlc = ?", (new_dbv, top))
        self.conn.execute("INSERT OR REPLACE INTO _p2p_vv VALUES (?, ?)", (self.site_id, new_dbv))
        self._stamped = new_dbv
        if self.signer is not None:
            self._sign_own()
        return new_dbv

    # -- capture health -----------------------------------------------------

    def _check_capture(self) -> dict[str, str]:
        """Re-read what is tracked and compare it with the tables, if the schema changed since last time.

        Adds columns, re-installs missing or stale triggers, records problems (store/capture.py).
        Returns the tables whose capture was missing or out of date, each with why: their writes since
        then must be reconciled. Runs inside the caller's write transaction.
        """
        conn = self.conn
        version = conn.execute("PRAGMA schema_version").fetchall()[0][0]
        if version == self._schema_seen:
            return {}
        before = {n: (s.pk, s.cols) for n, s in self.specs.items()}
        specs, problems, untracked, stale = {}, {}, {}, {}
        for name, spec in load_specs(conn).items():
            v = check_table(conn, spec)
            if v.problem is not None:
                problems[name] = v.problem
                continue
            if not digests.exists(conn, spec):
                conn.execute(digests.table_sql(spec))
                digests.fill(conn, spec)
            want = v.live if self.track_new_columns else TableSpec(name, spec.pk, spec.cols, v.live.unique)
            if not self.track_new_columns and v.added:
                untracked[name] = v.added
            if (self.track_new_columns and v.added) or not v.triggers_ok:
                ours = conn.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = ? "
                                    "AND name LIKE '\\_p2p\\_%' ESCAPE '\\'", (name,)).fetchall()[0][0]
                if v.added and self.track_new_columns:
                    why = f"column{'s' if len(v.added) > 1 else ''} {', '.join(map(repr, v.added))} added"
                    log.info("table %r: tracking new column%s %s", name, "s" if len(v.added) > 1 else "",
                             ", ".join(map(repr, v.added)))
                elif not ours:
                    why = "its triggers were gone: the table was rebuilt or they were dropped"
                else:
                    why = "its triggers were out of date"
                if not v.triggers_ok:
                    log.warning("table %r: capture was %s; re-installed", name,
                                "missing (the table was rebuilt, or our triggers dropped)" if not ours else "out of date")
                stale[name] = why
                spec = install(conn, want, spec)
            specs[name] = spec
        for name, p in problems.items():
            if self.problems.get(name) != p:
                log.error("%s", p.message)
        for name in self.problems:
            if name not in problems:
                log.warning("table %r is synced again", name)
        for name, cols in untracked.items():
            if self.untracked_columns.get(name) != cols:
                log.warning("table %r has columns %s that are not synced (track_new_columns is off); run "
                            "`p2psync track %s` to sync them", name, ", ".join(map(repr, cols)), name)
        self.problems, self.untracked_columns, self.specs = problems, untracked, specs
        if {n: (s.pk, s.cols) for n, s in specs.items()} != before:
            self.schema_changes += 1
        self._schema_seen = conn.execute("PRAGMA schema_version").fetchall()[0][0]
        return stale

    def _reconcile_tables(self, tables: dict[str, str], keys: dict[str, list] | None, now_ms: int) -> list[Found]:
        """Log the differences between ``tables`` and their digests (only ``keys[table]`` if given) as local
        writes at ``now_ms``; what was found (in the caller's write transaction, stamping not done yet)."""
        out = []
        for name, why in tables.items():
            spec = self.specs.get(name)
            if spec is None:
                continue
            d = digests.differences(self.conn, spec, None if keys is None else keys.get(name, []))
            if d:
                digests.log(self.conn, spec, d, now_ms)
                out.append(Found(name, why, len(d.inserted), len(d.updated), len(d.deleted), now_ms, None))
        return out

    def _note_found(self, found: list[Found], dbv: int | None) -> list[Found]:
        """Record (for `status`) and log what reconciliation found, stamped as ``dbv``; the records."""
        out = [Found(f.table, f.why, f.inserted, f.updated, f.deleted, f.at_ms, dbv) for f in found]
        for f in out:
            self.found.append(f)
            self.found_total += f.inserted + f.updated + f.deleted
            log.warning("%s", f.sentence())
        return out

    def reconcile(self, now_ms: int) -> list[Found]:
        """Compare every tracked table with its digests and sync the writes capture did not see.

        The comparison runs in a read transaction (writers are not blocked); only rows found
        different are compared again in the write transaction, after pending writes are stamped.
        """
        conn = self.conn
        candidates: dict[str, list] = {}
        conn.execute("BEGIN")
        try:
            for spec in list(self.specs.values()):
                d = digests.differences(conn, spec)
                if d:
                    candidates[spec.name] = d.inserted + [k for k, _ in d.updated] + d.deleted
        finally:
            conn.execute("COMMIT")
        with self._write():
            self._stamp_locked(now_ms)
            if not candidates:
                return []
            found = self._reconcile_tables({t: "writes made with triggers off, or not seen by them"
                                            for t in candidates}, candidates, now_ms)
            return self._note_found(found, self._stamp_pending(now_ms)) if found else []

    def capture_state(self) -> dict:
        """For `status`: problems, untracked columns, and what reconciliation found."""
        return {
            "problems": [{"table": p.table, "kind": p.kind, "message": p.message} for p in self.problems.values()],
            "untracked_columns": {t: list(c) for t, c in self.untracked_columns.items()},
            "found_total": self.found_total,
            "found": [{"table": f.table, "why": f.why, "inserted": f.inserted, "updated": f.updated,
                       "deleted": f.deleted, "at_ms": f.at_ms, "dbv": f.dbv, "sentence": f.sentence()}
                      for f in self.found],
        }

    # -- incarnations --------------------------------------------------------

    def incarnation(self) -> tuple[bytes, int]:
        """(this database's incarnation id, our newest db version): what the home records after each stamp."""
        return self.conn.execute("SELECT incarnation, dbv FROM _p2p_state").fetchall()[0]

    def continue_as(self, new_site: bytes, after: int, events: list[tuple[bytes, bytes]] = ()) -> int:
        """Continue under ``new_site``: our cells of versions after ``after`` are stamped again under it.

        For a database that is not the one this device last ran on (restored, rolled back, copied):
        the db versions after ``after`` may be held by peers with other contents, so they are never
        used again. Each of our versions after ``after`` becomes the next version of ``new_site``, in
        order and whole (cells keep their HLCs); we stop vouching for the old ones (their proofs go)
        and take the old site's versions after ``after`` from peers like any other device's. The
        membership ``events`` (the successor event) are stored in the same transaction. Returns how
        many versions were stamped again.
        """
        with self._write():
            if events:
                self.conn.executemany("INSERT OR IGNORE INTO _p2p_members(hash, data) VALUES (?, ?)", events)
            old, old_idx = self.site_id, self.local_idx
            new_idx = self.sites.idx(new_site)
            versions = sorted({v for spec in self.specs.values() for (v,) in self.conn.execute(
                f"SELECT DISTINCT dbv FROM {spec.obj('idx')} WHERE site = ? AND dbv > ?", (old_idx, after))})
            self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS _p2p_renumber(old INTEGER PRIMARY KEY, new INTEGER)")
            self.conn.execute("DELETE FROM temp._p2p_renumber")
            self.conn.executemany("INSERT INTO temp._p2p_renumber VALUES (?, ?)",
                                  [(v, i) for i, v in enumerate(versions, 1)])
            for spec in self.specs.values():
                idx = spec.obj("idx")
                self.conn.execute(f"INSERT OR IGNORE INTO {idx} SELECT ?, r.new, {', '.join('i.' + c for c in _quoted(spec.pk))} "
                                  f"FROM {idx} i JOIN temp._p2p_renumber r ON r.old = i.dbv WHERE i.site = ?",
                                  (new_idx, old_idx))
                for s_col, v_col in [("e_s", "e_v")] + [(f"s{i}", f"v{i}") for i in range(len(spec.cols))]:
                    # (the meta table's trigger drops the idx entries no cell refers to any more)
                    self.conn.execute(f"UPDATE {spec.obj('meta')} SET {s_col} = ?, {v_col} = "
                                      f"(SELECT new FROM temp._p2p_renumber WHERE old = {v_col}) "
                                      f"WHERE {s_col} = ? AND {v_col} > ?", (new_idx, old_idx, after))
            self.conn.execute("DELETE FROM _p2p_versions WHERE site = ? AND dbv > ?", (old, after))
            self.conn.execute("DELETE FROM _p2p_version_conflicts WHERE site = ? AND dbv > ?", (old, after))
            self.conn.execute("INSERT OR REPLACE INTO _p2p_vv VALUES (?, ?)", (old, after))
            self.conn.execute("INSERT OR REPLACE INTO _p2p_vv VALUES (?, ?)", (new_site, len(versions)))
            self.conn.execute("UPDATE _p2p_state SET site_id = ?, dbv = ?, incarnation = randomblob(16)",
                              (new_site, len(versions)))
            self.site_id, self.local_idx = new_site, new_idx
            self._stamped = len(versions)
        return len(versions)

    def checkpoints(self, site: bytes, top: int) -> tuple[tuple[int, int, int, bytes, bytes], ...]:
        """The proofs (dbv, hlc, count, root, signature) we hold of ``site``'s versions at ``top`` and
        1, 2, 4... below it: what a Hello tells ``site`` of its own versions, so that a rolled-back or
        cloned copy notices (one query)."""
        wanted, step = [], 1
        while top - step + 1 >= 1 and len(wanted) < MAX_CHECKPOINTS:
            wanted.append(top - step + 1)
            step *= 2
        if not wanted:
            return ()
        return tuple(self.conn.execute(
            f"SELECT dbv, hlc, count, root, sig FROM _p2p_versions WHERE site = ? AND dbv IN "
            f"({', '.join('?' * len(wanted))}) ORDER BY dbv DESC", (site, *wanted)).fetchall())

    def split_point(self, checkpoints) -> int | None:
        """Given a peer's proofs of our own versions: None if they agree with ours; else the newest
        version below the first disagreement that we share with the peer (0 if none): this database
        was rolled back or cloned, and our versions after it must not be used again.

        A disagreement counts only with our own signature on it (a version we signed and do not
        hold, or hold with another root): anyone can claim a root, only we can sign one.
        """
        if self.signer is None:
            return None
        dbv = self._state()[0]
        ours = Verifier(self.signer.group, {self.site_id: self.signer.public})
        agree, differ = [], []
        for d, hlc, count, root, sig in checkpoints:
            mine = self._known_root(self.site_id, d) if d <= dbv else None
            if mine == root:
                agree.append(d)
            elif (d > dbv or mine is not None) and ours.valid(Proof(self.site_id, d, hlc, count, root, sig, b"")):
                differ.append(d)
        if not differ:
            return None
        first = min(differ)
        return max([d for d in agree if d < first] + [0])

    def sign_versions(self) -> int:
        """Sign our versions stamped while no signer was set (by a tool, or before an upgrade); how many."""
        if self.signer is None:
            return 0
        with self._write():
            return self._sign_own()

    def _last_signed(self) -> int:
        """Our newest db version with a stored proof (0 if none)."""
        top = self.conn.execute("SELECT max(dbv) FROM _p2p_versions WHERE site = ?", (self.site_id,)).fetchall()[0][0]
        return top or 0

    def _unsigned(self) -> bool:
        return self._last_signed() < self._state()[0]

    def _sign_own(self) -> int:
        """Sign our versions after the last one signed (in the caller's write transaction); how many."""
        dbv = self._state()[0]
        last = self._last_signed()
        if last >= dbv:
            return 0
        reader = ChangeReader(self.conn, self.specs, self.version_vector())
        rows = []
        try:
            for d, changes in reader.version_changes(self.site_id, last, dbv):
                if changes or d == dbv:
                    rows.append(self._signed_row(d, changes))
        finally:
            reader.close()
        if not rows or rows[-1][1] != dbv:
            rows.append(self._signed_row(dbv, []))   # the newest version ends every range we send
        self.conn.executemany("INSERT OR IGNORE INTO _p2p_versions VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def _signed_row(self, dbv: int, changes: list[Change]) -> tuple:
        signer = self.signer
        leaves = [leaf for c in changes for leaf in signer.leaves(c)]
        hlc = max((c.hlc for c in changes), default=self._state()[1])
        p = signer.sign(dbv, hlc, leaves)
        return (p.site, p.dbv, p.hlc, p.count, p.root, p.signature, p.leaves)

    def _known_root(self, site: bytes, dbv: int) -> bytes | None:
        rows = self.conn.execute("SELECT root FROM _p2p_versions WHERE site = ? AND dbv = ?", (site, dbv)).fetchall()
        return rows[0][0] if rows else None

    def proofs(self, site: bytes) -> list[Proof]:
        """The proofs stored for ``site``'s versions, in order (for tools and tests)."""
        return [Proof(site, *r) for r in self.conn.execute(
            "SELECT dbv, hlc, count, root, sig, leaves FROM _p2p_versions WHERE site = ? ORDER BY dbv", (site,))]

    def version_conflicts(self) -> list[tuple[bytes, int]]:
        """(site, dbv) of versions signed twice with different contents (a clone or a rollback of that site)."""
        return self.conn.execute("SELECT DISTINCT site, dbv FROM _p2p_version_conflicts ORDER BY site, dbv").fetchall()

    def pending(self) -> int:
        """Logged local writes not yet stamped."""
        return sum(self.conn.execute(f"SELECT count(*) FROM {s.obj('log')}").fetchall()[0][0]
                   for s in self.specs.values())

    # -- reading ----------------------------------------------------------

    def changes_since(self, vv: VersionVector, max_changes: int = 1000,
                      max_bytes: int = 1 << 20) -> Iterator[tuple[Batch, bool]]:
        """Batches of what a peer with ``vv`` lacks; each db version whole from one snapshot, and no
        snapshot held between batches (store/reading.py: staged chunks)."""
        return in_snapshots(lambda v, staged: self._read_chunk(v, staged, max_changes, max_bytes), vv,
                            str(self.path.parent))

    def _read_chunk(self, vv: VersionVector, staged: Staged, max_changes: int, max_bytes: int) -> bool:
        """Stage one chunk of what ``vv`` lacks from a read transaction, ended on return; whether that was all."""
        conn = self._take_reader()
        ok = False
        try:
            conn.execute("BEGIN")
            try:
                local = VersionVector(dict(conn.execute("SELECT site, dbv FROM _p2p_vv").fetchall()))
                reader = ChangeReader(conn, dict(self.specs), local, self.signer, blocked=list(self.problems))
                try:
                    complete = stage(staged, reader.batches(vv, max_changes, max_bytes))
                finally:
                    reader.close()
            finally:
                conn.execute("COMMIT")
            ok = True
            return complete
        finally:
            self._give_reader(conn, ok)

    def _take_reader(self) -> apsw.Connection:
        with self._reader_lock:
            if self._readers:
                return self._readers.pop()
        return open_db(self.path, readonly=True)

    def _give_reader(self, conn: apsw.Connection, ok: bool) -> None:
        """Keep a read connection (outside any transaction) for the next read, up to MAX_IDLE_READERS."""
        with self._reader_lock:
            if ok and not self._closed and len(self._readers) < MAX_IDLE_READERS:
                self._readers.append(conn)
                return
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
        att = None
        if self.attestor is not None:
            verifier, hasher = self.attestor()
            att = attest(batch, verifier, hasher, known=self._known_root)
            batch = att.batch
        behind = self._behind(batch, att) if att is not None else None
        with self._write():
            if att is not None:
                self._store_proofs(att)
            if behind is None:
                self._catch_up_own(batch)
            self._stamp_locked(now_ms)
            clock = Hlc(self._state()[1], self.max_clock_skew_ms)
            held, ready = self._screen(batch.changes, now_ms)
            merged = self._merge(ready, clock, now_ms)
            refused = self._store_held(held)
            paused = {c.site for _, c in refused}
            vv = self.version_vector()
            for r in batch.ranges:
                if (r.site != self.site_id and r.site not in paused
                        and vv[r.site] >= r.lo and r.hi > vv[r.site]):
                    self.conn.execute("INSERT OR REPLACE INTO _p2p_vv VALUES (?, ?)", (r.site, r.hi))
                    self.conn.execute("DELETE FROM _p2p_held_paused WHERE site = ?", (r.site,))
                    vv = vv.with_entry(r.site, r.hi)
        if att is None:
            return ApplyResult(cells_won=merged, held=len(held) - len(refused), vv=vv)
        return ApplyResult(cells_won=merged, held=len(held) - len(refused), vv=vv, refused=att.refused,
                           refusals=tuple(att.reasons), cut=att.cut, conflicts=len(att.conflicts),
                           bad_proofs=att.bad_proofs, behind=behind)

    def _behind(self, batch: Batch, att) -> int | None:
        """If the peer holds versions of our own site that this database does not (ahead of it, or with
        other contents), the newest version we still share with it: this database was rolled back
        with its home (a VM snapshot) or cloned, and must continue under a new site id. Else None."""
        dbv = self._state()[0]
        own = [p.dbv for p in att.conflicts if p.site == self.site_id]
        ahead = any(r.site == self.site_id and r.hi > dbv for r in batch.ranges)
        if not own and not ahead:
            return None
        return min([dbv] + [d - 1 for d in own])

    def _store_proofs(self, att) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO _p2p_versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                              [(p.site, p.dbv, p.hlc, p.count, p.root, p.signature, p.leaves) for p in att.proofs])
        # a proof stored without leaves (seen as a range's end) gets them once they are known
        self.conn.executemany("UPDATE _p2p_versions SET leaves = ? WHERE site = ? AND dbv = ? AND root = ? "
                              "AND leaves = x''", [(p.leaves, p.site, p.dbv, p.root) for p in att.proofs if p.leaves])
        self.conn.executemany("INSERT OR IGNORE INTO _p2p_version_conflicts VALUES (?, ?, ?, ?, ?, ?)",
                              [(p.site, p.dbv, p.root, p.signature, p.hlc, p.count) for p in att.conflicts])

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

    def _split_unknown(self, changes) -> list[Change]:
        """``changes`` with each change that sets columns unknown here split in two: the known columns
        (and the row's existence), applied now, and the unknown ones alone, held until tracked.

        A device on an older schema thus shows every column it has of rows written on a newer one.
        """
        out = []
        for c in changes:
            spec = self.specs.get(c.table)
            if spec is None or len(c.pk) != len(spec.pk) or spec.col_set.issuperset(c.columns):
                out.append(c)
                continue
            known = [(col, v) for col, v in zip(c.columns, c.values) if col in spec.col_set]
            unknown = [(col, v) for col, v in zip(c.columns, c.values) if col not in spec.col_set]
            if known or c.alive is not None:
                out.append(c._replace(columns=tuple(k for k, _ in known), values=tuple(v for _, v in known)))
            out.append(c._replace(alive=None, columns=tuple(k for k, _ in unknown),
                                  values=tuple(v for _, v in unknown)))
        return out

    def _screen(self, changes: tuple[Change, ...], now_ms: int) -> tuple[list, list]:
        """Split changes into (held (reason, change) pairs, changes ready to merge)."""
        held, ready = [], []
        changes = self._split_unknown(changes)
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
            m = TableMerge(self.conn, self.specs[table], self.sites, digest=self.keep_digests)
            m.apply(cs)
            won, top = won + m.cells_won, max(top, m.max_hlc)
        if force:
            clock.last = max(clock.last, top)
        else:
            clock.receive(top, now_ms)
        self.conn.execute("UPDATE _p2p_state SET applying = 0, hlc = ?", (clock.last,))
        return won

    def _store_held(self, held: list[tuple[str, Change]]) -> list[tuple[str, Change]]:
        """Keep changes aside, once each however often they arrive, within the held budgets.

        Returns the (reason, change) pairs that did not fit: not stored, and
        their origins recorded in _p2p_held_paused (the caller does not advance
        those origins' vectors).
        """
        if not held:
            return []
        conn = self.conn
        used: dict[str, int] = {}

        def usage(tbl: str) -> int:
            if tbl not in used:
                rows = conn.execute("SELECT bytes FROM _p2p_held_usage WHERE tbl = ?", (tbl,)).fetchall()
                used[tbl] = rows[0][0] if rows else 0
            return used[tbl]

        refused, seen = [], set()
        for reason, c in held:
            row = _held_row(reason, c)
            digest, size = row[6], row[7]
            if digest in seen or conn.execute("SELECT 1 FROM _p2p_held WHERE digest = ?", (digest,)).fetchall():
                continue   # held already
            seen.add(digest)
            if usage(c.table) + size > self.max_held_table_bytes:
                budget = self.max_held_table_bytes
            elif usage("") + size > self.max_held_bytes:
                budget = self.max_held_bytes
            else:
                conn.execute(_INSERT_HELD, row)
                used[c.table] += size
                used[""] += size
                continue
            refused.append((reason, c))
            conn.execute("INSERT OR REPLACE INTO _p2p_held_paused VALUES (?, ?, ?, ?)", (c.table, c.site, reason, budget))
        return refused

    # -- held changes -----------------------------------------------------

    def held(self) -> list[HeldChange]:
        """Changes stored aside: unknown table or column, or clock too far ahead."""
        return [HeldChange(*r) for r in self.conn.execute("SELECT id, reason, tbl, hlc FROM _p2p_held ORDER BY id")]

    def held_usage(self) -> dict[str, tuple[int, int]]:
        """Per table, (bytes, changes) held; '' sums every table."""
        return {t: (b, n) for t, b, n in self.conn.execute("SELECT tbl, bytes, changes FROM _p2p_held_usage "
                                                           "WHERE changes > 0")}

    def held_pauses(self) -> list[HeldPause]:
        """Origins whose vector stopped advancing because a held budget was full."""
        return [HeldPause(*r) for r in self.conn.execute("SELECT tbl, site, reason, budget FROM _p2p_held_paused "
                                                         "ORDER BY tbl, site")]

    def release_held(self, now_ms: int, force: bool = False) -> int:
        """Apply held changes that can now be applied (all skewed ones if ``force``); returns how many.

        Works in chunks of RELEASE_CHUNK changes, one write transaction each,
        and reads only candidates: skewed changes whose clock is now in range,
        and, when the tracked schema changed since the last try, the changes
        of tables that are tracked now.
        """
        released = 0
        top = INT64_MAX if force else min(INT64_MAX, ((now_ms + self.max_clock_skew_ms + 1) << 16) - 1)
        while True:   # what is released leaves the selection
            n, _ = self._release_chunk("reason = 'skew' AND hlc <= ? ORDER BY hlc", (top,), now_ms, force)
            released += n
            if not n:
                break
        fingerprint = self.schema_fingerprint()
        if self._held_checked != fingerprint:
            for table in list(self.specs):
                after = 0
                while after is not None:
                    n, after = self._release_chunk("tbl = ? AND id > ? AND reason <> 'skew' ORDER BY id",
                                                   (table, after), now_ms, force)
                    released += n
            self._held_checked = fingerprint
        return released

    def _release_chunk(self, where: str, args: tuple, now_ms: int, force: bool) -> tuple[int, int | None]:
        """Release what can be of the first RELEASE_CHUNK held changes selected by ``where``, in one
        transaction; (how many, the last id read or None if none). Those still held get their current reason."""
        with self._write():
            rows = self.conn.execute(f"SELECT id, reason, change FROM _p2p_held WHERE {where} LIMIT ?",
                                     args + (RELEASE_CHUNK,)).fetchall()
            if not rows:
                return 0, None
            changes = [unpack_change(blob) for _, _, blob in rows]
            ready, ids, moved = [], [], []
            for (hid, was, _), c, reason in zip(rows, changes, self._hold_reasons(changes, now_ms)):
                if reason is None or (force and reason == "skew"):
                    ready.append(c)
                    ids.append((hid,))
                elif reason != was:
                    moved.append((reason, hid))
            self.conn.executemany("UPDATE _p2p_held SET reason = ? WHERE id = ?", moved)
            if ready:
                self._stamp_locked(now_ms)
                self._merge(ready, Hlc(self._state()[1], self.max_clock_skew_ms), now_ms, force=force)
                self.conn.executemany("DELETE FROM _p2p_held WHERE id = ?", ids)
            return len(ready), rows[-1][0]


def _quoted(names) -> list[str]:
    return ['"' + n.replace('"', '""') + '"' for n in names]


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
