"""mDNS discovery on loopback: real zeroconf multicast on 127.0.0.1, several devices in one trio run.

Other p2psync tests may advertise on loopback at the same time, so every test
waits for the instances it created and ignores the rest.
"""

from __future__ import annotations

import secrets
import time

import pytest
import trio
from zeroconf import IPVersion, Zeroconf

from p2psync.discovery import (
    SERVICE_TYPE,
    DiscoveryError,
    MdnsDiscovery,
    PeerGone,
    PeerSeen,
    instance_label,
    label_site,
    site_id_of,
    tag_matches,
)
from groups import TagGroup as Group
from p2psync.identity import day_number
from p2psync.protocol import PROTOCOL_VERSION

LOOPBACK = ["127.0.0.1"]
TIMEOUT = 10.0   # generous: loopback discovery takes milliseconds; a TTL expiry would take minutes


def device(group: Group, port: int, **kw) -> MdnsDiscovery:
    return MdnsDiscovery(secrets.token_bytes(16), group, port, LOOPBACK, **kw)


async def next_event(disc: MdnsDiscovery, instance: str, kind: type, seen: list | None = None):
    """The next ``kind`` event about ``instance``; every event read is appended to ``seen``."""
    with trio.fail_after(TIMEOUT):
        async for event in disc:
            if seen is not None:
                seen.append(event)
            if isinstance(event, kind) and event.instance == instance:
                return event
    raise AssertionError(f"{disc.instance}'s events ended before a {kind.__name__} of {instance}")


