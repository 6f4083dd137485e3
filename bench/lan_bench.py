"""LAN figures on a virtual LAN (network namespaces on a bridge, root only): discovery to connected,
commit-to-visible latency across three hosts, idle cost of a connected agent.

Agents run as ``p2psync run --listen <namespace ip>:7733`` with mDNS on and no
static peer, one per namespace of a lab made by scripts/netlab; the lab is
removed at the end even on failure. Status is read through each agent's control
socket (in its home directory, which namespaces do not separate), databases
with stdlib sqlite3 from this process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from p2psync.agent.control import ControlError, request

from .common import PY, ROOT, Device, cpu_ticks, line, median, rss_mb

SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL);"
NETLAB = ROOT / "scripts" / "netlab"
SUBNET_BASE = "10.76.0"          # private; exists only inside the lab's namespaces
PORT = 7733
PREFIX_RE = re.compile(r"^(p2pb(\d+))-(?:br|\d+)$")

SYNCTHING_CONNECT_S = 6.5        # NOTES.md: Syncthing 1.19, two namespaces, LAN discovery
SYNCTHING_IDLE_CPU_PCT = 0.07
SYNCTHING_RSS_MB = "49-52"

# The TCP round trip between two hosts of the lab, measured inside them.
ECHO_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while d := c.recv(100):
    c.sendall(d)
"""
ECHO_CLIENT = r"""
import socket, statistics, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
xs = []
for i in range(int(sys.argv[3])):
    t0 = time.perf_counter(); c.sendall(b"x"); c.recv(1); xs.append(time.perf_counter() - t0)
print(statistics.median(xs[20:]))
"""


