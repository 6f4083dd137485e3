"""A restored database continues under a new site id: every write on every device survives.

Real agents on loopback (tests/agents.py), the real `p2psync backup` and `restore`
commands, the application writing with stdlib sqlite3 before and after the agent
starts on the restored database.
"""

from __future__ import annotations

import sqlite3

import pytest

from agents import lab, pair, wait_until  # noqa: F401  (lab is a fixture)

INSERT = "INSERT INTO items(id, name, qty, note) VALUES (?, ?, ?, ?)"




def conflicts(dev) -> int:
    """Versions some peer signed twice with different contents, as this device saw them."""
    with sqlite3.connect(dev.db) as c:
        return c.execute("SELECT count(*) FROM _p2p_version_conflicts").fetchone()[0]


@pytest.mark.parametrize("app_first", [True, False], ids=["app-writes-before-agent", "agent-starts-first"])
def test_a_restored_backup_loses_no_write_on_any_device(lab, tmp_path, app_first):
    a, b = pair(lab)
    a.transaction([(INSERT, (i, f"before backup {i}", i, None)) for i in range(1, 11)])
    lab.wait_converged(a, b)
    backup = tmp_path / "a-backup.db"
    a.cli("backup", str(backup))
    a.transaction([(INSERT, (i, f"after backup {i}", i, None)) for i in range(11, 21)])
    b.execute(INSERT, (100, "written on B", 1, None))
    lab.wait_converged(a, b)
    old_site = a.status()["device"]["site"]
    lab.stop(a)
    a.cli("restore", str(backup))
    assert [r[0] for r in a.query("SELECT id FROM items WHERE id > 10")] == []   # the restore wiped them here

    def write_after_restore():
        a.transaction([(INSERT, (i, f"after restore {i}", i, None)) for i in range(21, 26)])
        a.execute("UPDATE items SET note = 'edited after restore' WHERE id = 1")

    if app_first:
        write_after_restore()
    lab.start(a, peers=[b])
    if not app_first:
        write_after_restore()
    final = lab.wait_converged(a, b)
    ids = {r[0] for r in final}
    assert ids == set(range(1, 26)) | {100}, sorted(ids)          # before, after the backup, after the restore, B's
    assert {r[0]: r for r in final}[1][3] == "edited after restore"
    st = a.status()
    assert st["device"]["site"] != old_site
    assert "continues as a new site id" in (st.get("incarnation") or ""), st.get("incarnation")
    assert conflicts(a) == 0 and conflicts(b) == 0                # no db version was used for two contents
    # and it keeps syncing as the new site, both ways
    a.execute(INSERT, (200, "later on A", 1, None))
    b.execute(INSERT, (201, "later on B", 1, None))
    final = lab.wait_converged(a, b)
    assert {200, 201} <= {r[0] for r in final}


def test_a_restart_on_the_same_database_keeps_its_site_id(lab):
    a, b = pair(lab)
    a.execute(INSERT, (1, "x", 1, None))
    lab.wait_converged(a, b)
    site = a.status()["device"]["site"]
    lab.stop(a)
    a.execute(INSERT, (2, "written while stopped", 1, None))
    lab.start(a, peers=[b])
    lab.wait_converged(a, b)
    assert a.status()["device"]["site"] == site and a.status().get("incarnation") is None


def test_a_copied_home_and_database_both_running_lose_no_write(lab, tmp_path):
    """A's home and database copied to a second location (as to a new machine) while A is stopped; both run.

    On one machine the copy cannot have the same paths, so here it differs by its paths and database
    file; a copy made to another machine differs by its machine id too (identity/succession.py)."""
    import json
    import shutil

    from agents import Device, free_port

    a, b = pair(lab)
    a.transaction([(INSERT, (i, f"shared {i}", i, None)) for i in range(1, 6)])
    lab.wait_converged(a, b)
    lab.stop(a)
    root = tmp_path / "copy"
    root.mkdir()
    shutil.copytree(a.home, root / "home")
    shutil.copy(a.db, root / "A2.db")
    info = json.loads((root / "home" / "device.json").read_text())
    info["db_path"] = str(root / "A2.db")
    (root / "home" / "device.json").write_text(json.dumps(info))
    copy = Device("A2", root / "home", root / "A2.db", free_port(), root / "agent.log")
    lab.all.append(copy)
    lab.start(a, peers=[b])
    lab.start(copy, peers=[b, a])
    a.transaction([(INSERT, (i, f"on A {i}", i, None)) for i in range(100, 150)])
    copy.transaction([(INSERT, (i, f"on the copy {i}", i, None)) for i in range(200, 250)])
    final = lab.wait_converged(a, b, copy)
    ids = {r[0] for r in final}
    assert set(range(100, 150)) | set(range(200, 250)) <= ids
    assert a.status()["device"]["site"] != copy.status()["device"]["site"]
    assert "copied" in (copy.status().get("incarnation") or "")
    # the copy notices at its start; the original, once the copy's successor retires their common site id
    assert "a copy of this device" in (a.status().get("incarnation") or "")
    assert conflicts(a) == conflicts(b) == conflicts(copy) == 0


