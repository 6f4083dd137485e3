"""Real agents as subprocesses on loopback: what a user of `p2psync run` sees.

Applications write with stdlib ``sqlite3``; the agents (``python -m p2psync
run``) find each other through ``--peer`` addresses on 127.0.0.1. See
``agents.py`` for the fixture.
"""

from __future__ import annotations

import json
import threading
import time

from agents import lab, pair, wait_until  # noqa: F401  (lab is a fixture)

INSERT = "INSERT INTO items(id, name, qty, note) VALUES (?, ?, ?, ?)"




def test_rows_updates_and_deletes_propagate_both_ways(lab):
    a, b = lab.devices(2)

    res = a.cli("status", check=False)
    assert res.returncode == 1
    assert "no agent is running" in res.stderr
    res = a.cli("status", "--json", check=False)
    assert res.returncode == 1 and "no agent is running" in res.stderr

    lab.start(a, peers=[b])
    lab.start(b, peers=[a])
    lab.wait_connected(a, b)

    a.transaction([(INSERT, (i, f"a{i}", i, None)) for i in range(1, 6)])
    wait_until(lambda: len(b.rows()) == 5, what="A's rows on B")
    assert b.rows() == a.rows()

    b.execute(INSERT, (10, "from b", 7, "x"))
    wait_until(lambda: a.row(10) == (10, "from b", 7, "x"), what="B's row on A")

    a.execute("UPDATE items SET qty = 70 WHERE id = 10")          # A updates B's row
    b.execute("UPDATE items SET name = 'renamed' WHERE id = 1")   # B updates A's row
    wait_until(lambda: b.row(10) == (10, "from b", 70, "x"), what="A's update on B")
    wait_until(lambda: a.row(1) == (1, "renamed", 1, None), what="B's update on A")

    a.execute("DELETE FROM items WHERE id = 10")
    b.execute("DELETE FROM items WHERE id IN (2, 3)")
    final = lab.wait_converged(a, b)
    assert [r[0] for r in final] == [1, 4, 5]
    assert a.rows() == b.rows() == final

    res = a.cli("status", "--json")
    st = json.loads(res.stdout)
    assert st["device"]["name"] == "A" and st["tracked"] == ["items"]
    peers = [p for p in st["peers"] if p.get("site") == b.site]
    assert len(peers) == 1
    assert peers[0]["state"] == "connected"
    assert peers[0]["we_owe"] == 0 and peers[0]["they_owe"] == 0
    text = b.cli("status").stdout
    assert "connected" in text and "we owe 0" in text and "they owe 0" in text

    lab.stop(a)
    res = a.cli("status", check=False)
    assert res.returncode == 1 and "no agent is running" in res.stderr


def test_concurrent_conflicting_writes_converge(lab):
    a, b = pair(lab)
    a.execute(INSERT, (1, "start", 0, None))
    wait_until(lambda: b.row(1) is not None, what="row 1 on B")

    rounds = 6
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(dev, tag):
        try:
            for r in range(rounds):
                barrier.wait(10)
                dev.execute("UPDATE items SET name = ?, qty = qty + 1 WHERE id = 1", (f"{tag}{r}",))
                dev.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?)", (100 + r, f"{tag}{r}", r, tag))
                if r % 2:
                    dev.execute("DELETE FROM items WHERE id = ?", (100 + r - 1,))
                barrier.wait(10)
                time.sleep(0.02)  # the next round is later in wall-clock time than this one on both sides
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(d, d.name)) for d in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors

    final = lab.wait_converged(a, b)
    assert a.rows() == b.rows() == final
    last = rounds - 1
    row1 = a.row(1)
    assert row1[1] in (f"A{last}", f"B{last}"), row1      # the last round's write wins
    assert a.row(100 + last)[1] in (f"A{last}", f"B{last}")
    assert all(a.row(100 + r) is None for r in range(0, rounds, 2) if r + 1 < rounds)


