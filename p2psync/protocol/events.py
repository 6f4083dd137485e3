"""Events: what the two ends of a session say to each other, in both directions."""

from __future__ import annotations

from dataclasses import dataclass

from ..model import Batch, VersionVector


@dataclass(frozen=True, slots=True)
class Hello:
    """First event each side sends: who we are and what we already have."""

    protocol_version: int
    site_id: bytes            # 16 bytes
    schema: bytes             # fingerprint of the tracked schema, at most 64 bytes
    wall_ms: int              # sender's wall clock, milliseconds since the epoch
    vv: VersionVector
    # Proofs (db version, hlc, count, root, signature) of some of the receiver's own versions as the
    # sender holds them (the newest, then 1, 2, 4... below it): a receiver whose own signature is on
    # a root it does not hold was rolled back or cloned. Unsigned claims move nothing.
    yours: tuple[tuple[int, int, int, bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class BatchEvent:
    """One batch (or one part of a multi-part group) of changes.

    ``seq`` is 1 for the first batch in each direction and one more for each
    next. ``more=True`` means this part must be applied atomically together
    with the following parts up to and including the next one with
    ``more=False``; only that last part may carry ranges.
    """

    seq: int
    batch: Batch
    more: bool = False


@dataclass(frozen=True, slots=True)
class Ack:
    """Cumulative acknowledgement of every batch with seq <= ``seq``."""

    seq: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness probe; the receiver should answer with ``ping.response()``."""

    token: int

    def response(self) -> Pong:
        """The Pong that answers this Ping."""
        return Pong(self.token)


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to the Ping with the same token."""

    token: int


@dataclass(frozen=True, slots=True)
class Members:
    """Membership log exchange: the sender's log heads and encoded signed events the peer may lack.

    Each side sends one with ``events=()`` right after the handshake (its
    heads); when heads differ both send their whole log once, and later
    events are pushed as they appear. Allowed before and after Hello.
    """

    heads: tuple[bytes, ...]      # 32-byte event hashes
    events: tuple[bytes, ...]     # encoded events (model.membership.encode_event)


@dataclass(frozen=True, slots=True)
class Have:
    """What the sender holds now: (site, db version) entries of its version vector that moved.

    A hint for the receiver's sending only (sync/peer.py): the receiver does
    not send what the sender says it holds, so a device that got a change
    from its origin is not sent it again by every other peer. It moves no
    version vector and says nothing about any device but the sender, whose
    false claim could only keep changes from itself.
    """

    vv: VersionVector


@dataclass(frozen=True, slots=True)
class Error:
    """Last event of a side: why it is closing. ``code`` is [a-z0-9-]+."""

    code: str
    message: str


Event = Hello | BatchEvent | Ack | Ping | Pong | Members | Have | Error

EVENT_TYPES = (Hello, BatchEvent, Ack, Ping, Pong, Members, Have, Error)


def event_name(event_type: type) -> str:
    """The name an event type has in messages ("Batch" for BatchEvent)."""
    return "Batch" if event_type is BatchEvent else event_type.__name__
