-- Signed versions (p2psync/model/attest.py). Devices sign every db version they
-- stamp; the relay checks each proof's signature against the signing keys in the
-- group's membership log, keeps the proofs beside the sealed changes, and serves
-- them with those changes, so a receiver can tell a whole version from a part.
-- root and leaves are keyed digests: the relay cannot test guesses of values.
CREATE TABLE p2p_versions (
    grp    integer NOT NULL REFERENCES p2p_groups(id),
    site   bytea   NOT NULL,
    dbv    bigint  NOT NULL,
    hlc    bigint  NOT NULL,
    count  bigint  NOT NULL,
    root   bytea   NOT NULL,
    sig    bytea   NOT NULL,
    leaves bytea   NOT NULL,
    PRIMARY KEY (grp, site, dbv)
);
