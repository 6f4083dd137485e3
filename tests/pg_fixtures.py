"""Postgres for tests: a pytest plugin (loaded by ``pytest_plugins`` in conftest.py).

How it works:

* If ``P2PSYNC_TEST_DSN`` is set, it names an existing server (an admin DSN whose
  role may CREATE DATABASE); tests use it and it is never started, stopped or
  restarted (``can_restart`` is False).
* Otherwise the session-scoped ``pg_server`` fixture starts one private cluster
  for the whole pytest session: ``initdb`` into a fresh ``/tmp/p2psync-pg-*``
  directory, trust auth, listening only on 127.0.0.1 on a free port, its unix
  socket inside that directory. Binaries come from PATH (``initdb``/``pg_ctl``)
  or else the highest ``/usr/lib/postgresql/*/bin``. As root, initdb and pg_ctl
  run as the ``postgres`` user via ``runuser``; the test process itself
  connects over TCP as the database user ``postgres``. Settings favour speed
  (``fsync=off``; set ``P2PSYNC_TEST_PG_FSYNC=on`` to keep fsync). At session
  end the cluster is stopped with ``pg_ctl stop -m fast`` (then ``-m
  immediate``, then SIGKILL to the postmaster's PID) and the directory removed.
* Without a DSN or binaries, ``pg_server`` calls ``require(False, ...)``: a skip
  on a laptop, a failure under CI=true.
* ``pg_dsn`` gives each test a fresh database (its DSN) and drops it afterwards.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import require

NO_SERVER = "no Postgres server: install the Debian package postgresql or set P2PSYNC_TEST_DSN"
START_TIMEOUT = 30.0


def find_pg_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then the highest /usr/lib/postgresql/N/bin."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda d: [int(x) for x in re.findall(r"\d+", Path(d).parent.name)] or [0], reverse=True)
    candidates += [Path(d) for d in versioned]
    for d in candidates:
        if os.access(d / "initdb", os.X_OK) and os.access(d / "pg_ctl", os.X_OK):
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgStartError(RuntimeError):
    """The private cluster did not come up; the message carries the server log's tail."""


