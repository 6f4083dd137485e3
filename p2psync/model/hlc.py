"""Hybrid logical clock: 48-bit wall milliseconds and a 16-bit counter in one int.

A timestamp is ``ms << 16 | counter``, so plain integer comparison orders
timestamps. The clock never reads the wall clock itself: callers pass
``wall_ms``. When the counter would overflow it carries into the millisecond
part (the clock runs at most one millisecond ahead per 65536 events).

Limits: SQLite stores 64-bit signed integers, and every clock must keep room
to count on from anything it takes in. So HLCs and db versions stay below
2^62 (``MAX_HLC``, ``MAX_DB_VERSION``), a margin of 2^62 under SQLite's
maximum; for an HLC that is the year 4199. The clock refuses to issue or take
a timestamp beyond that (``ClockLimitError``): a peer cannot exhaust it.
"""

from __future__ import annotations

COUNTER_BITS = 16
MAX_HLC = (1 << 62) - 1
MAX_DB_VERSION = (1 << 62) - 1


def pack(ms: int, counter: int = 0) -> int:
    """The timestamp for ``ms`` milliseconds and ``counter``."""
    return (ms << COUNTER_BITS) | counter


def wall_ms(ts: int) -> int:
    """The millisecond part of timestamp ``ts``."""
    return ts >> COUNTER_BITS


class ClockSkewError(ValueError):
    """A remote timestamp is further ahead of our wall clock than allowed."""

    def __init__(self, remote: int, wall: int, max_skew_ms: int):
        self.remote = remote
        self.ahead_ms = wall_ms(remote) - wall
        super().__init__(
            f"remote clock is {self.ahead_ms / 1000:.1f} s ahead of ours "
            f"(limit {max_skew_ms / 1000:.0f} s)"
        )


class ClockLimitError(OverflowError):
    """A timestamp past ``MAX_HLC``: issuing or taking it would leave the clock no room to count on."""

    def __init__(self, ts: int, what: str):
        self.ts = ts
        years = wall_ms(ts) / 1000 / 86400 / 365.2425
        when = f"about the year {1970 + years:.0f}" if years < 1e9 else "beyond any calendar"
        super().__init__(
            f"{what} HLC {ts} (wall time {when}) is past the clock limit {MAX_HLC} (2^62 - 1); "
            f"taking it would leave this device's clock no room for new writes"
        )


class Hlc:
    """A hybrid logical clock; ``last`` is the highest timestamp issued or seen (never advanced past MAX_HLC)."""

    __slots__ = ("_last", "max_skew_ms")

    def __init__(self, last: int = 0, max_skew_ms: int = 60_000):
        self._last = last
        self.max_skew_ms = max_skew_ms

    @property
    def last(self) -> int:
        return self._last

    @last.setter
    def last(self, ts: int) -> None:
        if ts > MAX_HLC and ts > self._last:
            raise ClockLimitError(ts, "a change stamped at")
        self._last = ts

    def now(self, wall: int) -> int:
        """A new timestamp for a local event at wall time ``wall`` (ms); ClockLimitError past MAX_HLC."""
        ts = max(pack(wall), self._last + 1)
        if ts > MAX_HLC:
            raise ClockLimitError(ts, "the next local")
        self._last = ts
        return ts

    def too_far_ahead(self, remote: int, wall: int) -> bool:
        """True if ``remote`` is more than the allowed skew ahead of ``wall``."""
        return wall_ms(remote) > wall + self.max_skew_ms

    def receive(self, remote: int, wall: int) -> int:
        """Merge a remote timestamp; refuses one too far ahead (ClockSkewError) or past MAX_HLC (ClockLimitError)."""
        if self.too_far_ahead(remote, wall):
            raise ClockSkewError(remote, wall, self.max_skew_ms)
        if remote > self._last:
            self.last = remote
        return self._last
