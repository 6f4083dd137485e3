"""The session state machine: one table of legal transitions.

Each side of a session (us, the peer) has its own state. A side starts in
AWAIT_HELLO (where it may exchange Members), moves to SYNCING by sending Hello, and ends in CLOSED by sending
Error or (peer only) closing the connection. Every legal (state, event type)
pair is in ``TRANSITIONS``; anything else raises ``LocalProtocolError`` naming
the event, the side and the state.
"""

from __future__ import annotations

import enum

from .errors import LocalProtocolError
from .events import Ack, BatchEvent, Error, Have, Hello, Members, Ping, Pong, event_name


class State(enum.Enum):
    """Where one side of a session is."""

    AWAIT_HELLO = "AWAIT_HELLO"
    SYNCING = "SYNCING"
    CLOSED = "CLOSED"


class Eof:
    """Marker "event" for the peer closing its end of the connection (never on the wire)."""


TRANSITIONS: dict[tuple[State, type], State] = {
    (State.AWAIT_HELLO, Hello): State.SYNCING,
    (State.AWAIT_HELLO, Members): State.AWAIT_HELLO,
    (State.AWAIT_HELLO, Error): State.CLOSED,
    (State.AWAIT_HELLO, Eof): State.CLOSED,
    (State.SYNCING, BatchEvent): State.SYNCING,
    (State.SYNCING, Ack): State.SYNCING,
    (State.SYNCING, Ping): State.SYNCING,
    (State.SYNCING, Pong): State.SYNCING,
    (State.SYNCING, Members): State.SYNCING,
    (State.SYNCING, Have): State.SYNCING,
    (State.SYNCING, Error): State.CLOSED,
    (State.SYNCING, Eof): State.CLOSED,
}

_HINTS = {
    State.AWAIT_HELLO: " (Hello must come first)",
    State.CLOSED: " (that side has already closed)",
}


def next_state(state: State, event_type: type, *, ours: bool) -> State:
    """The state after ``event_type`` in ``state``; raises if the transition is illegal."""
    try:
        return TRANSITIONS[state, event_type]
    except KeyError:
        name = "end of stream" if event_type is Eof else event_name(event_type)
        who = "cannot send" if ours else "peer sent"
        raise LocalProtocolError(
            "unexpected-event", f"{who} {name} in state {state.value}{_HINTS.get(state, '')}"
        ) from None
