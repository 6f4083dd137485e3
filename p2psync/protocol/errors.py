"""Protocol errors.

Code inside the protocol raises ``LocalProtocolError``. Where the peer's bytes
enter (``Session.receive_data`` / ``next_event`` / ``handle_timer``) it is
re-raised as ``RemoteProtocolError``: the peer misbehaved and the connection
must close. A ``LocalProtocolError`` that reaches the caller from ``send``
means the caller tried something illegal.
"""

from __future__ import annotations

from typing import NoReturn


class ProtocolError(Exception):
    """A protocol violation; ``code`` is a short machine-readable tag, e.g. "bad-frame"."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class LocalProtocolError(ProtocolError):
    """We (or the caller) did something the protocol forbids."""

    def reraise_as_remote(self) -> NoReturn:
        """Raise the same code and message as a RemoteProtocolError."""
        message = self.message if self.message.endswith("connection closed") else self.message + "; connection closed"
        raise RemoteProtocolError(self.code, message) from self


class RemoteProtocolError(ProtocolError):
    """The peer did something the protocol forbids; close the connection."""


def describe(v: object) -> str:
    """A short description of a bad value for an error message (never the whole value)."""
    if isinstance(v, (bytes, str)):
        return f"{type(v).__name__} of length {len(v)}"
    if v is None or isinstance(v, (bool, int, float)):
        return f"{v!r:.40}"
    return type(v).__name__
