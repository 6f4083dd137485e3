"""Real p2psync agents as subprocesses on loopback, for integration tests.

Use the ``lab`` fixture (import it into the test module)::

    from agents import lab  # noqa: F401  (the fixture)

    def test_x(lab):
        a, b = lab.devices(2)                 # one group, table ``items`` tracked
        lab.start(a, peers=[b]); lab.start(b, peers=[a])
        lab.wait_connected(a, b)
        a.execute("INSERT INTO items(id, name) VALUES (1, 'x')")
        wait_until(lambda: b.rows() == a.rows())

Devices are made with the CLI (``init``, ``invite``, ``join``, ``track``) in
the test's tmp dir; the application's tables are created and written with
stdlib ``sqlite3`` from this process (agents use apsw in their own process,
so no process holds two copies of SQLite on one file). Every agent is
``python -m p2psync run --listen 127.0.0.1:PORT --peer ... --no-mdns`` with its
stderr appended to ``<device>/agent.log``; each device keeps its port for
life, so a restarted agent is found again by its peers. Ports are chosen up
front below the kernel's ephemeral range, so no outgoing connection can take
one between choosing and binding it.

``lab.close()`` (the fixture's teardown) ends every process the lab started,
by PID, and prints each agent's log; pytest shows that output only for a
failing test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from p2psync.agent.control import ControlError, request

PYTHON = sys.executable
SCHEMA = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, note TEXT)"
START_TIMEOUT = 20.0
SYNC_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 150


def wait_until(predicate: Callable[[], Any], timeout: float = SYNC_TIMEOUT, interval: float = 0.02,
               what: str | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


# ---- ports ------------------------------------------------------------------

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def terminate(proc: subprocess.Popen, timeout: float, what: str) -> int:
    """SIGTERM ``proc`` by PID and return its exit status; SIGKILL and AssertionError after ``timeout`` s."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{what} did not exit within {timeout:g} s of SIGTERM") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses now and that outgoing connections never take."""
    high = min(_ephemeral_low(), 65536) - 1
    low = 20000 if high > 21000 else 1024
    for _ in range(500):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


# ---- a device ---------------------------------------------------------------

@dataclass
class Device:
    """One member of the group: its home, database, port and (while running) its agent process."""

    name: str
    home: Path
    db: Path
    port: int
    log_path: Path
    site: str = ""
    proc: subprocess.Popen | None = None
    peers: list[Device] = field(default_factory=list)
    relay: str | None = None          # HOST:PORT of the relay the agent keeps a session with
    exit_codes: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Device({self.name}, port {self.port}, pid {self.proc.pid if self.proc else None})"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name}: no agent started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def control_socket(self) -> Path:
        return self.home / "agent.sock"

    # -- the CLI --------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """``p2psync --home HOME ARGS...``; AssertionError (with its output) if ``check`` and it fails."""
        argv = [PYTHON, "-m", "p2psync", "--home", str(self.home), *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} on {self.name} exited {res.returncode}\n"
                                 f"stdout: {res.stdout}\nstderr: {res.stderr}")
        return res

    def status(self) -> dict:
        """The running agent's status, as ``p2psync status --json`` prints it (asked in-process: fast)."""
        reply = request(self.control_socket, {"cmd": "status"}, timeout=5.0)
        assert "error" not in reply, reply
        return reply

    def try_status(self) -> dict | None:
        try:
            return self.status()
        except (ControlError, OSError):
            return None

    def connected_peer(self, other: Device) -> dict | None:
        """The status entry of ``other`` if the agent is connected to it and has its Hello."""
        st = self.try_status()
        if st is None:
            return None
        for p in st["peers"]:
            if p.get("state") == "connected" and p.get("site") == other.site:
                return p
        return None

    def counters(self) -> dict:
        return self.status()["counters"]

    # -- the application's database (stdlib sqlite3) -------------------------

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db, timeout=30, isolation_level=None)

    def execute(self, sql: str, params: Iterable = ()) -> None:
        """One statement in its own transaction."""
        with _closing(self.connect()) as c:
            c.execute(sql, tuple(params))

    def transaction(self, statements: Iterable[tuple[str, Iterable]]) -> None:
        """Several statements committed as one transaction."""
        with _closing(self.connect()) as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    c.execute(sql, tuple(params))
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with _closing(self.connect()) as c:
            return c.execute(sql, tuple(params)).fetchall()

    def rows(self, table: str = "items") -> list[tuple]:
        """Every row of ``table`` ordered by its first column (``id`` for items)."""
        return self.query(f'SELECT * FROM "{table}" ORDER BY 1')

    def row(self, key: int, table: str = "items") -> tuple | None:
        found = self.query(f'SELECT * FROM "{table}" WHERE id = ?', (key,))
        return found[0] if found else None

    # -- process facts ----------------------------------------------------------

    def rss_bytes(self) -> int:
        """The agent's resident memory (VmRSS of /proc/PID/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS in /proc/{self.pid}/status")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class _closing:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc) -> None:
        self.conn.close()


# ---- the lab ----------------------------------------------------------------

class Lab:
    """Devices of one sync group in a directory, and the agent processes started for them."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.env = dict(env or {})
        self.all: list[Device] = []
        self._procs: list[subprocess.Popen] = []
        self._signalled: set[int] = set()
        self.founder: Device | None = None

    # -- making devices -------------------------------------------------------

    def devices(self, n: int, schema: str = SCHEMA, tables: Iterable[str] = ("items",)) -> list[Device]:
        """``n`` new devices of this lab's group (the first ever made creates it), tables tracked.

        Joins are real: a device joins with a single-use invite code from the
        group's first device, whose agent admits it over loopback (the agent is
        started for the joins if it is not running, and stopped again after).
        """
        tables = list(tables)
        names = [chr(ord("A") + len(self.all) + i) for i in range(n)]
        made = [self._new_device(name, schema) for name in names]
        todo = made
        if self.founder is None:
            first = self.founder = made[0]
            first.cli("init", "--db", str(first.db), "--name", first.name)
            self._finish(first, tables)
            todo = made[1:]
        if todo:
            self.join(todo, tables)
        self.all += made
        return made

    def invite(self, admin: Device | None = None, *args: str) -> str:
        """A new single-use invite code from ``admin`` (default: the founder), reachable at its port."""
        admin = admin or self.founder
        return admin.cli("invite", "--address", admin.address, *args).stdout.strip()

    def join(self, devices: list[Device], tables: Iterable[str] = ("items",), admin: Device | None = None) -> None:
        """Join ``devices`` through ``admin``'s agent (started for the purpose if needed)."""
        admin = admin or self.founder
        started = not admin.running
        if started:
            self.start(admin, peers=admin.peers)
        try:
            codes = [self.invite(admin) for _ in devices]
            with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
                list(pool.map(lambda dc: self._join(dc[0], dc[1], list(tables)), zip(devices, codes)))
        finally:
            if started:
                self.stop(admin)

    def _new_device(self, name: str, schema: str) -> Device:
        d = self.root / name
        d.mkdir(parents=True)
        dev = Device(name, d / "home", d / f"{name}.db", free_port(), d / "agent.log")
        with _closing(sqlite3.connect(dev.db)) as c:
            c.executescript(schema)
        return dev

    def _join(self, dev: Device, code: str, tables: list[str]) -> None:
        dev.cli("join", code, "--db", str(dev.db), "--name", dev.name, "--timeout", "30s")
        self._finish(dev, tables)

    @staticmethod
    def _finish(dev: Device, tables: list[str]) -> None:
        if tables:
            dev.cli("track", *tables)
        dev.site = json.loads((dev.home / "device.json").read_text())["site_id"]

    # -- agents -----------------------------------------------------------------

    def start(self, dev: Device, peers: Iterable[Device] | None = None, env: dict[str, str] | None = None,
              wait: bool = True, relay: str | None = None) -> Device:
        """Start ``dev``'s agent dialling ``peers`` and ``relay`` (default: what it had last time)."""
        assert not dev.running, f"{dev.name}: agent already running (pid {dev.pid})"
        if peers is not None:
            dev.peers = list(peers)
        if relay is not None:
            dev.relay = relay
        argv = [PYTHON, "-m", "p2psync", "--home", str(dev.home), "run", "--listen", dev.address, "--no-mdns"]
        for p in dev.peers:
            argv += ["--peer", p.address]
        if dev.relay:
            argv += ["--relay", dev.relay]
        with open(dev.log_path, "a") as log:
            log.write(f"===== {time.strftime('%H:%M:%S')} start: {' '.join(argv[2:])}\n")
            log.flush()
            dev.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        env={**os.environ, **self.env, **(env or {})})
        self._procs.append(dev.proc)
        if wait:
            self.wait_running(dev)
        return dev

    def wait_running(self, dev: Device, timeout: float = START_TIMEOUT) -> None:
        """Until the agent answers on its control socket (it listens on its port by then)."""
        def up():
            if not dev.running:
                raise AssertionError(f"agent {dev.name} exited with {dev.proc.returncode} while starting:\n"
                                     f"{_tail(dev.log())}")
            return dev.try_status()
        wait_until(up, timeout, interval=0.05, what=f"agent {dev.name} to answer `status`")

    def stop(self, dev: Device, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the agent by PID; it must exit with status 0 within ``timeout`` s."""
        assert dev.running, f"{dev.name}: agent not running"
        self._signalled.add(dev.pid)
        code = terminate(dev.proc, timeout, f"agent {dev.name}")
        dev.exit_codes.append(code)
        assert code == 0, f"agent {dev.name} exited with {code} on SIGTERM:\n{_tail(dev.log())}"
        return code

    def kill(self, dev: Device) -> None:
        """SIGKILL the agent by PID (a crash: no clean-up at all)."""
        assert dev.running, f"{dev.name}: agent not running"
        self._signalled.add(dev.pid)
        dev.proc.send_signal(signal.SIGKILL)
        dev.exit_codes.append(dev.proc.wait(STOP_TIMEOUT))

    # -- waiting ------------------------------------------------------------------

    def check_alive(self) -> None:
        """AssertionError (with its log) if an agent exited without being told to."""
        for d in self.all:
            if d.proc is not None and d.proc.poll() is not None and d.proc.pid not in self._signalled:
                raise AssertionError(f"agent {d.name} exited on its own with status {d.proc.returncode}:\n"
                                     f"{_tail(d.log(), 40)}")

    def wait_connected(self, *devices: Device, timeout: float = SYNC_TIMEOUT) -> None:
        """Until each consecutive pair of ``devices`` is connected, as seen by both ends' status."""
        for a, b in zip(devices, devices[1:]):
            wait_until(lambda: self.check_alive() or (a.connected_peer(b) and b.connected_peer(a)),
                       timeout, interval=0.05,
                       what=f"{a.name} and {b.name} to be connected")

    def wait_settled(self, *devices: Device, timeout: float = SYNC_TIMEOUT) -> None:
        """Until the devices are pairwise connected and none has a dialer still trying.

        A dialer for a static peer learns the peer's key only from its own
        first handshake; if it is backing off while the peer dials in, it
        connects later and the duplicate replaces one of the two links. Tests
        that assert the link is never interrupted wait for that to be over.
        """
        self.wait_connected(*devices, timeout=timeout)

        def settled() -> bool:
            for d in devices:
                st = d.try_status()
                if st is None or any(p.get("state") != "connected" for p in st["peers"]):
                    return False
            return all(a.connected_peer(b) for a in devices for b in devices if a is not b)
        wait_until(lambda: self.check_alive() or settled(), timeout, interval=0.05,
                   what="every dialer to be connected")

    def converged(self, devices: Iterable[Device], table: str = "items") -> bool:
        """All tables equal, and every agent owes/is owed nothing by the peers it is connected to."""
        self.check_alive()
        devices = list(devices)
        first = devices[0].rows(table)
        if any(d.rows(table) != first for d in devices[1:]):
            return False
        for d in devices:
            st = d.try_status()
            if st is None:
                return False
            for p in st["peers"]:
                if p.get("state") == "connected" and (p.get("we_owe") or p.get("they_owe")):
                    return False
        return True

    def wait_converged(self, *devices: Device, table: str = "items", timeout: float = SYNC_TIMEOUT) -> list:
        wait_until(lambda: self.converged(devices, table), timeout, interval=0.05,
                   what=f"{', '.join(d.name for d in devices)} to converge on {table}")
        return devices[0].rows(table)

    # -- teardown -------------------------------------------------------------------

    def close(self) -> None:
        """End every process this lab started (by PID) and print the agents' logs.

        AssertionError afterwards if an agent had exited on its own (a crash).
        """
        crashed = [f"pid {p.pid} exited with {p.returncode}" for p in self._procs
                   if p.poll() is not None and p.pid not in self._signalled]
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in self._procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
        self.print_logs()
        assert not crashed, f"agents exited without being told to: {', '.join(crashed)}"

    def print_logs(self, since: dict[str, int] | None = None) -> None:
        for d in self.all:
            text = d.log()[(since or {}).get(d.name, 0):]
            if text:
                print(f"----- agent {d.name} ({d.log_path}) -----")
                print(_tail(text))

    def log_offsets(self) -> dict[str, int]:
        return {d.name: len(d.log()) for d in self.all}


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    parts = text.splitlines()
    skipped = len(parts) - lines
    return ("[... %d lines]\n" % skipped if skipped > 0 else "") + "\n".join(parts[-lines:])


@pytest.fixture
def lab(tmp_path):
    """A Lab in the test's tmp dir; every agent it started is ended afterwards."""
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def pair(lab: Lab) -> list[Device]:
    """Two devices whose agents dial each other, connected."""
    a, b = lab.devices(2)
    lab.start(a, peers=[b])
    lab.start(b, peers=[a])
    lab.wait_connected(a, b)
    return [a, b]
