"""The relay's store: changes kept in Postgres, one group per store object.

How this works: the relay does not merge. It keeps every change it is given,
once (a change is named within its origin write by a hash of its table,
key, clock and columns), and a version vector per group saying which origin
db versions it holds completely. ``changes_since(vv)`` streams, per origin
site, the changes a peer with ``vv`` lacks in db-version order, in batches
that end on db-version boundaries and carry the range they complete,
exactly as a device's store does; a single db version too large for one
batch goes as parts (``more=True``). It reads a chunk at a time, each from
one REPEATABLE READ snapshot that ends before any of it is handed out
(store/reading.py: staged, in memory or beyond a small budget in a
temporary file, by a reader thread that never waits for the device), on a
connection borrowed from the process's pool (store/pg_pool.py): a device
that stalls holds neither a transaction nor a connection of its own.

``apply`` stores a batch in one transaction under a per-group advisory lock
(several relay processes may share the database): it drops the changes the
vector already covers (two devices pushing the same versions), writes the
rest with one binary COPY, advances the vector by the batch's ranges, and
NOTIFYs ``p2psync_relay`` with the group id so every relay process pushes
the news to its own sessions. There is no unique key (it costs half the
ingest rate); the rare duplicate the vector cannot catch is stored and
skipped when reading.

The relay never reads what it stores: devices seal their changes before
sending (p2psync/sync/sealing.py). The store itself is content-agnostic and
passes the same contract tests as the SQLite store.

A store object owns no connection: every call (an apply, a chunk read, a
vector or membership query) borrows one from the pool for its one
transaction, so a session can read and apply at the same time and an idle
one costs Postgres nothing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import struct
from collections.abc import Iterator
from importlib import resources

import msgpack
import psycopg

from ..model import Batch, Change, VersionVector
from ..model.attest import Proof, attest
from ..model.change import SEALED_COLUMN, SEALED_TABLE, check_batch
from .base import ApplyResult, HeldChange
from .batching import site_batches
from .errors import StoreError
from .pg_pool import RelayPool, dsn_for_humans
from .reading import Staged, in_snapshots, stage

NOTIFY_CHANNEL = "p2psync_relay"
LOCK_NAMESPACE = 0x7032_7073           # pg_advisory_xact_lock(namespace, group)
MIGRATION_LOCK = (LOCK_NAMESPACE, 0)
READ_CHUNK = 5000
IDENT_LEN = 16                          # bytes of the hash naming a change within its (site, dbv)
# A sealed change is stored as ident = row ref + clock, body = SEALED_MARK + sealed bytes
# (any other change's body is a msgpack array, which never starts with this byte).
SEALED_MARK = b"\x00"
_SEALED_COLUMNS = (SEALED_COLUMN,)
_I32, _I64 = struct.Struct(">i"), struct.Struct(">q")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)   # signature, flags, header extension length
_SITE_LEN, _I64_LEN = _I32.pack(16), _I32.pack(8)
RELAY_SCHEMA = hashlib.sha256(b"p2psync relay").digest()[:16]


def _migrations() -> list[tuple[int, str, str]]:
    """(number, name, sql) of every numbered migration, in order."""
    out = []
    for f in resources.files("p2psync.store").joinpath("sql/postgres").iterdir():
        m = re.fullmatch(r"(\d+)_.*\.sql", f.name)
        if m:
            out.append((int(m.group(1)), f.name, f.read_text()))
    return sorted(out)


def migrate(conn: psycopg.Connection) -> list[str]:
    """Bring the database's schema up to date; returns the migrations applied now.

    Safe to run from several relay processes at once: they take turns on an
    advisory lock, and each migration runs in its own transaction.
    """
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", MIGRATION_LOCK)
        conn.execute("CREATE TABLE IF NOT EXISTS p2p_migrations "
                     "(version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {v for (v,) in conn.execute("SELECT version FROM p2p_migrations")}
        for number, name, sql in _migrations():
            if number in done:
                continue
            with conn.transaction():
                conn.execute(sql)
                conn.execute("INSERT INTO p2p_migrations(version, name) VALUES (%s, %s)", (number, name))
            applied.append(name)
    return applied


def connect(dsn: str) -> psycopg.Connection:
    """An autocommit connection (transactions are explicit), with a clear error if the server is not there."""
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to Postgres ({dsn_for_humans(dsn)}): {str(e).strip()}") from e


def relay_site_id(conn: psycopg.Connection) -> bytes:
    """The relay's site id (made once per database, shared by all its relay processes)."""
    return _meta(conn, "site_id", lambda: secrets.token_bytes(16))


