"""The Postgres test fixtures: fresh databases are usable and isolated, and data survives a restart."""

from __future__ import annotations

import psycopg

from conftest import require



def test_fresh_database_is_usable(pg_dsn, pg_server):
    with psycopg.connect(pg_dsn) as c:
        c.execute("CREATE TABLE t(id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        assert c.execute("SELECT v FROM t ORDER BY id").fetchall() == [("one",), ("two",)]
    dump = pg_server.pg_dump(pg_dsn)
    assert "CREATE TABLE public.t" in dump and "one" in dump
    assert pg_server.pg_dump(pg_dsn) == dump  # deterministic: comparable across calls


def test_fresh_databases_are_isolated(pg_server):
    a, b = pg_server.create_database(), pg_server.create_database()
    try:
        assert a != b
        with psycopg.connect(a) as c:
            c.execute("CREATE TABLE t(v text)")
            c.execute("INSERT INTO t VALUES ('only in a')")
        with psycopg.connect(b) as c:
            assert c.execute("SELECT to_regclass('public.t')").fetchone() == (None,)
    finally:
        for dsn in (a, b):
            pg_server.drop_database(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def test_restart_keeps_committed_data(pg_dsn, pg_server):
    require(pg_server.can_restart, "an external server (P2PSYNC_TEST_DSN) cannot be restarted")
    with psycopg.connect(pg_dsn) as c:
        c.execute("CREATE TABLE t(v text)")
        c.execute("INSERT INTO t VALUES ('before restart')")
    port = pg_server.port
    pg_server.restart()
    assert pg_server.port == port  # DSNs handed out earlier stay valid
    with psycopg.connect(pg_dsn) as c:
        assert c.execute("SELECT v FROM t").fetchall() == [("before restart",)]
