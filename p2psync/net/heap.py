"""Giving memory a hostile peer made us allocate back to the system (glibc only; elsewhere a no-op).

A refused 16 MiB frame or a dropped staged transaction frees its Python
objects at once, but glibc keeps the freed pages in its heaps, and every
decoding thread gets a heap (an "arena") of its own: the resident size of an
agent under a flood of maximum-size frames grew by ~170 MB and stayed there.
So the process uses at most ``ARENAS`` arenas, and once a session that
received large frames ends, ``trim_soon`` asks glibc (off the event loop, at
most once per ``TRIM_INTERVAL``) to return its free pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import trio

ARENAS = 2
TRIM_INTERVAL = 2.0      # seconds between two trims at most
_M_ARENA_MAX = -8        # mallopt parameter (malloc.h)

_libc = None
_last_trim = 0.0


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim, libc.mallopt   # glibc has both; musl and macOS do not
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def limit_arenas() -> None:
    """Cap glibc's heaps at ARENAS (call once, before decoding threads start)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, ARENAS)


async def trim_soon() -> None:
    """Return free heap pages to the system, unless that was done in the last TRIM_INTERVAL."""
    global _last_trim
    libc = _glibc()
    now = time.monotonic()
    if libc is None or now - _last_trim < TRIM_INTERVAL:
        return
    _last_trim = now
    await trio.to_thread.run_sync(libc.malloc_trim, 0)   # ctypes lets go of the GIL meanwhile