def relay_static_private(conn: psycopg.Connection) -> bytes:
    """The relay's Noise static private key (made once per database)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return _meta(conn, "static_private", lambda: X25519PrivateKey.generate().private_bytes_raw())


def _meta(conn: psycopg.Connection, key: str, make) -> bytes:
    with conn.transaction():
        conn.execute("INSERT INTO p2p_meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", (key, make()))
        return bytes(conn.execute("SELECT value FROM p2p_meta WHERE key = %s", (key,)).fetchone()[0])


ADMITTED = "admitted"   # NOTIFY payload: a group was admitted (other payloads are group ids)


def admit_group(conn: psycopg.Connection, ref: bytes, psk: bytes, group_id: bytes, found: bytes) -> int:
    """Admit a group (idempotent; a group admitted before membership gets its found hash now); returns its id.

    ``ref`` is the group's fixed handle (``relay_preamble.group_ref``). Every relay process on the
    database is told (NOTIFY) so it adds the group to its table of refs at once.
    """
    with conn.transaction():
        conn.execute("INSERT INTO p2p_groups(ref, token, group_id, found) VALUES (%s, %s, %s, %s) "
                     "ON CONFLICT (ref) DO UPDATE SET group_id = EXCLUDED.group_id, found = EXCLUDED.found "
                     "WHERE p2p_groups.found IS NULL", (ref, psk, group_id, found))
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, ADMITTED))
        return conn.execute("SELECT id FROM p2p_groups WHERE ref = %s", (ref,)).fetchone()[0]


def member_log(conn: psycopg.Connection, group: int) -> list[bytes]:
    """Every membership event of ``group`` (encoded), in the order stored."""
    return [bytes(r[0]) for r in conn.execute("SELECT data FROM p2p_members WHERE grp = %s ORDER BY id", (group,))]


def member_mark(conn: psycopg.Connection, group: int) -> int:
    """The id of ``group``'s last stored membership event (0 if none): it moves when an event is stored."""
    return conn.execute("SELECT coalesce(max(id), 0) FROM p2p_members WHERE grp = %s", (group,)).fetchone()[0]


def find_groups(conn: psycopg.Connection) -> list[tuple[int, bytes, bytes, bytes]]:
    """(group id, handshake psk, group id bytes, found hash) of every admitted group, in one query."""
    rows = conn.execute("SELECT id, token, group_id, found FROM p2p_groups WHERE found IS NOT NULL").fetchall()
    return [(r[0], bytes(r[1]), bytes(r[2]), bytes(r[3])) for r in rows]