class Lab:
    """A virtual LAN of ``n`` hosts made with scripts/netlab; ``close()`` kills what runs in it and removes it."""

    def __init__(self, n: int) -> None:
        _reap_stale()
        self.prefix = f"p2pb{os.getpid()}"
        self.env = {**os.environ, "NETLAB_SUBNET": f"{SUBNET_BASE}.0/24"}
        self.n = n
        self.procs: list[subprocess.Popen] = []
        r = subprocess.run(["bash", str(NETLAB), "up", str(n), self.prefix], capture_output=True, text=True,
                           env=self.env, timeout=60)
        if r.returncode:
            self.close()
            raise RuntimeError(f"scripts/netlab up failed: {r.stderr.strip()}")

    def ip(self, k: int) -> str:
        return f"{SUBNET_BASE}.{k}"

    def argv(self, k: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", f"{self.prefix}-{k}", *argv]

    def run(self, k: int, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(k, argv), **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        _down(self.prefix, self.env)


def _down(prefix: str, env=None) -> None:
    """Kill (by PID) whatever still runs in the lab's namespaces, then delete them."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in (ln.split(" ", 1)[0] for ln in out.splitlines()):
        if ns.startswith(prefix + "-"):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
    subprocess.run(["bash", str(NETLAB), "down", prefix], capture_output=True, env=env, timeout=60)


def _reap_stale() -> None:
    """Remove labs left by bench runs that were killed (their pid, in the prefix, is gone)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ln in out.splitlines():
        m = PREFIX_RE.match(ln.split(" ", 1)[0])
        if m and not Path(f"/proc/{m.group(2)}").exists():
            _down(m.group(1))


# ---- agents ----------------------------------------------------------------------

def site(d: Device) -> str:
    return json.loads((d.home / "device.json").read_text())["site_id"]


def start(lab: Lab, d: Device, k: int) -> None:
    """Start ``d``'s agent in host ``k``: its address, mDNS on, no static peer."""
    assert d.proc is None or d.proc.poll() is not None
    d.log = open(d.home / "agent.log", "ab")
    d.proc = lab.run(k, [PY, "-m", "p2psync", "--home", str(d.home), "run", "--listen", f"{lab.ip(k)}:{PORT}",
                         "--log-level", "warning"], stdin=subprocess.DEVNULL, stdout=d.log, stderr=d.log)


def status(d: Device) -> dict | None:
    try:
        reply = request(d.home / "agent.sock", {"cmd": "status"}, timeout=2.0)
    except (ControlError, OSError):
        return None
    return None if "error" in reply else reply


def connected_sites(d: Device) -> set[str]:
    st = status(d)
    return {p.get("site") for p in st["peers"] if p["state"] == "connected"} if st else set()


def wait(predicate, timeout: float, what: str, interval: float = 0.005):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if v := predicate():
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def check_running(*devices: Device) -> None:
    for d in devices:
        if d.proc is not None and d.proc.poll() is not None:
            raise RuntimeError(f"agent {d.home} exited with {d.proc.returncode}; see {d.home / 'agent.log'}")


# ---- figures -------------------------------------------------------------------

def connect_time(base: Path, runs: int = 3) -> None:
    lab = Lab(2)
    a = Device(base, "CA", SCHEMA, ["t"])
    b = Device(base, "CB", SCHEMA, ["t"], admin=a)
    sa, sb = site(a), site(b)
    total, after_ready = [], []
    try:
        for _ in range(runs):
            start(lab, a, 1)
            wait(lambda: status(a), 20, "A to start")
            time.sleep(1.0)                              # A settled: advertising, browsing
            t0 = time.perf_counter()
            start(lab, b, 2)
            t_ready = wait(lambda: status(b) and time.perf_counter(), 20, "B to start")
            wait(lambda: check_running(a, b) or (sb in connected_sites(a) and sa in connected_sites(b)),
                 20, "A and B to connect")
            t1 = time.perf_counter()
            total.append(t1 - t0)
            after_ready.append(t1 - t_ready)
            b.stop()
            a.stop()
    finally:
        a.stop()
        b.stop()
        lab.close()
    t = median(total)
    print("discovery on a virtual LAN (2 namespaces on a bridge, mDNS, no static peers)")
    line("Syncthing 1.19: start -> connected (LAN disc.)", f"{SYNCTHING_CONNECT_S:.1f} s", "anchor")
    line(f"start 2nd agent -> both connected, median of {runs}", f"{t:.3f} s",
         f"{t / SYNCTHING_CONNECT_S:.2f}x Syncthing",
         f"target <= 0.5 s; of which process start-up to answering status {t - median(after_ready):.3f} s")


def latency(base: Path, samples: int = 100) -> None:
    lab = Lab(3)
    devs = [Device(base, "LA", SCHEMA, ["t"])]
    devs += [Device(base, n, SCHEMA, ["t"], admin=devs[0]) for n in ("LB", "LC")]
    a, b, c = devs
    sites = {d: site(d) for d in devs}
    try:
        for k, d in enumerate(devs, 1):
            start(lab, d, k)
        wait(lambda: check_running(*devs) or all(
            {sites[o] for o in devs if o is not d} <= connected_sites(d) for d in devs), 30, "the mesh")
        rtt = _tcp_rtt(lab)
        app = sqlite3.connect(a.db, isolation_level=None)
        readers = [sqlite3.connect(d.db) for d in (b, c)]
        lat = []
        for i in range(samples + 5):
            key = 1_000_000 + i
            t0 = time.perf_counter()
            app.execute("INSERT INTO t VALUES (?, 'lat', 1, 1.0)", (key,))
            pending = list(readers)
            deadline = t0 + 10
            while pending:
                pending = [r for r in pending if not r.execute("SELECT 1 FROM t WHERE id = ?", (key,)).fetchone()]
                if pending:
                    if time.perf_counter() > deadline:
                        check_running(*devs)
                        raise TimeoutError(f"row {key} not on both peers after 10 s")
                    time.sleep(0.0002)
            if i >= 5:                                    # the first few warm the path up
                lat.append(time.perf_counter() - t0)
            time.sleep(0.02)
        app.close()
        for r in readers:
            r.close()
    finally:
        for d in devs:
            d.stop()
        lab.close()
    lat.sort()
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print("latency on a virtual LAN (3 namespaces, one agent each)")
    line("raw TCP round trip between two namespaces", f"{rtt * 1000:.3f} ms", "baseline", "median of 200")
    line(f"commit on A -> visible on B and C, p50 ({len(lat)})", f"{p50 * 1000:.1f} ms",
         f"{p50 / rtt:.0f}x TCP RTT", "target <= 10 ms")
    line(f"commit on A -> visible on B and C, p99 ({len(lat)})", f"{p99 * 1000:.1f} ms",
         f"{p99 / rtt:.0f}x TCP RTT", "target <= 50 ms")


def _tcp_rtt(lab: Lab) -> float:
    port = PORT + 1
    srv = lab.run(2, [PY, "-c", ECHO_SERVER, lab.ip(2), str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        out = subprocess.run(lab.argv(1, [PY, "-c", ECHO_CLIENT, lab.ip(2), str(port), "220"]),
                             capture_output=True, text=True, timeout=60, check=True)
        return float(out.stdout)
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


def idle(base: Path, seconds: float) -> None:
    lab = Lab(3)
    devs = [Device(base, "IA", SCHEMA, ["t"])]
    devs += [Device(base, n, SCHEMA, ["t"], admin=devs[0]) for n in ("IB", "IC")]
    a = devs[0]
    sites = {d: site(d) for d in devs}
    try:
        for k, d in enumerate(devs, 1):
            start(lab, d, k)
        wait(lambda: check_running(*devs) or {sites[o] for o in devs[1:]} <= connected_sites(a), 30,
             "A to connect to B and C")
        time.sleep(2.0)                                   # start-up work done
        pid = a.proc.pid                                  # ip netns exec execs: this is the agent
        assert "p2psync" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        hz = os.sysconf("SC_CLK_TCK")
        c0, t0 = cpu_ticks(pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_ticks(pid), time.monotonic()
        check_running(*devs)
        rss = rss_mb(pid)
        still = len({sites[o] for o in devs[1:]} & connected_sites(a))
    finally:
        for d in devs:
            d.stop()
        lab.close()
    cpu = (c1 - c0) / hz / (t1 - t0) * 100
    print(f"idle on a virtual LAN (agent with 2 connected peers, {seconds:g} s)")
    line("Syncthing 1.19 idle CPU", f"{SYNCTHING_IDLE_CPU_PCT:.2f} %", "anchor")
    line("idle CPU (one core)", f"{cpu:.3f} %", f"{cpu / SYNCTHING_IDLE_CPU_PCT:.1f}x Syncthing",
         f"target <= 0.1 %; {c1 - c0} ticks of 1/{hz} s; {still} peers still connected")
    line("Syncthing 1.19 RSS", f"{SYNCTHING_RSS_MB} MB", "anchor")
    line("idle RSS", f"{rss:.1f} MB", f"{rss / 50.5:.2f}x Syncthing", "target <= 50 MB")


def run(idle_seconds: float = 60.0) -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("ip") is None:
        print("lan: skipped: needs root and iproute2 (network namespaces); run `sudo .venv/bin/python -m bench lan`")
        return
    for figure in (connect_time, latency, lambda base: idle(base, idle_seconds)):
        with tempfile.TemporaryDirectory(prefix="p2psync-lan-bench-") as tmp:
            figure(Path(tmp))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of the idle measurement (default 60)")
    run(ap.parse_args().idle)
