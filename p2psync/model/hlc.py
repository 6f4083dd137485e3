"""Hybrid logical clock: 48-bit wall milliseconds and a 16-bit counter in one int.

A timestamp is ``ms << 16 | counter``, so plain integer comparison orders
timestamps. The clock never reads the wall clock itself: callers pass
``wall_ms``. When the counter would overflow it carries into the millisecond
part (the clock runs at most one millisecond ahead per 65536 events).
"""

from __future__ import annotations

COUNTER_BITS = 16
MAX_TIMESTAMP = (1 << 64) - 1


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


class Hlc:
    """A hybrid logical clock; ``last`` is the highest timestamp issued or seen."""

    __slots__ = ("last", "max_skew_ms")

    def __init__(self, last: int = 0, max_skew_ms: int = 60_000):
        self.last = last
        self.max_skew_ms = max_skew_ms

    def now(self, wall: int) -> int:
        """A new timestamp for a local event at wall time ``wall`` (ms)."""
        ts = max(pack(wall), self.last + 1)
        if ts > MAX_TIMESTAMP:
            raise OverflowError("hybrid logical clock exhausted")
        self.last = ts
        return ts

    def too_far_ahead(self, remote: int, wall: int) -> bool:
        """True if ``remote`` is more than the allowed skew ahead of ``wall``."""
        return wall_ms(remote) > wall + self.max_skew_ms

    def receive(self, remote: int, wall: int) -> int:
        """Merge a remote timestamp; refuses (ClockSkewError) one too far ahead."""
        if self.too_far_ahead(remote, wall):
            raise ClockSkewError(remote, wall, self.max_skew_ms)
        if remote > self.last:
            self.last = remote
        return self.last
