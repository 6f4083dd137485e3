"""The group as this device knows it: the membership log, its resolved state and the keys it unlocks.

The log itself lives in the database (``_p2p_members`` on a device,
``p2p_members`` at a relay) so that the CLI and the agent, separate
processes, share it; this object holds it in memory, decoded and resolved,
and is rebuilt from what the store holds whenever the store's mark moves.
Methods here never touch the store: callers persist ``new`` events
through their store worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..model import Batch, Range
from ..model.membership import (Event, Member, Membership, MembershipError, MembershipLog, check_signatures,
                                decode_event, encode_event)
from .keyring import KeyRing

log = logging.getLogger("p2psync.group")

EPOCH_KINDS = ("found", "epoch")


@dataclass
class Admission:
    """Whether a peer's static key belongs to a current member, and if not why."""

    member: Member | None
    reason: str | None = None      # None: admitted

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class DecodedMembers:
    """Membership events as decoded from one message, with their signatures checked ahead."""

    events: list[Event]
    raw: dict[bytes, bytes]                     # hash -> the bytes as received
    verified: dict[tuple[bytes, bytes], bool]   # (hash, signing key) -> signature valid
    malformed: int = 0
    first_error: str | None = None
    rejected: int = 0                           # set by GroupMembers.take: forged (not kept)
    ignored_by: dict = None                     # set by GroupMembers.take: signer -> events new and ignored


def decode_members(encoded: list[bytes], keys: dict[bytes, bytes]) -> DecodedMembers:
    """Decode ``encoded`` and check the signatures ``keys`` (and the events themselves) allow.

    Pure and touching no shared state, so callers run it in a worker thread for a large
    message: the Ed25519 checks (~0.14 ms each) are what costs.
    """
    events, raw, malformed, first = [], {}, 0, None
    for data in encoded:
        try:
            ev = decode_event(data)
        except MembershipError as e:
            malformed += 1
            first = first or str(e)
            continue
        if ev.hash not in raw:
            events.append(ev)
            raw[ev.hash] = bytes(data)
    return DecodedMembers(events, raw, check_signatures(events, keys), malformed, first)


