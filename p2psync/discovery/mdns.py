"""mDNS/DNS-SD discovery of the group's devices on the local network.

How this works: one Zeroconf instance (it runs its own asyncio thread)
advertises this device as ``p2psync-<site id hex>._p2psync._tcp.local.`` with
two TXT entries, ``v`` (protocol version) and ``g`` (the group's tag for the
current UTC day, an HMAC under a key derived from the group key), and browses
for the same service type. The instance name holds the unique site id, so
registration skips probing (``cooperating_responders``) and takes milliseconds.

Browser callbacks cross into trio through a ThreadPortal as (name, change)
pairs. A trio task resolves every added or updated name (SRV, TXT and A
records; off the trio thread) and emits ``PeerSeen``, or ``PeerGone`` when the
peer says goodbye. A peer belongs to our group when its tag is the group's tag
for yesterday, today or tomorrow by our clock, so devices keep recognising each
other across midnight and small clock differences; other services are reported
with ``tag_ok=False``. Our own tag is re-announced when the UTC day changes.

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
import socket
import time
from collections.abc import Callable
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
RESOLVE_TIMEOUT_MS = 3000     # waiting for a peer's SRV/TXT/A records
CALL_TIMEOUT = 10.0           # a register/update call on zeroconf's loop
MAX_PEERS = 256               # names tracked at once; a flood beyond this is ignored
MAX_ADDRESSES = 8             # addresses reported per peer
EVENT_BUFFER = 64
ROTATE_CHECK = 3600.0         # longest sleep between checks of the UTC day

_INSTANCE_RE = re.compile(re.escape(INSTANCE_PREFIX) + r"([0-9a-f]{32})")


class DiscoveryError(Exception):
    """mDNS could not start; the message says why and what to do."""


@dataclass(frozen=True)
class PeerSeen:
    """A device advertised (or changed) its service: where to dial it, and whether it is of our group."""

    addresses: list[tuple[str, int]]
    instance: str
    tag_ok: bool


@dataclass(frozen=True)
class PeerGone:
    """A device withdrew its service (it said goodbye)."""

    instance: str


class GroupTags(Protocol):
    """Where the group's mDNS tags come from (the current key epoch, and the past ones to match)."""

    def mdns_tag(self, day: int) -> str:
        """The tag we advertise on UTC day ``day``."""

    def mdns_tags(self, day: int) -> set[str]:
        """Every tag a member may advertise on ``day`` (members that missed a key rotation use an old one)."""


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
    """The site id in a p2psync instance name, or None if the name is not of that form."""
    m = _INSTANCE_RE.fullmatch(instance.lower())
    return bytes.fromhex(m.group(1)) if m else None


class MdnsDiscovery:
    """Advertises this device and reports the p2psync services on the LAN.

    Iterate over it (or ``events``) for ``PeerSeen`` / ``PeerGone``; the
    iteration ends after ``run`` returns. ``run`` may be called once.
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
        self.instance = INSTANCE_PREFIX + site_id.hex()
        self.port = port
        self._group = group
        self._interfaces = _check_interfaces(interfaces)
        self._clock = clock
        self._send, self.events = trio.open_memory_channel(EVENT_BUFFER)
        self._known: dict[str, int] = {}     # present name -> generation of its latest change
        self._reported: set[str] = set()     # names we emitted PeerSeen for
        self.ignored = 0                     # names dropped because MAX_PEERS were tracked
        self._ran = False
        self._announcing: list = []          # zeroconf's announcement tasks (futures on its loop)

    def __aiter__(self) -> trio.MemoryReceiveChannel:
        return self.events

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
            await trio.to_thread.run_sync(self._register, zc, info)

            def on_change(*, zeroconf, service_type, name, state_change) -> None:
                portal.post((name, state_change))

            browser = await trio.to_thread.run_sync(
                lambda: ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change]))
            log.debug("advertising %s on port %d at %s", self.instance, self.port,
                      ", ".join(self._advertised()))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, zc, portal.receive, nursery)
                nursery.start_soon(self._rotate_tag, zc, day)
                task_status.started()
        finally:
            portal.close()
            with trio.CancelScope(shield=True):
                if zc is not None:
                    await trio.to_thread.run_sync(_shutdown, zc, browser, self._announcing)
                self._send.close()

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

    def _register(self, zc: Zeroconf, info: ServiceInfo) -> None:
        try:
            self._announcing.append(
                _in_zeroconf_loop(zc, lambda: zc.async_register_service(info, cooperating_responders=True)))
        except NonUniqueNameException:
            raise DiscoveryError(
                f"another host already advertises {self.instance}: is this device's agent "
                f"running twice, or was its home directory copied to another machine?") from None
        except TimeoutError:
            raise DiscoveryError(
                f"mDNS registration of {self.instance} did not finish within {CALL_TIMEOUT:g} s") from None

    def _advertised(self) -> list[str]:
        if self._interfaces:
            return list(self._interfaces)
        found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
                 if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
        return list(dict.fromkeys(found)) or ["127.0.0.1"]

    def _service_info(self, day: int) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self.instance}.{SERVICE_TYPE}",
            port=self.port,
            properties=txt_properties(self._group, day),
            server=f"{self.instance}.local.",
            addresses=[socket.inet_aton(a) for a in self._advertised()],
        )

    # -- trio side -----------------------------------------------------------

    async def _pump(self, zc: Zeroconf, changes: trio.MemoryReceiveChannel, nursery: trio.Nursery) -> None:
        async for name, change in changes:
            label = _label(name)
            if label is None or label.lower() == self.instance:
                continue
            if change is ServiceStateChange.Removed:
                self._known.pop(name, None)
                if name in self._reported:
                    self._reported.discard(name)
                    await self._emit(PeerGone(label))
                continue
            if name not in self._known and len(self._known) >= MAX_PEERS:
                self.ignored += 1
                log.debug("ignoring mDNS service %r: already tracking %d", name, MAX_PEERS)
                continue
            generation = self._known[name] = self._known.get(name, 0) + 1
            nursery.start_soon(self._resolve, zc, name, label, generation)

    async def _resolve(self, zc: Zeroconf, name: str, label: str, generation: int) -> None:
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
        addresses = list(dict.fromkeys(info.parsed_addresses(IPVersion.V4Only)))[:MAX_ADDRESSES]
        if not addresses or not info.port:
            log.debug("mDNS service %r has no IPv4 address or port; ignored", name)
            return
        tag_ok = tag_matches(self._group, (info.properties or {}).get(b"g"), self._clock())
        self._reported.add(name)
        await self._emit(PeerSeen([(a, info.port) for a in addresses], label, tag_ok))

    async def _emit(self, event: PeerSeen | PeerGone) -> None:
        try:
            await self._send.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # nobody listens any more; keep advertising

    async def _rotate_tag(self, zc: Zeroconf, day: int) -> None:
        while True:
            left = (day + 1) * 86400 - self._clock()
            await trio.sleep(min(max(left, 0.0) + 0.05, ROTATE_CHECK))
            today = day_number(self._clock())
            if today != day:
                day = today
                info = self._service_info(day)
                self._announcing.append(await trio.to_thread.run_sync(
                    _in_zeroconf_loop, zc, lambda: zc.async_update_service(info)))
                del self._announcing[:-1]
                log.debug("mDNS group tag rotated for UTC day %d", day)


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
