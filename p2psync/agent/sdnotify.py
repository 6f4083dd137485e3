"""The systemd notify protocol (sd_notify), without dependencies.

How this works: systemd passes a Unix datagram socket in ``$NOTIFY_SOCKET``
(a path, or an abstract name written with a leading '@'). Each notification is
one datagram of ``KEY=VALUE`` lines, e.g. ``READY=1\\nSTATUS=serving``. With
``WatchdogSec=`` systemd also sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``)
and expects ``WATCHDOG=1`` more often than that; we advise half the interval.
When the agent does not run under systemd, every call is a cheap no-op.
Sending never blocks and never raises: a lost notification is logged, and
systemd's own timeouts then report the problem.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    """The socket address for a ``$NOTIFY_SOCKET`` value, or None if unsupported."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is not a Unix socket path or abstract name; systemd notifications disabled",
                value)
    return None


def _line(key: str, value: object) -> str:
    text = str(value).replace("\n", " ")  # one field per line: values cannot span lines
    return f"{key.upper()}={text}"


class Notifier:
    """Sends state changes to systemd when run as a ``Type=notify`` service."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True if there is a systemd socket to notify."""
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` fields in one datagram; True if it was sent."""
        if self.address is None or not fields:
            return False
        data = "\n".join(_line(k, v) for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._warned:  # systemd gone or socket full: say so once, not every watchdog tick
                log.warning("cannot notify systemd on %r: %s", self.address.replace("\0", "@"), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def watchdog(self) -> bool:
        """Tell systemd's watchdog the agent is alive."""
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        """Show ``text`` in ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        """Tell systemd the agent is shutting down."""
        return self.notify(STOPPING=1)

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls (half systemd's timeout), or None if no watchdog."""
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None  # the watchdog is meant for another process (e.g. our parent)
            except ValueError:
                log.warning("ignoring WATCHDOG_PID=%r: not a number", self._watchdog_pid)
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not a number", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000
