-- Signed membership (docs/membership.md). A group is admitted with the hash of
-- its found event, which pins its founding admin; from then on the relay keeps
-- the group's membership log and admits a device by its static key when that
-- log lists it as a current member. Every table is keyed by group first.
ALTER TABLE p2p_groups ADD COLUMN group_id bytea;
ALTER TABLE p2p_groups ADD COLUMN found bytea;

-- The relay reads events' public parts (site ids, public keys, roles, signatures);
-- names and secrets inside them are sealed to members.
CREATE TABLE p2p_members (
    grp   integer NOT NULL REFERENCES p2p_groups(id),
    id    bigserial,
    hash  bytea   NOT NULL,
    data  bytea   NOT NULL,
    PRIMARY KEY (grp, hash)
);
