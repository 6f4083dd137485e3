"""The wire form of a model ``Batch``, and its validation.

How this works: a batch of N changes travels column-wise,

    [sites, tables, colsets, columns, ranges, proofs]

``sites``, ``tables`` and ``colsets`` list each distinct site id, table name
and column-name tuple once. ``columns`` is eight arrays of N entries each:
table index, primary key, site index, db version, hlc, alive (nil / true /
false), colset index, values. ``ranges`` is ``[[site index, lo, hi], ...]``;
``proofs`` is ``[[site index, dbv, hlc, count, root, signature, leaves], ...]``
(``model.attest.Proof``; leaves b"" when the version's cells are all there).

Column-wise is what makes 100k changes cheap in CPython: interning is
``dict.fromkeys`` and ``map`` over whole columns, and validation
("screening") is one tight loop per column with no per-change function
calls (on 3.11 that beats chains of C-level ``map``/``filter`` passes). The screen
restates ``model.change.check_change`` rule by rule (a property test holds
the two in agreement); only when a column fails does a Python loop look for
the first offending change, to name it in the error.

Outgoing batches are screened too; when one fails, ``model.check_batch``
words the error. Text and bytes lengths are checked separately
(``check_value_lengths``), and only for frames long enough to hold an
oversized value. Decoded changes are built with ``tuple.__new__`` over the
columns (``Change`` is a NamedTuple), skipping the generated ``__new__``.

Containers on the wire decode as tuples (``use_list=False``), which is what
the model wants for primary keys, column names and values.
"""

from __future__ import annotations

from itertools import chain, compress
from operator import attrgetter

from ..model.attest import LEAF_LEN, ROOT_LEN, SIG_LEN, Proof
from ..model.change import Batch, Change, InvalidChange, Range, check_batch, check_value
from .errors import describe
from .limits import (
    INT64_MAX, INT64_MIN, MAX_BATCH_CHANGES, MAX_BATCH_PROOFS, MAX_BATCH_RANGES, MAX_COLUMNS, MAX_NAME_LEN,
    MAX_PK_COLUMNS, MAX_VALUE_BYTES, SITE_ID_LEN, U63_MAX,
)

N_COLUMNS = 8
_VALUE_TYPES = frozenset({type(None), int, float, str, bytes})
_ALIVE_TYPES = frozenset({type(None), bool})
_SIZED_TYPES = frozenset({str, bytes})
_TUPLE = frozenset({tuple})
_CHANGE = frozenset({Change})
_RANGE = frozenset({Range})


class WireError(ValueError):
    """A batch cannot be put on, or taken off, the wire; the message says why."""


def batch_to_wire(batch: Batch) -> list:
    """The wire form of ``batch``; raises WireError if it is not a valid Batch."""
    try:
        wire = _to_wire(batch)
        screen(*wire[:5], indices_trusted=True)
        _screen_proofs(len(wire[0]), [tuple(p) for p in wire[5]])
        return wire
    except (WireError, TypeError, AttributeError) as e:
        try:
            check_batch(batch)
        except InvalidChange as invalid:
            raise WireError(str(invalid)) from None
        raise WireError(str(e)) from None


def batch_from_wire(wire: tuple) -> Batch:
    """The Batch that ``wire`` (six decoded fields) describes; raises WireError if malformed."""
    if len(wire) != 6:
        raise WireError(f"a batch has 6 fields, got {len(wire)}")
    sites, tables, colsets, cols, ranges, proofs = wire
    for name, part in (("sites", sites), ("tables", tables), ("colsets", colsets),
                       ("changes", cols), ("ranges", ranges), ("proofs", proofs)):
        if type(part) is not tuple:
            raise WireError(f"{name} must be an array, got {type(part).__name__}")
    screen(sites, tables, colsets, cols, ranges)
    _screen_proofs(len(sites), proofs)
    tis, pks, sis, dbvs, hlcs, alives, cis, vals = cols
    changes = _build_changes(map(tables.__getitem__, tis), pks, map(sites.__getitem__, sis),
                             dbvs, hlcs, alives, map(colsets.__getitem__, cis), vals)
    return Batch(changes, tuple(Range(sites[si], lo, hi) for si, lo, hi in ranges),
                 tuple(Proof(sites[p[0]], *p[1:]) for p in proofs))


