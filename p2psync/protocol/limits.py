"""Wire limits: the one place that says how big anything from a peer may be.

Row-shape limits (name length, key columns, columns per change, value size)
belong to the model and are re-exported here so the codec has one source.
"""

from __future__ import annotations

from ..model.change import INT64_MAX, INT64_MIN, MAX_COLUMNS, MAX_NAME_LEN, MAX_PK_COLUMNS, MAX_VALUE_BYTES
from ..model.version_vector import SITE_ID_LEN

PROTOCOL_VERSION = 2

FRAME_HEADER_LEN = 4                     # big-endian body length
MAX_FRAME = 16 * 1024 * 1024             # body bytes; checked before the body is buffered

MAX_BATCH_CHANGES = 100_000              # changes in one BatchEvent
MAX_BATCH_RANGES = 10_000                # ranges in one BatchEvent
MAX_VV_ENTRIES = 10_000                  # sites in a Hello's version vector
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
MAX_ARRAY_LEN = max(MAX_BATCH_CHANGES, MAX_BATCH_RANGES, MAX_COLUMNS, MAX_MEMBER_EVENTS)
MAX_MAP_LEN = MAX_VV_ENTRIES
MAX_BIN_LEN = MAX_FRAME
MAX_STR_LEN = MAX_FRAME

U63_MAX = INT64_MAX                      # seq, dbv, hlc, tokens, wall_ms: ints in [0, 2^63)

__all__ = [
    "PROTOCOL_VERSION", "FRAME_HEADER_LEN", "MAX_FRAME", "MAX_BATCH_CHANGES", "MAX_BATCH_RANGES",
    "MAX_VV_ENTRIES", "MAX_SCHEMA_LEN", "MAX_MEMBER_HEADS", "MAX_MEMBER_EVENTS", "MAX_MEMBER_EVENT_BYTES", "MEMBER_HASH_LEN", "MAX_ERROR_CODE_LEN", "MAX_ERROR_MESSAGE_LEN",
    "MAX_ARRAY_LEN", "MAX_MAP_LEN", "MAX_BIN_LEN", "MAX_STR_LEN", "U63_MAX", "INT64_MIN",
    "INT64_MAX", "MAX_COLUMNS", "MAX_NAME_LEN", "MAX_PK_COLUMNS", "MAX_VALUE_BYTES", "SITE_ID_LEN",
]
