"""The merge rule: per-register last writer wins.

Every column of every row, and the row's existence, is a register holding
(hlc, site, value). Of two writes to a register the one with the higher HLC
wins; equal HLCs fall back to the higher site id, then to the greater value
in a fixed total order of SQLite values. The rule is a pure function, so any
replica that has seen the same writes picks the same winner.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .change import Value


class Clock(NamedTuple):
    """One write to a register."""

    hlc: int
    site: bytes
    value: Value


# NULL < numbers < text < blob, as SQLite sorts them; ints before floats on a tie,
# and -0.0 before 0.0 (SQLite keeps the sign of zero in untyped columns).
_RANK = {type(None): 0, int: 1, float: 1, str: 2, bytes: 3}


def value_key(v: Value) -> tuple:
    """A sort key giving every SQLite value a place in one total order."""
    rank = _RANK[type(v)]
    if rank == 0:
        return (0,)
    if rank == 1:
        if isinstance(v, float):
            return (1, v, True, math.copysign(1.0, v))
        return (1, v, False)
    return (rank, v)


def compare_clocks(local_hlc: int, local_site: bytes, hlc: int, site: bytes) -> int:
    """1 if write (hlc, site) is newer than the local one, -1 if older, 0 if tied."""
    if hlc != local_hlc:
        return 1 if hlc > local_hlc else -1
    if site != local_site:
        return 1 if site > local_site else -1
    return 0


def value_wins(local: Value, incoming: Value) -> bool:
    """The last tie-break: the greater value wins."""
    return value_key(incoming) > value_key(local)


def wins(local: Clock | None, incoming: Clock) -> bool:
    """True if ``incoming`` should replace ``local`` in the register."""
    if local is None:
        return True
    c = compare_clocks(local.hlc, local.site, incoming.hlc, incoming.site)
    return c > 0 or (c == 0 and value_wins(local.value, incoming.value))
