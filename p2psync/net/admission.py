"""Who may start a handshake now: handshakes in flight per source and in all, and a rate per source.

How this works: WireGuard meets a flood of handshake initiations with a
token bucket per source IP (and cookies, which prove the source address;
TCP's own handshake already does that here). Each source has a bucket of
``burst`` tokens that refills at ``rate`` per second; a handshake takes one
token and one of the source's ``in_flight_per_source`` slots, and one of
``in_flight`` slots shared by all, and gives the slots back when it ends
(whatever its outcome). A refusal takes nothing. A source is an IPv4
address, or an IPv6 /64 (one host commonly holds a whole /64). The table of
sources is bounded: the least recently seen idle one is forgotten first.
Time is a parameter; nothing here awaits or reads a clock.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class HandshakeLimits:
    """How many handshakes a listener runs at once, and how often one source may start one."""

    in_flight: int = 64                 # handshakes in progress, all sources together
    in_flight_per_source: int = 8       # handshakes in progress from one source
    rate: float = 10.0                  # handshakes per second a source may start, sustained
    burst: int = 40                     # handshakes a source may start at once after a quiet spell
    max_sources: int = 16_384           # sources whose bucket is remembered


@dataclass(frozen=True)
class Refusal:
    """Which limit refused a connection; ``code`` names it (and its counter), ``text`` says it for people."""

    code: str
    text: str


@dataclass
class _Source:
    tokens: float
    at: float
    in_flight: int = 0


def source_of(host: str) -> str:
    """The source a connection from ``host`` counts against: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class HandshakeGate:
    """Handshake slots and per-source rate, for one listener."""

    def __init__(self, limits: HandshakeLimits = HandshakeLimits()):
        self.limits = limits
        self.in_flight = 0
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def enter(self, host: str, now: float) -> Refusal | None:
        """Take a slot for a handshake from ``host`` (give it back with ``leave``); or the limit refusing it."""
        lim, key = self.limits, source_of(host)
        s = self._sources.pop(key, None)
        if s is None:
            s = _Source(float(lim.burst), now)
        else:
            s.tokens, s.at = min(float(lim.burst), s.tokens + max(0.0, now - s.at) * lim.rate), now
        self._sources[key] = s
        self._forget_idle()
        if s.in_flight >= lim.in_flight_per_source:
            return Refusal("per_source", f"too many handshakes in progress from {key} "
                                         f"(limit {lim.in_flight_per_source} per source address)")
        if s.tokens < 1:
            return Refusal("rate", f"handshake rate from {key} over its limit "
                                   f"({lim.rate:g}/s, bursts of {lim.burst})")
        if self.in_flight >= lim.in_flight:
            return Refusal("in_flight", f"too many handshakes in progress (limit {lim.in_flight} in all)")
        s.tokens -= 1
        s.in_flight += 1
        self.in_flight += 1
        return None

    def leave(self, host: str) -> None:
        """A handshake that ``enter`` let in has ended."""
        s = self._sources.get(source_of(host))
        if s is not None and s.in_flight > 0:
            s.in_flight -= 1
            self.in_flight -= 1

    def _forget_idle(self) -> None:
        if len(self._sources) <= self.limits.max_sources:
            return
        for key in list(self._sources):   # least recently seen first
            if len(self._sources) <= self.limits.max_sources:
                break
            if self._sources[key].in_flight == 0:
                del self._sources[key]

    def statistics(self) -> dict:
        return {"in_flight": self.in_flight, "sources": len(self._sources)}


class LogThrottle:
    """At most ``lines`` log lines per key per ``window`` seconds; the rest are counted, and said with the next."""

    def __init__(self, lines: int = 10, window: float = 60.0, max_keys: int = 4096):
        self.lines, self.window, self.max_keys = lines, window, max_keys
        self._keys: OrderedDict[str, list] = OrderedDict()   # key -> [window start, lines logged, suppressed]

    def allow(self, key: str, now: float) -> int | None:
        """None: do not log this one; else how many were left unlogged for ``key`` before it."""
        st = self._keys.pop(key, None)
        if st is None or now - st[0] >= self.window:
            suppressed = st[2] if st is not None else 0
            st = [now, 0, suppressed]
        self._keys[key] = st
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        if st[1] >= self.lines:
            st[2] += 1
            return None
        st[1] += 1
        suppressed, st[2] = st[2], 0
        return suppressed


def with_suppressed(text: str, suppressed: int) -> str:
    """``text``, noting how many like it were not logged."""
    return f"{text} ({suppressed} more refusals like this one were not logged)" if suppressed else text


__all__ = ["HandshakeLimits", "HandshakeGate", "Refusal", "LogThrottle", "source_of", "with_suppressed"]
