"""mDNS/DNS-SD discovery of the group's devices on the local network.

How this works: one Zeroconf instance (it runs its own asyncio thread)
advertises this device under a private label, ``p2psync-<48 hex>``, with two
TXT entries, ``v`` (protocol version) and ``g`` (the group's tag for the
current UTC day, an HMAC under a key derived from the group key), and browses
for the same service type. The label seals the site id under a key derived
from the group's tag key and the UTC day (``instance_label``): it changes
every day, and only a holder of the group's key can tell whose it is, or make
one. So an outsider cannot link a device across days, and a forger cannot
invent devices of the group. It is still unique per device, so registration
skips probing (``cooperating_responders``) and takes milliseconds. At UTC
midnight the new label is registered, then the old one withdrawn.

Browser callbacks cross into trio through a ThreadPortal as (name, change)
pairs. A label that opens under one of the group's tag keys (any epoch,
yesterday to tomorrow by our clock) is a member: it is reported under the
stable name ``p2psync-<site id>``, whatever the day's label; any other service
is reported under its own label with ``tag_ok=False``. A trio task resolves
every added or updated name (SRV, TXT and A records; off the trio thread) and
emits ``PeerSeen``, or ``PeerGone`` when the last label of a device says
goodbye. A member's ``tag_ok`` also needs its TXT tag to be one of the
group's tags for yesterday, today or tomorrow.

Addresses: each device has an ``AddressTable`` of at most MAX_ADDRESSES,
newest first, each dropped ADDRESS_TTL after it was last seen; a new address
may push out any but the longest-known one. ``PeerSeen.addresses`` is that
table, the addresses to dial now (replace, do not add). What a forger on the
LAN can still do: replay a member's label with its own addresses (and
cache-flush records that make zeroconf forget the real one); that costs the
dialer at most MAX_ADDRESSES - 1 wasted dials per round, but cannot remove
the address the device was first seen at while that is seen within
ADDRESS_TTL. If our agent starts after a forger has taken every slot, the
real address only gets in again when the device re-announces (start, UTC
midnight); the device still dials us. A forger can also send goodbyes in a
member's name (PeerGone): the agent only stops dialling after a failed round.

Discovery is a hint, never trust: dial only ``tag_ok`` peers and believe
nothing until the Noise handshake succeeds. A peer that vanishes without a
goodbye is never reported gone (zeroconf keeps PTR records for ~19 minutes at
least); liveness comes from session heartbeats.
"""

from __future__ import annotations

from typing import Protocol

import asyncio
import hmac
import ipaddress
import logging
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ifaddr
import trio
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from ..identity import day_number
from ..protocol.limits import PROTOCOL_VERSION
from .portal import ThreadPortal

log = logging.getLogger("p2psync.discovery")

SERVICE_TYPE = "_p2psync._tcp.local."
INSTANCE_PREFIX = "p2psync-"
LABEL_MAC = 8                 # bytes of the label that authenticate it; 16 more seal the site id
RESOLVE_TIMEOUT_MS = 3000     # waiting for a peer's SRV/TXT/A records
CALL_TIMEOUT = 10.0           # a register/update call on zeroconf's loop
MAX_PEERS = 256               # member labels tracked at once (a device has at most 3: yesterday to tomorrow)
MAX_STRANGERS = 256           # other names tracked at once; a flood beyond this is ignored
MAX_ADDRESSES = 4             # addresses reported per device
MAX_ADDRESSES_READ = 64       # addresses of one resolve looked at
ADDRESS_TTL = 4500.0          # seconds an address is kept after it was last seen (zeroconf's PTR TTL)
MAX_TAG_KEYS = 64             # tag keys (epochs) a label is tried under
RELABEL_OVERLAP = 1.0         # seconds both labels are advertised at midnight, so peers see the new one first
EVENT_BUFFER = 64
ROTATE_CHECK = 3600.0         # longest sleep between checks of the UTC day

