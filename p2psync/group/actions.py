"""Membership events this device signs: founding, invites, admissions, removals, roles, key shares.

Each function returns the events to add to the log (and persist, and push
to peers); none touches the store or the network. Callers check who may do
what first (the CLI gives clear messages); the log's resolution rules are
the real check, on every device.
"""

from __future__ import annotations

from ..identity.home import Device, DeviceKeys
from ..identity.invites import InviteCode, invite_id, invite_psk, new_invite_secret
from ..identity.keys import EpochKeys, new_secret, seal_box
from ..model.membership import ROLE_ADMIN, Event, Member, make_event
from .keyring import box_payload
from .members import GroupMembers

MAX_EPOCHS_PER_SHARE = 64


class ActionError(Exception):
    """A membership action cannot be done; the message says why and what to do."""


def _name_box(keys: EpochKeys, site: bytes, name: str) -> bytes:
    return keys.seal(name.encode("utf-8"), b"name" + site)


def found_group(keys: DeviceKeys, name: str, group_id: bytes, now_ms: int) -> Event:
    """The found event of a new group: this device its first admin, holding epoch 0's secret."""
    secret = new_secret()
    epoch0 = EpochKeys.derive(group_id, [(b"", secret)])
    box = seal_box(keys.static_public, box_payload([(b"", secret)]), group_id, keys.site_id)
    body = {"site": keys.site_id, "sign": keys.sign_public, "dh": keys.static_public,
            "name": _name_box(epoch0, keys.site_id, name), "boxes": {keys.site_id: box}}
    return make_event("found", group_id, keys.site_id, keys.sign_private, (), now_ms, body)


def _sign(device: Device, members: GroupMembers, kind: str, body: dict, now_ms: int,
          parents: tuple[bytes, ...] | None = None) -> Event:
    return make_event(kind, device.group_id, device.site_id, device.sign_private,
                      members.heads if parents is None else parents, now_ms, body)


def _current_keys(members: GroupMembers) -> EpochKeys:
    if members.keys is None or members.keys.current is None:
        raise ActionError("this device holds no key of the group's current epoch yet: run the agent "
                          "until it has synced with an admin, then try again")
    return members.keys.current


def require_admin(device: Device, members: GroupMembers) -> None:
    me = members.me
    if me is None or me.state != "current":
        raise ActionError("this device is not a current member of its group")
    if me.role != ROLE_ADMIN:
        raise ActionError("only an admin can do this; `p2psync devices` lists the admins")


def invite(device: Device, members: GroupMembers, role: str, expires_ms: int, now_ms: int,
           addresses=(), relay: str | None = None) -> tuple[InviteCode, Event]:
    """A new single-use invite: the code to give the new device and the event that records it."""
    require_admin(device, members)
    secret = new_invite_secret()
    iid = invite_id(secret)
    psk_box = _current_keys(members).seal(invite_psk(secret), b"invite" + iid)
    ev = _sign(device, members, "invite", {"id": iid, "expires": expires_ms, "role": role, "psk": psk_box}, now_ms)
    code = InviteCode(device.group_id, device.found, secret, expires_ms, tuple(addresses), relay)
    return code, ev


def cancel_invite(device: Device, members: GroupMembers, iid: bytes, now_ms: int) -> Event:
    require_admin(device, members)
    return _sign(device, members, "cancel", {"id": iid}, now_ms)


def _shares(device: Device, members: GroupMembers, targets: dict[bytes, list[bytes]], now_ms: int,
            parents: tuple[bytes, ...] | None = None) -> list[Event]:
    """Share events giving each target site the secrets of the listed epochs (that we hold)."""
    ring = members.keys
    out: list[Event] = []
    by_epochs: dict[tuple, dict[bytes, bytes]] = {}
    for site, epochs in targets.items():
        m = members.state.member(site)
        held = tuple(h for h in epochs if h in ring.secrets)
        if m is None or not held:
            continue
        for i in range(0, len(held), MAX_EPOCHS_PER_SHARE):
            chunk = held[i:i + MAX_EPOCHS_PER_SHARE]
            box = seal_box(m.dh_pub, box_payload([(h, ring.secrets[h]) for h in chunk]), device.group_id, site)
            by_epochs.setdefault(chunk, {})[site] = box
    for chunk, boxes in by_epochs.items():
        ev = _sign(device, members, "share", {"boxes": boxes, "epochs": list(chunk)}, now_ms,
                   parents if parents is not None else None)
        out.append(ev)
    return out


