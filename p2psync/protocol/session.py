"""One sync session with one peer, sans-IO (h11 style).

How this works: the caller owns the socket and the clock. Bytes from the peer
go into ``receive_data(data, now)`` (``b""`` for end of stream); events come
out of ``next_event()`` until it returns ``NEED_DATA`` (feed more) or
``CLOSED`` (the peer is done). Events to the peer go through
``send(event, now)``, which checks them against the state machine and returns
the bytes to write. ``get_timer()`` is the next deadline; at or after it call
``handle_timer(now)`` and write what it returns. Timers start at the first
``now`` the session sees (normally ``send(Hello, now)``).

Rules enforced on both sides:
- Each side's first event is Hello (``state.TRANSITIONS``); a Hello with
  another protocol version is "bad-version", one with our own site id is
  "self-connection".
- Batches go only after both Hellos. Batch seqs are 1, 2, 3... per direction,
  each exactly one more than the last ("bad-seq").
- Acks are cumulative: ``Ack(n)`` acknowledges every batch with seq <= n and
  must acknowledge at least one outstanding batch ("bad-ack"). At most
  ``window`` batches may be unacknowledged (``can_send_batch``). An Ack of a
  ``more=True`` part means "received and staged", of a final part "applied and
  committed", so a group larger than the window cannot stall the pipe.
- Liveness: whenever we have sent nothing for ``heartbeat_interval``,
  ``handle_timer`` returns a Ping. If nothing at all arrives for
  ``idle_timeout`` ("idle-timeout"), or no Hello for ``hello_timeout``
  ("hello-timeout"), ``handle_timer`` raises. Both ends ping on their own, so
  liveness does not depend on answers. A received Ping is returned by
  ``next_event`` like any event; answer with ``send(ping.response(), now)``
  (Pongs are returned too and may be ignored): every byte we write comes out
  of ``send`` or ``handle_timer``, nothing is queued behind the caller's back.

Large frames: a session made with ``offload=True`` does not decode a frame
body of ``LARGE_FRAME`` bytes or more inside ``next_event``; it returns
``DECODE`` instead. Call ``decode_pending()`` (pure, and touching nothing else
of the session, so it may run in a worker thread while the event loop serves
other peers), then ``next_event()`` again for the event. ``buffered`` is
what the peer's bytes cost us in memory until their events come out.

Once the peer has sent Error or closed, ``next_event`` returns CLOSED and
any further bytes from it are ignored.

Errors: anything wrong with the peer's bytes or timing raises
``RemoteProtocolError`` from ``receive_data``/``next_event``/``handle_timer``;
afterwards those keep raising it, and ``send`` accepts only an ``Error`` (to
tell the peer why) before the caller closes the connection. ``send`` raises
``LocalProtocolError`` for the caller's own mistakes and changes nothing.
"""

from __future__ import annotations

import enum

from .codec import FrameDecoder, decode_body, encode_event
from .errors import LocalProtocolError, RemoteProtocolError
from .events import Ack, BatchEvent, Error, Event, Hello, Ping, event_name
from .limits import LARGE_FRAME, PROTOCOL_VERSION, SITE_ID_LEN, U63_MAX
from .state import Eof, State, next_state


