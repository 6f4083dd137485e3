"""What a relay process decides before a session syncs: which group a ref names, and whether there is room.

How this works: ``RefTable`` answers "which admitted group does this
preamble's ref name?" from memory. It holds every admitted group's row and
the refs each is accepted under today (yesterday's, today's and tomorrow's
``day_ref``), rebuilt when the UTC day changes. The relay reads the group
table again (one query) when a group is admitted (NOTIFY), or on a miss if
the table is older than REFRESH_INTERVAL; a ref still missing after that
is refused from memory for UNKNOWN_REF_TTL. So a flood of unknown refs,
random or repeated, costs Postgres at most one query per REFRESH_INTERVAL.

``make_room`` applies ``SessionLimits`` to a group's sessions when a device
completes its handshake: a device key holding ``per_device`` sessions has
its oldest closed (a device that changed networks comes back before its old
session times out; the new one wins), a group holding ``per_group`` refuses
more, and keys its log does not list as current members (strangers: a new
member whose admission has not reached the relay, a removed device holding
the relay PSK, anyone holding it) share ``strangers_per_group`` sessions
until they are admitted. (``per_process``, the sessions of all groups, is
the relay's to check: a session over it is told to come back later.) Time and the day are parameters; nothing here
awaits or reads a clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..protocol.relay_preamble import accepted_refs

REFRESH_INTERVAL = 5.0       # s: the least time between two reads of the group table that unknown refs cause
UNKNOWN_REF_TTL = 60.0       # s: an unknown ref is refused from memory this long after the table was read for it
MAX_UNKNOWN_REFS = 10_000    # unknown refs remembered (the oldest are forgotten first)


@dataclass(frozen=True)
class SessionLimits:
    """Sessions one relay process holds (a session holds no Postgres connection: they share the pool)."""

    per_device: int = 4              # of one device key; one more closes that key's oldest session
    per_group: int = 32              # of one group; one more is refused
    strangers_per_group: int = 4     # of keys not (yet) current members of the group; one more is refused
    per_process: int = 2_000         # in all groups; one more is told the relay is busy (relay-busy)


@dataclass(frozen=True)
class Admitted:
    """An admitted group's row: what the handshake needs before any membership is loaded."""

    id: int
    token: bytes = field(repr=False)
    group_id: bytes
    found: bytes


class RefTable:
    """Which admitted group a preamble's ref names, answered from memory (``now`` is monotonic seconds)."""

    def __init__(self):
        self.admitted: dict[int, Admitted] = {}
        self.loaded_at = -math.inf
        self._by_ref: dict[bytes, Admitted] = {}
        self._day: int | None = None
        self._unknown: OrderedDict[bytes, float] = OrderedDict()

    def load(self, rows, now: float) -> None:
        """Take the whole group table as read from Postgres (``find_groups``)."""
        self.admitted = {r[0]: Admitted(*r) for r in rows}
        self.loaded_at = now
        self._day = None
        self._unknown.clear()

    def get(self, ref: bytes, day: int) -> Admitted | None:
        if day != self._day:
            self._by_ref, self._day = {}, day
            for a in self.admitted.values():
                for r in accepted_refs(a.token, day):
                    self._by_ref[r] = a
            self._unknown.clear()
        return self._by_ref.get(ref)

    def known_unknown(self, ref: bytes, now: float) -> bool:
        """Was ``ref`` looked for in a fresh table lately and not found?"""
        until = self._unknown.get(ref)
        if until is None:
            return False
        if until <= now:
            del self._unknown[ref]
            return False
        return True

    def stale(self, now: float) -> bool:
        return now - self.loaded_at >= REFRESH_INTERVAL

    def mark_unknown(self, ref: bytes, now: float) -> None:
        self._unknown.pop(ref, None)
        self._unknown[ref] = now + UNKNOWN_REF_TTL
        while len(self._unknown) > MAX_UNKNOWN_REFS:
            self._unknown.popitem(last=False)


@dataclass
class Room:
    """What ``make_room`` decided: sessions to close first, and the refusal (counter, text), if any."""

    close: list = field(default_factory=list)
    held: int = 0                                 # sessions the key held before
    refusal: tuple[str, str] | None = None


def make_room(sessions, key: bytes, is_member: Callable[[bytes], bool], limits: SessionLimits) -> Room:
    """Room for a new session of ``key`` among ``sessions`` (oldest first; each with ``key``, ``closing``
    and ``admitted``)."""
    live = [s for s in sessions if not s.closing]
    own = [s for s in live if s.key == key]
    room = Room(close=own[:max(0, len(own) - limits.per_device + 1)], held=len(own))
    live = [s for s in live if s not in room.close]
    if len(live) >= limits.per_group:
        room.refusal = ("sessions_refused_per_group",
                        f"{len(live)} sessions at this relay (limit {limits.per_group} per group)")
    elif not is_member(key):
        strangers = [s for s in live if not s.admitted and not is_member(s.key)]
        if len(strangers) >= limits.strangers_per_group:
            room.refusal = ("sessions_refused_strangers",
                            f"{len(strangers)} sessions of keys that are not (yet) its members at this relay "
                            f"(limit {limits.strangers_per_group} per group)")
    return room


__all__ = ["Admitted", "RefTable", "SessionLimits", "Room", "make_room", "REFRESH_INTERVAL", "UNKNOWN_REF_TTL",
           "MAX_UNKNOWN_REFS"]
