"""The virtual LAN (scripts/netlab): reachability, real multicast mDNS across the bridge, cut links.

Root only: skips on a laptop, fails under CI=true.
"""

from __future__ import annotations

import json
import queue
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from netlab import virtual_lan  # noqa: F401  (the fixture)

from groups import TagGroup as Group

pytestmark = pytest.mark.root

PEER_SCRIPT = str(Path(__file__).resolve().parent / "mdns_peer.py")


class PeerProcess:
    """An mdns_peer.py process in a namespace, with its JSON lines read in the background."""

    def __init__(self, lan, host, group: Group, port: int, interface: str | None) -> None:
        self.site = secrets.token_bytes(16)
        self.instance = "p2psync-" + self.site.hex()
        argv = [sys.executable, PEER_SCRIPT, self.site.hex(), group.group_id.hex(), group.key.hex(), str(port)]
        if interface:
            argv.append(interface)
        self.proc = lan.run(host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def wait_for(self, timeout: float = 10.0, **match) -> dict:
        """The next line whose fields include ``match``; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                break
            assert msg is not None, f"peer exited with {self.proc.wait()} before {match}"
            if all(msg.get(k) == v for k, v in match.items()):
                return msg
        raise AssertionError(f"no {match} within {timeout} s")

    def stop(self) -> None:
        """Close stdin: the peer says goodbye and exits."""
        self.stopped_at = time.monotonic()
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0


def test_hosts_reach_each_other_and_a_cut_host_is_isolated(virtual_lan) -> None:
    lan = virtual_lan(3)
    assert [h.ip for h in lan.hosts] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    for a in lan.hosts:
        for b in lan.hosts:
            if a != b:
                assert lan.ping(a, b), f"{a.netns} cannot ping {b.ip}"

    lan.cut(3)
    assert not lan.ping(1, 3)
    assert not lan.ping(3, 2)
    assert lan.ping(1, 2)

    lan.restore(3)
    assert any(lan.ping(1, 3) for _ in range(5)), "host 3 unreachable after restore"
    assert lan.ping(3, 2) and lan.ping(2, 3)


def test_mdns_crosses_the_bridge_both_ways(virtual_lan) -> None:
    lan = virtual_lan(2)
    group = Group.generate()
    a = PeerProcess(lan, 1, group, 7101, None)                # all interfaces (lo and eth0)
    started_a = a.wait_for(ev="started")
    b = PeerProcess(lan, 2, group, 7102, lan.hosts[1].ip)     # one interface
    started_b = b.wait_for(ev="started")

    seen_b = a.wait_for(ev="seen", instance=b.instance)
    seen_a = b.wait_for(ev="seen", instance=a.instance)
    assert seen_b["addresses"] == [[lan.hosts[1].ip, 7102]] and seen_b["tag_ok"]
    assert seen_a["addresses"] == [[lan.hosts[0].ip, 7101]] and seen_a["tag_ok"]

    b.stop()
    gone = a.wait_for(ev="gone", instance=b.instance)
    a.stop()
    print(f"\nmDNS across namespaces: B calls run()->A sees B {1000 * (seen_b['t'] - started_b['before']):.1f} ms "
          f"(B's run() took {1000 * (started_b['after'] - started_b['before']):.1f} ms); "
          f"B calls run()->B sees A {1000 * (seen_a['t'] - started_b['before']):.1f} ms; "
          f"B told to stop->A sees gone {1000 * (gone['t'] - b.stopped_at):.1f} ms; "
          f"A's run() took {1000 * (started_a['after'] - started_a['before']):.1f} ms")


def test_down_removes_every_namespace(virtual_lan) -> None:
    lan = virtual_lan(3)
    names = {h.netns for h in lan.hosts} | {lan.bridge_netns}
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert names <= {line.split(" ", 1)[0] for line in listed.splitlines()}
    proc = lan.run(1, ["sleep", "60"])
    lan.close()
    assert proc.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not names & {line.split(" ", 1)[0] for line in listed.splitlines()}
