"""What a Connection needs from whoever runs it (the agent, a relay link, a relay session).

Declared here so that ``Connection`` depends on a small, named interface
instead of reaching into the agent: the store worker it syncs through, the
change bus it waits on, the group's membership, and the callbacks through
which it reports what happened.
"""

from __future__ import annotations

from typing import Protocol

from ..group import Admission, GroupMembers
from ..model import Batch
from ..net.bus import ChangeBus


class SessionHost(Protocol):
    """The owner of one or more connections."""

    site_id: bytes
    schema: bytes
    check_schema: bool         # warn when the peer tracks another schema
    bus: ChangeBus
    worker: object             # version_vector(), apply(batch), batches(vv, n, bytes), optional prepare(batch)
    members: GroupMembers

    def wall_ms(self) -> int: ...

    def admit(self, conn) -> Admission:
        """May ``conn``'s peer (by its static key, ``conn.remote_static``) sync with us now?"""

    def on_hello(self, conn, hello) -> None: ...

    def on_applied(self, conn, batch, result) -> None: ...

    async def on_members(self, conn, decoded) -> None:
        """Events received from ``conn``'s peer, decoded (``group.members.DecodedMembers``): take them in
        with ``members.take`` before any await, then persist, pass on, re-check sessions."""

    def screen(self, conn, batch: Batch) -> Batch:
        """``batch`` without what the membership refuses (removed devices past their cap, unknown sites)."""
