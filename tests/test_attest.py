"""The rules of model/attest.py, on the code that runs in production (pure: no store, no network)."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync.model import Batch, Change, Range
from p2psync.model.attest import Signer, Verifier, attest, cell_key, leaf_hasher
from p2psync.model.membership import public_keys

GROUP = b"G" * 16
KEY = cell_key(GROUP, b"s" * 32)
HASH = leaf_hasher(KEY)


def dev(name: str) -> tuple[bytes, bytes]:
    site = hashlib.blake2b(name.encode(), digest_size=16).digest()
    return site, hashlib.sha256(name.encode()).digest()


A, B = dev("A"), dev("B")
SIGNERS = {site: Signer(GROUP, site, private, KEY) for site, private in (A, B)}
VERIFIER = Verifier(GROUP, {site: public_keys(private) for site, private in (A, B)})


def version(site: bytes, dbv: int, rows: list[tuple]) -> list[Change]:
    return [Change("t", (k,), site, dbv, 1000 + dbv, True, ("v",), (v,)) for k, v in rows]


def signed(changes: list[Change], *, leaves: bool = False):
    s = SIGNERS[changes[0].site]
    p = s.sign(changes[0].dbv, max(c.hlc for c in changes), [x for c in changes for x in s.leaves(c)])
    return p if leaves else p.without_leaves()


rows = st.lists(st.tuples(st.integers(0, 50), st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.text(max_size=5), st.none())),
                min_size=1, max_size=8, unique_by=lambda r: r[0])


@settings(max_examples=200, deadline=None)
@given(rows)
def test_a_whole_signed_version_is_applied_and_moves_the_vector(rs):
    cs = version(A[0], 3, rs)
    out = attest(Batch(tuple(cs), (Range(A[0], 2, 3),), (signed(cs),)), VERIFIER, HASH)
    assert out.batch.changes == tuple(cs) and out.batch.ranges == (Range(A[0], 2, 3),)
    assert not out.refused and not out.cut and len(out.proofs) == 1 and out.proofs[0].leaves  # leaves filled in


@settings(max_examples=200, deadline=None)
@given(rows, st.data())
def test_an_altered_or_missing_cell_is_refused_and_the_range_cut(rs, data):
    cs = version(A[0], 3, rs)
    proof = signed(cs)
    i = data.draw(st.integers(0, len(cs) - 1))
    if data.draw(st.booleans()) or len(cs) == 1:
        bad = list(cs)
        bad[i] = bad[i]._replace(values=("altered " + repr(bad[i].values[0]),))
    else:
        bad = cs[:i] + cs[i + 1:]
    out = attest(Batch(tuple(bad), (Range(A[0], 2, 3),), (proof,)), VERIFIER, HASH)
    assert out.batch.changes == () and out.batch.ranges == ()
    assert out.refused == {A[0]: len(bad)} and out.cut == {A[0]: (3, 2)}


def test_a_partial_version_with_its_leaves_is_applied():
    cs = version(A[0], 3, [(1, "a"), (2, "b"), (3, "c")])
    out = attest(Batch(tuple(cs[:2]), (Range(A[0], 2, 3),), (signed(cs, leaves=True),)), VERIFIER, HASH)
    assert out.batch.changes == tuple(cs[:2]) and not out.refused and not out.cut


def test_a_change_under_another_sites_id_or_signed_by_another_key_is_refused():
    cs = version(A[0], 3, [(1, "a")])
    by_b = SIGNERS[B[0]].sign(3, 1003, [x for c in cs for x in HASH(c)])._replace(site=A[0]).without_leaves()
    out = attest(Batch(tuple(cs), (), (by_b,)), VERIFIER, HASH)
    assert out.batch.changes == () and out.refused == {A[0]: 1}
    out = attest(Batch(tuple(cs), (), ()), VERIFIER, HASH)
    assert out.batch.changes == () and out.refused == {A[0]: 1}


def test_a_range_moves_only_up_to_a_signed_version():
    empty = Batch((), (Range(A[0], 0, (1 << 63) - 1),))
    out = attest(empty, VERIFIER, HASH)
    assert out.batch.ranges == () and out.cut == {A[0]: ((1 << 63) - 1, 0)}
    # a range ending past the last version the batch (or the store) attests stops there
    v1, v2 = version(A[0], 1, [(1, "a")]), version(A[0], 2, [(2, "b")])
    out = attest(Batch(tuple(v1 + v2), (Range(A[0], 0, 9),), (signed(v1), signed(v2))), VERIFIER, HASH)
    assert out.batch.ranges == (Range(A[0], 0, 2),) and out.cut == {A[0]: (9, 2)}
    out = attest(Batch(tuple(v1 + v2), (Range(A[0], 0, 9),), (signed(v1), signed(v2))), VERIFIER, HASH,
                 known=lambda s, d: b"r" * 32 if d == 9 else None)
    assert out.batch.ranges == (Range(A[0], 0, 9),)


def test_a_version_that_fails_stops_the_range_before_it():
    v1, v2, v3 = (version(A[0], d, [(d, "x")]) for d in (1, 2, 3))
    bad = [v2[0]._replace(values=("forged",))]
    out = attest(Batch(tuple(v1 + bad + v3), (Range(A[0], 0, 3),), (signed(v1), signed(v2), signed(v3))),
                 VERIFIER, HASH)
    assert out.batch.ranges == (Range(A[0], 0, 1),) and set(out.batch.changes) == set(v1 + v3)


def test_two_contents_signed_for_one_version_are_a_conflict():
    mine, theirs = version(A[0], 4, [(1, "here")]), version(A[0], 4, [(1, "on the clone")])
    stored = signed(mine).root
    out = attest(Batch(tuple(theirs), (Range(A[0], 3, 4),), (signed(theirs),)), VERIFIER, HASH,
                 known=lambda s, d: stored if d == 4 else None)
    assert out.batch.changes == () and len(out.conflicts) == 1 and "two different versions" in out.reasons[0]


def test_a_relay_checks_signatures_and_ranges_but_not_sealed_cells():
    cs = version(A[0], 3, [(1, "a")])
    out = attest(Batch(tuple(cs), (Range(A[0], 2, 3),), (signed(cs),)), VERIFIER, None)
    assert out.batch.changes == tuple(cs) and not out.cut
    out = attest(Batch(tuple(cs), (Range(A[0], 2, 3),), ()), VERIFIER, None)
    assert out.batch.changes == () and out.cut == {A[0]: (3, 2)}


# ---- with stores (SQLite files), signing as agents do -------------------------------------

def test_a_value_written_behind_captures_back_is_not_sent_and_the_rest_of_its_version_is(tmp_path, caplog):
    """Triggers dropped, a row changed, triggers back: the sender finds the cell no longer matches what
    it signed, leaves it out (logged) and sends the rest of the version with its leaves -- the receiver
    refuses nothing, so an honest session is never taken for a forger's."""
    import sqlite3

    from p2psync.store import SqliteStore
    from storeutil import SigningGroup, transfer

    group = SigningGroup()
    stores = []
    for name, site in (("a", b"A" * 16), ("b", b"B" * 16)):
        db = tmp_path / f"{name}.db"
        c = sqlite3.connect(db)
        c.executescript("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
        c.close()
        s = group.arm(SqliteStore(db, site))
        s.track("t")
        stores.append(s)
    a, b = stores
    # the application, through apsw here: closing a stdlib sqlite3 connection would drop the locks of
    # the store's apsw connections to the same file (two SQLite libraries in one process)
    import apsw
    app = apsw.Connection(str(a.path))
    app.execute("BEGIN; INSERT INTO t VALUES (1, 'one'); INSERT INTO t VALUES (2, 'two'); COMMIT;")
    a.stamp(1_700_000_000_000)
    # behind capture's back: no trigger logs this update (a tool that dropped and recreated them)
    sql = app.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = '_p2p_upd_t'").fetchall()[0][0]
    app.execute(f"DROP TRIGGER _p2p_upd_t; UPDATE t SET v = 'changed unseen' WHERE id = 2; {sql};")
    app.close()
    with caplog.at_level("WARNING", logger="p2psync.store"):
        results = transfer(a, b, 1_700_000_000_000)
    assert all(not r.refused and not r.cut for r in results)
    assert "no longer hold what was signed" in caplog.text
    def b_rows():   # through B's own (apsw) connection: a second SQLite library on an open file breaks its locks
        return b.conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()

    assert b_rows() == [(1, "one"), (2, None)]   # row 2 exists; its altered cell is not sent under the old signature
    assert [f.updated for f in a.reconcile(1_700_000_000_001)] == [1]   # ... but as A's new write
    transfer(a, b, 1_700_000_000_001)
    assert b_rows() == [(1, "one"), (2, "changed unseen")]
    a.close()
    b.close()


def test_a_proof_that_does_not_verify_is_counted_and_one_nothing_needs_is_not_checked():
    cs = version(A[0], 3, [(1, "a")])
    good = signed(cs)
    forged = good._replace(signature=bytes(64))
    out = attest(Batch(tuple(cs), (), (forged,)), VERIFIER, HASH)
    assert out.bad_proofs == 1 and out.refused == {A[0]: 1}
    unrelated = signed(version(B[0], 9, [(5, "b")]))._replace(signature=bytes(64))
    out = attest(Batch(tuple(cs), (), (good, unrelated)), VERIFIER, HASH)
    assert out.bad_proofs == 0 and out.batch.changes == tuple(cs)   # not needed by the batch: never verified


def test_a_version_signed_by_a_device_not_in_the_log_yet_waits_and_is_no_forgery():
    """A Members push can trail the batch that needs it (found by the six-agent mesh test: a device that
    joined while others were joining took its peers' versions for forgeries and closed every session)."""
    cs = version(A[0], 3, [(1, "a")])
    p = signed(cs)
    stranger = Verifier(VERIFIER.group, {})
    out = attest(Batch(tuple(cs), (Range(A[0], 2, 3),), (p,)), stranger, HASH)
    assert out.bad_proofs == 0                       # nothing says the sender forged anything
    assert out.refused == {A[0]: 1} and not out.batch.changes   # but nothing unchecked is applied
    assert out.cut                                   # and no vector moves over it
    assert any("not in the membership log" in r for r in out.reasons)


def test_signed_zero_is_one_leaf_as_capture_sees_no_change_between_them():
    """An update of -0.0 to 0.0 is no change to SQLite's IS (capture logs nothing), yet the stored value
    changes: the leaf must not tell them apart, or an honest version would fail its own check later.
    (Found by the convergence property test with signing on.)"""
    neg = Change("t", (1,), A[0], 3, 1003, True, ("v",), (-0.0,))
    assert HASH(neg) == HASH(neg._replace(values=(0.0,)))
    out = attest(Batch((neg._replace(values=(0.0,)),), (Range(A[0], 2, 3),), (signed([neg]),)), VERIFIER, HASH)
    assert not out.refused and not out.cut