def _screen_proofs(n_sites: int, proofs) -> None:
    if len(proofs) > MAX_BATCH_PROOFS:
        raise WireError(f"{len(proofs)} proofs (limit {MAX_BATCH_PROOFS})")
    for i, p in enumerate(proofs):
        if type(p) is not tuple or len(p) != 7:
            raise WireError(f"proof {i} must be [site index, dbv, hlc, count, root, signature, leaves]")
        _check_ints(p[:1], 0, n_sites - 1, f"proof {i}: site index")
        _check_ints(p[1:2], 1, U63_MAX, f"proof {i}: db version")
        _check_ints(p[2:4], 0, U63_MAX, f"proof {i}: hlc and count")
        root, sig, leaves = p[4:]
        if type(root) is not bytes or len(root) != ROOT_LEN or type(sig) is not bytes or len(sig) != SIG_LEN:
            raise WireError(f"proof {i}: root must be {ROOT_LEN} bytes and signature {SIG_LEN}")
        if type(leaves) is not bytes or (leaves and len(leaves) != p[3] * LEAF_LEN):
            raise WireError(f"proof {i}: leaves must be empty or count * {LEAF_LEN} bytes")


def _build_changes(*columns) -> tuple[Change, ...]:
    """Changes from eight columns of field values (Change is a NamedTuple: built by tuple.__new__)."""
    return tuple(map(_new_change, *columns))


def _new_change(*fields) -> Change:
    return _tuple_new(Change, fields)


_tuple_new = tuple.__new__


def _to_wire(batch: Batch) -> list:
    if type(batch) is not Batch:
        raise WireError(f"expected a Batch, got {type(batch).__name__}")
    ch, rs = batch.changes, batch.ranges
    if type(ch) is not tuple or type(rs) is not tuple:
        raise WireError("batch changes and ranges must be tuples")
    if ch and not set(map(type, ch)) <= _CHANGE or rs and not set(map(type, rs)) <= _RANGE:
        raise WireError("batch changes must be Change objects and ranges Range objects")
    tables_col, pks, sites_col, dbvs, hlcs, alives, colsets_col, vals = (
        (list(col) for col in zip(*ch)) if ch else ([] for _ in Change._fields)
    )
    sites = list(dict.fromkeys(chain(sites_col, (r.site for r in rs))))
    tables = list(dict.fromkeys(tables_col))
    colsets = list(dict.fromkeys(colsets_col))
    site_i = {s: i for i, s in enumerate(sites)}
    table_i = {t: i for i, t in enumerate(tables)}
    colset_i = {c: i for i, c in enumerate(colsets)}
    cols = [list(map(table_i.__getitem__, tables_col)), pks, list(map(site_i.__getitem__, sites_col)),
            dbvs, hlcs, alives, list(map(colset_i.__getitem__, colsets_col)), vals]
    ranges = [(site_i[r.site], r.lo, r.hi) for r in rs]
    proofs = []
    for pr in batch.proofs:
        si = site_i.get(pr.site)
        if si is None:
            si = site_i[pr.site] = len(sites)
            sites.append(pr.site)
        proofs.append((si, pr.dbv, pr.hlc, pr.count, pr.root, pr.signature, pr.leaves))
    return [sites, tables, colsets, cols, ranges, proofs]


def screen(sites, tables, colsets, cols, ranges, *, indices_trusted: bool = False) -> None:
    """Raise WireError unless the wire fields describe a valid Batch (model rules).

    ``indices_trusted`` skips checking the index columns, for wire forms we built.
    """
    for i, s in enumerate(sites):
        if type(s) is not bytes or len(s) != SITE_ID_LEN:
            raise WireError(f"site {i} must be {SITE_ID_LEN} bytes, got {describe(s)}")
    for i, t in enumerate(tables):
        _check_name(t, f"table {i}")
    for i, cs in enumerate(colsets):
        if type(cs) is not tuple or len(cs) > MAX_COLUMNS:
            raise WireError(f"colset {i} must be an array of at most {MAX_COLUMNS} column names")
        for c in cs:
            _check_name(c, f"colset {i}: column name")
        if len(set(cs)) != len(cs):
            raise WireError(f"colset {i}: a column appears twice")
    _screen_changes(len(sites), len(tables), colsets, cols, indices_trusted)
    if len(ranges) > MAX_BATCH_RANGES:
        raise WireError(f"{len(ranges)} ranges (limit {MAX_BATCH_RANGES})")
    for i, r in enumerate(ranges):
        if type(r) is not tuple or len(r) != 3:
            raise WireError(f"range {i} must be [site index, lo, hi]")
        _check_ints(r[:1], 0, len(sites) - 1, f"range {i}: site index")
        _check_ints(r[1:], 0, U63_MAX, f"range {i}: bound")
        if r[2] <= r[1]:
            raise WireError(f"range {i}: empty or inverted range ({r[1]}, {r[2]}]")


