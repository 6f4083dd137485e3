"""Sans-IO sync protocol: frames, events, and the session state machine."""

from .codec import FrameDecoder, decode_body, encode_event
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import Ack, BatchEvent, Error, Event, Have, Hello, Members, Ping, Pong
from .limits import PROTOCOL_VERSION
from .session import CLOSED, NEED_DATA, Sentinel, Session
from .state import State

__all__ = [
    "Ack", "BatchEvent", "CLOSED", "Error", "Event", "FrameDecoder", "Have", "Hello", "LocalProtocolError",
    "Members", "NEED_DATA", "PROTOCOL_VERSION", "Ping", "Pong", "ProtocolError", "RemoteProtocolError", "Sentinel",
    "Session", "State", "decode_body", "encode_event",
]