def resolve_txt(label: str, timeout_ms: int = 5000) -> dict | None:
    """The TXT entries advertised under ``label`` as a third party on loopback sees them (None: no answer)."""
    zc = Zeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    try:
        info = zc.get_service_info(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", timeout=timeout_ms)
    finally:
        zc.close()
    return None if info is None else info.properties


@pytest.mark.trio
async def test_devices_of_one_group_see_each_other_but_not_themselves(nursery) -> None:
    group = Group.generate()
    a, b = device(group, 7201), device(group, 7202)
    await nursery.start(a.run)
    await nursery.start(b.run)
    events_a: list = []
    seen_b = await next_event(a, b.instance, PeerSeen, events_a)
    seen_a = await next_event(b, a.instance, PeerSeen)
    assert seen_b == PeerSeen([("127.0.0.1", 7202)], b.instance, True)
    assert seen_a == PeerSeen([("127.0.0.1", 7201)], a.instance, True)
    assert all(e.instance != a.instance for e in events_a)
    assert site_id_of(seen_b.instance) == bytes.fromhex(b.instance.removeprefix("p2psync-"))


@pytest.mark.trio
async def test_device_of_another_group_is_reported_not_ok(nursery) -> None:
    a, stranger = device(Group.generate(), 7211), device(Group.generate(), 7212)
    await nursery.start(a.run)
    await nursery.start(stranger.run)
    seen = await next_event(a, stranger.label, PeerSeen)   # not a member: known by its label only
    assert seen == PeerSeen([("127.0.0.1", 7212)], stranger.label, False)


@pytest.mark.trio
async def test_goodbye_reports_peer_gone_and_ends_its_events(nursery) -> None:
    group = Group.generate()
    a, b = device(group, 7221), device(group, 7222)
    await nursery.start(a.run)
    async with trio.open_nursery() as inner:
        await inner.start(b.run)
        await next_event(a, b.instance, PeerSeen)
        inner.cancel_scope.cancel()
    assert await next_event(a, b.instance, PeerGone) == PeerGone(b.instance)
    with trio.fail_after(TIMEOUT):
        async for _ in b:   # b's run() has returned: its event stream ends
            pass


@pytest.mark.trio
async def test_txt_holds_only_version_and_daily_group_tag(nursery) -> None:
    group = Group.generate()
    a = device(group, 7231)
    await nursery.start(a.run)
    props = await trio.to_thread.run_sync(resolve_txt, a.label)
    assert props is not None, f"{a.label} did not answer"
    assert set(props) == {b"v", b"g"}
    assert props[b"v"] == str(PROTOCOL_VERSION).encode()
    today = day_number(time.time())
    tag = props[b"g"]
    assert tag in (group.mdns_tag(today).encode(), group.mdns_tag(today + 1).encode())  # midnight race
    assert tag not in {group.mdns_tag(d).encode() for d in (today - 2, today - 1, today + 2)}
    assert tag != Group(group.group_id, secrets.token_bytes(32)).mdns_tag(today).encode()
    stable = [a.instance.removeprefix("p2psync-"), group.group_id.hex(), group.key.hex(),
              group.psk().hex(), group.tag_key().hex(), group.data_key().hex()]
    for value in props.values():
        text = value.decode("ascii").lower()
        assert len(text) <= 16
        assert not any(text and text in s for s in stable if len(text) >= 8)
    sealed = a.label.removeprefix("p2psync-")                  # the label: no stable identifier either
    assert not any(sealed[i:i + 8] in s for s in stable for i in range(0, len(sealed) - 7, 4))


@pytest.mark.trio
async def test_tag_rotates_at_utc_midnight_and_peers_keep_recognising_each_other(nursery) -> None:
    group = Group.generate()
    day = day_number(time.time()) + 100
    offset = (day + 1) * 86400 - 1.0 - time.time()     # midnight of a future day, one second away

    def clock() -> float:
        return time.time() + offset

    a, b = device(group, 7241, clock=clock), device(group, 7242, clock=clock)
    await nursery.start(a.run)
    await nursery.start(b.run)
    assert (await next_event(a, b.instance, PeerSeen)).tag_ok
    assert b.label == instance_label(group.tag_key(), b.site_id, day)
    assert (await trio.to_thread.run_sync(resolve_txt, b.label))[b"g"] == group.mdns_tag(day).encode()
    tomorrow = instance_label(group.tag_key(), b.site_id, day + 1)
    with trio.fail_after(TIMEOUT):
        while day_number(clock()) == day:
            await trio.sleep(0.05)
        while (await trio.to_thread.run_sync(resolve_txt, tomorrow, 1000) or {}).get(b"g") != \
                group.mdns_tag(day + 1).encode():
            await trio.sleep(0.1)
    assert (await next_event(a, b.instance, PeerSeen)).tag_ok   # the new label is reported, as the same device
    assert b.label == tomorrow


def test_tag_matches_yesterday_today_and_tomorrow_only() -> None:
    group = Group.generate()
    now = 1_700_000_000.0
    day = day_number(now)
    for d in (day - 1, day, day + 1):
        assert tag_matches(group, group.mdns_tag(d).encode(), now)
    for d in (day - 2, day + 2, day - 365):
        assert not tag_matches(group, group.mdns_tag(d).encode(), now)
    assert not tag_matches(Group.generate(), group.mdns_tag(day).encode(), now)
    assert not tag_matches(group, None, now)
    assert not tag_matches(group, group.mdns_tag(day), now)   # str, not the raw TXT bytes
    assert not tag_matches(group, b"", now)


def test_members_are_reported_by_site_id_and_advertise_a_daily_sealed_label() -> None:
    site, group = bytes(range(16)), Group.generate()
    disc = MdnsDiscovery(site, group, 7000, LOOPBACK, clock=lambda: 1_700_000_000.0)
    assert disc.instance == "p2psync-" + site.hex()
    assert site_id_of("p2psync-" + site.hex().upper()) == site
    assert site_id_of("p2psync-1234") is None
    assert site_id_of("printer") is None
    day = day_number(1_700_000_000.0)
    assert disc.label == instance_label(group.tag_key(), site, day)
    assert site.hex() not in disc.label and len(disc.label) <= 63
    assert label_site([group.tag_key()], disc.label, day) == site
    assert label_site([group.tag_key()], disc.label, day + 1) == site      # tomorrow by a peer's clock
    assert label_site([group.tag_key()], disc.label, day + 2) is None
    assert label_site([Group.generate().tag_key()], disc.label, day) is None
    assert label_site([group.tag_key()], "p2psync-" + site.hex(), day) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"interfaces": ["eth0"]}, "not an IPv4 address"),
    ({"interfaces": ["::1"]}, "not an IPv4 address"),
    ({"interfaces": ["0.0.0.0"]}, "None for all interfaces"),
    ({"interfaces": []}, "empty"),
    ({"interfaces": "127.0.0.1"}, "list"),
    ({"port": 0}, "not a TCP port"),
    ({"site_id": b"short"}, "16 bytes"),
])
def test_bad_arguments_are_refused_with_a_reason(kwargs, message) -> None:
    args = {"site_id": secrets.token_bytes(16), "group": Group.generate(), "port": 7000,
            "interfaces": LOOPBACK, **kwargs}
    with pytest.raises(ValueError, match=message):
        MdnsDiscovery(**args)


@pytest.mark.trio
async def test_an_interface_that_is_not_up_gives_a_clear_error() -> None:
    disc = MdnsDiscovery(secrets.token_bytes(16), Group.generate(), 7000, ["10.255.255.254"])
    with pytest.raises(DiscoveryError, match=r"10\.255\.255\.254.*--no-mdns"):
        await disc.run()
    async for _ in disc:   # the event stream ends even though run() failed
        pass
