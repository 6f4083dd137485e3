-- Ready for a distributed Postgres (docs/relay.md, "Running on Citus"): every
-- table a session touches is keyed by group first, and no query on the hot
-- path spans groups. A relay process reads a group's membership mark
-- (max(id) of its events) whenever another relay process NOTIFYs a change of
-- that group; this index answers it, and the log in order, within the group.
CREATE INDEX p2p_members_by_group ON p2p_members (grp, id);
