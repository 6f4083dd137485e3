"""Inspecting application tables and installing capture on them."""

from __future__ import annotations

import json
import re

import apsw

from . import digests
from .ddl import OP_INSERT, WALL_MS, TableSpec, add_columns, create_tables, create_triggers, drop_triggers, q
from .errors import NotTrackable

RESERVED_PREFIX = "_p2p_"
# Columns of our log, meta, idx and orphan tables, which also hold the key columns.
_OUR_COLUMNS = {"op", "mask", "wall", "site", "dbv", "col", "value", "e_a", "e_h", "e_s", "e_v"}
_META_COLUMN = re.compile(r"[hsv][0-9]+")


def _key_clashes(pk: list[str]) -> list[str]:
    """Key columns whose names (SQLite ignores case) our bookkeeping tables already use."""
    low = [c.lower() for c in pk]
    return [c for c, lc in zip(pk, low)
            if lc in _OUR_COLUMNS or _META_COLUMN.fullmatch(lc) or (lc.startswith("old_") and lc[4:] in low)]


def inspect_table(conn: apsw.Connection, name: str) -> TableSpec:
    """The TableSpec of application table ``name``; NotTrackable if it can't be synced."""
    if name.startswith(RESERVED_PREFIX) or name.startswith("sqlite_"):
        raise NotTrackable(f"table {name!r}: names starting with {RESERVED_PREFIX} or sqlite_ are reserved")
    row = conn.execute("SELECT type, sql FROM sqlite_schema WHERE name = ? AND type IN ('table','view')",
                       (name,)).fetchall()
    if not row:
        raise NotTrackable(f"table {name!r} does not exist in this database; create it first")
    typ, sql = row[0]
    if typ != "table" or (sql or "").upper().startswith("CREATE VIRTUAL"):
        raise NotTrackable(f"{name!r} is a {typ if typ != 'table' else 'virtual table'}; only ordinary tables can be tracked")
    info = conn.execute(f"PRAGMA table_xinfo({q(name)})").fetchall()
    # cid, name, type, notnull, dflt_value, pk, hidden
    generated = [r[1] for r in info if r[6] in (2, 3)]
    pk = [r[1] for r in sorted((r for r in info if r[5] > 0), key=lambda r: r[5])]
    if not pk:
        raise NotTrackable(
            f"table {name!r} has no primary key; p2psync identifies rows across devices by their "
            f"primary key: add one (e.g. an id TEXT PRIMARY KEY holding a random UUID)")
    if clash := _key_clashes(pk):
        raise NotTrackable(
            f"table {name!r}: primary key column(s) {clash} have names p2psync uses for its own "
            f"bookkeeping columns ({', '.join(sorted(_OUR_COLUMNS))}, h0/s0/v0..., old_<key column>); "
            f"rename them to track this table")
    cols = [r[1] for r in info if r[5] == 0 and r[6] not in (2, 3)]
    del generated  # generated columns are computed on every device, never synced
    return TableSpec(name, tuple(pk), tuple(cols), _unique_indexes(conn, name))


def _unique_indexes(conn: apsw.Connection, name: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """The UNIQUE indexes of ``name`` other than its key, as ((column, collation), ...).

    Indexes on expressions or on the rowid are left out: rows clashing on
    them cannot be named from a trigger, so a REPLACE through such an index
    is still not captured.
    """
    out = []
    for _seq, idx, unique, origin, *_ in conn.execute(f"PRAGMA index_list({q(name)})").fetchall():
        if not unique or origin == "pk":
            continue
        # seqno, cid, name, desc, coll, key
        keys = [r for r in conn.execute(f"PRAGMA index_xinfo({q(idx)})").fetchall() if r[5]]
        if keys and all(r[1] >= 0 and r[2] is not None for r in keys):
            out.append(tuple((r[2], r[4] or "BINARY") for r in keys))
    return tuple(sorted(out))


def column_defaults(conn: apsw.Connection, table: str, columns: tuple[str, ...]) -> list:
    """The value ``ALTER TABLE ADD COLUMN`` gave existing rows for each of ``columns`` (None if unknown)."""
    info = {r[1]: r[4] for r in conn.execute(f"PRAGMA table_xinfo({q(table)})").fetchall()}
    out = []
    for c in columns:
        expr, value = info.get(c), None
        if expr is not None:
            try:   # a constant (ADD COLUMN allows no other), from the application's own schema
                value = conn.execute(f"SELECT {expr}").fetchall()[0][0]
            except apsw.Error:
                value = None
        out.append(value)
    return out


def load_specs(conn: apsw.Connection) -> dict[str, TableSpec]:
    """The tracked tables recorded in this database."""
    return {
        name: TableSpec(name, tuple(json.loads(pk)), tuple(json.loads(cols)))
        for name, pk, cols in conn.execute("SELECT name, pk, cols FROM _p2p_tables")
    }


def install(conn: apsw.Connection, spec: TableSpec, old: TableSpec | None) -> TableSpec:
    """Create or upgrade capture for ``spec`` (inside the caller's transaction).

    Returns the spec actually recorded: columns keep their meta slots, new
    columns are appended; a changed primary key is refused.
    """
    if old is not None:
        if old.pk != spec.pk:
            raise NotTrackable(
                f"table {spec.name!r}: primary key changed from {list(old.pk)} to {list(spec.pk)}; "
                f"a tracked table's key cannot change")
        missing = [c for c in old.cols if c not in spec.cols]
        if missing:
            raise NotTrackable(f"table {spec.name!r}: tracked columns {missing} were dropped; "
                               f"dropping synced columns is not supported")
        spec = TableSpec(spec.name, spec.pk, old.cols + tuple(c for c in spec.cols if c not in old.cols),
                         spec.unique)
    had_digests = digests.exists(conn, spec)
    for stmt in drop_triggers(spec) + create_tables(spec) + [digests.table_sql(spec)]:
        conn.execute(stmt)
    if old is not None:
        for stmt in add_columns(spec, len(old.cols)):
            conn.execute(stmt)
        if not had_digests:
            digests.fill(conn, spec)     # tracked before digests existed: the table as it is counts as captured
        elif len(spec.cols) > len(old.cols):
            added = spec.cols[len(old.cols):]
            digests.extend(conn, spec, len(old.cols), column_defaults(conn, spec.name, added))
    for stmt in create_triggers(spec):
        conn.execute(stmt)
    conn.execute(
        "INSERT INTO _p2p_tables(name, pk, cols) VALUES (?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET pk = excluded.pk, cols = excluded.cols",
        (spec.name, json.dumps(list(spec.pk)), json.dumps(list(spec.cols))))
    if old is None:
        # Rows already in the table become changes, as if just inserted.
        conn.execute(f"INSERT INTO {spec.obj('log')} SELECT {OP_INSERT}, -1, {WALL_MS}, {spec.pk_list}, "
                     f"{', '.join('NULL' for _ in spec.pk)} FROM {q(spec.name)}")
    return spec
