"""Changes and batches: what one device tells another about its rows.

A ``Change`` is a patch to one row made by one origin write: the columns it
set, all stamped with the same clock (hlc, site, dbv), and optionally the
row's existence register (``alive``: True for an insert, False for a delete).
A row whose cells carry different clocks travels as several changes.

A ``Batch`` is a list of changes applied in one transaction, plus the ranges
of origin db versions it completes: after applying it, a receiver whose
version vector has ``vv[site] >= lo`` may set ``vv[site] = hi``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Union

from .version_vector import SITE_ID_LEN

Value = Union[None, int, float, str, bytes]

MAX_NAME_LEN = 255
MAX_PK_COLUMNS = 32
MAX_COLUMNS = 2000
MAX_VALUE_BYTES = 8 * 1024 * 1024
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# A change sealed for a relay (p2psync/sync/sealing.py) is an ordinary change
# of this table with this one column; relays store such changes compactly.
SEALED_TABLE = "~"
SEALED_COLUMN = "~"


class InvalidChange(ValueError):
    """A change or batch is malformed (wrong types, missing fields, absurd sizes)."""


class Change(NamedTuple):
    """Columns of one row set by one origin write, with the clock of that write.

    A NamedTuple rather than a frozen dataclass: immutable all the same, and
    several times cheaper to create, which matters at 100k changes a batch.
    """

    table: str
    pk: tuple[Value, ...]
    site: bytes
    dbv: int
    hlc: int
    alive: bool | None
    columns: tuple[str, ...]
    values: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Range:
    """Origin db versions (lo, hi] of ``site`` that a batch completes."""

    site: bytes
    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Changes to apply in one transaction and the version ranges they complete."""

    changes: tuple[Change, ...]
    ranges: tuple[Range, ...] = ()
    proofs: tuple = ()      # model.attest.Proof of the versions the changes and ranges belong to


def check_value(v: object, what: str) -> None:
    """Raise InvalidChange unless ``v`` is a storable SQLite value."""
    if v is None or isinstance(v, bool):
        if isinstance(v, bool):
            raise InvalidChange(f"{what}: booleans are not SQLite values")
        return
    if isinstance(v, int):
        if not INT64_MIN <= v <= INT64_MAX:
            raise InvalidChange(f"{what}: integer {v} does not fit in 64 bits")
    elif isinstance(v, float):
        if math.isnan(v):
            raise InvalidChange(f"{what}: NaN is not a SQLite value")
    elif isinstance(v, (str, bytes)):
        if len(v) > MAX_VALUE_BYTES:
            raise InvalidChange(f"{what}: value of {len(v)} bytes exceeds {MAX_VALUE_BYTES}")
    else:
        raise InvalidChange(f"{what}: {type(v).__name__} is not a SQLite value")


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise InvalidChange(f"{what} must be a non-empty string of at most {MAX_NAME_LEN} chars")


def _check_u63(n: object, what: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= INT64_MAX:
        raise InvalidChange(f"{what} must be an integer in [0, 2^63), got {n!r:.40}")


def _check_site(site: object, what: str) -> None:
    if not isinstance(site, bytes) or len(site) != SITE_ID_LEN:
        raise InvalidChange(f"{what} must be {SITE_ID_LEN} bytes")


def check_change(c: object) -> None:
    """Raise InvalidChange unless ``c`` is a well-formed Change."""
    if type(c) is not Change:
        raise InvalidChange(f"expected a Change, got {type(c).__name__}")
    if type(c.table) is not str or not 0 < len(c.table) <= MAX_NAME_LEN:
        _check_name(c.table, "table name")
    pk, cols, vals = c.pk, c.columns, c.values
    if type(pk) is not tuple or not 1 <= len(pk) <= MAX_PK_COLUMNS:
        raise InvalidChange(f"{c.table}: primary key must be a tuple of 1..{MAX_PK_COLUMNS} values")
    if type(c.site) is not bytes or len(c.site) != SITE_ID_LEN:
        _check_site(c.site, f"{c.table}: site id")
    if type(c.dbv) is not int or not 0 < c.dbv <= INT64_MAX:
        raise InvalidChange(f"{c.table}: db version must be an integer in [1, 2^63), got {c.dbv!r:.40}")
    if type(c.hlc) is not int or not 0 <= c.hlc <= INT64_MAX:
        _check_u63(c.hlc, f"{c.table}: hlc")
    if c.alive is not None and type(c.alive) is not bool:
        raise InvalidChange(f"{c.table}: alive must be true, false or null")
    if type(cols) is not tuple or type(vals) is not tuple:
        raise InvalidChange(f"{c.table}: columns and values must be tuples")
    if len(cols) != len(vals) or len(cols) > MAX_COLUMNS:
        if len(cols) > MAX_COLUMNS:
            raise InvalidChange(f"{c.table}: {len(cols)} columns in one change (at most {MAX_COLUMNS})")
        raise InvalidChange(f"{c.table}: {len(cols)} columns but {len(vals)} values")
    if c.alive is None and not cols:
        raise InvalidChange(f"{c.table}: a change must set the row's existence or a column")
    for v in pk + vals:
        t = type(v)
        if t is str or t is bytes:
            if len(v) > MAX_VALUE_BYTES:
                check_value(v, c.table)
        elif t is int:
            if not INT64_MIN <= v <= INT64_MAX:
                check_value(v, c.table)
        elif t is float:
            if v != v:
                check_value(v, c.table)
        elif v is not None:
            check_value(v, c.table)
    for col in cols:
        if type(col) is not str or not 0 < len(col) <= MAX_NAME_LEN:
            _check_name(col, f"{c.table}: column name")
    if len(cols) > 1 and len(set(cols)) != len(cols):
        raise InvalidChange(f"{c.table}: a column appears twice in one change")


def check_batch(b: object) -> None:
    """Raise InvalidChange unless ``b`` is a well-formed Batch."""
    if not isinstance(b, Batch):
        raise InvalidChange(f"expected a Batch, got {type(b).__name__}")
    if not isinstance(b.changes, tuple) or not isinstance(b.ranges, tuple):
        raise InvalidChange("batch changes and ranges must be tuples")
    for c in b.changes:
        check_change(c)
    for r in b.ranges:
        if not isinstance(r, Range):
            raise InvalidChange(f"expected a Range, got {type(r).__name__}")
        _check_site(r.site, "range site id")
        _check_u63(r.lo, "range start")
        _check_u63(r.hi, "range end")
        if r.hi <= r.lo:
            raise InvalidChange(f"empty or inverted range ({r.lo}, {r.hi}]")