_INSTANCE_RE = re.compile(re.escape(INSTANCE_PREFIX) + r"([0-9a-f]{32})")
_LABEL_RE = re.compile(re.escape(INSTANCE_PREFIX) + r"([0-9a-f]{%d})" % (2 * (LABEL_MAC + 16)))


class DiscoveryError(Exception):
    """mDNS could not start; the message says why and what to do."""


@dataclass(frozen=True)
class PeerSeen:
    """A device advertised (or changed) its service: the addresses to dial it at now, and whether it is of our group.

    ``instance`` is ``p2psync-<site id>`` for a member of the group (the same every day), else the advertised label.
    """

    addresses: list[tuple[str, int]]
    instance: str
    tag_ok: bool


@dataclass(frozen=True)
class PeerGone:
    """A device withdrew its service (it said goodbye)."""

    instance: str


class GroupTags(Protocol):
    """Where the group's mDNS tags and tag keys come from (the current key epoch, and the past ones to match)."""

    def mdns_tag(self, day: int) -> str:
        """The tag we advertise on UTC day ``day``."""

    def mdns_tags(self, day: int) -> set[str]:
        """Every tag a member may advertise on ``day`` (members that missed a key rotation use an old one)."""

    def tag_keys(self) -> list[bytes]:
        """The tag keys of the epochs behind ``mdns_tags``, the one behind ``mdns_tag`` first; empty if none."""


def txt_properties(group: GroupTags, day: int) -> dict[str, str]:
    """The TXT entries we advertise on UTC day ``day``: protocol version and group tag, nothing else."""
    return {"v": str(PROTOCOL_VERSION), "g": group.mdns_tag(day)}


def tag_matches(group: GroupTags, tag: object, now: float) -> bool:
    """Whether ``tag`` (raw TXT value) is one of ``group``'s tags for yesterday, today or tomorrow at ``now``."""
    if not isinstance(tag, bytes):
        return False
    day = day_number(now)
    found = False
    for d in (day - 1, day, day + 1):
        for t in group.mdns_tags(d):
            found |= hmac.compare_digest(tag, t.encode("ascii"))
    return found


def site_id_of(instance: str) -> bytes | None:
    """The site id in a member's stable name (``PeerSeen.instance``), or None if the name is not of that form."""
    m = _INSTANCE_RE.fullmatch(instance.lower())
    return bytes.fromhex(m.group(1)) if m else None


# -- private labels ------------------------------------------------------------------

def _label_key(tag_key: bytes, day: int) -> bytes:
    return hmac.digest(tag_key, b"p2psync mdns label\0" + day.to_bytes(8, "big", signed=True), "sha256")


def _pad(key: bytes, mac: bytes) -> bytes:
    return hmac.digest(key, b"\2" + mac, "sha256")[:16]


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def instance_label(tag_key: bytes, site_id: bytes, day: int) -> str:
    """The label a device with ``site_id`` advertises on UTC day ``day``: its site id sealed under ``tag_key``.

    Deterministic (SIV-like): an 8-byte MAC of the site id, then the site id
    encrypted with a pad derived from that MAC, both under a key for the day.
    """
    if len(site_id) != 16:
        raise ValueError("site_id must be 16 bytes")
    key = _label_key(tag_key, day)
    mac = hmac.digest(key, b"\1" + site_id, "sha256")[:LABEL_MAC]
    return INSTANCE_PREFIX + (mac + _xor(site_id, _pad(key, mac))).hex()


def label_site(tag_keys: Iterable[bytes], label: str, day: int) -> bytes | None:
    """The site id sealed in ``label`` under one of ``tag_keys`` on ``day`` - 1, ``day`` or ``day`` + 1, or None."""
    m = _LABEL_RE.fullmatch(label.lower())
    if m is None:
        return None
    raw = bytes.fromhex(m.group(1))
    mac, sealed = raw[:LABEL_MAC], raw[LABEL_MAC:]
    for tag_key in tag_keys:
        for d in (day, day - 1, day + 1):
            key = _label_key(tag_key, d)
            site = _xor(sealed, _pad(key, mac))
            if hmac.compare_digest(hmac.digest(key, b"\1" + site, "sha256")[:LABEL_MAC], mac):
                return site
    return None


