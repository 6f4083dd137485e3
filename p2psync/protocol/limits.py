"""Wire limits: the one place that says how big anything from a peer may be.

Row-shape limits (name length, key columns, columns per change, value size)
belong to the model and are re-exported here so the codec has one source.
"""

from __future__ import annotations

from ..model.change import INT64_MAX, INT64_MIN, MAX_COLUMNS, MAX_NAME_LEN, MAX_PK_COLUMNS, MAX_VALUE_BYTES
from ..model.version_vector import SITE_ID_LEN

PROTOCOL_VERSION = 5     # 3: batches carry signed versions (proofs); 4: Hello carries checkpoints; 5: Have

FRAME_HEADER_LEN = 4                     # big-endian body length
MAX_FRAME = 16 * 1024 * 1024             # body bytes; checked before the body is buffered

MAX_BATCH_CHANGES = 100_000              # changes in one BatchEvent
MAX_BATCH_RANGES = 10_000                # ranges in one BatchEvent
MAX_BATCH_PROOFS = 110_000               # signed versions in one BatchEvent (one per version of its changes
                                         # and of its ranges)
MAX_VV_ENTRIES = 10_000                  # sites in a Hello's version vector
MAX_CHECKPOINTS = 64                     # (dbv, root) pairs of the receiver's versions in a Hello
MAX_SCHEMA_LEN = 64                      # bytes of schema fingerprint in a Hello
MAX_MEMBER_HEADS = 64                    # heads in a Members event
MAX_MEMBER_EVENTS = 10_000               # events in a Members event
MAX_MEMBER_EVENT_BYTES = 256 * 1024      # one encoded membership event
MEMBER_HASH_LEN = 32
MAX_ERROR_CODE_LEN = 64                  # chars of Error.code ([a-z0-9-])
MAX_ERROR_MESSAGE_LEN = 4096             # chars of Error.message

# Passed to msgpack.unpackb so no single container can exceed what some field
# may legitimately hold; the frame limit bounds everything else. A text or
# bytes value may be up to MAX_VALUE_BYTES long, which only a frame longer
# than that can hold, so the codec checks value lengths only in such frames.
MAX_ARRAY_LEN = max(MAX_BATCH_CHANGES, MAX_BATCH_RANGES, MAX_BATCH_PROOFS, MAX_COLUMNS, MAX_MEMBER_EVENTS)
MAX_MAP_LEN = MAX_VV_ENTRIES
MAX_BIN_LEN = MAX_FRAME
MAX_STR_LEN = MAX_FRAME

U63_MAX = INT64_MAX                      # seq, dbv, hlc, tokens, wall_ms: ints in [0, 2^63)

# ---- work and memory budgets (docs/wire-protocol.md, "Limits") ----------------
# What one peer may make us hold or compute. Over any of them the peer is sent
# an Error whose code names the limit, and the session closes; what it had
# staged is dropped, so nothing is half applied.

# Decoding. Every msgpack object takes at least one byte, so a frame can
# decode to at most as many objects as it has body bytes; bodies of at least
# LARGE_FRAME bytes are decoded in a worker thread (the event loop keeps
# serving other peers) with their objects counted as they are built; such a
# frame may hold a map only if it is a Hello (its version vector), so a flood
# of empty maps (1 byte on the wire, 64 in memory) stops at the first one.
LARGE_FRAME = 64 * 1024                  # body bytes from which a frame is decoded off the event loop
MAX_FRAME_OBJECTS = 1_000_000            # objects one frame may decode to ("frame-objects"); our own
                                         # largest batches (20,000 changes or 4 MiB, to a relay) stay
                                         # below 500,000

# Memory held for one session, counted in bytes: a batch costs its frame's body
# bytes plus CHANGE_COST per change (what a decoded change takes in Python
# beyond its wire form, measured at ~330-400 bytes).
CHANGE_COST = 400
MAX_GROUP_CHANGES = 1_000_000            # changes of one multi-part transaction staged ("staged-changes")
MAX_STAGED_BYTES = 64 * 1024 * 1024      # cost of the staged parts of one transaction ("staged-bytes")
MAX_UNACKED_BYTES = 64 * 1024 * 1024     # cost of complete batches received and not yet applied and
                                         # acked ("unacked-bytes"); our pipeline holds at most three
MAX_PROCESS_BYTES = 256 * 1024 * 1024    # all sessions of one agent or relay process together: frames
                                         # being received, staged and unacked batches ("process-memory")

__all__ = [
    "PROTOCOL_VERSION", "FRAME_HEADER_LEN", "MAX_FRAME", "MAX_BATCH_CHANGES", "MAX_BATCH_RANGES", "MAX_BATCH_PROOFS",
    "MAX_VV_ENTRIES", "MAX_SCHEMA_LEN", "MAX_MEMBER_HEADS", "MAX_MEMBER_EVENTS", "MAX_MEMBER_EVENT_BYTES", "MEMBER_HASH_LEN", "MAX_ERROR_CODE_LEN", "MAX_ERROR_MESSAGE_LEN",
    "MAX_ARRAY_LEN", "MAX_MAP_LEN", "MAX_BIN_LEN", "MAX_STR_LEN", "U63_MAX", "INT64_MIN",
    "INT64_MAX", "MAX_COLUMNS", "MAX_NAME_LEN", "MAX_PK_COLUMNS", "MAX_VALUE_BYTES", "SITE_ID_LEN",
    "LARGE_FRAME", "MAX_FRAME_OBJECTS", "CHANGE_COST", "MAX_GROUP_CHANGES", "MAX_STAGED_BYTES",
    "MAX_UNACKED_BYTES", "MAX_PROCESS_BYTES",
]
