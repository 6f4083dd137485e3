"""The relay process's Postgres connections: one bounded pool, shared by every session and group.

How this works: a ``psycopg_pool.ConnectionPool`` of at most ``size``
connections (autocommit, ``application_name`` p2psync-relay, so an operator
can count them in ``pg_stat_activity``). Every store call borrows one for
the length of one transaction and gives it back: a session that is idle or
stalled holds none. ``connection()`` waits up to ``wait`` seconds for one;
past that (the pool is exhausted for that long, or Postgres is down) it
raises ``StoreError`` saying so. The relay keeps sessions from queueing in
threads here: it admits at most ``size`` store calls at a time
(``slots``, a trio limiter the relay owns), so a call that gets a slot
normally finds a connection at once. The backend pids of the pool's open
connections are remembered (``own_pid``), so the relay can tell its own
NOTIFYs from other relay processes'.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from contextlib import contextmanager

import psycopg

from .errors import StoreError

log = logging.getLogger("p2psync.relay")

APPLICATION_NAME = "p2psync-relay"
DEFAULT_SIZE = 10         # connections per relay process (Postgres' default max_connections is 100)
CONNECTION_WAIT = 30.0    # s a store call waits for a connection before it fails with a StoreError


def dsn_for_humans(dsn: str) -> str:
    """``dsn`` with any password masked."""
    return re.sub(r"(password=)\S+", r"\1***", re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", dsn))


class RelayPool:
    """At most ``size`` Postgres connections for one relay process."""

    def __init__(self, dsn: str, size: int = DEFAULT_SIZE, *, wait: float = CONNECTION_WAIT,
                 application_name: str = APPLICATION_NAME):
        from psycopg_pool import ConnectionPool

        if size < 1:
            raise ValueError(f"a relay needs at least one pooled Postgres connection (got {size})")
        self.dsn, self.size, self.wait = dsn, size, wait
        self._pids: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()
        self.borrowed = 0          # connections handed out, in all (a figure for benchmarks and tests)
        self._pool = ConnectionPool(dsn, min_size=min(2, size), max_size=size, open=False, timeout=wait,
                                    name=application_name, configure=self._configure,
                                    kwargs={"autocommit": True, "connect_timeout": 10,
                                            "application_name": application_name})
        self._pool.open(wait=False)

    def _configure(self, conn: psycopg.Connection) -> None:
        with self._lock:
            self._pids = {p: r for p, r in self._pids.items() if (c := r()) is not None and not c.closed}
            self._pids[conn.info.backend_pid] = weakref.ref(conn)

    def own_pid(self, pid: int) -> bool:
        """Is ``pid`` the backend of one of this pool's open connections?"""
        with self._lock:
            ref = self._pids.get(pid)
        conn = ref() if ref is not None else None
        return conn is not None and not conn.closed

    @contextmanager
    def connection(self):
        """A connection outside any transaction, for the length of the block (blocking)."""
        from psycopg_pool import PoolTimeout

        try:
            conn = self._pool.getconn()
        except PoolTimeout as e:
            raise StoreError(f"no Postgres connection within {self.wait:g} s ({dsn_for_humans(self.dsn)}, pool of "
                             f"{self.size}): Postgres is down or unreachable, or the pool is exhausted") from e
        self.borrowed += 1
        try:
            yield conn
        finally:
            self._pool.putconn(conn)   # a broken one is discarded and replaced

    def statistics(self) -> dict:
        return dict(self._pool.get_stats())

    def close(self) -> None:
        self._pool.close()


__all__ = ["RelayPool", "APPLICATION_NAME", "DEFAULT_SIZE", "CONNECTION_WAIT", "dsn_for_humans"]
