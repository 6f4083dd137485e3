"""SQL for one tracked table: its change log, clock metadata and triggers.

For an application table ``t`` with primary key columns P and other columns
C[0..n):

- ``_p2p_log_t(op, mask, wall, P...)``: what the triggers append, one row per
  written row: op 1 insert, 2 update (mask = changed columns, as text
  'm0,m1,...' for tables of more than 62 columns), 3 delete, and
  the write's wall time in ms. Appending one narrow row is all a write pays.
  On tables with UNIQUE indexes besides the key, op 4 ("check") names rows
  that a REPLACE may be about to delete: SQLite fires no delete trigger for
  them (unless recursive_triggers is on), so stamping looks whether they are
  still there.
- ``_p2p_meta_t(P..., e_a, e_h, e_s, e_v, h0, s0, v0, ...)``: one row per
  known row: for the existence register (e_) and each column i, the HLC, the
  origin site (an index into _p2p_sites) and the origin db version of the
  current winning write; e_a is 1 while the row exists.
- ``_p2p_idx_t(site, dbv, P...)``: which rows hold cells of (site, dbv), so
  ``changes_since`` reads what a peer lacks without scanning. A trigger on
  the meta table drops entries no cell refers to any more.
- ``_p2p_orphan_t(P..., col, value)``: values of cells whose row does not
  exist here (not yet created, or deleted before a later concurrent update).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

WALL_MS = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
MASK_BITS = 62  # columns per integer of an update's mask (older triggers: bit 62 = "some column >= 62")
OP_INSERT, OP_UPDATE, OP_DELETE, OP_CHECK = 1, 2, 3, 4


def q(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class TableSpec:
    """A tracked table: its name, primary key columns and other columns."""

    name: str
    pk: tuple[str, ...]
    cols: tuple[str, ...]
    # UNIQUE indexes other than the key, each as ((column, collation), ...); known
    # when the table is inspected for ``track`` (the triggers need them), not stored.
    unique: tuple[tuple[tuple[str, str], ...], ...] = ()

    def obj(self, kind: str) -> str:
        """The quoted name of one of our objects for this table."""
        return q(f"_p2p_{kind}_{self.name}")

    @cached_property
    def col_set(self) -> frozenset[str]:
        return frozenset(self.cols)

    @property
    def pk_list(self) -> str:
        return ", ".join(q(c) for c in self.pk)

    def pk_match(self, left: str, right: str) -> str:
        """SQL true when the primary keys of two aliases are equal."""
        return " AND ".join(f"{left}.{q(c)} IS {right}.{q(c)}" for c in self.pk)

    @property
    def pk_where(self) -> str:
        """``pk1 IS ? AND pk2 IS ?`` for binding a key."""
        return " AND ".join(f"{q(c)} IS ?" for c in self.pk)

    def meta_columns(self, start: int = 0) -> list[str]:
        """The clock columns of data columns ``start`` onwards."""
        return [f"{x}{i}" for i in range(start, len(self.cols)) for x in "hsv"]


def create_tables(t: TableSpec) -> list[str]:
    """Statements creating the log, meta, idx and orphan tables of ``t``."""
    pks = t.pk_list
    old = ", ".join(q("old_" + c) for c in t.pk)
    meta_cols = ", ".join(["e_a INTEGER", "e_h INTEGER", "e_s INTEGER", "e_v INTEGER"]
                          + [f"{c} INTEGER" for c in t.meta_columns()])
    return [
        f"CREATE TABLE IF NOT EXISTS {t.obj('log')}(op INTEGER, mask INTEGER, wall INTEGER, {pks}, {old})",
        f"CREATE TABLE IF NOT EXISTS {t.obj('meta')}({pks}, {meta_cols}, PRIMARY KEY({pks})) WITHOUT ROWID",
        f"CREATE TABLE IF NOT EXISTS {t.obj('idx')}(site INTEGER, dbv INTEGER, {pks}, "
        f"PRIMARY KEY(site, dbv, {pks})) WITHOUT ROWID",
        f"CREATE TABLE IF NOT EXISTS {t.obj('orphan')}({pks}, col TEXT, value, "
        f"PRIMARY KEY({pks}, col)) WITHOUT ROWID",
    ]


def add_columns(t: TableSpec, old_count: int) -> list[str]:
    """Statements adding clock columns for data columns ``old_count`` onwards."""
    return [f"ALTER TABLE {t.obj('meta')} ADD COLUMN {c} INTEGER" for c in t.meta_columns(old_count)]


def drop_triggers(t: TableSpec) -> list[str]:
    return [f"DROP TRIGGER IF EXISTS {t.obj(k)}" for k in ("ins", "upd", "del", "gc", "uins", "uupd")]


def create_triggers(t: TableSpec) -> list[str]:
    """The capture triggers on the application table and the idx GC trigger.

    Each write appends exactly one log row. An update records the old key
    too; stamping turns a key change into a delete plus an insert.
    """
    when = "WHEN (SELECT applying FROM _p2p_state) = 0"
    new_pk = ", ".join(f"NEW.{q(c)}" for c in t.pk)
    old_pk = ", ".join(f"OLD.{q(c)}" for c in t.pk)
    nulls = ", ".join("NULL" for _ in t.pk)
    mask = _mask(t.cols)
    log = t.obj("log")
    return [
        f"CREATE TRIGGER {t.obj('ins')} AFTER INSERT ON {q(t.name)} {when} BEGIN "
        f"INSERT INTO {log} VALUES ({OP_INSERT}, -1, {WALL_MS}, {new_pk}, {nulls}); END",
        f"CREATE TRIGGER {t.obj('upd')} AFTER UPDATE ON {q(t.name)} {when} BEGIN "
        f"INSERT INTO {log} VALUES ({OP_UPDATE}, {mask}, {WALL_MS}, {new_pk}, {old_pk}); END",
        f"CREATE TRIGGER {t.obj('del')} AFTER DELETE ON {q(t.name)} {when} BEGIN "
        f"INSERT INTO {log} VALUES ({OP_DELETE}, 0, {WALL_MS}, {old_pk}, {nulls}); END",
        _gc_trigger(t),
    ] + _replace_triggers(t, when)


def _replace_triggers(t: TableSpec, when: str) -> list[str]:
    """Log the rows a write may delete through REPLACE on a UNIQUE index (op 4, checked at stamping).

    ``INSERT OR REPLACE`` or ``UPDATE OR REPLACE`` (or a constraint declared
    ``ON CONFLICT REPLACE``) deletes the rows that clash on a UNIQUE index,
    and SQLite fires no DELETE trigger for them unless recursive_triggers is
    on: without this, the delete is never synced and peers then fail on the
    same UNIQUE index for ever. The rows logged are a superset (an OR IGNORE
    or an upsert deletes nothing); stamping keeps only those that are gone.
    """
    if not t.unique:
        return []
    log = t.obj("log")
    nulls = ", ".join("NULL" for _ in t.pk)
    clashes = " OR ".join(
        "(" + " AND ".join(f"{q(c)} = NEW.{q(c)} COLLATE {q(coll)}" for c, coll in idx) + ")" for idx in t.unique)

    def select(*who: str) -> str:
        others = " AND ".join("(" + " OR ".join(f"{q(c)} IS NOT {w}.{q(c)}" for c in t.pk) + ")" for w in who)
        return (f"INSERT INTO {log} SELECT {OP_CHECK}, 0, {WALL_MS}, {t.pk_list}, {nulls} FROM {q(t.name)} "
                f"WHERE ({clashes}) AND {others};")

    ucols = sorted({c for idx in t.unique for c, _ in idx})
    return [
        f"CREATE TRIGGER {t.obj('uins')} BEFORE INSERT ON {q(t.name)} {when} BEGIN {select('NEW')} END",
        f"CREATE TRIGGER {t.obj('uupd')} BEFORE UPDATE OF {', '.join(q(c) for c in ucols)} ON {q(t.name)} "
        f"{when} BEGIN {select('NEW', 'OLD')} END",
    ]


def _mask(cols: tuple[str, ...]) -> str:
    """SQL for the changed-columns mask of an update: an integer, or for more than
    MASK_BITS columns the text 'm0,m1,...' of one integer per MASK_BITS columns."""
    chunks = [" | ".join(f"(({_differs(c)}) << {i})" for i, c in enumerate(cols[k:k + MASK_BITS]))
              for k in range(0, len(cols), MASK_BITS)]
    if len(chunks) <= 1:
        return chunks[0] if chunks else "0"
    return f"printf('{','.join(['%d'] * len(chunks))}', {', '.join(chunks)})"


def _differs(col: str) -> str:
    """SQL true when an update changed ``col``: its value, or only its type (1 -> 1.0).

    SQL equality says 1 = 1.0, so ``IS NOT`` alone would miss an update that
    turns an integer into the equal real and the replicas would disagree on
    the type for ever. (SQL cannot tell -0.0 from 0.0 at all: flipping the
    sign of a zero is not captured.)
    """
    return f"NEW.{q(col)} IS NOT OLD.{q(col)} OR typeof(NEW.{q(col)}) <> typeof(OLD.{q(col)})"


def _gc_trigger(t: TableSpec) -> str:
    """Drop idx entries of (site, dbv) pairs an updated meta row no longer holds."""
    pairs = [("e_s", "e_v")] + [(f"s{i}", f"v{i}") for i in range(len(t.cols))]
    pk_eq = " AND ".join(f"{q(c)} = OLD.{q(c)}" for c in t.pk)
    stmts = []
    for s, v in pairs:
        still = " OR ".join(f"(NEW.{s2} IS OLD.{s} AND NEW.{v2} IS OLD.{v})" for s2, v2 in pairs)
        stmts.append(
            f"DELETE FROM {t.obj('idx')} WHERE site = OLD.{s} AND dbv = OLD.{v} AND {pk_eq} "
            f"AND OLD.{v} IS NOT NULL AND NOT ({still});"
        )
    return f"CREATE TRIGGER {t.obj('gc')} AFTER UPDATE ON {t.obj('meta')} BEGIN {' '.join(stmts)} END"
