"""Is capture of each tracked table intact? What the schema check finds and what it does.

The agent looks whenever ``PRAGMA schema_version`` moved (any CREATE, DROP or
ALTER, by any connection), at start, and when the periodic reconciliation
runs. For each tracked table it compares the table as it is now with what
we track:

- the table is gone, its primary key changed, or tracked columns are gone
  (renamed or dropped): sync of that table stops here, with one sentence in
  ``status`` and the log saying what to do (``Problem``);
- columns were added: they are tracked from now on (unless the config turns
  that off, then ``status`` says how to track them);
- our triggers are missing (a rebuilt table) or not the ones this version
  installs (a new UNIQUE index, an older p2psync): they are installed again.

A table whose capture was missing or out of date is then reconciled
(store/digests.py) so the writes made meanwhile are found and synced.
"""

from __future__ import annotations

from dataclasses import dataclass

import apsw

from .ddl import TableSpec, create_triggers, q
from .errors import NotTrackable
from .tracking import inspect_table

TRIGGERS = ("ins", "upd", "del", "gc", "uins", "uupd")


@dataclass(frozen=True)
class Problem:
    """A tracked table this device cannot sync any more, and what to do."""

    table: str
    kind: str        # 'table-gone' | 'key-changed' | 'columns-gone'
    message: str


@dataclass(frozen=True)
class Verdict:
    """What the check found for one table."""

    live: TableSpec | None            # the table as it is now (None: gone or not trackable)
    problem: Problem | None = None
    added: tuple[str, ...] = ()       # columns not tracked yet
    triggers_ok: bool = True


def _norm(sql: str | None) -> str:
    return " ".join((sql or "").split())


def triggers_intact(conn: apsw.Connection, spec: TableSpec) -> bool:
    """Whether exactly the triggers ``create_triggers(spec)`` makes are installed, with that SQL."""
    want = {}
    for stmt in create_triggers(spec):
        name = stmt.split(None, 3)[2]           # CREATE TRIGGER "name" ...
        want[name.strip('"').replace('""', '"')] = _norm(stmt)
    names = [f"_p2p_{k}_{spec.name}" for k in TRIGGERS]
    have = dict(conn.execute(
        f"SELECT name, sql FROM sqlite_schema WHERE type = 'trigger' AND name IN ({', '.join('?' * len(names))})",
        names).fetchall())
    return {n: _norm(s) for n, s in have.items()} == want


def check_table(conn: apsw.Connection, spec: TableSpec) -> Verdict:
    """Compare tracked ``spec`` with the table as it is in the database now."""
    try:
        live = inspect_table(conn, spec.name)
    except NotTrackable:
        exists = conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?",
                              (spec.name,)).fetchall()
        if not exists:
            return Verdict(None, Problem(spec.name, "table-gone",
                f"Table {spec.name!r} is tracked but no longer exists, so it is not synced here; create it again "
                f"with the same key and columns (a migration that rebuilds a table must do it in one "
                f"transaction, as migration tools do)."))
        live = None
    if live is None or live.pk != spec.pk:
        now = list(live.pk) if live is not None else "none"
        return Verdict(live, Problem(spec.name, "key-changed",
            f"The primary key of table {spec.name!r} changed from {list(spec.pk)} to {now}, so the table is not "
            f"synced here any more (rows are matched across devices by their key); change the key back, or "
            f"create a new table with the new key and track that one."))
    gone = [c for c in spec.cols if c not in live.col_set]
    if gone:
        names = ", ".join(repr(c) for c in gone)
        return Verdict(live, Problem(spec.name, "columns-gone",
            f"Column{'s' if len(gone) > 1 else ''} {names} of table {spec.name!r} {'are' if len(gone) > 1 else 'is'} "
            f"gone (renamed or dropped), so the table is not synced here any more; rename "
            f"{'them' if len(gone) > 1 else 'it'} back (ALTER TABLE {q(spec.name)} RENAME COLUMN ...): p2psync "
            f"cannot rename or drop a synced column (README, \"Schema changes\")."))
    added = tuple(c for c in live.cols if c not in spec.col_set)
    full = TableSpec(spec.name, spec.pk, spec.cols, live.unique)
    return Verdict(live, None, added, triggers_intact(conn, full))
