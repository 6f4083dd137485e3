"""Bounded, private discovery (issue 9, item 7): real zeroconf multicast on 127.0.0.1.

An outsider on the LAN sees every advert and can send any mDNS answer it
likes (raw packets from its own zeroconf instance, below): it copies a
member's label and the group's daily tag, and forges addresses and devices.
Members must still find each other at their real addresses, with bounded
address lists, and an outsider must not be able to tell who a label is or
link it to the next day's.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time

import pytest
import trio
from zeroconf import (DNSAddress, DNSOutgoing, DNSPointer, DNSService, DNSText, IPVersion, ServiceBrowser,
                      ServiceStateChange, Zeroconf)
from zeroconf.const import _CLASS_IN, _CLASS_UNIQUE, _FLAGS_AA, _FLAGS_QR_RESPONSE, _TYPE_A, _TYPE_PTR, \
    _TYPE_SRV, _TYPE_TXT

from groups import TagGroup as Group
from p2psync.discovery import SERVICE_TYPE, MdnsDiscovery, PeerGone, PeerSeen
from p2psync.identity import day_number

LOOPBACK = ["127.0.0.1"]
TIMEOUT = 30.0          # generous: a flood of 2,000 adverts is worked through in seconds
FORGED_ADVERTS = 2000
ADDRESSES_PER_ADVERT = 8
MAX_LISTED = 4          # what a member's address list may hold (MAX_ADDRESSES)


def device(group: Group, port: int, **kw) -> MdnsDiscovery:
    return MdnsDiscovery(secrets.token_bytes(16), group, port, LOOPBACK, **kw)


class Outsider:
    """Anyone on the LAN: browses the p2psync services, resolves them, forges answers (no key of any group)."""

    def __init__(self) -> None:
        self.zc = Zeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
        self.changes: list[tuple[str, ServiceStateChange]] = []
        self._lock = threading.Lock()

        def on_change(*, zeroconf, service_type, name, state_change) -> None:
            with self._lock:
                self.changes.append((name, state_change))

        self.browser = ServiceBrowser(self.zc, SERVICE_TYPE, handlers=[on_change])

    def names(self, change: ServiceStateChange = ServiceStateChange.Added) -> list[str]:
        with self._lock:
            return [n for n, c in self.changes if c is change]

    def find(self, port: int, timeout: float = 10.0, exclude: tuple = ()):
        """The advert (ServiceInfo) of whoever offers ``port``, found by browsing as anyone can."""
        deadline = time.monotonic() + timeout
        tried: set[str] = set(exclude)
        while time.monotonic() < deadline:
            for name in self.names():
                if name in tried:
                    continue
                info = self.zc.get_service_info(SERVICE_TYPE, name, timeout=1000)
                if info is not None and info.port == port:
                    return info
                tried.add(name)   # another test's device
            time.sleep(0.05)
        raise AssertionError(f"no p2psync advert with port {port} within {timeout} s")

    def forge(self, name: str, server: str, port: int, txt: bytes, addresses: list[str]) -> None:
        """One unsolicited answer: ``name`` is at ``server``:``port`` with ``addresses`` (cache-flush set)."""
        out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
        out.add_answer_at_time(DNSPointer(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN, 4500, name), 0)
        out.add_answer_at_time(DNSService(name, _TYPE_SRV, _CLASS_IN | _CLASS_UNIQUE, 120, 0, 0, port, server), 0)
        out.add_answer_at_time(DNSText(name, _TYPE_TXT, _CLASS_IN | _CLASS_UNIQUE, 4500, txt), 0)
        for a in addresses:
            out.add_answer_at_time(DNSAddress(server, _TYPE_A, _CLASS_IN | _CLASS_UNIQUE, 120, socket.inet_aton(a)), 0)
        self.zc.send(out)

    def close(self) -> None:
        self.browser.cancel()
        self.zc.close()


@pytest.fixture
async def outsider():
    o = await trio.to_thread.run_sync(Outsider)
    try:
        yield o
    finally:
        await trio.to_thread.run_sync(o.close)


def forged(i: int) -> list[str]:
    return [f"10.{i // 256 % 256}.{i % 256}.{k}" for k in range(1, ADDRESSES_PER_ADVERT + 1)]


async def collect(disc: MdnsDiscovery, into: list, stop: trio.Event) -> None:
    async for ev in disc:
        into.append(ev)
        if stop.is_set():
            return


async def wait_for(events: list, predicate, what: str, timeout: float = TIMEOUT):
    with trio.fail_after(timeout):
        while True:
            for ev in events:
                if predicate(ev):
                    return ev
            await trio.sleep(0.05)
    raise AssertionError(what)


@pytest.mark.trio
async def test_forged_adverts_neither_grow_a_members_addresses_nor_push_out_the_real_one(nursery, outsider) -> None:
    group = Group.generate()
    a, b = device(group, 7301), device(group, 7302)
    events: list = []
    await nursery.start(a.run)
    nursery.start_soon(collect, a, events, trio.Event())
    await nursery.start(b.run)
    real = ("127.0.0.1", 7302)
    await wait_for(events, lambda e: e == PeerSeen([real], b.instance, True), "A to see B")

    # The outsider reads B's advert off the LAN and re-advertises B's very name and host name with
    # 8 new addresses at a time, 2,000 times (16,000 addresses; cache-flush: A's zeroconf forgets
    # the real A record), then one last advert with a marker address.
    info = await trio.to_thread.run_sync(outsider.find, 7302)

    def flood() -> None:
        for i in range(FORGED_ADVERTS):
            outsider.forge(info.name, info.server, info.port, info.text, forged(i))
            if i % 25 == 0:
                time.sleep(0.002)   # let the receivers' socket buffers drain

    await trio.to_thread.run_sync(flood)
    marker = ("10.254.254.254", 7302)
    with trio.fail_after(TIMEOUT):
        while not any(isinstance(e, PeerSeen) and marker in e.addresses for e in events):
            await trio.to_thread.run_sync(outsider.forge, info.name, info.server, info.port, info.text, [marker[0]])
            await trio.sleep(0.2)

    about_b = [e for e in events if isinstance(e, PeerSeen) and e.instance == b.instance]
    assert any(h.startswith("10.") and (h, p) != marker for e in about_b for h, p in e.addresses), \
        "the flood did not reach A"   # (A reports the latest state only: events for one name coalesce)
    assert all(len(e.addresses) <= MAX_LISTED for e in about_b), max(len(e.addresses) for e in about_b)
    assert all(e.tag_ok for e in about_b)
    last = about_b[-1]   # what A's agent dials now: bounded, the real address kept, the newest there
    # (which one is first depends on whether B's own re-announcement came after the last forgery)
    assert real in last.addresses and marker in last.addresses, last.addresses
    assert all(real in e.addresses for e in about_b), "the real address was pushed out at some point"
    assert not [e for e in events if isinstance(e, PeerSeen) and e.instance != b.instance and e.tag_ok]


@pytest.mark.trio
async def test_adverts_with_the_group_tag_but_no_members_label_are_not_members(nursery, outsider) -> None:
    group = Group.generate()
    a, b = device(group, 7311), device(group, 7312)
    events: list = []
    await nursery.start(a.run)
    nursery.start_soon(collect, a, events, trio.Event())
    await nursery.start(b.run)
    await wait_for(events, lambda e: isinstance(e, PeerSeen) and e.instance == b.instance, "A to see B")

    # The tag is public (B's TXT): the outsider makes up 300 devices carrying it, under labels of the
    # new form and names of the old form (p2psync-<site id>).
    info = await trio.to_thread.run_sync(outsider.find, 7312)
    fakes = [f"p2psync-{secrets.token_hex(24 if i % 2 else 16)}.{SERVICE_TYPE}" for i in range(300)]

    def flood() -> None:
        for i, name in enumerate(fakes):
            outsider.forge(name, name.split(".")[0] + ".local.", 7313, info.text, [f"10.9.{i // 256}.{i % 256}"])
            if i % 25 == 0:
                time.sleep(0.002)

    await trio.to_thread.run_sync(flood)
    labels = {n.split(".")[0] for n in fakes}
    with trio.fail_after(TIMEOUT):
        while len({e.instance for e in events if isinstance(e, PeerSeen) and e.instance in labels}) < 200:
            await trio.sleep(0.1)
    assert not [e for e in events if isinstance(e, PeerSeen) and e.instance in labels and e.tag_ok]

    # A member that comes up after the flood is still found, as a member (the fakes fill no member's slot).
    c = device(group, 7314)
    await nursery.start(c.run)
    await wait_for(events, lambda e: isinstance(e, PeerSeen) and e.instance == c.instance and e.tag_ok, "A to see C")
    seen = [e for e in events if isinstance(e, PeerSeen)]
    assert {e.instance for e in seen if e.tag_ok} == {b.instance, c.instance}
    assert all(not e.tag_ok for e in seen if e.instance in labels)


@pytest.mark.trio
async def test_labels_change_at_utc_midnight_hide_the_site_id_and_members_keep_knowing_each_other(
        nursery, outsider) -> None:
    group = Group.generate()
    day = day_number(time.time()) + 200
    offset = (day + 1) * 86400 - 1.5 - time.time()     # midnight of a future day, 1.5 s away

    def clock() -> float:
        return time.time() + offset

    a, b = device(group, 7321, clock=clock), device(group, 7322, clock=clock)
    events: list = []
    await nursery.start(a.run)
    nursery.start_soon(collect, a, events, trio.Event())
    await nursery.start(b.run)
    await wait_for(events, lambda e: isinstance(e, PeerSeen) and e.instance == b.instance, "A to see B")
    first = await trio.to_thread.run_sync(outsider.find, 7322)
    before = len(events)
    with trio.fail_after(TIMEOUT):
        while day_number(clock()) == day:
            await trio.sleep(0.05)
    second = await trio.to_thread.run_sync(lambda: outsider.find(7322, exclude=(first.name,)))
    with trio.fail_after(TIMEOUT):   # the old label is withdrawn (a goodbye), after the new one is up
        while first.name not in outsider.names(ServiceStateChange.Removed):
            await trio.sleep(0.05)
    # A member reports B under its new label as the same device, still of the group.
    await wait_for(events[before:], lambda e: isinstance(e, PeerSeen) and e.instance == b.instance,
                   "A to report B under its new label")

    # What an outsider sees: a new name, unrelated to the old one and to the site id, for host and service.
    site = b.instance.removeprefix("p2psync-")
    for info in (first, second):
        assert site not in info.name.lower() and site not in info.server.lower()
    assert first.name != second.name and first.server != second.server
    assert first.name.split(".")[0][8:24] not in second.name   # not even a shared piece
    # What a member sees: the same device all along, never gone, always of the group.
    about_b = [e for e in events if getattr(e, "instance", None) == b.instance]
    assert not [e for e in about_b if isinstance(e, PeerGone)], about_b
    assert all(e.tag_ok for e in about_b)


def test_an_address_not_seen_for_its_ttl_is_dropped_and_the_first_known_keeps_its_seat() -> None:
    from p2psync.discovery import AddressTable   # (here: the tests above also run against older code)
    from p2psync.discovery.mdns import ADDRESS_TTL

    t = AddressTable(limit=MAX_LISTED)
    real, moved = ("192.168.1.20", 7733), ("192.168.7.3", 7733)
    t.observe([real], now=0.0)
    for i in range(100):                                   # forged adverts, 8 addresses each, newest first
        t.observe([(a, 7733) for a in reversed(forged(i))], now=1.0 + i)
    listed = t.current(200.0)
    assert len(listed) == MAX_LISTED and listed[-1] == real
    assert listed[:3] == [("10.0.99.8", 7733), ("10.0.99.7", 7733), ("10.0.99.6", 7733)]   # newest first
    t.observe([moved], now=300.0)                          # the device moved to another network
    assert t.current(300.0)[0] == moved and real in t.current(300.0)
    assert real not in t.current(ADDRESS_TTL + 0.5)        # not seen again for its TTL: dropped
    assert moved in t.current(ADDRESS_TTL + 0.5)
    assert t.current(300.0 + ADDRESS_TTL + 1) == []
