"""A virtual LAN for tests: network namespaces on a Linux bridge, made by scripts/netlab.

Use the ``virtual_lan`` fixture (import it into the test module): ``lan =
virtual_lan(3)`` gives hosts 1..3, each a namespace with one address on a
shared bridge. ``lan.run(host, argv)`` starts a process inside a host; the
fixture kills the processes it started and removes every namespace at the end,
even when the test fails. A lab left behind by a killed test run is removed by
the next run. Needs root and iproute2: skips on a laptop, fails under CI=true.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "netlab"
SUBNET = "10.77.0.0/24"          # private, and only ever inside the lab's namespaces
_PREFIX_RE = re.compile(r"^(p2pt(\d+)_\d+)-(?:br|\d+)$")
_counter = itertools.count(1)

# ICMP echo for machines without the ping binary (raw sockets need root, as the lab does).
_PING_PY = r"""
import os, socket, struct, sys, time
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
dst, ident, data = sys.argv[1], os.getpid() & 0xFFFF, b"p2psync netlab"
pkt = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + data
pkt = pkt[:2] + struct.pack("!H", csum(pkt)) + pkt[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
try:
    s.sendto(pkt, (dst, 0))
except OSError:
    sys.exit(1)
deadline = time.monotonic() + float(sys.argv[2])
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        buf, addr = s.recvfrom(2048)
    except socket.timeout:
        break
    ihl = (buf[0] & 15) * 4
    kind, _, _, who, _ = struct.unpack("!BBHHH", buf[ihl:ihl + 8])
    if kind == 0 and who == ident and addr[0] == dst:
        sys.exit(0)
sys.exit(1)
"""


@dataclass(frozen=True)
class Host:
    """One host of the lab: its number (1..n), namespace and IPv4 address."""

    index: int
    netns: str
    ip: str


class VirtualLan:
    """A running lab; ``close()`` (idempotent) kills its processes and deletes its namespaces."""

    def __init__(self, n: int, prefix: str, subnet: str = SUBNET) -> None:
        self.prefix, self.subnet = prefix, subnet
        base = subnet.rsplit(".", 1)[0]
        self.hosts = [Host(k, f"{prefix}-{k}", f"{base}.{k}") for k in range(1, n + 1)]
        self.bridge_netns = f"{prefix}-br"
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        result = _netlab("up", str(n), prefix, subnet=subnet)
        if result.returncode != 0:
            self.close()
            require(False, f"scripts/netlab up failed: {result.stderr.strip()}")

    def host(self, host: Host | int) -> Host:
        """The Host for a Host or a 1-based host number."""
        return host if isinstance(host, Host) else self.hosts[host - 1]

    def argv(self, host: Host | int, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.host(host).netns, *argv]

    def run(self, host: Host | int, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host``; it is killed at teardown if still running."""
        proc = subprocess.Popen(self.argv(host, argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    def ping(self, src: Host | int, dst: Host | int | str, timeout: float = 1.0) -> bool:
        """Whether one ICMP echo from ``src`` to ``dst`` (host or IP) is answered within ``timeout``."""
        ip = dst if isinstance(dst, str) else self.host(dst).ip
        if shutil.which("ping"):
            cmd = ["ping", "-c1", f"-W{max(1, round(timeout))}", ip]
        else:
            cmd = [sys.executable, "-c", _PING_PY, ip, str(timeout)]
        return subprocess.run(self.argv(src, cmd), capture_output=True, timeout=timeout + 10).returncode == 0

    def cut(self, k: int) -> None:
        """Unplug host ``k`` from the bridge (its link goes down; the host keeps its address)."""
        _check(_netlab("cut", str(k), self.prefix))

    def restore(self, k: int) -> None:
        """Plug host ``k`` back in."""
        _check(_netlab("restore", str(k), self.prefix))

    def close(self) -> None:
        """Kill the processes started with ``run`` (by PID), then delete the lab's namespaces."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        _kill_leftovers([h.netns for h in self.hosts] + [self.bridge_netns])
        _check(_netlab("down", self.prefix))


@pytest.fixture
def virtual_lan():
    """A factory: ``virtual_lan(n)`` starts an n-host lab with a unique prefix, removed at teardown."""
    require(hasattr(os, "geteuid") and os.geteuid() == 0, "virtual LAN tests need root (network namespaces)")
    require(shutil.which("ip") is not None, "virtual LAN tests need the ip command (iproute2)")
    _reap_stale_labs()
    labs: list[VirtualLan] = []

    def make(n: int, subnet: str = SUBNET) -> VirtualLan:
        lab = VirtualLan(n, f"p2pt{os.getpid()}_{next(_counter)}", subnet)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()


def _netlab(*args: str, subnet: str = SUBNET) -> subprocess.CompletedProcess:
    env = {**os.environ, "NETLAB_SUBNET": subnet}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def _check(result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(result.args[1:])} failed: {result.stderr.strip()}")


def _kill_leftovers(namespaces: list[str]) -> None:
    """Kill, by PID, processes still inside the lab's namespaces (children of what tests started)."""
    for ns in namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in out.stdout.split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass


def _reap_stale_labs() -> None:
    """Remove labs whose creating test process (pid in the prefix) no longer exists."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    stale = set()
    for line in out.stdout.splitlines():
        m = _PREFIX_RE.match(line.split(" ", 1)[0])
        if m and not _alive(int(m.group(2))):
            stale.add(m.group(1))
    for prefix in stale:
        _kill_leftovers([line.split(" ", 1)[0] for line in out.stdout.splitlines()
                         if line.startswith(prefix + "-")])
        _netlab("down", prefix)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
