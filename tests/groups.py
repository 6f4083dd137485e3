"""Test helpers for groups: a single-epoch key set where tests need only tags and keys, and the
membership of a real device home (read from its database, as the agent does)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from p2psync.group import GroupMembers
from p2psync.identity import EpochKeys, load_device
from p2psync.store import SqliteStore


@dataclass(frozen=True)
class TagGroup:
    """One epoch of a group, as discovery and Noise see it: an id and a secret (tests only)."""

    group_id: bytes
    key: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> TagGroup:
        return cls(secrets.token_bytes(16), secrets.token_bytes(32))

    @property
    def epoch(self) -> EpochKeys:
        return EpochKeys.derive(self.group_id, [(b"", self.key)])

    def psk(self) -> bytes:
        return self.epoch.psk()

    def tag_key(self) -> bytes:
        return self.epoch.tag_key()

    def data_key(self) -> bytes:
        return self.epoch.data_key()

    def mdns_tag(self, day: int) -> str:
        return self.epoch.mdns_tag(day)

    def mdns_tags(self, day: int) -> set[str]:
        return {self.mdns_tag(day)}

    def tag_keys(self) -> list[bytes]:
        return [self.tag_key()]


def device_members(home) -> GroupMembers:
    """The membership log of the device in ``home``, resolved, with its keys (as its agent sees it)."""
    device = load_device(home)
    store = SqliteStore(device.db_path, device.site_id)
    try:
        members = GroupMembers(device.found, device.site_id, device.static_private)
        members.load(store.member_events())
    finally:
        store.close()
    return members


def make_group(n: int, now_ms: int = 1_700_000_000_000) -> tuple[list, list[GroupMembers]]:
    """A group of ``n`` devices built in memory, the first the founding admin, the others added by it:
    (their DeviceKeys, each one's GroupMembers holding the whole log)."""
    from p2psync.group import actions
    from p2psync.identity import Device, DeviceKeys
    from p2psync.model.membership import ROLE_MEMBER

    keys = [DeviceKeys.generate() for _ in range(n)]
    group_id = secrets.token_bytes(16)
    found = actions.found_group(keys[0], "d0", group_id, now_ms)
    admin = GroupMembers(found.hash, keys[0].site_id, keys[0].static_private)
    admin.add([found])
    dev0 = Device(home=None, site_id=keys[0].site_id, name="d0", db_path=None, static_private=keys[0].static_private,
                  sign_private=keys[0].sign_private, group_id=group_id, found=found.hash)
    for i, k in enumerate(keys[1:], 1):
        admin.add(actions.admit(dev0, admin, k.site_id, k.sign_public, k.static_public, f"d{i}", ROLE_MEMBER, b"",
                                now_ms + i))
    events = admin.encoded()
    out = []
    for k in keys:
        m = GroupMembers(found.hash, k.site_id, k.static_private)
        m.load(events)
        out.append(m)
    return keys, out