# -- addresses of one device ---------------------------------------------------------

class AddressTable:
    """Where one device was seen: at most ``limit`` (host, port) pairs, newest first, each dropped ``ttl``
    seconds after it was last seen; a new address never pushes out the longest-known one. ``now`` is any
    monotonic clock, in seconds."""

    def __init__(self, limit: int = MAX_ADDRESSES, ttl: float = ADDRESS_TTL) -> None:
        if limit < 2:
            raise ValueError("an address table needs room for at least 2 addresses")
        self.limit, self.ttl = limit, ttl
        self._seen: dict[tuple[str, int], list] = {}   # address -> [first tick, last tick, last seen at]
        self._tick = 0

    def observe(self, addresses: list[tuple[str, int]], now: float) -> None:
        """Note that the device was just seen at ``addresses`` (newest first)."""
        self._expire(now)
        listed = list(dict.fromkeys(addresses))
        new = [a for a in listed if a not in self._seen][: self.limit]
        for a in reversed([a for a in listed if a in self._seen or a in new]):   # oldest first
            self._tick += 1
            entry = self._seen.get(a)
            if entry is not None:
                entry[1:] = [self._tick, now]
                continue
            if len(self._seen) >= self.limit:
                keeper = min(self._seen, key=lambda k: self._seen[k][0])
                del self._seen[min((k for k in self._seen if k != keeper), key=lambda k: self._seen[k][1])]
            self._seen[a] = [self._tick, self._tick, now]

    def current(self, now: float) -> list[tuple[str, int]]:
        """The addresses to dial now, newest first."""
        self._expire(now)
        return sorted(self._seen, key=lambda k: -self._seen[k][1])

    def _expire(self, now: float) -> None:
        for a in [a for a, e in self._seen.items() if now - e[2] > self.ttl]:
            del self._seen[a]

    def __len__(self) -> int:
        return len(self._seen)