def authenticity_conflicts(dev) -> list:
    return dev.status()["authenticity"]["conflicts"]


def test_a_vm_rolled_back_with_its_home_loses_no_write(lab, tmp_path):
    """Database and home rolled back together (a VM snapshot): locally nothing looks wrong; the peer
    holds this device's later versions, so it continues under a new site id and gets them back."""
    import shutil

    a, b = pair(lab)
    a.transaction([(INSERT, (i, f"before the snapshot {i}", i, None)) for i in range(1, 6)])
    lab.wait_converged(a, b)
    lab.stop(a)
    snap = tmp_path / "snapshot"
    shutil.copytree(a.home, snap / "home")
    shutil.copy(a.db, snap / "a.db")
    lab.start(a, peers=[b])
    a.transaction([(INSERT, (i, f"after the snapshot {i}", i, None)) for i in range(10, 20)])
    lab.wait_converged(a, b)
    lab.stop(a)
    shutil.rmtree(a.home)
    shutil.copytree(snap / "home", a.home)
    for suffix in ("-wal", "-shm"):
        (a.db.parent / (a.db.name + suffix)).unlink(missing_ok=True)
    shutil.copy(snap / "a.db", a.db)
    # the rolled-back machine writes before and after its agent meets the peer
    a.transaction([(INSERT, (i, f"after the rollback {i}", i, None)) for i in range(30, 35)])
    lab.start(a, peers=[b])
    a.execute(INSERT, (40, "later", 1, None))
    final = lab.wait_converged(a, b)
    ids = {r[0] for r in final}
    assert set(range(1, 6)) | set(range(10, 20)) | set(range(30, 35)) | {40} <= ids, sorted(ids)
    assert "rolled back" in (a.status().get("incarnation") or "")
    assert authenticity_conflicts(a) == [] and authenticity_conflicts(b) == []


def test_a_peers_checkpoints_count_only_with_this_devices_own_signature(tmp_path):
    """A member (or anyone in a session) claiming in its Hello that our versions have other contents
    must not make us give up our site id and re-stamp: only a proof we signed ourselves does."""
    from p2psync.model.attest import Signer
    from p2psync.store import SqliteStore
    from storeutil import SigningGroup, _private_of

    db = tmp_path / "a.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT)")
    c.close()
    group = SigningGroup()
    a = group.arm(SqliteStore(db, b"A" * 16))
    try:
        a.track("items")
        for i in range(3):
            a.conn.execute("INSERT INTO items VALUES (?, 'x')", (i,))
            a.stamp(1_700_000_000_000 + i)
        real = {p.dbv: p for p in a.proofs(a.site_id)}
        top = max(real)
        forged = [(top, 1, 1, b"x" * 32, b"y" * 64), (top + 5, 1, 1, b"x" * 32, b"y" * 64)]
        assert a.split_point(forged) is None                      # unsigned claims move nothing
        stranger = Signer(group.GROUP, a.site_id, _private_of(b"M" * 16), group.key)  # a member's key, our site id
        p = stranger.sign(top, 1, [b"z" * 32])
        assert a.split_point([(top, p.hlc, p.count, p.root, p.signature)]) is None
        mine = Signer(group.GROUP, a.site_id, _private_of(a.site_id), group.key)
        other = mine.sign(top, 1, [b"z" * 32])                    # a copy of us signed another content
        shared = real[top - 1]
        assert a.split_point([(top, other.hlc, other.count, other.root, other.signature),
                              (shared.dbv, shared.hlc, shared.count, shared.root, shared.signature)]) == top - 1
        assert a.split_point([(d, p.hlc, p.count, p.root, p.signature) for d, p in real.items()]) is None
        assert a.checkpoints(a.site_id, top)[0][0] == top
    finally:
        a.close()