def admit(device: Device, members: GroupMembers, site: bytes, sign_pub: bytes, dh_pub: bytes, name: str,
          role: str, iid: bytes, now_ms: int) -> list[Event]:
    """The add event of a joining device and a share of every epoch secret we hold (to read older data)."""
    require_admin(device, members)
    if members.state.member(site) is not None:
        raise ActionError(f"site {site.hex()[:12]} is already in the group's log")
    add = _sign(device, members, "add", {"site": site, "sign": sign_pub, "dh": dh_pub,
                                         "name": _name_box(_current_keys(members), site, name),
                                         "role": role, "invite": iid}, now_ms)
    members.add([add])
    shares = _shares(device, members, {site: list(members.keys.secrets)}, now_ms)
    return [add, *shares]


def remove(device: Device, members: GroupMembers, target: Member, last_dbv: int, now_ms: int) -> list[Event]:
    """Remove ``target`` (its versions after ``last_dbv`` never count) and start a new key epoch."""
    require_admin(device, members)
    if target.state != "current" and target.state != "succeeded":
        raise ActionError(f"{members.who(target.site)} is already removed")
    admins = [m for m in members.state.admins() if m.site != target.site]
    if target.role == ROLE_ADMIN and not admins:
        raise ActionError(f"{members.who(target.site)} is the group's last admin: make another device "
                          f"admin first (`p2psync role DEVICE admin`)")
    rm = _sign(device, members, "remove", {"site": target.site, "last": last_dbv}, now_ms)
    members.add([rm])
    return [rm, new_epoch(device, members, now_ms)]


def new_epoch(device: Device, members: GroupMembers, now_ms: int) -> Event:
    """A new key epoch: a fresh secret sealed to every current member."""
    secret = new_secret()
    boxes = {m.site: seal_box(m.dh_pub, box_payload([(b"", secret)]), device.group_id, m.site)
             for m in members.state.current()}
    ev = _sign(device, members, "epoch", {"boxes": boxes}, now_ms)
    members.add([ev])
    return ev


def set_role(device: Device, members: GroupMembers, target: Member, role: str, now_ms: int) -> Event:
    require_admin(device, members)
    if target.state != "current":
        raise ActionError(f"{members.who(target.site)} is not a current member")
    if target.role == ROLE_ADMIN and role != ROLE_ADMIN and len(members.state.admins()) <= 1:
        raise ActionError(f"{members.who(target.site)} is the group's last admin: make another device admin first")
    return _sign(device, members, "role", {"site": target.site, "role": role}, now_ms)


def shares_for_lacking(device: Device, members: GroupMembers, now_ms: int) -> list[Event]:
    """Share events for current members that hold no box for a current epoch (an admin's chore)."""
    me = members.me
    if me is None or me.state != "current" or me.role != ROLE_ADMIN or members.keys is None:
        return []
    lacking = {site: list(epochs) for site, epochs in members.state.lacking_shares().items()}
    return _shares(device, members, lacking, now_ms) if lacking else []


def successor(device: Device, members: GroupMembers, new_keys: DeviceKeys, name: str, now_ms: int) -> Event:
    """This device continues as a new site with new keys (a restored or cloned database); no admin needed.

    Its parents leave out any successor of this site already in the log and what followed it: that
    one was signed by a copy of this device, and this continuation is concurrent with it (a
    successor signed after the site was succeeded would not count: docs/membership.md rule 9).
    """
    return _sign(device, members, "successor", {"site": new_keys.site_id, "sign": new_keys.sign_public,
                                                "dh": new_keys.static_public,
                                                "name": _name_box(_current_keys(members), new_keys.site_id, name)},
                 now_ms, parents=_before_successors(members, device.site_id))


def _before_successors(members: GroupMembers, site: bytes) -> tuple[bytes, ...] | None:
    """The heads of the log without ``site``'s successor events and their descendants (None: the heads)."""
    events = members.log.events()
    after: set[bytes] = set()
    for ev in events:   # parents first
        if (ev.kind == "successor" and ev.signer == site) or any(p in after for p in ev.parents):
            after.add(ev.hash)
    if not after:
        return None
    keep = [ev for ev in events if ev.hash not in after]
    referenced = {p for ev in keep for p in ev.parents}
    return tuple(sorted(ev.hash for ev in keep if ev.hash not in referenced))