class PgServer:
    """A Postgres server for tests: a private cluster (``start_private``) or an external one (``external``)."""

    def __init__(self, admin_dsn: str, *, host: str, port: int, bindir: Path | None = None,
                 base: Path | None = None):
        self.admin_dsn, self.host, self.port = admin_dsn, host, port
        self.bindir, self.base = bindir, base  # base is None for an external server
        self._created: set[str] = set()
        self._restrict_key: str | None | bool = False  # False: not yet probed

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def external(cls, admin_dsn: str) -> "PgServer":
        from psycopg.conninfo import conninfo_to_dict
        params = conninfo_to_dict(admin_dsn)
        return cls(admin_dsn, host=str(params.get("host", "")), port=int(params.get("port") or 5432),
                   bindir=find_pg_bindir())

    @classmethod
    def start_private(cls, bindir: Path, *, fsync: bool = False) -> "PgServer":
        base = Path(tempfile.mkdtemp(prefix="p2psync-pg-", dir="/tmp"))
        os.chmod(base, 0o711)  # o+x so the postgres user can reach its data dir
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")
        server = cls("", host="127.0.0.1", port=0, bindir=bindir, base=base)
        try:
            server._initdb(fsync)
            for attempt in range(3):  # the free port can be taken between probe and bind
                server.port = _free_port()
                server.admin_dsn = server.dsn("postgres")
                conf = base / "data" / "p2psync_test.conf"
                conf.write_text(f"port = {server.port}\n")
                if os.geteuid() == 0:  # root's umask may hide it from the server
                    shutil.chown(conf, "postgres", "postgres")
                try:
                    server.start()
                    break
                except PgStartError as e:
                    if attempt == 2 or "Address already in use" not in str(e):
                        raise
        except BaseException:
            server.close()
            raise
        atexit.register(server.close)  # in case the session ends without fixture teardown
        return server

    def _as_owner(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a server binary as the cluster's owner (postgres when we are root)."""
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise PgStartError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}{self.log_tail()}")
        return r

    def _initdb(self, fsync: bool) -> None:
        data = self.base / "data"
        self._as_owner("initdb", "-D", str(data), "-U", "postgres", "-E", "UTF8", "--locale=C",
                       "--auth=trust", "--no-sync", "--no-instructions")
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "fsync": "on" if fsync else "off",
            "synchronous_commit": "on" if fsync else "off",
            "full_page_writes": "on" if fsync else "off",
            "logging_collector": "off",
        }
        with open(data / "postgresql.conf", "a") as f:
            f.write("\n# p2psync tests\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
            f.write("include_if_exists = 'p2psync_test.conf'\n")  # holds the port

    # --- DSNs and databases -------------------------------------------------------------------

    def dsn(self, dbname: str) -> str:
        if self.base is None:
            from psycopg.conninfo import make_conninfo
            return make_conninfo(self.admin_dsn, dbname=dbname)
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=10"

    def _admin(self):
        import psycopg
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def create_database(self) -> str:
        """Create a fresh, uniquely named database; returns its DSN."""
        from psycopg import sql
        name = f"p2psync_test_{uuid.uuid4().hex[:12]}"
        with self._admin() as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._created.add(name)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Terminate the database's backends, then drop it (no error if it is gone)."""
        from psycopg import sql
        with self._admin() as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            force = sql.SQL(" WITH (FORCE)") if c.info.server_version >= 130000 else sql.SQL("")
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)) + force)
        self._created.discard(name)

    def pg_dump(self, dsn: str) -> str:
        """Plain-text dump (schema and data) of the database ``dsn`` names."""
        tool = None
        if self.bindir and os.access(self.bindir / "pg_dump", os.X_OK):
            tool = str(self.bindir / "pg_dump")
        tool = tool or shutil.which("pg_dump") or ("/usr/bin/pg_dump" if os.path.exists("/usr/bin/pg_dump") else None)
        require(tool is not None, "pg_dump is not installed (Debian package postgresql-client)")
        argv = [tool, "--no-owner", "--no-privileges"]
        if self._restrict_key is False:  # recent point releases write a random \restrict key: fix it
            helptext = subprocess.run([tool, "--help"], capture_output=True, text=True).stdout
            self._restrict_key = "p2psynctest" if "--restrict-key" in helptext else None
        if self._restrict_key:
            argv.append(f"--restrict-key={self._restrict_key}")
        r = subprocess.run([*argv, "-d", dsn], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"pg_dump failed ({r.returncode}): {r.stderr}")
        return r.stdout

    # --- lifecycle (private cluster only) -----------------------------------------------------

    @property
    def can_restart(self) -> bool:
        return self.base is not None

    def _require_private(self) -> None:
        if not self.can_restart:
            raise RuntimeError("an external server (P2PSYNC_TEST_DSN) cannot be stopped or restarted")

    def log_tail(self, lines: int = 30) -> str:
        log = self.base / "server.log" if self.base else None
        if not log or not log.exists():
            return ""
        return "\n--- server log (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        self._require_private()
        self._as_owner("pg_ctl", "-D", str(self.base / "data"), "-l", str(self.base / "server.log"),
                       "-w", "-t", str(int(START_TIMEOUT)), "start", timeout=START_TIMEOUT + 10)
        import psycopg  # pg_ctl -w checked the unix socket; make sure TCP answers too
        deadline, last = time.monotonic() + START_TIMEOUT, None
        while time.monotonic() < deadline:
            try:
                psycopg.connect(self.admin_dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError as e:
                last = e
                time.sleep(0.1)
        raise PgStartError(f"Postgres on 127.0.0.1:{self.port} does not accept connections: {last}{self.log_tail()}")

    def stop(self) -> None:
        self._require_private()
        data = self.base / "data"
        if not (data / "postmaster.pid").exists():
            return
        for mode in ("fast", "immediate"):
            if self._as_owner("pg_ctl", "-D", str(data), "-m", mode, "-w", "-t", "30", "stop",
                              check=False).returncode == 0:
                return
        try:  # last resort: the postmaster by its PID, if that PID is still our postmaster
            pid = int((data / "postmaster.pid").read_text().split()[0])
            if str(data).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and delete a private cluster; drop leftover test databases on an external server."""
        if self.base is None:
            for name in list(self._created):
                try:
                    self.drop_database(name)
                except Exception:
                    pass
            return
        if self.base.exists():
            try:
                self.stop()
            finally:
                shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    require(importlib.util.find_spec("psycopg") is not None, "psycopg is not installed (pip install -e '.[relay]')")
    external = os.environ.get("P2PSYNC_TEST_DSN")
    if external:
        server = PgServer.external(external)
    else:
        bindir = find_pg_bindir()
        require(bindir is not None, NO_SERVER)
        if os.geteuid() == 0:
            try:
                import pwd
                pwd.getpwnam("postgres")
            except KeyError:
                require(False, "running as root but there is no postgres user (Debian package postgresql)")
        fsync = os.environ.get("P2PSYNC_TEST_PG_FSYNC", "off").lower() in ("1", "on", "true", "yes")
        server = PgServer.start_private(bindir, fsync=fsync)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_dsn(pg_server):
    """DSN of a fresh database for this test; dropped afterwards."""
    from psycopg.conninfo import conninfo_to_dict
    dsn = pg_server.create_database()
    yield dsn
    pg_server.drop_database(conninfo_to_dict(dsn)["dbname"])
