"""Real agents on a virtual LAN: mDNS discovery, partitions, shutdown and crash, mDNS spoofing, goodbyes.

Each agent runs in its own network namespace of the lab (``netlab.virtual_lan``),
listens on its namespace's address with mDNS on and no static peer, so every
connection starts from real multicast discovery across the bridge. Devices are
made with the CLI and their databases written from this process with stdlib
``sqlite3`` (see ``agents.py``); ``status`` reaches each agent through the
control socket in its home directory, which namespaces do not separate.

The helper scripts mdns_peer.py (discovery alone) and mdns_spoofer.py (an attacker with
the group tag but no accepted key) run in lab hosts too. Root only: skips on a laptop,
fails under CI=true.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from agents import PYTHON, SCHEMA, Device, Lab, wait_until
from netlab import virtual_lan  # noqa: F401  (the fixture)

from groups import TagGroup as Group, device_members
from p2psync.discovery import instance_label
from p2psync.identity import day_number
from p2psync.protocol import PROTOCOL_VERSION

pytestmark = pytest.mark.root

PORT = 7733
INSERT = "INSERT INTO items(id, name, qty, note) VALUES (?, ?, ?, ?)"
IDLE_TIMEOUT = 15.0            # SyncSettings.idle_timeout: a silent peer is dropped after this
SPOOFER = str(Path(__file__).resolve().parent / "mdns_spoofer.py")
MDNS_PEER = str(Path(__file__).resolve().parent / "mdns_peer.py")


def instance(dev: Device) -> str:
    """How the members of its group report the device (``p2psync-<site id>``), in their logs too."""
    return "p2psync-" + dev.site


def label(dev: Device) -> str:
    """The mDNS label the device advertises today (its site id sealed under its group's tag key)."""
    tag_key = device_members(dev.home).keys.all[0].tag_key()
    return instance_label(tag_key, bytes.fromhex(dev.site), day_number(time.time()))


class LanLab(Lab):
    """A Lab whose agents run inside the hosts of a virtual LAN, found by mDNS only."""

    def __init__(self, root: Path, lan) -> None:
        super().__init__(root)
        self.lan = lan
        self.host_of: dict[str, object] = {}

    def stranger(self, name: str) -> Device:
        """A device of a new group of its own (``init``, not ``join``), table ``items`` tracked."""
        dev = self._new_device(name, SCHEMA)
        dev.cli("init", "--db", str(dev.db), "--name", name)
        self._finish(dev, ["items"])
        self.all.append(dev)
        return dev

    def start_on(self, dev: Device, host: int, wait: bool = True) -> Device:
        """Start ``dev``'s agent inside lab host ``host``, listening on its address, mDNS on."""
        assert not dev.running, f"{dev.name}: agent already running (pid {dev.pid})"
        h = self.lan.host(host)
        self.host_of[dev.name] = h
        argv = [PYTHON, "-m", "p2psync", "--home", str(dev.home), "run", "--listen", f"{h.ip}:{PORT}",
                "--log-level", "debug"]
        with open(dev.log_path, "a") as log:
            log.write(f"===== {time.strftime('%H:%M:%S')} start in {h.netns}: {' '.join(argv[2:])}\n")
            log.flush()
            dev.proc = self.lan.run(h, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env={**os.environ, **self.env})
        self._procs.append(dev.proc)
        if wait:
            self.wait_running(dev)
        return dev

    def start_all(self, devices: list[Device], first_host: int = 1) -> None:
        for i, d in enumerate(devices):
            self.start_on(d, first_host + i, wait=False)
        for d in devices:
            self.wait_running(d)

    def ip(self, dev: Device) -> str:
        return self.host_of[dev.name].ip

    def wait_mesh(self, devices: list[Device], timeout: float = 20.0) -> None:
        """Until every agent of ``devices`` is connected to every other one, both ends agreeing."""
        def meshed():
            self.check_alive()
            return all(a.connected_peer(b) for a in devices for b in devices if a is not b)
        wait_until(meshed, timeout, interval=0.05,
                   what=f"{', '.join(d.name for d in devices)} to connect to each other by mDNS")

    def wait_discovered(self, devices: list[Device], timeout: float = 10.0) -> None:
        """Until every agent of ``devices`` has found every other one by mDNS (not just been dialled)."""
        for d in devices:
            for o in devices:
                if o is not d:
                    wait_until(lambda: f"mDNS: found {instance(o)} at " in d.log(), timeout,
                               what=f"{d.name} to find {o.name} by mDNS")

    def kill_tcp(self, dev: Device) -> None:
        """Abort every TCP connection of the agent's port inside its host (as a middlebox reset would)."""
        h = self.host_of[dev.name]
        for expr in (f"sport = :{PORT}", f"dport = :{PORT}"):
            subprocess.run(self.lan.argv(h, ["ss", "-K", "state", "established", f"( {expr} )"]),
                           capture_output=True, timeout=10, check=True)


@pytest.fixture
def lan_lab(virtual_lan, tmp_path):  # noqa: F811  (virtual_lan is a fixture)
    """``lan_lab(n)``: a LanLab on an n-host virtual LAN; agents stopped, logs printed, LAN removed."""
    labs: list[LanLab] = []

    def make(n: int) -> LanLab:
        lab = LanLab(tmp_path / f"lab{len(labs)}", virtual_lan(n))
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()   # before the fixture removes the namespaces


def peer_entries(dev: Device, other: Device) -> list[dict]:
    """Every entry of ``dev``'s status that is about ``other`` (connection or dialer)."""
    st = dev.status()
    return [p for p in st["peers"] if p.get("site") == other.site or p.get("address") == instance(other)]


def assert_mesh_addresses(lab: LanLab, devices: list[Device]) -> None:
    """Each agent is connected to exactly the others, each at the other's real address."""
    real = {lab.ip(d) for d in devices}
    for d in devices:
        connected = [p for p in d.status()["peers"] if p["state"] == "connected" and p.get("site")]   # (a session still
        # saying hello has no site yet)
        assert sorted(p["site"] for p in connected) == sorted(o.site for o in devices if o is not d), connected
        for p in connected:
            assert p["address"].rsplit(":", 1)[0] in real - {lab.ip(d)}, (d.name, p)


# ---- 1. discovery and convergence; another group on the same LAN ---------------

def test_agents_find_each_other_by_mdns_and_converge_and_ignore_another_group(lan_lab):
    lab = lan_lab(4)
    a, b, c = lab.devices(3)
    x = lab.stranger("X")                       # same table, another group
    lab.start_all([a, b, c, x])
    lab.wait_mesh([a, b, c])

    a.transaction([(INSERT, (i, f"a{i}", i, None)) for i in range(1, 4)])
    b.transaction([(INSERT, (i, f"b{i}", i, "from b")) for i in range(10, 13)])
    c.execute(INSERT, (20, "c20", 20, None))
    x.execute(INSERT, (99, "stranger's", 0, "must stay on X"))
    wait_until(lambda: a.row(20) is not None, what="C's row on A")
    a.execute("UPDATE items SET qty = 100 WHERE id = 20")           # A updates C's row
    final = lab.wait_converged(a, b, c)
    assert [r[0] for r in final] == [1, 2, 3, 10, 11, 12, 20]
    assert a.row(20) == (20, "c20", 100, None)

    # The stranger was seen by mDNS on both sides of the group boundary (by its label only)...
    for d in (a, b, c):
        wait_until(lambda: f"mDNS: {label(x)} belongs to another group; ignored" in d.log(),
                   timeout=10, what=f"{d.name} to log X as another group's device")
        wait_until(lambda: f"mDNS: {label(d)} belongs to another group; ignored" in x.log(),
                   timeout=10, what=f"X to log {d.name} as another group's device")
    # ...but nobody ever dialled across it: no connection, no dialer, not one handshake.
    for d in (a, b, c):
        assert peer_entries(d, x) == [], d.status()["peers"]
        assert not any(p.get("address", "").startswith(lab.ip(x)) for p in d.status()["peers"])
        assert d.counters()["handshake_failures"] == 0, d.counters()
        assert d.row(99) is None
    st = x.status()
    assert st["peers"] == [] and st["counters"]["handshake_failures"] == 0, st
    assert x.rows() == [(99, "stranger's", 0, "must stay on X")]
    assert "connected to" not in x.log()


# ---- 2. partition and heal ------------------------------------------------------------

def test_partition_writes_on_both_sides_converge_after_the_link_is_restored(lan_lab):
    lab = lan_lab(3)
    a, b, c = lab.devices(3)
    lab.start_all([a, b, c])
    pids = [d.pid for d in (a, b, c)]
    lab.wait_mesh([a, b, c])
    a.transaction([(INSERT, (i, f"item{i}", i, None)) for i in range(1, 7)])
    lab.wait_converged(a, b, c)

    lab.lan.cut(3)                                         # C alone on one side, A and B on the other
    step = 0.03                                            # keeps the writes' HLC order = this order

    def write(dev: Device, sql: str, params=()) -> None:
        dev.execute(sql, params)
        time.sleep(step)

    write(c, "UPDATE items SET name = 'c2' WHERE id = 2")        # loses: A deletes row 2 later
    write(a, "UPDATE items SET name = 'a1' WHERE id = 1")        # loses: C renames row 1 later
    write(c, "UPDATE items SET name = 'c3' WHERE id = 3")        # other column than A's: both kept
    write(a, "DELETE FROM items WHERE id = 2")
    write(a, "UPDATE items SET qty = 33 WHERE id = 3")
    write(c, "UPDATE items SET name = 'c1' WHERE id = 1")
    write(b, INSERT, (100, "b100", 1, None))
    write(c, INSERT, (300, "c300", 3, None))
    write(c, "DELETE FROM items WHERE id = 4")
    write(b, "UPDATE items SET note = 'b6' WHERE id = 6")

    # A and B keep syncing with each other while C is away.
    wait_until(lambda: a.rows() == b.rows() and a.row(100) is not None and b.row(2) is None,
               timeout=10, what="A and B to sync during the partition")
    assert c.row(100) is None and a.row(300) is None
    # Let the sessions across the cut die of silence (idle timeout), on both sides.
    wait_until(lambda: not any((a.connected_peer(c), b.connected_peer(c), c.connected_peer(a),
                                c.connected_peer(b))),
               timeout=IDLE_TIMEOUT + 10, interval=0.2, what="the sessions across the cut to time out")

    lab.lan.restore(3)
    lab.wait_mesh([a, b, c], timeout=25)
    final = lab.wait_converged(a, b, c, timeout=20)
    assert final == [
        (1, "c1", 1, None),
        (3, "c3", 33, None),
        (5, "item5", 5, None),
        (6, "item6", 6, "b6"),
        (100, "b100", 1, None),
        (300, "c300", 3, None),
    ]
    assert [d.pid for d in (a, b, c)] == pids, "an agent was restarted"

    c.execute(INSERT, (301, "after the heal", 1, None))             # and the healed links carry new writes
    wait_until(lambda: a.row(301) and b.row(301), timeout=10, what="a write after the heal")


# ---- 3. SIGTERM says goodbye, SIGKILL is found out by the heartbeat ---------------

def test_sigterm_says_goodbye_and_killed_agents_go_offline(lan_lab):
    lab = lan_lab(4)
    a, b, c, d = lab.devices(4)
    lab.start_all([a, b, c, d])
    lab.wait_mesh([a, b, c, d])
    lab.wait_discovered([a, b, c, d])   # else a peer may know D only from D's own dialling

    # D stops cleanly: exit 0, an mDNS goodbye, and the others stop dialling it.
    lab.stop(d)
    for o in (a, b, c):
        wait_until(lambda: f"mDNS: {instance(d)} said goodbye" in o.log(), timeout=5,
                   what=f"{o.name} to receive D's mDNS goodbye")
        wait_until(lambda: peer_entries(o, d) == [] and f"no longer dialling {instance(d)}" in o.log(),
                   timeout=10, what=f"{o.name} to forget D")
    lab.wait_mesh([a, b, c], timeout=5)

    # C loses power (its link goes first, so not even a FIN leaves it); B crashes (the kernel
    # still closes B's sockets). A must drop both, C by the heartbeat's idle timeout.
    lab.lan.cut(3)
    lab.kill(c)
    lab.kill(b)
    killed = time.monotonic()
    wait_until(lambda: not a.connected_peer(b), timeout=IDLE_TIMEOUT + 5, interval=0.1,
               what="A to drop the killed B")
    b_after = time.monotonic() - killed
    wait_until(lambda: not a.connected_peer(c), timeout=IDLE_TIMEOUT + 5 - b_after, interval=0.1,
               what="A to drop C, which vanished without a word (heartbeat timeout)")
    c_after = time.monotonic() - killed
    assert c_after <= IDLE_TIMEOUT + 5
    st = a.status()
    assert not [p for p in st["peers"] if p["state"] == "connected"], st["peers"]
    # No goodbye came from B or C: A keeps looking for them (dialling), it does not forget them.
    assert f"mDNS: {instance(b)} said goodbye" not in a.log()
    assert f"mDNS: {instance(c)} said goodbye" not in a.log()
    assert a.running
    print(f"offline on A after SIGKILL: B {b_after:.1f} s, C (no FIN) {c_after:.1f} s")


# ---- helper scripts in lab hosts ----------------------------------------------------------

class JsonLinesProcess:
    """A helper script (mdns_peer.py, mdns_spoofer.py) in a lab host, its JSON lines read in the background."""

    def __init__(self, lab: LanLab, host: int, argv: list[str]) -> None:
        self.proc = lab.lan.run(host, [sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def wait_for(self, timeout: float = 10.0, **match) -> dict:
        """The first line, already read or not, whose fields include ``match`` (all read are kept in ``seen``)."""
        for msg in self.seen:
            if all(msg.get(k) == v for k, v in match.items()):
                return msg
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                break
            assert msg is not None, f"{self.proc.args[4:6]} exited with {self.proc.wait()} before {match}"
            self.seen.append(msg)
            if all(msg.get(k) == v for k, v in match.items()):
                return msg
        raise AssertionError(f"no {match} within {timeout} s")

    def drain(self, seconds: float) -> list[dict]:
        """Every line printed within the next ``seconds`` (also kept in ``seen``)."""
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if msg is None:
                break
            out.append(msg)
        self.seen += out
        return out

    def stop(self) -> None:
        """Close stdin: the helper withdraws its adverts (mDNS goodbyes) and exits 0."""
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0


# ---- 4. mDNS spoofing -------------------------------------------------------------------

def test_spoofed_mdns_adverts_and_goodbyes_do_not_disturb_sync(lan_lab):
    lab = lan_lab(4)
    a, b, c = lab.devices(3)
    lab.start_all([a, b, c])
    lab.wait_mesh([a, b, c])
    devices = [a, b, c]
    lab.wait_discovered(devices)        # each has learned the others' real addresses

    # An attacker on the LAN (host 4) copies what anyone can see: the group's daily tag and the
    # devices' labels. It holds no key of the group, so it can advertise, not handshake.
    tag = device_members(a.home).keys.current.mdns_tag(day_number(time.time()))
    txt = {"v": str(PROTOCOL_VERSION), "g": tag}
    hostile = lab.lan.host(4).ip
    dead = lab.lan.subnet.rsplit(".", 1)[0] + ".200"        # on the LAN, nobody there
    fake = "p2psync-" + secrets.token_hex(24)                # a label that opens under no group key
    services = [{"instance": fake, "server": f"{fake}.local.", "address": hostile, "port": PORT, "txt": txt}]
    # Every real device's own label and host name, re-advertised at a dead or a hostile address
    # (the A records carry cache-flush: the agents' mDNS caches now hold only the false address).
    for d, addr in zip(devices, (dead, hostile, dead)):
        services.append({"instance": label(d), "server": f"{label(d)}.local.", "address": addr,
                         "port": PORT, "txt": txt})
    plan = {"interface": hostile, "listen": [hostile, PORT], "services": services}
    spoofer = JsonLinesProcess(lab, 4, [SPOOFER, json.dumps(plan)])
    spoofer.wait_for(ev="ready")

    # The fake device has the group's tag but not a member's label: every agent sees it and ignores it...
    for d in devices:
        wait_until(lambda: f"mDNS: {fake} belongs to another group; ignored" in d.log(), timeout=15,
                   what=f"{d.name} to see and ignore the fake device")
        assert not any(p.get("address") == fake for p in d.status()["peers"])
    # ...and sync between the real devices goes on, over their real addresses.
    a.execute(INSERT, (1, "during the spoof", 1, None))
    wait_until(lambda: b.row(1) and c.row(1), timeout=5, what="a write during the spoof")
    assert_mesh_addresses(lab, devices)

    def reset_and_reconnect() -> None:
        """Reset every connection: the agents dial each other again and must get through at the real
        addresses they learned, after at most a few forged ones (a spoofed advert or goodbye must not
        make them forget or give up a live peer)."""
        since = lab.log_offsets()
        reset = time.monotonic()
        for d in devices:
            lab.kill_tcp(d)
        lab.wait_mesh(devices, timeout=20)
        for d in devices:
            peers = d.status()["peers"]
            assert all(p["connected_for_s"] <= time.monotonic() - reset + 0.2 for p in peers
                       if p["state"] == "connected"), (d.name, "a connection survived the reset", peers)
            log = d.log()[since[d.name]:]
            for o in devices:
                assert f"no longer dialling {instance(o)}" not in log, f"{d.name} gave up {o.name}"
        assert_mesh_addresses(lab, devices)

    # While the forged adverts stand: A and C now also dial B's forged, hostile address (and fail there).
    failures = a.counters()["handshake_failures"] + c.counters()["handshake_failures"]
    reset_and_reconnect()
    assert a.counters()["handshake_failures"] + c.counters()["handshake_failures"] > failures

    # The attacker withdraws its adverts: zeroconf sends goodbyes for the real devices' labels too.
    spoofer.proc.stdin.close()
    bye = spoofer.wait_for(ev="bye")
    assert spoofer.proc.wait(timeout=10) == 0
    assert bye["connections"] >= 1, "nobody connected to the hostile address"
    for d in devices:
        for o in devices:
            if o is not d:
                wait_until(lambda: f"mDNS: {instance(o)} said goodbye" in d.log(), timeout=5,
                           what=f"{d.name} to receive the spoofed goodbye for {o.name}")
    reset_and_reconnect()
    b.execute(INSERT, (2, "after the spoof", 2, None))
    wait_until(lambda: a.row(2) and c.row(2), timeout=5, what="a write after the spoof")
    assert lab.converged(devices)


# ---- 5. a goodbye right after start-up (discovery alone) -----------------------------

def test_a_device_stopped_right_after_starting_is_seen_gone_for_good(lan_lab):
    # zeroconf announces a new service three times, 225 ms apart, and receivers drop the
    # goodbye's identical repeats for 1 s: an announcement still pending at the goodbye used to
    # bring the device back for good (and its peers dialled it until they gave up). Four
    # devices start at once; the fourth stops as soon as they have all seen each other.
    lab = lan_lab(4)
    for _ in range(3):
        group = Group.generate()
        sites = [secrets.token_hex(16) for _ in range(4)]
        peers = [JsonLinesProcess(lab, k, [MDNS_PEER, site, group.group_id.hex(), group.key.hex(), str(PORT),
                                           lab.lan.host(k).ip])
                 for k, site in zip((1, 2, 3, 4), sites)]
        for p, site in zip(peers, sites):
            for other in sites:
                if other != site:
                    p.wait_for(ev="seen", instance="p2psync-" + other)
        peers[3].stop()
        time.sleep(1.2)
        for p in peers[:3]:
            p.drain(0.05)
            about = [m["ev"] for m in p.seen if m.get("instance") == "p2psync-" + sites[3]]
            assert about[-1] == "gone", f"a peer's last word on the stopped device: {about}"
        for p in peers[:3]:
            p.stop()
