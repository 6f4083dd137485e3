"""Helpers shared by the benchmarks: timing, medians, devices and agent processes."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def median(xs):
    return statistics.median(xs)


def line(name: str, value: str, ratio: str = "", note: str = "") -> None:
    """One result line: figure, ratio to baseline, note."""
    print(f"  {name:<46} {value:>18}  {ratio:<26} {note}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, check: bool = True) -> str:
    r = subprocess.run([PY, "-m", "p2psync", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"p2psync {' '.join(args)} failed: {r.stderr}")
    return r.stdout


class Device:
    """A device home + database, created through the CLI."""

    def __init__(self, base: Path, name: str, schema: str, tables: list[str], admin: "Device | None" = None):
        """A new device: the founder of a new group, or (``admin`` given) a member admitted by ``admin``."""
        self.home = base / f"home-{name}"
        self.db = base / f"{name}.db"
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        c = sqlite3.connect(self.db)
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(schema)
        c.close()
        if admin is None:
            cli("--home", str(self.home), "init", "--db", str(self.db), "--name", name)
        else:
            running = admin.proc is not None and admin.proc.poll() is None
            if not running:
                admin.start()
            try:
                code = cli("--home", str(admin.home), "invite", "--address", f"127.0.0.1:{admin.port}").strip()
                cli("--home", str(self.home), "join", code, "--db", str(self.db), "--name", name, "--timeout", "60s")
            finally:
                if not running:
                    admin.stop()
        cli("--home", str(self.home), "track", *tables)

    def start(self, peers: list[int] = (), extra: list[str] = ()) -> None:
        args = [PY, "-m", "p2psync", "--home", str(self.home), "run", "--listen", f"127.0.0.1:{self.port}",
                "--no-mdns", "--log-level", "warning", *extra]
        for p in peers:
            args += ["--peer", f"127.0.0.1:{p}"]
        self.log = open(self.home / "agent.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)

    def status(self) -> dict | None:
        r = subprocess.run([PY, "-m", "p2psync", "--home", str(self.home), "status", "--json"],
                           capture_output=True, text=True)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def wait_connected(self, n: int, timeout: float = 20) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            st = self.status()
            if st and sum(p["state"] == "connected" for p in st["peers"]) >= n:
                return time.perf_counter() - t0
            time.sleep(0.02)
        raise TimeoutError(f"{self.home}: not connected to {n} peers")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def count_rows(db: Path, table: str = "t") -> int:
    """Rows in ``table`` of the SQLite file ``db``, read with a connection of its own."""
    c = sqlite3.connect(db)
    try:
        return c.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    finally:
        c.close()


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    return 0.0