class GroupMembers:
    """One group's membership log, resolved, with this device's keys (or none, at a relay)."""

    def __init__(self, found: bytes, site: bytes | None = None, dh_private: bytes | None = None,
                 retired: tuple[tuple[bytes, bytes], ...] = ()):
        self.found, self.site, self._dh_private = found, site, dh_private
        self._retired = tuple(retired)   # (site, dh private) this device continued from (identity/succession.py)
        self.log = MembershipLog(found)
        self.malformed = 0
        self.state: Membership | None = None
        self.keys: KeyRing | None = None
        self._encoded: dict[bytes, bytes] = {}

    # -- taking events in ---------------------------------------------------------

    def load(self, encoded: list[bytes]) -> list[Event]:
        """Take events as stored or received (encoded); the ones new to the log, to persist."""
        decoded = decode_members(encoded, self.signing_keys())
        if decoded.malformed:
            log.warning("ignored %d malformed membership events (the first: %s)", decoded.malformed, decoded.first_error)
        return self.take(decoded)

    def take(self, decoded: "DecodedMembers") -> list[Event]:
        """Take events decoded (and their signatures checked) by ``decode_members``; the new ones."""
        self.malformed += decoded.malformed
        fresh = [ev for ev in decoded.events if ev.hash not in self.log]
        rejected = self.log.rejected
        new = self.add(fresh, decoded.raw, decoded.verified)
        decoded.rejected = self.log.rejected - rejected
        ignored = self.state.ignored if self.state else {}
        decoded.ignored_by = {}
        for ev in new:
            if ev.hash in ignored:
                decoded.ignored_by[ev.signer] = decoded.ignored_by.get(ev.signer, 0) + 1
        return new

    def signing_keys(self) -> dict[bytes, bytes]:
        """site -> signing key of every device the log knows (for ``decode_members``)."""
        return {s: m.sign_pub for s, m in self.state.members.items()} if self.state else {}

    def counts(self) -> tuple[int, int]:
        """(events rejected, events ignored) so far: how much forged or unauthorised input was seen."""
        return self.log.rejected, len(self.state.ignored) if self.state else 0

    def add(self, events: list[Event], raw: dict | None = None, verified: dict | None = None) -> list[Event]:
        """Take decoded events; the ones new to the log (accepted), to persist and pass on."""
        new = self.log.add(events, verified)
        for ev in new:   # keep the bytes of what the log accepted only (rejected events are dropped)
            self._encoded.setdefault(ev.hash, (raw or {}).get(ev.hash) or encode_event(ev))
        if new or self.state is None:
            self._refresh()
        return new

    def _refresh(self) -> None:
        self.state = self.log.state()
        if self.site is not None and self._dh_private is not None:
            self.keys = KeyRing(self.state, self.site, self._dh_private, self._epoch_parents(), self._retired)

    def _epoch_parents(self) -> dict[bytes, frozenset]:
        """Epoch event hash -> every valid epoch event in its causal past."""
        valid_epochs = set(self.state.epochs)
        below: dict[bytes, frozenset] = {}   # event -> epoch events at or below it
        out: dict[bytes, frozenset] = {}
        for ev in self.log.events():
            past = frozenset().union(*(below.get(p, frozenset()) for p in ev.parents))
            if ev.hash in valid_epochs:
                out[ev.hash] = past
                below[ev.hash] = past | {ev.hash}
            else:
                below[ev.hash] = past
        return out

    # -- what it says ------------------------------------------------------------------

    def encoded(self, events: list[Event] | None = None) -> list[bytes]:
        """Encoded events (all of the log, parents first, if ``events`` is None)."""
        evs = self.log.events() if events is None else events
        return [self._encoded.get(ev.hash) or encode_event(ev) for ev in evs]

    def pairs(self, events: list[Event]) -> list[tuple[bytes, bytes]]:
        """(hash, encoded) pairs for the store."""
        return [(ev.hash, self._encoded.get(ev.hash) or encode_event(ev)) for ev in events]

    @property
    def heads(self) -> tuple[bytes, ...]:
        return tuple(self.state.heads) if self.state else ()

    def admit(self, dh_public: bytes) -> Admission:
        """May the device with this static key sync with us?"""
        m = self.state.by_dh(dh_public) if self.state else None
        if m is None:
            return Admission(None, "unknown-device")
        if m.state == "removed":
            return Admission(m, "removed")
        if m.state != "current":
            return Admission(m, "succeeded")
        return Admission(m)

    def screen(self, batch: Batch) -> tuple[Batch, int, list[bytes]]:
        """``batch`` without changes of devices never added, or of removed devices past their last
        counting version (their ranges clipped to it); also how many changes were left out, and whose."""
        st = self.state
        bad: dict[bytes, int] = {}
        for s in {r.site for r in batch.ranges} | {c.site for c in batch.changes}:
            if st.member(s) is None:
                bad[s] = -1
            elif (cap := st.cap(s)) is not None:
                bad[s] = cap
        if not bad:
            return batch, 0, []
        changes = tuple(c for c in batch.changes if c.site not in bad or c.dbv <= bad[c.site])
        ranges = []
        for r in batch.ranges:
            cap = bad.get(r.site)
            if cap is None:
                ranges.append(r)
            elif cap > r.lo:
                ranges.append(Range(r.site, r.lo, min(r.hi, cap)))
        return Batch(changes, tuple(ranges), batch.proofs), len(batch.changes) - len(changes), sorted(bad)

    @property
    def me(self) -> Member | None:
        return self.state.member(self.site) if self.state and self.site else None

    def removed_self(self) -> Member | None:
        """Our own record, if the log says this device was removed."""
        m = self.me
        return m if m is not None and m.state == "removed" else None

    def name_of(self, site: bytes) -> str:
        """A member's name as its add event sealed it (or its site id prefix if we cannot open it)."""
        m = self.state.member(site) if self.state else None
        if m is None:
            return site.hex()[:12]
        if self.keys is not None:
            try:
                return self.keys.open_sealed(m.name_box, b"name" + site).decode("utf-8", "replace")
            except Exception:
                pass
        return site.hex()[:12]

    def who(self, site: bytes) -> str:
        """'name (site prefix)' for logs and messages."""
        return f"{self.name_of(site)} ({site.hex()[:12]})"