class Sentinel(enum.Enum):
    """What ``next_event`` returns when it has no event."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"
    DECODE = "DECODE"


NEED_DATA = Sentinel.NEED_DATA
CLOSED = Sentinel.CLOSED
DECODE = Sentinel.DECODE


class Session:
    """The protocol state of one connection with one peer."""

    def __init__(self, our_site: bytes, *, heartbeat_interval: float = 5.0, idle_timeout: float = 15.0,
                 hello_timeout: float = 10.0, window: int = 8, offload: bool = False):
        if type(our_site) is not bytes or len(our_site) != SITE_ID_LEN:
            raise ValueError(f"our_site must be {SITE_ID_LEN} bytes")
        if not 0 < heartbeat_interval < idle_timeout or hello_timeout <= 0:
            raise ValueError("need 0 < heartbeat_interval < idle_timeout and hello_timeout > 0")
        if type(window) is not int or window < 1:
            raise ValueError("window must be a positive int")
        self.our_site = our_site
        self.heartbeat_interval = heartbeat_interval
        self.idle_timeout = idle_timeout
        self.hello_timeout = hello_timeout
        self.window = window
        self._our_state = State.AWAIT_HELLO
        self._their_state = State.AWAIT_HELLO
        self._peer_hello: Hello | None = None
        self._decoder = FrameDecoder()
        self._offload = offload
        self._pending: bytes | None = None          # a large body waiting for decode_pending
        self._decoded: object = None                # what decode_pending made of it
        self._frame_size = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._started: float | None = None
        self._last_received = self._last_sent = 0.0
        self._sent_seq = 0        # last batch seq we sent
        self._acked_seq = 0       # last of ours the peer acked
        self._received_seq = 0    # last batch seq the peer sent
        self._acks_sent = 0       # last of theirs we acked
        self._ping_token = 0

    # ---- properties ---------------------------------------------------------

    @property
    def our_state(self) -> State:
        """Where our side is: AWAIT_HELLO until we send Hello, CLOSED after we send Error."""
        return self._our_state

    @property
    def their_state(self) -> State:
        """Where the peer's side is: CLOSED after its Error, its end of stream, or a protocol error."""
        return self._their_state

    @property
    def peer_hello(self) -> Hello | None:
        """The peer's Hello, once received."""
        return self._peer_hello

    @property
    def unacked(self) -> int:
        """Batches we sent that the peer has not acknowledged."""
        return self._sent_seq - self._acked_seq

    @property
    def can_send_batch(self) -> bool:
        """True if a BatchEvent with seq ``next_seq`` may be sent now."""
        return (self._error is None and self._our_state is State.SYNCING
                and self._their_state is State.SYNCING and self.unacked < self.window)

    @property
    def next_seq(self) -> int:
        """The seq our next BatchEvent must carry."""
        return self._sent_seq + 1

    @property
    def received_seq(self) -> int:
        """Seq of the last batch received from the peer (0 if none)."""
        return self._received_seq

    @property
    def buffered(self) -> int:
        """Bytes received from the peer whose events have not come out of ``next_event`` yet."""
        return self._decoder.buffered + (len(self._pending) if self._pending is not None else 0)

    @property
    def last_frame_size(self) -> int:
        """Body bytes of the frame that carried the last event ``next_event`` returned."""
        return self._frame_size

    # ---- sending ------------------------------------------------------------

    def send(self, event: Event, now: float) -> bytes:
        """The bytes that carry ``event`` to the peer; LocalProtocolError if it may not be sent."""
        if self._error is not None and type(event) is not Error:
            raise LocalProtocolError(
                "session-failed",
                f"cannot send {event_name(type(event))}: the session has failed "
                f"({self._error.code}); send an Error and close the connection",
            )
        new_state = next_state(self._our_state, type(event), ours=True)
        self._check_send(event)
        data = encode_event(event)
        self._touch(now)
        self._our_state = new_state
        self._last_sent = now
        if type(event) is BatchEvent:
            self._sent_seq = event.seq
        elif type(event) is Ack:
            self._acks_sent = event.seq
        return data

    def _check_send(self, event: Event) -> None:
        t = type(event)
        if t is Hello:
            if event.protocol_version != PROTOCOL_VERSION:
                raise LocalProtocolError("bad-version", f"cannot send Hello with protocol version "
                                         f"{event.protocol_version!r}; this release speaks {PROTOCOL_VERSION}")
            if event.site_id != self.our_site:
                raise LocalProtocolError("invalid-event", "cannot send Hello with a site id other than our_site")
        elif t is BatchEvent:
            if self._their_state is not State.SYNCING:
                raise LocalProtocolError("unexpected-event", f"cannot send Batch while the peer is in state "
                                         f"{self._their_state.value} (batches follow both Hellos)")
            if event.seq != self.next_seq:
                raise LocalProtocolError(
                    "bad-seq", f"cannot send Batch with seq {event.seq!r}; next seq is {self.next_seq}")
            if self.unacked >= self.window:
                raise LocalProtocolError("window-full", f"cannot send Batch {event.seq}: {self.unacked} batches "
                                         f"unacknowledged (window {self.window}); wait for an Ack")
        elif t is Ack:
            if type(event.seq) is not int or not self._acks_sent < event.seq <= self._received_seq:
                raise LocalProtocolError("bad-ack", f"cannot send Ack {event.seq!r}: received batches up to "
                                         f"{self._received_seq}, already acked up to {self._acks_sent}")

    def handle_timer(self, now: float) -> bytes:
        """Act on deadlines up to ``now``: the bytes of a heartbeat Ping, or b""; raises on timeouts."""
        self._raise_if_failed()
        if self._our_state is State.CLOSED or self._their_state is State.CLOSED:
            return b""
        self._touch(now)
        if self._their_state is State.AWAIT_HELLO and now >= self._started + self.hello_timeout:
            self._fail(LocalProtocolError("hello-timeout", f"peer sent no Hello within {self.hello_timeout:g} s"))
        if now >= self._last_received + self.idle_timeout:
            self._fail(LocalProtocolError(
                "idle-timeout", f"nothing received from peer for {now - self._last_received:.1f} s "
                                f"(idle timeout {self.idle_timeout:g} s)"))
        if self._our_state is State.SYNCING and now >= self._last_sent + self.heartbeat_interval:
            self._ping_token = self._ping_token + 1 if self._ping_token < U63_MAX else 0
            return self.send(Ping(self._ping_token), now)
        return b""

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next be called, or None if no deadline is pending."""
        if (self._error is not None or self._started is None
                or State.CLOSED in (self._our_state, self._their_state)):
            return None
        deadline = self._last_received + self.idle_timeout
        if self._their_state is State.AWAIT_HELLO:
            deadline = min(deadline, self._started + self.hello_timeout)
        if self._our_state is State.SYNCING:
            deadline = min(deadline, self._last_sent + self.heartbeat_interval)
        return deadline

    # ---- receiving ----------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Take bytes received from the peer; ``b""`` means the peer closed its end."""
        self._raise_if_failed()
        if self._eof:
            raise LocalProtocolError("data-after-eof", "receive_data called again after end of stream (b\"\")")
        self._touch(now)
        if not data:
            self._eof = True
            return
        self._last_received = now
        if self._their_state is not State.CLOSED:
            self._decoder.feed(data)
            try:
                self._decoder.check_header()
            except LocalProtocolError as e:
                self._fail(e)

    def next_event(self) -> Event | Sentinel:
        """The next event from the peer, NEED_DATA, or CLOSED once the peer is done."""
        self._raise_if_failed()
        if self._their_state is State.CLOSED:
            return CLOSED
        try:
            if self._pending is not None:
                if self._decoded is None:
                    return DECODE
                event, self._pending, self._decoded = self._decoded, None, None
                if isinstance(event, LocalProtocolError):
                    raise event
            else:
                n = self._decoder.complete()
                if n is None:
                    if not self._eof:
                        return NEED_DATA
                    if self._decoder.buffered:
                        raise LocalProtocolError(
                            "truncated-frame", f"peer closed the connection in the middle of a frame "
                                               f"({self._decoder.buffered} bytes of it received)")
                    self._their_state = next_state(self._their_state, Eof, ours=False)
                    return CLOSED
                self._frame_size = n
                if self._offload and n >= LARGE_FRAME:
                    self._pending = self._decoder.take_body()
                    return DECODE
                event = decode_body(self._decoder.take_body())
            self._receive_event(event)
        except LocalProtocolError as e:
            self._fail(e)
        return event

    def decode_pending(self) -> None:
        """Decode the frame ``next_event`` announced with DECODE (its event or error comes out next).

        Touches only that frame, so the caller may run it in a worker thread.
        """
        if self._pending is None or self._decoded is not None:
            raise LocalProtocolError("nothing-to-decode", "decode_pending called without a DECODE from next_event")
        try:
            self._decoded = decode_body(self._pending)
        except LocalProtocolError as e:
            self._decoded = e.with_traceback(None)   # its frames would keep the body (and its objects) alive

    def _receive_event(self, event: Event) -> None:
        new_state = next_state(self._their_state, type(event), ours=False)
        t = type(event)
        if t is Hello:
            if event.site_id == self.our_site:
                raise LocalProtocolError("self-connection", "peer has our own site id: this device connected to itself")
            self._peer_hello = event
        elif t is BatchEvent:
            if event.seq != self._received_seq + 1:
                raise LocalProtocolError(
                    "bad-seq", f"peer sent Batch with seq {event.seq}, expected {self._received_seq + 1}")
            self._received_seq = event.seq
        elif t is Ack:
            if not self._acked_seq < event.seq <= self._sent_seq:
                raise LocalProtocolError("bad-ack", f"peer sent Ack {event.seq}, but we sent batches up to "
                                         f"{self._sent_seq} and it had acked up to {self._acked_seq}")
            self._acked_seq = event.seq
        self._their_state = new_state

    # ---- helpers ------------------------------------------------------------

    def _touch(self, now: float) -> None:
        if self._started is None:
            self._started = self._last_received = self._last_sent = now

    def _fail(self, error: LocalProtocolError) -> None:
        # Kept in _error for good: drop the frames (and what they hold, such as a
        # peer's frame and what was decoded of it) and any exception it chained.
        error.__traceback__ = error.__context__ = None
        self._their_state = State.CLOSED
        try:
            error.reraise_as_remote()
        except RemoteProtocolError as remote:
            self._error = remote
            raise

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(self._error.code, self._error.message)
