"""p2psync demo: three devices, one todo table, rows arriving live.

As root, the three agents run on a virtual LAN (three network namespaces on a
bridge, made by scripts/netlab) and find each other by mDNS; otherwise they
run on loopback with mDNS on 127.0.0.1. Every second a todo is written on one
device with the stdlib sqlite3 module, as an application would; the screen
shows each device's table and its peers, refreshed live. Ctrl-C stops the
agents (SIGTERM), removes the virtual LAN and exits 0.

With --relay the devices never meet: mDNS is off, no device knows another's
address, and everything goes through a `p2psync relay` process backed by a
private Postgres cluster started for the demo (the server binaries of the
Debian package postgresql are needed; scripts/setup-env installs them as root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
NAMES = ["laptop", "desktop", "tablet"]
SCHEMA = "CREATE TABLE todo(id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', done INTEGER DEFAULT 0, by TEXT)"
TODOS = ["buy milk", "call the plumber", "water the plants", "book train tickets", "fix the bike",
         "return library books", "plan the weekend", "pay the electricity bill", "bake bread"]


def p2p(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "p2psync", "--home", str(home), *args], capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """Where the agents run: a virtual LAN (root) or loopback."""

    def __init__(self, use_netns: bool):
        self.use_netns = use_netns
        self.prefix = f"p2pdemo{os.getpid()}"
        self.subnet_base = "10.78.0."
        if use_netns:
            env = dict(os.environ, NETLAB_SUBNET=self.subnet_base + "0/24")
            subprocess.run([str(ROOT / "scripts/netlab"), "up", "3", self.prefix], check=True, env=env,
                           capture_output=True)

    def address(self, i: int) -> tuple[str, int]:
        return (f"{self.subnet_base}{i + 1}", 7733) if self.use_netns else ("127.0.0.1", free_port())

    def argv(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", f"{self.prefix}-{i + 1}", *argv] if self.use_netns else argv

    def close(self) -> None:
        if self.use_netns:
            subprocess.run([str(ROOT / "scripts/netlab"), "down", self.prefix], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    ap.add_argument("--loopback", action="store_true", help="do not use network namespaces even as root")
    ap.add_argument("--relay", action="store_true",
                    help="devices that never meet, syncing only through a relay backed by Postgres")
    args = ap.parse_args()
    use_netns = (os.geteuid() == 0 and shutil.which("ip") is not None and not args.loopback and not args.relay)
    base = Path(tempfile.mkdtemp(prefix="p2psync-demo-"))
    lab = None
    procs: list[subprocess.Popen] = []
    pg = None
    try:
        lab = Lab(use_netns)
        homes, dbs = [], []
        for i, name in enumerate(NAMES):
            home, db = base / name, base / f"{name}.db"
            c = sqlite3.connect(db)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(SCHEMA)
            c.close()
            homes.append(home)
            dbs.append(db)
        enroll(base, homes, dbs)
        extra: list[str] = []
        if args.relay:
            pg, relay = start_relay(base, homes[0], procs)
            extra = ["--no-mdns", "--relay", relay]
            where = f"loopback, no mDNS, no peer addresses: only a relay at {relay} (Postgres {pg.port})"
        else:
            where = "a virtual LAN (3 network namespaces, mDNS across a bridge)" if use_netns else \
                "loopback (mDNS on 127.0.0.1)"
        print(f"p2psync demo: 3 devices on {where}; files in {base}")
        for i, home in enumerate(homes):
            host, port = lab.address(i)
            log = open(home / "agent.log", "wb")
            procs.append(subprocess.Popen(lab.argv(i, [PY, "-m", "p2psync", "--home", str(home), "run",
                                                       "--listen", f"{host}:{port}", *extra]),
                                          stdout=log, stderr=log))
        return loop(homes, dbs, procs, args.duration)
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if lab:
            lab.close()
        if pg is not None:
            pg.close()
        print(f"\nagents stopped; logs and databases are in {base}")


def enroll(base: Path, homes: list[Path], dbs: list[Path]) -> None:
    """The first device founds the group; the others join it with single-use invites, admitted by the
    first device's agent (run on loopback just for this)."""
    r = p2p(homes[0], "init", "--db", str(dbs[0]), "--name", NAMES[0])
    if r.returncode:
        raise SystemExit(r.stderr)
    port = free_port()
    log = open(base / "enroll.log", "wb")
    admin = subprocess.Popen([PY, "-m", "p2psync", "--home", str(homes[0]), "run", "--listen", f"127.0.0.1:{port}",
                              "--no-mdns"], stdout=log, stderr=log)
    try:
        for home, db, name in zip(homes[1:], dbs[1:], NAMES[1:]):
            code = p2p(homes[0], "invite", "--address", f"127.0.0.1:{port}").stdout.strip()
            r = p2p(home, "join", code, "--db", str(db), "--name", name, "--timeout", "60s")
            if r.returncode:
                raise SystemExit(f"{name} could not join: {r.stderr}")
        for home in homes:
            p2p(home, "track", "todo")
    finally:
        admin.send_signal(signal.SIGTERM)
        admin.wait(10)


