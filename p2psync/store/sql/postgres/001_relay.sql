-- The relay's tables. Everything a device sends a relay is sealed (see
-- p2psync/sync/sealing.py): table "~", key (cell id), one ciphertext value.

-- Groups admitted with `p2psync relay --allow-group TOKEN`.
CREATE TABLE p2p_groups (
    id          serial PRIMARY KEY,
    ref         bytea NOT NULL UNIQUE,        -- public handle a device sends before its handshake
    token       bytea NOT NULL,               -- the group's relay credential: the Noise pre-shared key
    admitted_at timestamptz NOT NULL DEFAULT now()
);

-- The relay's own identity, shared by every relay process on this database.
CREATE TABLE p2p_meta (
    key   text PRIMARY KEY,
    value bytea NOT NULL
);

-- One row per change. ident names it within its origin write (site, dbv):
-- for a sealed change (see p2psync/sync/sealing.py) its row ref and clock,
-- and body is 0x00 followed by the sealed bytes; for any other change a
-- 16-byte hash of its table, key, columns and clock, and body is msgpack
-- [table, key, existence, columns, values]. No unique key:
-- apply drops changes the vector says are already here, and the rare
-- duplicate that gets past that is skipped when reading (see postgres.py).
CREATE TABLE p2p_changes (
    grp   integer NOT NULL REFERENCES p2p_groups(id),
    site  bytea   NOT NULL,
    dbv   bigint  NOT NULL,
    ident bytea   NOT NULL,
    hlc   bigint  NOT NULL,
    body  bytea   NOT NULL
);
CREATE INDEX p2p_changes_by_origin ON p2p_changes (grp, site, dbv);

-- What the relay holds: per group and origin site, every db version up to dbv.
CREATE TABLE p2p_vv (
    grp  integer NOT NULL REFERENCES p2p_groups(id),
    site bytea   NOT NULL,
    dbv  bigint  NOT NULL,
    PRIMARY KEY (grp, site)
);
