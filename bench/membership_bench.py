"""Membership benchmarks: handshake plus membership check, removal latency on a 3-device LAN,
rotation cost by group size. Each figure with its baseline from the same run."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import trio

from .common import ROOT, Device, cli, line, median

sys.path.insert(0, str(ROOT / "tests"))

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"
HANDSHAKES = 200


class _Host:
    """What a Connection needs for the membership exchange, with a real group's log."""

    check_schema, schema, worker = False, b"", None

    def __init__(self, members):
        self.members = members
        self.site_id = members.site

    def admit(self, conn):
        return self.members.admit(conn.remote_static)

    async def on_members(self, conn, events):
        self.members.take(events)


async def _pairs(n: int, membership: bool) -> list[float]:
    """Median-able durations of ``n`` loopback TCP handshakes (and membership exchanges, if asked)."""
    from groups import make_group
    from p2psync.net.connection import Connection, SyncSettings
    from p2psync.net.noise_stream import NoiseStream
    from p2psync.noise import agent_handshake, agent_responder
    from p2psync.protocol.prologue import device_prologue

    keys, members = make_group(3)
    psk = members[1].keys.current.psk()
    pro = device_prologue(members[0].state.group)
    out: list[float] = []

    async def serve(stream):
        if membership:
            hs = agent_responder(keys[0].static_private, members[0].keys.psks(), pro)
        else:
            hs = agent_handshake(False, keys[0].static_private, psk, pro)
        ns = NoiseStream(stream, hs)
        await ns.do_handshake()
        if membership:
            await Connection(ns, _Host(members[0]), "b", SyncSettings())._exchange_members()
        await ns.send_all(b"k")
        await ns.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0, )
        port = listeners[0].socket.getsockname()[1]
        for _ in range(n):
            t0 = time.perf_counter()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            ns = NoiseStream(stream, agent_handshake(True, keys[1].static_private, psk, pro))
            await ns.do_handshake()
            if membership:
                await Connection(ns, _Host(members[1]), "a", SyncSettings())._exchange_members()
            await ns.receive_some(1)
            out.append(time.perf_counter() - t0)
            await ns.aclose()
        nursery.cancel_scope.cancel()
    return out


def handshake() -> None:
    base = median(trio.run(_pairs, HANDSHAKES, False))
    ours = median(trio.run(_pairs, HANDSHAKES, True))
    line("handshake, loopback TCP (baseline: XXpsk0 alone)", f"{base * 1000:.2f} ms", "baseline")
    line("handshake + membership check and exchange", f"{ours * 1000:.2f} ms", f"{ours / base:.2f}x the handshake",
         "target <= 5 ms")


def rotation() -> None:
    from groups import make_group
    from p2psync.group import actions
    from p2psync.identity import Device as Dev

    base_ms = None
    for n in (3, 10, 50):
        keys, members = make_group(n)
        admin = members[0]
        me = keys[0]
        dev = Dev(home=None, site_id=me.site_id, name="d0", db_path=None, static_private=me.static_private,
                  sign_private=me.sign_private, group_id=admin.state.group, found=admin.found)
        times, apply_times = [], []
        for k in range(3):
            target = next(m for m in admin.state.current() if m.site != me.site_id)
            other = next(m for m in members if m.site not in (target.site, me.site_id))
            other.load(admin.encoded())           # in sync with the admin before the removal
            t0 = time.perf_counter()
            events = actions.remove(dev, admin, target, 0, 1_700_000_100_000 + k)
            times.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            other.add(events)
            apply_times.append(time.perf_counter() - t1)
            # the removed member's replacement keeps the group size
            nk = keys[0].__class__.generate()
            admin.add(actions.admit(dev, admin, nk.site_id, nk.sign_public, nk.static_public, "n", "member", b"",
                                    1_700_000_200_000 + k))
        t = median(times) * 1000
        base_ms = base_ms or t / n
        line(f"rotation on removal, {n} members: admin signs", f"{t:.1f} ms", f"{t / n:.2f} ms per member",
             f"a member takes it in {median(apply_times) * 1000:.2f} ms")


def removal_latency() -> None:
    """Three agents on loopback; A removes C: how long until B and C have closed their sessions with C."""
    tmp = Path(tempfile.mkdtemp(prefix="p2psync-bench-members-"))
    a = Device(tmp, "MA", SCHEMA, ["t"])
    b = Device(tmp, "MB", SCHEMA, ["t"], admin=a)
    runs = []
    for k in range(3):
        c = Device(tmp, f"MC{k}", SCHEMA, ["t"], admin=a)
        a.start([b.port, c.port])
        b.start([a.port, c.port])
        c.start([a.port, b.port])
        for d in (a, b, c):
            d.wait_connected(2)
        site_c = json.loads((c.home / "device.json").read_text())["site_id"]
        t0 = time.time()
        cli("--home", str(a.home), "remove", f"MC{k}")
        t_written = time.time()
        deadline = time.time() + 10
        while time.time() < deadline:
            sb, sc = _status(b), _status(c)
            if sb and sc and sc.get("state") == "removed" and not any(
                    p.get("site") == site_c and p.get("state") == "connected" for p in sb["peers"]):
                break
            time.sleep(0.005)
        t_done = time.time()
        runs.append((t_done - t_written, t_done - t0))
        for d in (a, b, c):
            d.stop()
    after_write = median([r[0] for r in runs])
    total = median([r[1] for r in runs])
    line("removal: events written -> B and C cut off", f"{after_write * 1000:.0f} ms", "(polling `status`)",
         "target <= 1 s")
    line("removal: `p2psync remove` started -> cut off", f"{total * 1000:.0f} ms", "incl. CLI start-up")


def _status(dev) -> dict | None:
    """The agent's status straight from its control socket (no CLI start-up in the loop)."""
    from p2psync.agent.control import ControlError, request

    try:
        return request(dev.home / "agent.sock", {"cmd": "status"})
    except ControlError:
        return None


def run() -> None:
    print("membership", flush=True)
    handshake()
    rotation()
    removal_latency()
