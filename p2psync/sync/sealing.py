"""Blind cells: what devices send a relay instead of their rows.

How this works: a relay stores and serves changes but must not read them.
Before a batch goes to a relay, every cell of every change (the row's
existence register and each column) becomes one *sealed* change of its own:

    Change(table="~", pk=(cell_id,), site, dbv, hlc, alive=None,
           columns=("~",), values=(nonce || ciphertext,))

``cell_id`` is a keyed hash (BLAKE2b with a key, 16 bytes) of (table,
primary key, column), so equal cells share an id and nothing else about them shows. The
ciphertext is ChaCha20-Poly1305 over (table, primary key, column, value or
existence flag), with the cell id and the version (site, dbv, hlc) as
associated data: a relay that flips a byte, swaps two cells' ids or moves a
value to another version produces a change that fails authentication. The
nonce is synthetic (a keyed hash of the associated data and the plaintext),
so the same cell version always seals to the same bytes and a nonce never
repeats for different plaintexts.

Opening reverses this, checks the cell id against the decrypted identity,
and puts cells of one (table, key, site, dbv, hlc) back together as one
change. The relay still sees sites, db versions, clocks, how many cells a
write touched and how long each value is; it never sees table names, keys,
column names or values.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..model import Batch, Change, Range
from ..model.change import InvalidChange, check_change

SEALED_TABLE = "~"
SEALED_COLUMN = "~"
CELL_ID_LEN = 16
NONCE_LEN = 12
_EXISTENCE = None  # the column slot of a row's existence register
_VERSION = struct.Struct(">qq")


def _subkey(data_key: bytes, label: bytes) -> bytes:
    return hmac.new(data_key, b"p2psync seal v1 " + label, hashlib.sha256).digest()




@dataclass
class OpenResult:
    """A relay batch opened: the plaintext batch to apply and what failed authentication."""

    batch: Batch
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)


class Sealer:
    """Seals and opens cells with one group's data key."""

    def __init__(self, data_key: bytes):
        self._id_key = _subkey(data_key, b"cell id")
        self._nonce_key = _subkey(data_key, b"nonce")
        self._aead = ChaCha20Poly1305(_subkey(data_key, b"aead"))
        # A Sealer seals in one thread at a time and opens in one thread at a
        # time (a connection's sender and reader); each side has its own packer.
        self._seal_pack = msgpack.Packer(use_bin_type=True).pack
        self._open_pack = msgpack.Packer(use_bin_type=True).pack
        self._last_row_key, self._last_row = None, None

    def _row_hash(self, table: str, pk: tuple, pack):
        h = hashlib.blake2b(key=self._id_key, digest_size=CELL_ID_LEN)
        h.update(pack([table, list(pk)]))
        return h

    def cell_id(self, table: str, pk: tuple, column: str | None) -> bytes:
        """The id a relay knows this cell by (for tests and tools; sealing computes it inline)."""
        pack = msgpack.Packer(use_bin_type=True).pack
        h = self._row_hash(table, pk, pack)
        h.update(pack(column))
        return h.digest()

    def _cell_id_cached(self, table: str, pk: tuple, column) -> bytes:
        """``cell_id``, reusing the row's hash state across a row's consecutive cells."""
        if self._last_row_key != (table, pk):
            self._last_row_key, self._last_row = (table, pk), self._row_hash(table, pk, self._open_pack)
        h = self._last_row.copy()
        h.update(self._open_pack(column))
        return h.digest()

    def seal_changes(self, changes) -> list[Change]:
        """Every cell of ``changes`` as its own sealed change."""
        out = []
        aead, nonce_key, pack, version = self._aead, self._nonce_key, self._seal_pack, _VERSION.pack
        for c in changes:
            row = self._row_hash(c.table, c.pk, pack)
            head = pack(c.table) + pack(list(c.pk))
            cells = list(zip(c.columns, c.values))
            if c.alive is not None:
                cells.insert(0, (_EXISTENCE, c.alive))
            site_ver = c.site + version(c.dbv, c.hlc)
            for col, val in cells:
                h = row.copy()
                colb = pack(col)
                h.update(colb)
                cid = h.digest()
                ad = cid + site_ver
                plain = b"\x94" + head + colb + pack(val)  # msgpack array of 4: table, pk, column, value
                nonce = hashlib.blake2b(ad + plain, key=nonce_key, digest_size=NONCE_LEN).digest()
                out.append(Change(SEALED_TABLE, (cid,), c.site, c.dbv, c.hlc, None, (SEALED_COLUMN,),
                                  (nonce + aead.encrypt(nonce, plain, ad),)))
        return out

    def _open_cell(self, s: Change) -> tuple[str, tuple, str | None, object]:
        if (s.table != SEALED_TABLE or len(s.pk) != 1 or type(s.pk[0]) is not bytes
                or len(s.pk[0]) != CELL_ID_LEN or s.columns != (SEALED_COLUMN,) or s.alive is not None
                or type(s.values[0]) is not bytes or len(s.values[0]) <= NONCE_LEN):
            raise ValueError("not a sealed cell")
        cid, blob = s.pk[0], s.values[0]
        try:
            plain = self._aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], cid + s.site + _VERSION.pack(s.dbv, s.hlc))
        except InvalidTag:
            raise ValueError("authentication failed (altered, moved or from another group)") from None
        try:
            table, pk, column, value = msgpack.unpackb(plain, raw=False, use_list=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise ValueError("authentic but malformed cell") from None
        if type(pk) is not tuple or self._cell_id_cached(table, pk, column) != cid:
            raise ValueError("cell id does not match its contents")
        return table, pk, column, value

    def open_batch(self, batch: Batch) -> OpenResult:
        """The plaintext batch behind a relay batch, without the cells that failed to open.

        Ranges of a site with a rejected cell are dropped: the receiver does
        not count those versions as received, so it asks again (and any
        honest peer can still bring the real cells).
        """
        rows: dict[tuple, list] = {}
        reasons: list[str] = []
        bad_sites: set[bytes] = set()
        rejected = 0

        def reject(site: bytes, why: str, cells: int = 1) -> None:
            nonlocal rejected
            rejected += cells
            bad_sites.add(site)
            if len(reasons) < 5:
                reasons.append(why)

        for s in batch.changes:
            try:
                table, pk, column, value = self._open_cell(s)
                if column is _EXISTENCE and type(value) is not bool:
                    raise ValueError("existence cell without a true/false flag")
            except ValueError as e:
                reject(s.site, str(e))
                continue
            entry = rows.setdefault((table, pk, s.site, s.dbv, s.hlc), [None, [], []])
            if column is _EXISTENCE:
                entry[0] = value
            else:
                entry[1].append(column)
                entry[2].append(value)
        changes = []
        for (t, pk, site, dbv, hlc), (a, cols, vals) in rows.items():
            c = Change(t, pk, site, dbv, hlc, a, tuple(cols), tuple(vals))
            try:
                check_change(c)
            except InvalidChange as e:
                reject(site, f"authentic but invalid change: {e}", len(cols) + (a is not None))
                continue
            changes.append(c)
        ranges = tuple(r for r in batch.ranges if r.site not in bad_sites)
        return OpenResult(Batch(tuple(changes), ranges), rejected, reasons)


def split_parts(changes: list[Change], ranges: tuple[Range, ...], more: bool,
                max_changes: int, max_bytes: int) -> list[tuple[Batch, bool]]:
    """Sealed changes cut into parts no bigger than the limits; only the last keeps ``ranges``/``more``."""
    parts: list[tuple[Batch, bool]] = []
    start, size = 0, 0
    for i, c in enumerate(changes):
        size += 60 + len(c.values[0])
        if i + 1 - start >= max_changes or size >= max_bytes:
            if i + 1 < len(changes):
                parts.append((Batch(tuple(changes[start:i + 1]), ()), True))
                start, size = i + 1, 0
    parts.append((Batch(tuple(changes[start:]), ranges), more))
    return parts