class MdnsDiscovery:
    """Advertises this device and reports the p2psync services on the LAN.

    Iterate over it (or ``events``) for ``PeerSeen`` / ``PeerGone``; the
    iteration ends after ``run`` returns. ``run`` may be called once.
    ``instance`` is how members of the group report this device; ``label``
    is what it advertises today.
    """

    def __init__(
        self,
        site_id: bytes,
        group: GroupTags,
        port: int,
        interfaces: list[str] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(site_id, bytes) or len(site_id) != 16:
            raise ValueError("site_id must be 16 bytes")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is not a TCP port (1-65535)")
        self.site_id = site_id
        self.instance = INSTANCE_PREFIX + site_id.hex()
        self.port = port
        self._group = group
        self._interfaces = _check_interfaces(interfaces)
        self._clock = clock
        self._send, self.events = trio.open_memory_channel(EVENT_BUFFER)
        self._known: dict[str, int] = {}      # present name -> generation of its latest change
        self._who: dict[str, str] = {}        # present name -> the instance it is reported as
        self._members: set[str] = set()       # present names whose label opened under a group key
        self._tables: dict[str, AddressTable] = {}
        self._reported: set[str] = set()      # instances we emitted PeerSeen for and no PeerGone since
        self._own: list[str] = []             # the labels we advertised lately
        self._random: dict[int, str] = {}     # day -> our label while we hold no tag key
        self._opened: dict[tuple[str, int], bytes | None] = {}   # (label, day) -> site (a cache)
        self._opened_keys: tuple[bytes, ...] = ()
        self._advert: ServiceInfo | None = None
        self.ignored = 0                      # names dropped because MAX_PEERS / MAX_STRANGERS were tracked
        self._ran = False
        self._announcing: list = []           # zeroconf's announcement tasks (futures on its loop)

    def __aiter__(self) -> trio.MemoryReceiveChannel:
        return self.events

    @property
    def label(self) -> str:
        """The label this device advertises (once running; before that, today's by its clock)."""
        if self._advert is not None:
            return _label(self._advert.name)
        return self._label_for(day_number(self._clock()))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Advertise and browse until cancelled, then say goodbye; DiscoveryError if mDNS cannot start."""
        if self._ran:
            raise RuntimeError("MdnsDiscovery.run() can be called only once")
        self._ran = True
        portal = ThreadPortal()
        zc = browser = None
        try:
            zc = await trio.to_thread.run_sync(self._open_zeroconf)
            day = day_number(self._clock())
            info = self._service_info(day)
            await self._advertise(zc, info)

            def on_change(*, zeroconf, service_type, name, state_change) -> None:
                portal.post((name, state_change))

            browser = await trio.to_thread.run_sync(
                lambda: ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change]))
            log.debug("advertising %s as %s on port %d at %s", self.instance, _label(info.name), self.port,
                      ", ".join(self._advertised()))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, zc, portal.receive, nursery)
                nursery.start_soon(self._rotate_label, zc, day)
                task_status.started()
        finally:
            portal.close()
            with trio.CancelScope(shield=True):
                if zc is not None:
                    await trio.to_thread.run_sync(_shutdown, zc, browser, self._announcing)
                self._send.close()

    # -- labels ----------------------------------------------------------------

    def _label_for(self, day: int) -> str:
        keys = self._group.tag_keys()
        if keys:
            return instance_label(keys[0], self.site_id, day)
        if day not in self._random:   # no key yet: a label nobody can link to us, new every day
            self._random = {day: INSTANCE_PREFIX + secrets.token_hex(LABEL_MAC + 16)}
        return self._random[day]

    def _identify(self, label: str) -> tuple[str | None, bool]:
        """(the instance ``label`` is reported as, or None for our own; whether it is a member's label)."""
        label = label.lower()
        if label in self._own:
            return None, False
        keys = tuple(self._group.tag_keys()[:MAX_TAG_KEYS])
        if keys != self._opened_keys or len(self._opened) > 4 * (MAX_PEERS + MAX_STRANGERS):
            self._opened, self._opened_keys = {}, keys
        day = day_number(self._clock())
        if (label, day) not in self._opened:
            self._opened[label, day] = label_site(keys, label, day)
        site = self._opened[label, day]
        if site is None:
            return label, False
        if site == self.site_id:
            return None, False   # ours, from another day (or a copy of our home directory elsewhere)
        return INSTANCE_PREFIX + site.hex(), True

    # -- zeroconf calls (run in worker threads) ------------------------------

    def _open_zeroconf(self) -> Zeroconf:
        try:
            return Zeroconf(interfaces=self._interfaces or InterfaceChoice.All,
                            ip_version=IPVersion.V4Only)
        except OSError as e:
            where = (f"{', '.join(self._interfaces)} (is that the address of an interface "
                     f"that is up?)" if self._interfaces else "all interfaces")
            raise DiscoveryError(
                f"cannot start mDNS on {where}: {e.strerror or e}; "
                f"run with --no-mdns and give peers with --peer") from e

    async def _advertise(self, zc: Zeroconf, info: ServiceInfo) -> None:
        """Register ``info`` (our service under a new label); the labels of the last days stay known as ours."""
        label = _label(info.name)
        self._own = [*self._own[-3:], label.lower()]
        await trio.to_thread.run_sync(self._register, zc, info, label)
        self._advert = info

    def _register(self, zc: Zeroconf, info: ServiceInfo, label: str) -> None:
        try:
            self._announcing.append(
                _in_zeroconf_loop(zc, lambda: zc.async_register_service(info, cooperating_responders=True)))
        except NonUniqueNameException:
            raise DiscoveryError(
                f"another host already advertises {label} (this device's label): is this device's agent "
                f"running twice, or was its home directory copied to another machine?") from None
        except TimeoutError:
            raise DiscoveryError(
                f"mDNS registration of {label} did not finish within {CALL_TIMEOUT:g} s") from None

    def _advertised(self) -> list[str]:
        if self._interfaces:
            return list(self._interfaces)
        found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
                 if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
        return list(dict.fromkeys(found)) or ["127.0.0.1"]

    def _service_info(self, day: int) -> ServiceInfo:
        label = self._label_for(day)
        return ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=self.port,
            properties=txt_properties(self._group, day),
            server=f"{label}.local.",
            addresses=[socket.inet_aton(a) for a in self._advertised()],
        )

    # -- trio side -----------------------------------------------------------

    async def _pump(self, zc: Zeroconf, changes: trio.MemoryReceiveChannel, nursery: trio.Nursery) -> None:
        async for name, change in changes:
            label = _label(name)
            if label is None:
                continue
            if change is ServiceStateChange.Removed:
                await self._removed(name)
                continue
            who, member = self._identify(label)
            if who is None:
                continue
            if name not in self._known:
                tracked = sum(1 for n in self._known if (n in self._members) == member)
                if tracked >= (MAX_PEERS if member else MAX_STRANGERS):
                    self.ignored += 1
                    log.debug("ignoring mDNS service %r: already tracking %d", name, tracked)
                    continue
            self._who[name] = who   # a stranger's label may open once we hold a newer epoch's key
            if member:
                self._members.add(name)
            else:
                self._members.discard(name)
            generation = self._known[name] = self._known.get(name, 0) + 1
            nursery.start_soon(self._resolve, zc, name, generation)

    async def _removed(self, name: str) -> None:
        self._known.pop(name, None)
        self._members.discard(name)
        who = self._who.pop(name, None)
        if who in self._reported and who not in self._who.values():
            self._reported.discard(who)
            await self._emit(PeerGone(who))

    async def _resolve(self, zc: Zeroconf, name: str, generation: int) -> None:
        try:
            info = await trio.to_thread.run_sync(
                zc.get_service_info, SERVICE_TYPE, name, RESOLVE_TIMEOUT_MS, abandon_on_cancel=True)
        except Exception as e:  # hostile or broken records must not stop discovery
            log.debug("cannot resolve mDNS service %r: %s", name, e)
            return
        if self._known.get(name) != generation:
            return  # removed or changed again meanwhile
        if info is None:
            log.debug("mDNS service %r did not answer within %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)[:MAX_ADDRESSES_READ]   # newest first
        if not addresses or not info.port:
            log.debug("mDNS service %r has no IPv4 address or port; ignored", name)
            return
        who = self._who[name]
        tag_ok = name in self._members and tag_matches(self._group, (info.properties or {}).get(b"g"), self._clock())
        now = trio.current_time()
        table = self._tables.get(who)
        if table is None:
            self._prune_tables(now)
            table = self._tables[who] = AddressTable()
        table.observe([(a, info.port) for a in addresses], now)
        self._reported.add(who)
        await self._emit(PeerSeen(table.current(now), who, tag_ok))

    def _prune_tables(self, now: float) -> None:
        """Forget devices with no name present whose addresses expired; the oldest such beyond the cap."""
        live = set(self._who.values())
        idle = [w for w in self._tables if w not in live]
        for w in idle:
            if not self._tables[w].current(now):
                del self._tables[w]
        excess = len(self._tables) - (MAX_PEERS + MAX_STRANGERS)
        for w in [w for w in idle if w in self._tables][:max(excess, 0)]:
            del self._tables[w]

    async def _emit(self, event: PeerSeen | PeerGone) -> None:
        try:
            await self._send.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # nobody listens any more; keep advertising

    async def _rotate_label(self, zc: Zeroconf, day: int) -> None:
        """At each UTC midnight: advertise the new day's label and tag, then withdraw the old label."""
        while True:
            left = (day + 1) * 86400 - self._clock()
            await trio.sleep(min(max(left, 0.0) + 0.05, ROTATE_CHECK))
            today = day_number(self._clock())
            if today == day:
                continue
            day, old = today, self._advert
            new = self._service_info(day)
            if old is not None and new.name == old.name:
                self._announcing.append(await trio.to_thread.run_sync(
                    _in_zeroconf_loop, zc, lambda: zc.async_update_service(new)))
            else:
                await self._advertise(zc, new)
                if old is not None:
                    await trio.sleep(RELABEL_OVERLAP)
                    await trio.to_thread.run_sync(_in_zeroconf_loop, zc, lambda: zc.async_unregister_service(old))
            del self._announcing[:-1]
            log.debug("mDNS label and group tag rotated for UTC day %d", day)


def _in_zeroconf_loop(zc: Zeroconf, make_coro) -> object:
    """Run a zeroconf coroutine on its loop; wait for it, not for the announcements it schedules."""
    assert zc.loop is not None
    return asyncio.run_coroutine_threadsafe(make_coro(), zc.loop).result(CALL_TIMEOUT)


def _shutdown(zc: Zeroconf, browser: ServiceBrowser | None, announcing: list) -> None:
    """Stop browsing, say goodbye for our service and close the sockets."""
    if browser is not None:
        try:
            browser.cancel()
        except Exception as e:  # shutting down anyway
            log.debug("stopping the mDNS browser: %s", e)
    try:
        _in_zeroconf_loop(zc, lambda: _goodbye(zc, announcing))
    except Exception as e:
        log.warning("mDNS goodbye not sent (peers will find out from heartbeats): %s", e)
    try:
        zc.close()
    except Exception as e:
        log.warning("mDNS shutdown did not finish cleanly (peers may not see a goodbye): %s", e)


async def _goodbye(zc: Zeroconf, announcing: list) -> None:
    """Withdraw our service (goodbye x3), with nothing about it left to go out after the first goodbye.

    zeroconf announces a service three times, 225 ms apart, and delays
    multicast answers (20-120 ms, more to aggregate them). An announcement or
    answer still pending when the goodbye goes out re-announces us just after
    it, and receivers drop the goodbye's two repeats as duplicate packets
    (identical bytes within 1 s): they would believe we are still there until
    the records expire, and keep dialling us. So, in the same loop step that
    removes our service from the registry, cancel the pending announcements
    and drop the queued answers (only our own records are ever queued).
    """
    for task in announcing:
        if hasattr(task, "cancel"):
            task.cancel()
    for name in ("out_queue", "out_delay_queue"):
        pending = getattr(getattr(zc, name, None), "queue", None)
        if pending is not None:
            pending.clear()
    await zc.async_unregister_all_services()


def _label(name: str) -> str | None:
    suffix = "." + SERVICE_TYPE
    if len(name) <= len(suffix) or not name.lower().endswith(suffix):
        return None
    return name[: -len(suffix)]


def _check_interfaces(interfaces: list[str] | None) -> list[str] | None:
    if interfaces is None:
        return None
    if isinstance(interfaces, str):
        raise ValueError("interfaces must be a list of IPv4 addresses, or None for all")
    out = []
    for a in interfaces:
        try:
            ip = ipaddress.IPv4Address(a)
        except ValueError:
            raise ValueError(f"mDNS interface {a!r} is not an IPv4 address; give the "
                             f"interface's IPv4 address, or None for all interfaces") from None
        if ip.is_unspecified:
            raise ValueError("mDNS interface 0.0.0.0 is not an interface; give None for all interfaces")
        out.append(str(ip))
    if not out:
        raise ValueError("the list of mDNS interfaces is empty; give None for all interfaces")
    return out
