"""Helpers for store tests: an application process writing with stdlib sqlite3, syncing, dumps.

The application runs in its own process. Python's ``sqlite3`` module links
the system's SQLite while apsw bundles its own; two copies of SQLite in one
process do not see each other's POSIX locks (https://sqlite.org/howtocorrupt.html
§2.2.1), so an application and the agent sharing one process can corrupt the
database. Real applications are other processes; so is this one.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import apsw
import pytest

from p2psync.model import Batch, VersionVector
from p2psync.store import ApplyResult, SqliteStore

_APP_SERVER = r"""
import pickle, sqlite3, sys
conns = {}
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    try:
        op, db, arg = pickle.load(inp)
    except EOFError:
        break
    try:
        c = conns.get(db)
        if c is None and op != "close":
            c = conns[db] = sqlite3.connect(db, isolation_level=None, timeout=30)
            c.execute("PRAGMA synchronous=NORMAL")  # the app's choice; the agent's connection keeps FULL
        res = None
        if op == "tx":
            c.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in arg:
                    c.execute(sql, params)
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
        elif op == "script":
            c.executescript(arg)
        elif op == "query":
            res = c.execute(arg[0], arg[1]).fetchall()
        elif op == "close":
            if c is not None:
                c.close()
                del conns[db]
        reply = ("ok", res)
    except Exception as e:
        reply = ("err", f"{type(e).__name__}: {e}")
    pickle.dump(reply, out)
    out.flush()
"""


class AppError(Exception):
    """The application's SQL failed."""


class App:
    """An application process that writes to SQLite files with Python's stdlib ``sqlite3``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _APP_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def _call(self, op: str, db, arg=None):
        pickle.dump((op, str(db), arg), self.proc.stdin)
        self.proc.stdin.flush()
        status, res = pickle.load(self.proc.stdout)
        if status != "ok":
            raise AppError(res)
        return res

    def tx(self, db, stmts) -> None:
        """Run ``[(sql, params), ...]`` as one committed transaction."""
        self._call("tx", db, [(s, tuple(p)) for s, p in stmts])

    def execute(self, db, sql: str, params=()) -> None:
        self.tx(db, [(sql, params)])

    def script(self, db, sql: str) -> None:
        self._call("script", db, sql)

    def query(self, db, sql: str, params=()) -> list[tuple]:
        return self._call("query", db, (sql, tuple(params)))

    def disconnect(self, db) -> None:
        self._call("close", db)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


def ident(v) -> tuple:
    """A value's identity as a user sees it: type and exact bits (1 != 1.0, 0.0 != -0.0)."""
    if isinstance(v, float):
        return ("real", struct.pack("<d", v))
    return (type(v).__name__, v)


def ident_rows(rows) -> list[tuple]:
    return [tuple(ident(v) for v in r) for r in rows]


def table_rows(app: App, db, table: str, order: str, *, signed_zero: bool = True) -> list[tuple]:
    """The app's view of ``table``, values identified by type and bits.

    With ``signed_zero=False`` -0.0 counts as 0.0: SQL cannot tell them apart
    (-0.0 = 0.0, and quote() and printf() drop the sign), so no trigger can
    notice an update that only flips the sign of a zero.
    """
    rows = app.query(db, f'SELECT * FROM "{table}" ORDER BY {order}')
    if not signed_zero:
        rows = [tuple(0.0 if isinstance(v, float) and v == 0 else v for v in r) for r in rows]
    return ident_rows(rows)


def dump(path) -> dict[str, list]:
    """Every table of the database, p2psync's own included, rows sorted (read with apsw)."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
        out = {}
        for n in names:
            rows = ident_rows(conn.execute(f'SELECT * FROM "{n}"').fetchall())
            out[n] = sorted(rows, key=repr)
        return out
    finally:
        conn.close()


def transfer(src: SqliteStore, dst: SqliteStore, now_ms: int, max_changes: int = 1000,
             max_bytes: int = 1 << 20) -> list[ApplyResult]:
    """Send everything ``dst`` lacks from ``src``, applying each group whole as documented."""
    results = []
    parts = []
    for batch, more in src.changes_since(dst.version_vector(), max_changes, max_bytes):
        parts.append(batch)
        if not more:
            results.append(dst.apply(join(parts), now_ms))
            parts = []
    assert not parts, "the stream ended inside a group"
    return results


def join(parts: list[Batch]) -> Batch:
    """The parts of one group as one batch: all their changes and proofs, the last part's ranges."""
    return Batch(tuple(c for p in parts for c in p.changes), parts[-1].ranges,
                 tuple(pr for p in parts for pr in p.proofs))


class SigningGroup:
    """Signing keys for any site id (derived from it), so stores sign and check versions as agents do.

    ``arm(store)`` gives the store a Signer and an attestor whose verifier knows every site's key.
    """

    GROUP = b"G" * 16

    def __init__(self) -> None:
        from p2psync.model.attest import cell_key, leaf_hasher
        self.key = cell_key(self.GROUP, b"founding secret for the tests!!!")
        self.hasher = leaf_hasher(self.key)
        self.keys = _DerivedKeys()

    def arm(self, store: SqliteStore) -> SqliteStore:
        from p2psync.model.attest import Signer, Verifier
        store.signer = Signer(self.GROUP, store.site_id, _private_of(store.site_id), self.key)
        verifier = Verifier(self.GROUP, self.keys)
        store.attestor = lambda: (verifier, self.hasher)
        return store


def _private_of(site: bytes) -> bytes:
    import hashlib
    return hashlib.sha256(b"test signing key" + site).digest()


class _DerivedKeys(dict):
    def get(self, site, default=None):
        if site not in self:
            from p2psync.model.membership import public_keys
            self[site] = public_keys(_private_of(site))
        return dict.get(self, site, default)


def groups(src: SqliteStore, vv: VersionVector, max_changes: int = 1000, max_bytes: int = 1 << 20) -> list[Batch]:
    """The whole groups ``src`` would send to a peer with ``vv``."""
    out, parts = [], []
    for batch, more in src.changes_since(vv, max_changes, max_bytes):
        parts.append(batch)
        if not more:
            out.append(join(parts))
            parts = []
    return out


def sync_all(stores: list[SqliteStore], now_ms: int, rounds: int = 10) -> int:
    """All-pairs sync until the version vectors stop changing; returns the rounds used."""
    for r in range(1, rounds + 1):
        for s in stores:
            s.stamp(now_ms)
        before = [s.version_vector() for s in stores]
        for a in stores:
            for b in stores:
                if a is not b:
                    transfer(a, b, now_ms)
        if [s.version_vector() for s in stores] == before:
            return r
    raise AssertionError(f"version vectors still changing after {rounds} rounds of all-pairs sync")


def new_db(app: App, path: Path, schema: str) -> Path:
    app.script(path, schema)
    return path


def now_ms() -> int:
    """The wall clock in milliseconds."""
    return int(time.time() * 1000)


@pytest.fixture(scope="module")
def app():
    """One application process per test module (see App)."""
    a = App()
    yield a
    a.close()


ITEMS = """
CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, data BLOB, note);
"""


@pytest.fixture
def make(tmp_path, app):
    """make(name, site, schema, tables) -> (store, db path): a database with ``schema``, ``tables`` tracked."""
    opened = []

    def _make(name: str, site: bytes, schema: str = ITEMS, tables=("items",)):
        path = tmp_path / f"{name}.db"
        app.script(path, schema)
        store = SqliteStore(path, site)
        for t in tables:
            store.track(t)
        opened.append((store, path))
        return store, path

    yield _make
    for store, path in opened:
        app.disconnect(path)
        store.close()