class PostgresStore:
    """One group's changes in a relay database."""

    def __init__(self, dsn: str, group: int, site_id: bytes, pool: RelayPool | None = None):
        self.dsn, self.group, self.site_id = dsn, group, site_id
        self._own_pool = pool is None     # a store made with only a DSN (tools, tests) has a small pool of its own
        self.pool = pool if pool is not None else RelayPool(dsn, 2)
        self._write_pack = msgpack.Packer(use_bin_type=True).pack
        self.attestor = None   # () -> (Verifier, None), set by the relay: apply keeps only signed versions

    def close(self) -> None:
        """Close the store's own pool, if it has one (a relay's stores share the relay's and hold nothing)."""
        if self._own_pool:
            self.pool.close()

    def _query(self, what: str, fn):
        """``fn(conn)`` on a borrowed connection; a Postgres error becomes a StoreError saying ``what`` failed."""
        try:
            with self.pool.connection() as conn:
                return fn(conn)
        except psycopg.Error as e:
            raise StoreError(f"could not {what}: {str(e).strip()}") from e

    # -- membership log -------------------------------------------------------

    def member_events(self) -> list[bytes]:
        """Every membership event of this group stored here (encoded)."""
        return self._query("read the membership log", lambda conn: member_log(conn, self.group))

    def add_member_events(self, events: list[tuple[bytes, bytes]]) -> int:
        """Store (hash, encoded event) pairs not yet here; how many were new (NOTIFYs when any)."""
        if not events:
            return 0

        def add(conn):
            with conn.transaction():
                new = 0
                for h, data in events:
                    cur = conn.execute("INSERT INTO p2p_members(grp, hash, data) VALUES (%s, %s, %s) "
                                       "ON CONFLICT DO NOTHING", (self.group, h, data))
                    new += cur.rowcount
                if new:
                    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, f"{self.group}"))
            return new
        return self._query("store membership events", add)

    def member_mark(self) -> int:
        return self._query("read the membership log", lambda conn: member_mark(conn, self.group))

    # -- the Store interface ------------------------------------------------

    def schema_fingerprint(self) -> bytes:
        return RELAY_SCHEMA

    def stamp(self, now_ms: int) -> None:
        """A relay writes nothing of its own."""
        return None

    def held(self) -> list[HeldChange]:
        """A relay holds nothing back: it forwards every change and lets devices judge clocks."""
        return []

    def release_held(self, now_ms: int, force: bool = False) -> int:
        return 0

    def version_vector(self) -> VersionVector:
        return self._query("read the version vector", self._vv)

    def _vv(self, conn: psycopg.Connection) -> VersionVector:
        rows = conn.execute("SELECT site, dbv FROM p2p_vv WHERE grp = %s", (self.group,)).fetchall()
        return VersionVector({bytes(s): n for s, n in rows})

    def apply(self, batch: Batch, now_ms: int, *, validated: bool = False) -> ApplyResult:
        """Keep a batch's changes and advance the vector, in one transaction; re-applying changes nothing."""
        if not validated:
            try:
                check_batch(batch)
            except ValueError as e:
                raise StoreError(f"rejected batch: {e}") from e
        att = None
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, self.group))
                if self.attestor is not None:
                    verifier, _ = self.attestor()
                    att = attest(batch, verifier, None, known=lambda s, d: self._known_root(conn, s, d))
                    batch = att.batch
                    if att.proofs:
                        with conn.cursor() as cur:
                            cur.executemany("INSERT INTO p2p_versions(grp, site, dbv, hlc, count, root, sig, leaves) "
                                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (grp, site, dbv) DO "
                                            "UPDATE SET leaves = excluded.leaves WHERE p2p_versions.leaves = '' "
                                            "AND p2p_versions.root = excluded.root",
                                            [(self.group, p.site, p.dbv, p.hlc, p.count, p.root, p.signature,
                                              p.leaves) for p in att.proofs])
                vv = self._vv(conn)
                rows = self._new_rows(batch.changes, vv)
                if rows:
                    self._copy(conn, rows)
                advanced = {}
                for r in batch.ranges:
                    if vv[r.site] >= r.lo and r.hi > vv[r.site]:
                        vv = vv.with_entry(r.site, r.hi)
                        advanced[r.site] = r.hi
                if advanced:
                    with conn.cursor() as cur:
                        cur.executemany("INSERT INTO p2p_vv(grp, site, dbv) VALUES (%s, %s, %s) "
                                        "ON CONFLICT (grp, site) DO UPDATE SET dbv = excluded.dbv",
                                        [(self.group, s, n) for s, n in advanced.items()])
                if rows or advanced:
                    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(self.group)))
        except psycopg.Error as e:
            raise StoreError(f"could not store a batch: {str(e).strip()}") from e
        if att is None:
            return ApplyResult(cells_won=len(rows), held=0, vv=vv)
        return ApplyResult(cells_won=len(rows), held=0, vv=vv, refused=att.refused, refusals=tuple(att.reasons),
                           cut=att.cut, conflicts=len(att.conflicts), bad_proofs=att.bad_proofs)

    def _known_root(self, conn, site: bytes, dbv: int) -> bytes | None:
        row = conn.execute("SELECT root FROM p2p_versions WHERE grp = %s AND site = %s AND dbv = %s",
                           (self.group, site, dbv)).fetchone()
        return bytes(row[0]) if row else None

    def _new_rows(self, changes, vv: VersionVector) -> list[tuple]:
        """(site, dbv, ident, hlc, body) of the changes the vector does not already cover.

        Two devices pushing the same versions is the common duplicate; the
        vector catches it. A change beyond the vector can still be here
        already (it came along in another site's batch, or before a gap was
        filled); such rare duplicates are stored and skipped when reading.
        """
        pack, blake2b, i64 = self._write_pack, hashlib.blake2b, _I64.pack
        have = dict(vv.items())
        rows = []
        for c in changes:
            if c.dbv <= have.get(c.site, 0):
                continue
            pk = c.pk
            if (c.table == SEALED_TABLE and c.alive is None and c.columns == _SEALED_COLUMNS and len(pk) == 1
                    and type(pk[0]) is bytes and len(pk[0]) <= 32 and type(c.values[0]) is bytes):
                # a sealed change (the usual case at a relay): its row ref and clock name it
                rows.append((c.site, c.dbv, pk[0] + i64(c.hlc), c.hlc, SEALED_MARK + c.values[0]))
                continue
            head = pack([c.table, list(pk)])
            cols = pack(list(c.columns))
            ident = blake2b(head + cols + pack(c.hlc), digest_size=IDENT_LEN).digest()
            rows.append((c.site, c.dbv, ident, c.hlc, b"\x95" + head[1:] + pack(c.alive) + cols + pack(list(c.values))))
        return rows

    def _copy(self, conn: psycopg.Connection, rows: list[tuple]) -> None:
        """COPY rows in PostgreSQL's binary format, encoded here (psycopg's per-value path is 5x slower)."""
        i32, i64 = _I32.pack, _I64.pack
        head = b"\x00\x06" + i32(4) + i32(self.group)
        chunk: list[bytes] = [_COPY_HEADER]
        with conn.cursor() as cur:
            with cur.copy("COPY p2p_changes (grp, site, dbv, ident, hlc, body) FROM STDIN (FORMAT BINARY)") as cp:
                for site, dbv, ident, hlc, body in rows:
                    chunk.append(b"".join((head, _SITE_LEN, site, _I64_LEN, i64(dbv), i32(len(ident)), ident,
                                           _I64_LEN, i64(hlc), i32(len(body)), body)))
                    if len(chunk) >= 2000:
                        cp.write(b"".join(chunk))
                        chunk = []
                chunk.append(b"\xff\xff")
                cp.write(b"".join(chunk))

    def changes_since(self, vv: VersionVector, max_changes: int = 1000,
                      max_bytes: int = 1 << 20) -> Iterator[tuple[Batch, bool]]:
        """Batches of what a peer with ``vv`` lacks; each db version whole from one snapshot, and no
        snapshot or connection held between batches (store/reading.py: staged chunks)."""
        return in_snapshots(lambda v, staged: self._read_chunk(v, staged, max_changes, max_bytes), vv)

    def _read_chunk(self, vv: VersionVector, staged: Staged, max_changes: int, max_bytes: int) -> bool:
        """Stage one chunk of what ``vv`` lacks from a snapshot, ended (its connection returned) on return;
        whether that was all."""
        for attempt in (1, 2):
            try:
                with self.pool.connection() as conn, conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    return stage(staged, self._batches(conn, self._vv(conn), vv, max_changes, max_bytes))
            except psycopg.OperationalError as e:
                if attempt == 1 and not staged.added:
                    continue   # an idle connection the server dropped meanwhile (a restart): the pool replaces it
                raise StoreError(f"could not read changes: {str(e).strip()}") from e
            except psycopg.Error as e:
                raise StoreError(f"could not read changes: {str(e).strip()}") from e
        raise AssertionError("unreachable")

    def _batches(self, conn, local: VersionVector, vv: VersionVector, max_changes: int, max_bytes: int):
        for site, hi in sorted(local.items()):
            lo = vv[site]
            if hi > lo:
                yield from self._site_batches(conn, site, lo, hi, max_changes, max_bytes)

    def _site_batches(self, conn, site: bytes, lo: int, hi: int, max_changes: int, max_bytes: int):
        with conn.cursor(name=f"p2p_read_{secrets.token_hex(4)}") as cur:
            cur.itersize = READ_CHUNK
            cur.execute("SELECT dbv, ident, hlc, body FROM p2p_changes "
                        "WHERE grp = %s AND site = %s AND dbv > %s AND dbv <= %s ORDER BY dbv",
                        (self.group, site, lo, hi))
            parts = site_batches(site, lo, hi, self._versions(cur, site), max_changes, max_bytes)
            yield from self._with_proofs(conn, site, parts)

    def _with_proofs(self, conn, site: bytes, parts):
        """``parts`` with the stored proofs of their versions (as the devices sent them) on each group's last part."""
        dbvs: set[int] = set()
        for batch, more in parts:
            dbvs.update(c.dbv for c in batch.changes)
            if more:
                yield batch, more
                continue
            dbvs.update(r.hi for r in batch.ranges)
            proofs = ()
            if dbvs:
                rows = conn.execute("SELECT dbv, hlc, count, root, sig, leaves FROM p2p_versions "
                                    "WHERE grp = %s AND site = %s AND dbv = ANY(%s)",
                                    (self.group, site, sorted(dbvs))).fetchall()
                proofs = tuple(Proof(site, d, h, n, bytes(r), bytes(s), bytes(lv)) for d, h, n, r, s, lv in rows)
            dbvs = set()
            yield Batch(batch.changes, batch.ranges, proofs), False

    @staticmethod
    def _versions(rows, site: bytes):
        """(dbv, (change,)) per stored row, a duplicate of one already read for that dbv skipped."""
        seen: set[bytes] = set()
        cur_dbv = None
        for dbv, ident, hlc, body in rows:
            if dbv != cur_dbv:
                seen, cur_dbv = set(), dbv
            if ident in seen:
                continue
            seen.add(ident)
            if body[:1] == SEALED_MARK:
                yield dbv, (Change(SEALED_TABLE, (ident[:-8],), site, dbv, hlc, None, _SEALED_COLUMNS, (body[1:],)),)
                continue
            table, pk, alive, columns, values = msgpack.unpackb(body, use_list=False)
            yield dbv, (Change(table, pk, site, dbv, hlc, alive, columns, values),)
