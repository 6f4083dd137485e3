"""Row digests: what each tracked row held when p2psync last wrote its clocks.

Triggers see only the writes made while they exist and fire. A table rebuilt
by a migration tool (copy, drop, rename: the triggers go with the dropped
table), writes inside the same transaction as such a rebuild, a client that
turns triggers off: none of these are logged, and nothing else would ever
notice them. So for every row whose clocks we write (stamping a local write,
merging a remote one) we also keep a digest of the row as it then is in the
table: ``_p2p_digest_t(pk..., d)``, ``d`` being 4 bytes per tracked column
(CRC-32 of the msgpack of the value; cells, not rows, so a difference names
the columns that changed). A reconciliation pass compares the table with the
digests: a row with no digest was inserted behind capture's back, a digest
with no row was deleted, a digest that differs was updated in the columns
whose 4 bytes differ. Those writes are then logged as if the triggers had
seen them and stamped like any local write (store/sqlite.py, ``reconcile``).

The digests never leave the device and guard against accidents, not
attackers: 32 bits per cell miss a changed value once in 4 billion.

SQLite has no hash function without an extension, so the digest is a
Python function registered on the agent's connections
(``register``); the application's connections never need it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import apsw
import msgpack

from .ddl import MASK_BITS, OP_DELETE, OP_INSERT, OP_UPDATE, TableSpec, q

FUNCTION = "p2p_cells"
CELL_BYTES = 4
_pack = msgpack.Packer(use_bin_type=True).pack


def cell_digest(value) -> bytes:
    """4 bytes standing for one value: 1 and 1.0 and '1' differ, as they do in SQLite."""
    return zlib.crc32(_pack(value)).to_bytes(CELL_BYTES, "little")


def cells(*values) -> bytes:
    """The digest of a row's tracked columns, in the spec's column order."""
    return b"".join([zlib.crc32(_pack(v)).to_bytes(CELL_BYTES, "little") for v in values])


def table_sql(t: TableSpec) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {t.obj('digest')}({t.pk_list}, d BLOB NOT NULL, "
            f"PRIMARY KEY({t.pk_list})) WITHOUT ROWID")


def exists(conn: apsw.Connection, t: TableSpec) -> bool:
    return bool(conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?",
                             (f"_p2p_digest_{t.name}",)).fetchall())


def _row_expr(t: TableSpec, alias: str) -> str:
    return f"{FUNCTION}({', '.join(f'{alias}.{q(c)}' for c in t.cols)})" if t.cols else "x''"


def fill(conn: apsw.Connection, t: TableSpec) -> None:
    """Digest every row the table holds now (the table's state taken as captured)."""
    conn.execute(f"DELETE FROM {t.obj('digest')}")
    conn.execute(f"INSERT INTO {t.obj('digest')} SELECT {t.pk_list}, {_row_expr(t, 'b')} FROM {q(t.name)} b "
                 f"WHERE {' AND '.join(f'b.{q(c)} IS NOT NULL' for c in t.pk)}")


def splice(old: bytes, new: bytes, mask: bytes) -> bytes:
    """``old`` with the cells whose bit is set in ``mask`` (little-endian bytes) taken from ``new``."""
    bits = int.from_bytes(mask, "little")
    out = bytearray(old)
    i = 0
    while bits:
        if bits & 1:
            out[i * CELL_BYTES:(i + 1) * CELL_BYTES] = new[i * CELL_BYTES:(i + 1) * CELL_BYTES]
        bits >>= 1
        i += 1
    return bytes(out)


def register(conn: apsw.Connection) -> None:
    """Make ``p2p_cells(...)`` and ``p2p_splice(old, new, mask)`` callable on ``conn``."""
    conn.create_scalar_function(FUNCTION, cells, -1, deterministic=True)
    conn.create_scalar_function("p2p_splice", splice, 3, deterministic=True)


def _keys_table(conn: apsw.Connection, npk: int, keys: list[tuple]) -> str:
    tmp = f"_p2p_keys{npk}"
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {tmp}({', '.join(f'k{i}' for i in range(npk))})")
    conn.execute(f"DELETE FROM temp.{tmp}")
    conn.executemany(f"INSERT INTO temp.{tmp} VALUES ({', '.join('?' * npk)})", keys)
    return f"temp.{tmp}"


def refresh(conn: apsw.Connection, t: TableSpec, full: list[tuple], gone: list[tuple] = (),
            partial: dict[int, list[tuple]] | None = None) -> None:
    """Record what p2psync just wrote clocks for: the whole rows of ``full``, no row for ``gone``, and
    for ``partial`` (column bitmask -> keys) only those cells of rows already digested.

    Only the cells whose clocks were written take the table's current values: a column changed
    behind capture's back in the same row keeps its old digest, so reconciliation still finds it.
    """
    dig, npk = t.obj("digest"), len(t.pk)
    if gone:
        conn.executemany(f"DELETE FROM {dig} WHERE {t.pk_where}", gone)
    if full:
        if len(full) <= 16:
            conn.executemany(f"INSERT OR REPLACE INTO {dig} SELECT {t.pk_list}, {_row_expr(t, 'b')} "
                             f"FROM {q(t.name)} b WHERE {t.pk_where}", full)
        else:
            tmp = _keys_table(conn, npk, full)
            on = " AND ".join(f"b.{q(c)} = k.k{i}" for i, c in enumerate(t.pk))
            conn.execute(f"INSERT OR REPLACE INTO {dig} SELECT {', '.join(f'b.{q(c)}' for c in t.pk)}, "
                         f"{_row_expr(t, 'b')} FROM {tmp} k JOIN {q(t.name)} b ON {on}")
        # a key of ``full`` whose row is gone by now (deleted behind capture) keeps its old digest
    for mask, keys in (partial or {}).items():
        m = mask.to_bytes((len(t.cols) + 7) // 8 or 1, "little")
        tmp = _keys_table(conn, npk, keys)
        on_k = " AND ".join(f"{dig}.{q(c)} = k.k{i}" for i, c in enumerate(t.pk))
        on_b = " AND ".join(f"b.{q(c)} = k.k{i}" for i, c in enumerate(t.pk))
        conn.execute(f"UPDATE {dig} SET d = p2p_splice({dig}.d, {_row_expr(t, 'b')}, ?) "
                     f"FROM {tmp} k JOIN {q(t.name)} b ON {on_b} WHERE {on_k}", (m,))


def extend(conn: apsw.Connection, t: TableSpec, old_count: int, defaults: list) -> None:
    """Columns ``old_count`` onwards were added: each stored digest gets the digest of the column's default,
    what ``ALTER TABLE ADD COLUMN`` gave every row already there (so values written into the new column
    before its capture was installed are found as differences)."""
    tail = b"".join(cell_digest(v) for v in defaults)
    keep, npk = old_count * CELL_BYTES, len(t.pk)
    rows = conn.execute(f"SELECT {t.pk_list}, d FROM {t.obj('digest')} WHERE length(d) < ?",
                        (len(t.cols) * CELL_BYTES,)).fetchall()
    conn.executemany(f"UPDATE {t.obj('digest')} SET d = ? WHERE {t.pk_where}",
                     [(r[npk][:keep] + tail,) + tuple(r[:npk]) for r in rows])


@dataclass
class Differences:
    """Rows of one table that differ from their digests: writes capture did not see."""

    inserted: list[tuple] = field(default_factory=list)             # keys with a row and no digest
    updated: list[tuple[tuple, int]] = field(default_factory=list)  # (key, bitmask of columns that differ)
    deleted: list[tuple] = field(default_factory=list)              # keys with a digest and no row

    def __len__(self) -> int:
        return len(self.inserted) + len(self.updated) + len(self.deleted)


def _mask(old: bytes, new: bytes, ncols: int) -> int:
    mask = 0
    for i in range(ncols):
        a = old[i * CELL_BYTES:(i + 1) * CELL_BYTES]
        if a != new[i * CELL_BYTES:(i + 1) * CELL_BYTES]:
            mask |= 1 << i
    return mask


def differences(conn: apsw.Connection, t: TableSpec, keys: list[tuple] | None = None) -> Differences:
    """What differs between ``t`` and what p2psync last recorded of it: every row, or only ``keys``.

    Inserted: a row with no digest, or one the metadata holds as deleted. Deleted: a row the
    metadata holds as existing (or that has a digest) but the table lacks -- also a row whose
    captured insert was stamped after it had been deleted behind capture. Updated: digests differ.
    """
    npk, ncols = len(t.pk), len(t.cols)
    dig, meta, tbl = t.obj("digest"), t.obj("meta"), q(t.name)
    out = Differences()
    if keys is not None:
        if not keys:
            return out
        tmp = _keys_table(conn, npk, keys)
        src_b = f"{tmp} k JOIN {tbl} b ON " + " AND ".join(f"b.{q(c)} = k.k{i}" for i, c in enumerate(t.pk))
        src_d = f"{tmp} k JOIN {dig} d ON " + " AND ".join(f"d.{q(c)} = k.k{i}" for i, c in enumerate(t.pk))
        src_m = f"{tmp} k JOIN {meta} m ON " + " AND ".join(f"m.{q(c)} = k.k{i}" for i, c in enumerate(t.pk))
    else:
        src_b, src_d, src_m = f"{tbl} b", f"{dig} d", f"{meta} m"
    # +b.x: without affinity, as our key columns are (else SQLite cannot use their index)
    on_d = " AND ".join(f"d.{q(c)} = +b.{q(c)}" for c in t.pk)
    on_m = " AND ".join(f"m.{q(c)} = +b.{q(c)}" for c in t.pk)
    pk_b = ", ".join(f"b.{q(c)}" for c in t.pk)
    not_null = " AND ".join(f"b.{q(c)} IS NOT NULL" for c in t.pk)
    sql = (f"SELECT {pk_b}, d.d, {_row_expr(t, 'b')} AS now, m.e_a FROM {src_b} LEFT JOIN {dig} d ON {on_d} "
           f"LEFT JOIN {meta} m ON {on_m} WHERE {not_null} AND (d.d IS NOT now OR m.e_a IS NOT 1)")
    for row in conn.execute(sql):
        pk, old, new, alive = tuple(row[:npk]), row[npk], row[npk + 1], row[npk + 2]
        if old is None or alive != 1:
            out.inserted.append(pk)
        else:
            mask = _mask(old, new, ncols)
            if mask:
                out.updated.append((pk, mask))
    def gone(alias: str) -> str:
        return " AND ".join(f"b.{q(c)} = {alias}.{q(c)}" for c in t.pk)
    seen = set()
    for sql in (f"SELECT {', '.join(f'd.{q(c)}' for c in t.pk)} FROM {src_d} "
                f"WHERE NOT EXISTS (SELECT 1 FROM {tbl} b WHERE {gone('d')})",
                f"SELECT {', '.join(f'm.{q(c)}' for c in t.pk)} FROM {src_m} "
                f"WHERE m.e_a = 1 AND NOT EXISTS (SELECT 1 FROM {tbl} b WHERE {gone('m')})"):
        for r in conn.execute(sql):
            if tuple(r) not in seen:
                seen.add(tuple(r))
                out.deleted.append(tuple(r))
    return out


def log(conn: apsw.Connection, t: TableSpec, diffs: Differences, wall_ms: int) -> None:
    """Append ``diffs`` to ``t``'s change log as the triggers would have, at ``wall_ms``: stamping then
    treats them like any local write."""
    npk = len(t.pk)
    nulls = (None,) * npk
    sql = f"INSERT INTO {t.obj('log')} VALUES ({', '.join('?' * (3 + 2 * npk))})"
    rows = [(OP_INSERT, -1, wall_ms) + k + nulls for k in diffs.inserted]
    rows += [(OP_DELETE, 0, wall_ms) + k + nulls for k in diffs.deleted]
    rows += [(OP_UPDATE, _log_mask(m, len(t.cols)), wall_ms) + k + k for k, m in diffs.updated]
    conn.executemany(sql, rows)


def _log_mask(mask: int, ncols: int) -> int | str:
    """A column bitmask as the update trigger logs it (store/ddl.py, _mask)."""
    if ncols <= MASK_BITS:
        return mask
    chunks = [(mask >> k) & ((1 << MASK_BITS) - 1) for k in range(0, ncols, MASK_BITS)]
    return ",".join(str(c) for c in chunks)