def start_relay(base: Path, home: Path, procs: list) -> tuple:
    """A private Postgres cluster and a relay admitting the demo's group; (server, relay address)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pg_fixtures import PgServer, find_pg_bindir  # the test suite's private-cluster helper

    bindir = find_pg_bindir()
    if bindir is None:
        raise SystemExit("--relay needs the Postgres server binaries (Debian package postgresql)")
    pg = PgServer.start_private(bindir, fsync=True)
    try:
        dsn = pg.create_database()
        token = p2p(home, "relay-token").stdout.strip()
        port = free_port()
        log = open(base / "relay.log", "wb")
        procs.append(subprocess.Popen([PY, "-m", "p2psync", "relay", "--dsn", dsn, "--listen", f"127.0.0.1:{port}",
                                       "--allow-group", token], stdout=log, stderr=log))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or procs[-1].poll() is not None:
                    raise SystemExit(f"the relay did not start; see {base / 'relay.log'}")
                time.sleep(0.1)
    except BaseException:
        pg.close()
        raise
    return pg, f"127.0.0.1:{port}"


def status(home: Path) -> dict | None:
    r = p2p(home, "status", "--json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def loop(homes, dbs, procs, duration: float) -> int:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    start = time.monotonic()
    n = 0
    next_write = start + 1.5
    tty = sys.stdout.isatty()
    while not duration or time.monotonic() - start < duration:
        for p in procs:
            if p.poll() is not None:
                print(f"an agent exited with status {p.returncode}; see its agent.log", file=sys.stderr)
                return 1
        now = time.monotonic()
        if now >= next_write:
            i = n % len(dbs)
            c = sqlite3.connect(dbs[i])
            c.execute("INSERT INTO todo(id, title, by) VALUES (?, ?, ?)",
                      (os.urandom(8).hex(), TODOS[n % len(TODOS)], NAMES[i]))
            if n >= 3 and n % 3 == 0:  # mark an older one done, on another device
                c.execute("UPDATE todo SET done = 1 WHERE rowid = (SELECT min(rowid) FROM todo WHERE done = 0)")
            c.commit()
            c.close()
            n += 1
            next_write = now + 1.0
        screen = render(homes, dbs, n)
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n(Ctrl-C to stop)\n")
        else:
            print(screen, end="\n\n")
        sys.stdout.flush()
        time.sleep(0.5 if tty else 2.0)
    return 0


def render(homes, dbs, writes: int) -> str:
    out = [f"p2psync demo: {writes} todos written so far, one per second, rotating over the devices", ""]
    for name, home, db in zip(NAMES, homes, dbs):
        c = sqlite3.connect(db)
        rows = c.execute("SELECT title, done, by FROM todo ORDER BY rowid DESC LIMIT 4").fetchall()
        total = c.execute("SELECT count(*), sum(done) FROM todo").fetchone()
        c.close()
        st = status(home)
        peers = []
        for p in (st or {}).get("peers", []):
            label = ("relay " if p.get("relay") else "") + p["address"]
            if p["state"] == "connected":
                peers.append(f"{label} connected (seen {p['last_seen_s_ago']:.0f}s ago, "
                             f"owes {p['they_owe']}/{p['we_owe']})")
            else:
                peers.append(f"{label} {p['state']}")
        out.append(f"[{name}] {total[0]} todos, {total[1] or 0} done; peers: "
                   + ("; ".join(peers) if peers else "(searching...)"))
        for title, done, by in rows:
            out.append(f"    [{'x' if done else ' '}] {title:<28} (written on {by})")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
