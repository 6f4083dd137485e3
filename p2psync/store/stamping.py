"""Stamping: turning the triggers' change log into clocked cells.

Everything pending in the logs (only committed transactions are visible to
our write transaction, and nobody else writes while we hold it) gets ONE new
db version, so a stamp never splits an application transaction. Each logged
row gets the HLC ``max(min(wall, now) << 16, last + 1)``: after every
timestamp we issued or saw, and at the write's own wall time when the agent
was not running. Several log rows for one key collapse in log order.

A stamp that would issue a db version or an HLC past the model's limits
(``MAX_DB_VERSION``, ``MAX_HLC``: 2^62 - 1) is refused with a StoreError
before anything is written; the log stays pending.
"""

from __future__ import annotations

import apsw

from . import digests
from .merging import existing_keys
from .ddl import MASK_BITS, OP_CHECK, OP_DELETE, OP_INSERT, OP_UPDATE, TableSpec, q
from .errors import StoreError
from ..model.hlc import MAX_DB_VERSION, MAX_HLC, pack


def _columns_of(mask: int | str, ncols: int) -> int:
    """Expand a trigger mask to a full column bitmask.

    Wide tables log 'm0,m1,...' (MASK_BITS columns each); triggers installed
    before that logged one integer whose bit 62 meant 'some later column'.
    """
    if type(mask) is str:
        return sum(int(m) << (k * MASK_BITS) for k, m in enumerate(mask.split(",")))
    if mask < 0:
        return (1 << ncols) - 1
    if ncols > MASK_BITS and mask >> MASK_BITS & 1:
        mask = (mask & ((1 << MASK_BITS) - 1)) | (((1 << ncols) - 1) >> MASK_BITS << MASK_BITS)
    return mask


def check_limits(dbv: int, last_hlc: int, now_ms: int) -> None:
    """StoreError unless db version ``dbv`` and the HLCs after ``last_hlc`` at ``now_ms`` are within the limits."""
    if dbv > MAX_DB_VERSION:
        raise StoreError(f"cannot stamp local writes as db version {dbv}: past the limit {MAX_DB_VERSION} "
                         f"(2^62 - 1); they stay pending, unsynced; restore a backup from before the jump "
                         f"(`p2psync restore`)")
    if max(last_hlc + 1, pack(now_ms)) > MAX_HLC:
        raise StoreError(f"cannot stamp local writes: this device's clock is at HLC {last_hlc}, past the limit "
                         f"{MAX_HLC} (2^62 - 1); they stay pending, unsynced; restore a backup from before the "
                         f"clock jumped (`p2psync restore`)")


def stamp_table(conn: apsw.Connection, spec: TableSpec, *, site_idx: int, dbv: int,
                last_hlc: int, now_ms: int, digest: bool = True) -> tuple[int, int]:
    """Stamp ``spec``'s pending log; returns (rows stamped, highest HLC issued).

    With ``digest`` the stamped rows' digests (store/digests.py) are refreshed too.

    StoreError, with nothing written, if ``dbv`` or the HLCs it would issue are past the model's limits.
    """
    npk, ncols = len(spec.pk), len(spec.cols)
    rows = conn.execute(f"SELECT * FROM {spec.obj('log')} ORDER BY rowid").fetchall()
    if not rows:
        return 0, last_hlc
    check_limits(dbv, last_hlc, now_ms)
    floor = last_hlc + 1
    top = last_hlc
    state: dict[tuple, list] = {}  # pk -> [exists(None/True/False), column bitmask, hlc]
    everything = (1 << ncols) - 1

    def note(pk: tuple, op: int, cols: int, h: int) -> None:
        st = state.get(pk)
        if st is None:
            st = state[pk] = [None, 0, h]
        if op == OP_INSERT:
            st[0], st[1] = True, everything
        elif op == OP_DELETE:
            st[0], st[1] = False, 0
        else:
            st[1] |= cols
        if h > st[2]:
            st[2] = h

    checks: dict[tuple, int] = {}  # rows a REPLACE may have deleted -> hlc of that write

    for r in rows:
        op, mask, wall = r[0], r[1], r[2]
        pk = r[3:3 + npk]
        if (op == OP_INSERT and pk not in state and None not in pk and wall is not None
                and floor <= (h := wall << 16) and wall <= now_ms):
            state[pk] = [True, everything, h]  # the common case, inlined
            if h > top:
                top = h
            continue
        if None in pk and op != OP_UPDATE:
            continue  # SQLite lets non-integer keys be NULL; such rows cannot be identified
        if wall is None or wall > now_ms:
            wall = now_ms
        h = pack(wall)
        if h < floor:
            h = floor
        if h > top:
            top = h
        if op == OP_CHECK:
            checks[pk] = h
            continue
        if op == OP_UPDATE:
            old = r[3 + npk:]
            if old != pk:  # the key changed: the old row is gone, a new one exists
                if None not in old:
                    note(old, OP_DELETE, 0, h)
                if None not in pk:  # (a row moved to a NULL key leaves sync: gone for peers)
                    note(pk, OP_INSERT, 0, h)
                continue
            if None in pk:
                continue
            cols = _columns_of(mask, ncols)
            if not cols:
                continue
            note(pk, op, cols, h)
        else:
            note(pk, op, 0, h)
    if checks:
        there = f"SELECT 1 FROM {q(spec.name)} WHERE {spec.pk_where}"
        for pk, h in checks.items():
            if not conn.execute(there, pk).fetchall():  # deleted by a REPLACE (or by a logged delete)
                note(pk, OP_DELETE, 0, h)
    meta_params, idx_params = [], []
    none3 = (None, None, None)
    for pk, (exists, cols, h) in state.items():
        cell = (h, site_idx, dbv)
        head = (None, None, None, None) if exists is None else ((1 if exists else 0),) + cell
        if cols == everything:
            tail = cell * ncols
        else:
            tail = tuple(x for i in range(ncols) for x in (cell if cols >> i & 1 else none3))
        meta_params.append(pk + head + tail)
        idx_params.append((site_idx, dbv) + pk)
    regs = ["e_a", "e_h", "e_s", "e_v"] + spec.meta_columns()
    pks = spec.pk_list
    insert = f"INSERT INTO {spec.obj('meta')}({pks}, {', '.join(regs)}) VALUES ({', '.join('?' * (npk + len(regs)))})"
    known = existing_keys(conn, spec, list(state))
    if known:
        conn.executemany(
            insert + f" ON CONFLICT({pks}) DO UPDATE SET "
            + ", ".join(f"{c} = coalesce(excluded.{c}, {c})" for c in regs),
            [r for r, pk in zip(meta_params, state) if pk in known])
        meta_params = [r for r, pk in zip(meta_params, state) if pk not in known]
    conn.executemany(insert, meta_params)  # keys with no metadata yet: a plain insert is cheaper
    conn.executemany(f"INSERT OR IGNORE INTO {spec.obj('idx')} VALUES ({', '.join('?' * (2 + npk))})", idx_params)
    if conn.execute(f"SELECT 1 FROM {spec.obj('orphan')} LIMIT 1").fetchall():
        conn.executemany(f"DELETE FROM {spec.obj('orphan')} WHERE {spec.pk_where}", list(state))
    if digest:
        full, gone, partial = [], [], {}
        for pk, (exists, cols, _) in state.items():
            if exists is None:
                partial.setdefault(cols, []).append(pk)
            else:
                (full if exists else gone).append(pk)
        digests.refresh(conn, spec, full, gone, partial)
    conn.execute(f"DELETE FROM {spec.obj('log')}")
    return len(state), top