def _screen_changes(n_sites: int, n_tables: int, colsets, cols, indices_trusted: bool) -> None:
    if type(cols) not in (tuple, list) or len(cols) != N_COLUMNS:
        raise WireError(f"changes must be {N_COLUMNS} column arrays")
    if not set(map(type, cols)) <= {tuple, list}:
        raise WireError("changes must be arrays")
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise WireError("change columns have different lengths")
    if n > MAX_BATCH_CHANGES:
        raise WireError(f"{n} changes (limit {MAX_BATCH_CHANGES})")
    if not n:
        return
    tis, pks, sis, dbvs, hlcs, alives, cis, vals = cols
    if not indices_trusted:
        _check_ints(tis, 0, n_tables - 1, "change {i}: table index")
        _check_ints(sis, 0, n_sites - 1, "change {i}: site index")
        _check_ints(cis, 0, len(colsets) - 1, "change {i}: colset index")
    _check_ints(dbvs, 1, U63_MAX, "change {i}: db version")
    _check_ints(hlcs, 0, U63_MAX, "change {i}: hlc")
    if not set(map(type, alives)) <= _ALIVE_TYPES:
        i = next(i for i, a in enumerate(alives) if type(a) not in _ALIVE_TYPES)
        raise WireError(f"change {i}: alive must be true, false or nil, got {describe(alives[i])}")
    _check_rows(pks, "primary key")
    pk_lens = list(map(len, pks))
    if min(pk_lens) < 1 or max(pk_lens) > MAX_PK_COLUMNS:
        i = next(i for i, k in enumerate(pk_lens) if not 1 <= k <= MAX_PK_COLUMNS)
        raise WireError(f"change {i}: primary key must have 1..{MAX_PK_COLUMNS} values, got {pk_lens[i]}")
    _check_rows(vals, "values")
    widths = [len(cs) for cs in colsets]
    if list(map(len, vals)) != list(map(widths.__getitem__, cis)):
        i = next(i for i, (v, c) in enumerate(zip(vals, cis)) if len(v) != widths[c])
        raise WireError(f"change {i}: {widths[cis[i]]} columns but {len(vals[i])} values")
    _check_values(pks, vals)
    empty = {i for i, w in enumerate(widths) if not w}
    if empty and None in compress(alives, map(empty.__contains__, cis)):
        i = next(i for i, (a, c) in enumerate(zip(alives, cis)) if a is None and c in empty)
        raise WireError(f"change {i}: a change must set the row's existence or a column")


def _check_ints(col, lo: int, hi: int, what: str) -> None:
    """Raise unless every entry is an int in [lo, hi]; ``what`` may name the entry as {i}."""
    for v in col:
        if type(v) is not int or not lo <= v <= hi:
            break
    else:
        return
    i, v = next((i, v) for i, v in enumerate(col) if type(v) is not int or not lo <= v <= hi)
    raise WireError(f"{what.format(i=i)} must be an integer in [{lo}, {hi}], got {describe(v)}")


def _check_rows(rows, what: str) -> None:
    if not set(map(type, rows)) <= _TUPLE:
        i = next(i for i, r in enumerate(rows) if type(r) is not tuple)
        raise WireError(f"change {i}: {what} must be an array, got {describe(rows[i])}")


def check_value_lengths(batch: Batch) -> None:
    """Raise unless every text and bytes value is at most MAX_VALUE_BYTES long.

    The screen leaves this out: only a frame longer than MAX_VALUE_BYTES can
    hold such a value, so the codec calls this for those frames alone.
    """
    pks = map(attrgetter("pk"), batch.changes)
    vals = map(attrgetter("values"), batch.changes)
    flat = list(chain.from_iterable(chain(pks, vals)))
    sized = compress(flat, map(_SIZED_TYPES.__contains__, map(type, flat)))
    longest = max(map(len, sized), default=0)
    if longest > MAX_VALUE_BYTES:
        i, n = next((i, len(v)) for i, c in enumerate(batch.changes) for v in c.pk + c.values
                    if type(v) in _SIZED_TYPES and len(v) > MAX_VALUE_BYTES)
        raise WireError(f"change {i}: a value of {n} bytes exceeds {MAX_VALUE_BYTES}")


def _check_values(pks, vals) -> None:
    """Raise unless every primary-key value and column value is a SQLite value."""
    if _all_sqlite_values(pks) and _all_sqlite_values(vals):
        return
    for what, rows in (("primary key", pks), ("value", vals)):
        for i, row in enumerate(rows):
            for v in row:
                try:
                    check_value(v, what)
                except InvalidChange as e:
                    raise WireError(f"change {i}: {e}") from None
    raise WireError("values must be nil, integers, floats, text or bytes")


def _all_sqlite_values(rows, lo=INT64_MIN, hi=INT64_MAX) -> bool:
    """True if every value in every row is nil, a 64-bit int, a non-NaN float, text or bytes.

    One plain loop: on 3.11 this beats any combination of C-level passes.
    """
    for row in rows:
        for v in row:
            t = type(v)
            if t is str or t is bytes or v is None:
                continue
            if t is int:
                if lo <= v <= hi:
                    continue
            elif t is float and v == v:
                continue
            return False
    return True


def _check_name(name: object, what: str) -> None:
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN:
        raise WireError(f"{what} must be a non-empty string of at most {MAX_NAME_LEN} chars, got {describe(name)}")
