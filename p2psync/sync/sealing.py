"""Blind changes: what devices send a relay instead of their rows.

How this works: a relay stores and serves changes but must not read them.
Before a batch goes to a relay, every change becomes a *sealed* change:

    Change(table="~", pk=(row_ref,), site, dbv, hlc, alive=None,
           columns=("~",), values=(key id || nonce || ciphertext,))

The data key is the current key epoch's (``identity.keys.EpochKeys``); the
8-byte key id names the epoch, so a device opens what was sealed under any
epoch it holds, and a device removed before an epoch began holds no key
that opens what is sealed under it.

``row_ref`` is a keyed hash (BLAKE2b with a key, 16 bytes) of the table and
primary key, so all changes of one row share a ref and nothing else about
the row shows. The ciphertext is ChaCha20-Poly1305 over (table, primary key,
existence flag, columns, values), with the row ref and the version (site,
dbv, hlc) as associated data: a relay that flips a byte, swaps two changes'
refs or moves a change to another version produces a change that fails
authentication. The nonce is synthetic (a keyed hash of the associated data
and the plaintext), so the same change always seals to the same bytes and a
nonce never repeats for different plaintexts.

Opening reverses this and checks the ref against the decrypted identity. The
relay still sees sites, db versions, clocks, which changes concern the same
row, and how long each sealed change is; it never sees table names, keys,
column names, values, or whether a change is an insert, update or delete.
Why one seal per change rather than per cell: docs/relay.md.
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
from ..model.change import SEALED_COLUMN, SEALED_TABLE, InvalidChange, check_change

ROW_REF_LEN = 16
NONCE_LEN = 12
KEY_ID_LEN = 8
_VERSION = struct.Struct(">qq")


def _subkey(data_key: bytes, label: bytes) -> bytes:
    return hmac.new(data_key, b"p2psync seal v1 " + label, hashlib.sha256).digest()


@dataclass
class OpenResult:
    """A relay batch opened: the plaintext batch to apply and what failed authentication."""

    batch: Batch
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)


class _EpochSealer:
    """The sealing keys of one epoch."""

    def __init__(self, key_id: bytes, data_key: bytes):
        self.key_id = key_id
        self.ref_key = _subkey(data_key, b"row ref")
        self.nonce_key = _subkey(data_key, b"nonce")
        self.aead = ChaCha20Poly1305(_subkey(data_key, b"aead"))


class Sealer:
    """Seals changes under the current epoch's data key and opens them under any epoch's.

    ``keys()`` returns the current keys (with ``key_id`` and ``data_key()``)
    and ``lookup(key_id)`` those of any epoch the device holds, or None.
    Seal from one thread at a time and open from one thread at a time (a
    session's sender and reader); each side has its own msgpack packer.
    """

    def __init__(self, keys, lookup):
        self._keys, self._lookup = keys, lookup
        self._epochs: dict[bytes, _EpochSealer] = {}
        self._seal_pack = msgpack.Packer(use_bin_type=True).pack
        self._open_pack = msgpack.Packer(use_bin_type=True).pack

    def _epoch(self, k) -> _EpochSealer:
        e = self._epochs.get(k.key_id)
        if e is None:
            e = self._epochs[k.key_id] = _EpochSealer(k.key_id, k.data_key())
        return e

    def row_ref(self, table: str, pk: tuple, pack=None, epoch: _EpochSealer | None = None) -> bytes:
        """The name a relay knows a row by (in the current epoch, or ``epoch``)."""
        pack = pack or msgpack.Packer(use_bin_type=True).pack
        e = epoch or self._epoch(self._keys())
        return hashlib.blake2b(pack([table, list(pk)]), key=e.ref_key, digest_size=ROW_REF_LEN).digest()

    def seal_changes(self, changes) -> list[Change]:
        """Each of ``changes`` sealed under the current epoch's key."""
        out = []
        current = self._keys()
        if current is None:
            raise ValueError("no key of the group's current epoch is held here; cannot seal for the relay")
        e = self._epoch(current)
        aead, nonce_key, ref_key, pack, version, kid = (e.aead, e.nonce_key, e.ref_key, self._seal_pack,
                                                        _VERSION.pack, e.key_id)
        blake2b = hashlib.blake2b
        for c in changes:
            ident = pack([c.table, list(c.pk)])
            ref = blake2b(ident, key=ref_key, digest_size=ROW_REF_LEN).digest()
            ad = kid + ref + c.site + version(c.dbv, c.hlc)
            plain = pack([c.table, list(c.pk), c.alive, list(c.columns), list(c.values)])
            nonce = blake2b(ad + plain, key=nonce_key, digest_size=NONCE_LEN).digest()
            out.append(Change(SEALED_TABLE, (ref,), c.site, c.dbv, c.hlc, None, (SEALED_COLUMN,),
                              (kid + nonce + aead.encrypt(nonce, plain, ad),)))
        return out

    def _open(self, s: Change) -> Change:
        if (s.table != SEALED_TABLE or len(s.pk) != 1 or type(s.pk[0]) is not bytes
                or len(s.pk[0]) != ROW_REF_LEN or s.columns != (SEALED_COLUMN,) or s.alive is not None
                or type(s.values[0]) is not bytes or len(s.values[0]) <= KEY_ID_LEN + NONCE_LEN):
            raise ValueError("not a sealed change")
        ref, blob = s.pk[0], s.values[0]
        kid = blob[:KEY_ID_LEN]
        e = self._epochs.get(kid)
        if e is None:
            k = self._lookup(kid)
            if k is None:
                raise ValueError("sealed under a key epoch this device does not hold")
            e = self._epoch(k)
        body = blob[KEY_ID_LEN:]
        try:
            plain = e.aead.decrypt(body[:NONCE_LEN], body[NONCE_LEN:], kid + ref + s.site + _VERSION.pack(s.dbv, s.hlc))
        except InvalidTag:
            raise ValueError("authentication failed (altered, moved or from another group)") from None
        try:
            table, pk, alive, columns, values = msgpack.unpackb(plain, raw=False, use_list=False)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise ValueError("authentic but malformed change") from None
        if type(pk) is not tuple or type(table) is not str or self.row_ref(table, pk, self._open_pack, e) != ref:
            raise ValueError("row ref does not match the change's table and key")
        c = Change(table, pk, s.site, s.dbv, s.hlc, alive, columns, values)
        try:
            check_change(c)
        except InvalidChange as e:
            raise ValueError(f"authentic but invalid change: {e}") from None
        return c

    def open_batch(self, batch: Batch) -> OpenResult:
        """The plaintext batch behind a relay batch, without the changes that failed to open.

        Ranges of a site with a rejected change are dropped: the receiver
        does not count those versions as received, so it asks again (and any
        honest peer can still bring the real changes).
        """
        changes, reasons, bad_sites = [], [], set()
        rejected = 0
        for s in batch.changes:
            try:
                changes.append(self._open(s))
            except ValueError as e:
                rejected += 1
                bad_sites.add(s.site)
                if len(reasons) < 5:
                    reasons.append(str(e))
        ranges = tuple(r for r in batch.ranges if r.site not in bad_sites)
        return OpenResult(Batch(tuple(changes), ranges, batch.proofs), rejected, reasons)


def split_parts(changes: list[Change], ranges: tuple[Range, ...], more: bool,
                max_changes: int, max_bytes: int, proofs: tuple = ()) -> list[tuple[Batch, bool]]:
    """Sealed changes cut into parts no bigger than the limits; only the last keeps ``ranges``/``more``
    (and the proofs)."""
    parts: list[tuple[Batch, bool]] = []
    start, size = 0, 0
    for i, c in enumerate(changes):
        size += 60 + len(c.values[0])
        if i + 1 - start >= max_changes or size >= max_bytes:
            if i + 1 < len(changes):
                parts.append((Batch(tuple(changes[start:i + 1]), ()), True))
                start, size = i + 1, 0
    parts.append((Batch(tuple(changes[start:]), ranges, proofs), more))
    return parts