def test_offline_writes_on_both_sides_converge_after_restart(lab):
    a, b = pair(lab)
    a.transaction([(INSERT, (i, f"base{i}", i, None)) for i in range(1, 11)])
    lab.wait_converged(a, b)
    lab.stop(a)
    lab.stop(b)

    a.execute("UPDATE items SET name = 'A offline' WHERE id = 1")
    a.execute("DELETE FROM items WHERE id = 2")
    a.execute(INSERT, (50, "A's 50", 1, "a"))
    a.execute("UPDATE items SET qty = 333 WHERE id = 3")
    time.sleep(0.02)  # B's writes are later in wall-clock time
    b.execute("UPDATE items SET name = 'B offline' WHERE id = 1")
    b.execute("DELETE FROM items WHERE id = 4")
    b.execute(INSERT, (50, "B's 50", 2, "b"))
    b.execute("UPDATE items SET note = 'b note' WHERE id = 3")
    b.transaction([(INSERT, (i, f"b{i}", i, "bulk")) for i in range(60, 80)])

    lab.start(a)
    lab.start(b)
    final = lab.wait_converged(a, b)
    assert a.rows() == b.rows() == final
    rows = {r[0]: r for r in final}
    assert rows[1][1] == "B offline"                    # later write wins
    assert 2 not in rows and 4 not in rows              # deletes on either side
    assert rows[50] == (50, "B's 50", 2, "b")           # later insert of the same key wins
    assert rows[3] == (3, "base3", 333, "b note")       # different columns: both updates kept
    assert all(i in rows for i in range(60, 80))


def test_sigterm_exits_cleanly_and_killed_peer_catches_up(lab):
    a, b = pair(lab)
    assert a.control_socket.exists()

    started = time.monotonic()
    lab.stop(a)                     # SIGTERM: exit status 0 (checked by stop)
    assert time.monotonic() - started < 10
    assert not a.control_socket.exists(), "agent left its control socket behind"

    lab.start(a)
    lab.wait_connected(a, b)
    a.execute(INSERT, (1, "before crash", 1, None))
    wait_until(lambda: b.row(1) is not None, what="row 1 on B")

    lab.kill(b)                     # SIGKILL: no clean-up, the socket file stays
    a.transaction([(INSERT, (i, f"while B was down {i}", i, None)) for i in range(2, 102)])
    a.execute("UPDATE items SET name = 'changed while B was down' WHERE id = 1")
    b.execute(INSERT, (500, "B offline", 0, None))

    lab.start(b)                    # replaces the stale control socket
    final = lab.wait_converged(a, b)
    assert len(final) == 102
    assert b.row(1)[1] == "changed while B was down"
    assert a.row(500) == (500, "B offline", 0, None)


def test_three_agent_chain_forwards(lab):
    a, b, c = lab.devices(3)
    lab.start(a, peers=[b])
    lab.start(b, peers=[a, c])
    lab.start(c, peers=[b])
    lab.wait_connected(a, b, c)
    assert a.connected_peer(c) is None and c.connected_peer(a) is None  # C does not know A

    a.execute(INSERT, (1, "from A", 1, None))
    wait_until(lambda: c.row(1) == (1, "from A", 1, None), what="A's row on C")
    c.execute("UPDATE items SET note = 'from C' WHERE id = 1")
    wait_until(lambda: a.row(1) == (1, "from A", 1, "from C"), what="C's update on A")
    final = lab.wait_converged(a, b, c)
    assert a.rows() == b.rows() == c.rows() == final


def test_large_transaction_arrives_whole(lab):
    a, b = pair(lab)
    n = 2000   # about 2 MB: more than one batch's worth of bytes, so it travels in several parts
    a.transaction([(INSERT, (i, f"row {i}", i, "n" * 1000)) for i in range(1, n + 1)])

    seen = set()
    deadline = time.monotonic() + 30
    conn = b.connect()
    try:
        while time.monotonic() < deadline:
            count = conn.execute("SELECT count(*) FROM items").fetchone()[0]
            seen.add(count)
            if count == n:
                break
    finally:
        conn.close()
    assert seen <= {0, n}, f"receiver saw a partial transaction: counts {sorted(seen)}"
    assert n in seen, "the transaction did not arrive"
    final = lab.wait_converged(a, b)
    assert len(final) == n
