"""Scale figures on a virtual LAN (root only): meshes of 10 and 50 real agents found by mDNS.

For each mesh: single-row writes from every device in turn, each timed from its commit until it
is visible on every other device (read with stdlib sqlite3 from this process); receipts of each
write per device (the agents' ``versions_received`` counters); agent CPU per write (all agents'
CPU time over the writes, from /proc); idle CPU per agent once connected. Baselines measured in
the same run: the same figures on a LAN of 2, and the mesh of 10 with forwarding all eager
(``P2PSYNC_FORWARD_DELAY=0``: every device forwards what it gets at once, the behaviour before
lazy forwarding). The relay's scale figures are ``scripts/bench relay-scale``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from .common import PY, Device, cpu_ticks, line, rss_mb
from .lan_bench import PORT, SCHEMA, Lab, check_running, connected_sites, site, status, wait


class Mesh:
    """``n`` agents, one per host of a virtual LAN, joined to one group."""

    def __init__(self, base: Path, n: int, env: dict[str, str] | None = None):
        self.lab = Lab(n)
        self.env = {**os.environ, **(env or {})}
        admin = Device(base, "M0", SCHEMA, ["t"])
        admin.start()
        try:
            others = [Device(base, f"M{i}", SCHEMA, ["t"], admin=admin) for i in range(1, n)]
        finally:
            admin.stop()
        self.devices = [admin] + others
        self.sites = {d.home: site(d) for d in self.devices}

    def start(self) -> None:
        for k, d in enumerate(self.devices, 1):
            d.log = open(d.home / "agent.log", "ab")
            d.proc = self.lab.run(k, [PY, "-m", "p2psync", "--home", str(d.home), "run", "--listen",
                                      f"{self.lab.ip(k)}:{PORT}", "--log-level", "warning"],
                                  stdin=__import__("subprocess").DEVNULL, stdout=d.log, stderr=d.log, env=self.env)
            time.sleep(0.05)
        want = {d.home: {self.sites[o.home] for o in self.devices if o is not d} for d in self.devices}

        def meshed():
            check_running(*self.devices)
            return all(want[d.home] <= connected_sites(d) for d in self.devices)
        t0 = time.perf_counter()
        wait(meshed, 60 + 3 * len(self.devices), "the mesh", interval=0.5)
        self.mesh_s = time.perf_counter() - t0

    def counters(self) -> list[dict]:
        return [status(d)["counters"] for d in self.devices]

    def cpu(self) -> int:
        return sum(cpu_ticks(d.proc.pid) for d in self.devices)

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        self.lab.close()


def writes(mesh: Mesh, count: int, gap: float = 0.02) -> dict:
    """``count`` single-row writes, from each device in turn; latency to all, receipts, CPU."""
    devs = mesh.devices
    apps = [sqlite3.connect(d.db, isolation_level=None) for d in devs]
    readers = [sqlite3.connect(d.db) for d in devs]
    for r in readers:
        r.execute("PRAGMA query_only=1")
    before = mesh.counters()
    hz = os.sysconf("SC_CLK_TCK")
    c0 = mesh.cpu()
    lat = []
    for i in range(count):
        src = i % len(devs)
        key = 10_000_000 + i
        t0 = time.perf_counter()
        apps[src].execute("INSERT INTO t VALUES (?, 'scale', 1, 1.0)", (key,))
        pending = [r for j, r in enumerate(readers) if j != src]
        deadline = t0 + 30
        while pending:
            pending = [r for r in pending if not r.execute("SELECT 1 FROM t WHERE id = ?", (key,)).fetchone()]
            if pending:
                if time.perf_counter() > deadline:
                    check_running(*devs)
                    raise TimeoutError(f"write {i} not on every device after 30 s ({len(pending)} missing)")
                time.sleep(0.0005)
        lat.append(time.perf_counter() - t0)
        time.sleep(gap)
    time.sleep(1.0)                                   # late forwards (after the delay) counted too
    cpu_s = (mesh.cpu() - c0) / hz
    after = mesh.counters()
    for c in apps + readers:
        c.close()
    got = [a["versions_received"] - b["versions_received"] for a, b in zip(after, before)]
    dup = [a["versions_redundant"] - b["versions_redundant"] for a, b in zip(after, before)]
    expected = count * (len(devs) - 1) / len(devs)     # versions each device must receive
    lat.sort()
    return {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "receipts": statistics.median(got) / expected, "receipts_max": max(got) / expected,
            "redundant": sum(dup) / max(1, sum(got)), "cpu_per_write": cpu_s / count}


def idle_cpu(mesh: Mesh, seconds: float) -> tuple[float, float, float]:
    """(median, max) idle CPU % of one core per agent, and median RSS in MB."""
    hz = os.sysconf("SC_CLK_TCK")
    pids = [d.proc.pid for d in mesh.devices]
    c0, t0 = [cpu_ticks(p) for p in pids], time.monotonic()
    time.sleep(seconds)
    c1, t1 = [cpu_ticks(p) for p in pids], time.monotonic()
    pct = [(b - a) / hz / (t1 - t0) * 100 for a, b in zip(c0, c1)]
    return statistics.median(pct), max(pct), statistics.median(rss_mb(p) for p in pids)


def run_mesh(n: int, count: int, idle_s: float, env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"p2psync-scale-{n}-") as tmp:
        mesh = Mesh(Path(tmp), n, env)
        try:
            mesh.start()
            time.sleep(2.0)                            # start-up work (first syncs, mDNS) done
            out = writes(mesh, count)
            out["mesh_s"] = mesh.mesh_s
            if idle_s:
                out["idle"] = idle_cpu(mesh, idle_s)
            return out
        finally:
            mesh.close()


def report(title: str, r: dict, base: dict, base_name: str, targets: dict) -> None:
    print(title)
    line("start -> full mesh", f"{r['mesh_s']:.1f} s", "", "")
    for key, name, unit, scale in (("p50", "write -> visible on all, p50", "ms", 1000),
                                   ("p99", "write -> visible on all, p99", "ms", 1000),
                                   ("cpu_per_write", "agent CPU per write, all agents", "ms", 1000)):
        line(name, f"{r[key] * scale:.1f} {unit}", f"{r[key] / base[key]:.2f}x {base_name}", targets.get(key, ""))
    line("receipts of each write per device, median", f"{r['receipts']:.2f}",
         f"{r['receipts'] / base['receipts']:.2f}x {base_name}",
         f"{targets.get('receipts', '')}; worst device {r['receipts_max']:.2f}; "
         f"{r['redundant'] * 100:.1f} % already held")
    if "idle" in r:
        med, worst, rss = r["idle"]
        line("idle CPU per agent (one core), median", f"{med:.3f} %", "", f"{targets.get('idle', '')}; "
             f"worst {worst:.3f} %; RSS {rss:.0f} MB")


def run(big: int = 50, idle_s: float = 30.0) -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("ip") is None:
        print("scale: skipped: needs root and iproute2 (network namespaces)")
        return
    two = run_mesh(2, 100, 0)
    eager = run_mesh(10, 100, 0, {"P2PSYNC_FORWARD_DELAY": "0"})
    ten = run_mesh(10, 200, idle_s)
    report("virtual LAN of 2 (baseline)", two, two, "LAN of 2", {})
    report("virtual LAN of 10, forwarding all eager (baseline: before lazy forwarding)", eager, two, "LAN of 2", {})
    report("virtual LAN of 10, 200 single-row writes", ten, eager, "all-eager",
           {"p50": "target <= 25 ms", "p99": "target <= 100 ms", "cpu_per_write": "target <= 30 ms",
            "receipts": "target <= 1.5", "idle": "target <= 0.2 %"})
    if big:
        many = run_mesh(big, 100, idle_s)
        report(f"virtual LAN of {big}, 100 single-row writes (full agents)", many, ten, "LAN of 10",
               {"p50": "target <= 100 ms", "idle": "target <= 0.2 %"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", type=int, default=50, help="agents in the big mesh (0: skip it)")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of each idle measurement")
    a = ap.parse_args()
    run(a.big, a.idle)


if __name__ == "__main__":
    main()
