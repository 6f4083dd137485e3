"""The group membership log: signed events in a DAG, resolved the same way on every device.

An event names the hashes of the events its signer had seen (its parents).
Whether an event counts depends only on its causal past, and the membership of
a set of events depends only on the set, so every device holding the same
events computes the same membership, whatever order they arrived in.
"""

# How this works
#
# Order. depth(found) = 0, depth(e) = 1 + max depth of its parents. A set of
# events is always processed in (depth, hash) order -- the canonical order. A
# parent has a smaller depth than its child, so the canonical order of a
# causally closed subset is the restriction of any larger set's order to it.
#
# Resolution of a set: one pass over its *valid* events in canonical order
# (_Pass.apply). Whenever a remove or role change x leaves no current admin,
# one device gets its rights back, there and then (so it keeps them when it
# later appoints others): of the devices that lost admin rights (removed or
# demoted while a current admin) through x or through an event concurrent
# with x, the one added earliest. A device stays out if x's signer had seen
# any event removing or demoting it. After
# the pass (_settle), an invite used by several adds keeps the add with the
# lowest hash, the other devices are removed, and if that leaves no admin the
# earliest-added device that ever lost admin rights gets them back.
#
# Validity of e: resolve P = strict ancestors of e to a state S; e counts if
# its signer is a current member of S whose key verifies the signature, is an
# admin where the kind needs one, and the kind's own check against S passes.
# It is computed once, when e is accepted (all its parents are known).
#
# Cost. Ancestor sets are Python ints used as bitsets over the acceptance
# index. Each accepted event keeps the pass state of its inclusive past
# (copy-on-write dicts of frozen records): with one parent p, the state of P
# is p's snapshot; with several, P is sorted and replayed from the latest
# event c whose inclusive past is a prefix of P's canonical order (a "cut"),
# which in a mostly linear log is shortly before the fork.

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ROLE_ADMIN = "admin"
ROLE_MEMBER = "member"
ROLES = (ROLE_ADMIN, ROLE_MEMBER)
KINDS = ("found", "add", "remove", "role", "epoch", "share", "successor", "invite", "cancel")
HASH_LEN = 32
SITE_LEN = 16
GROUP_LEN = 16
KEY_LEN = 32
SIG_LEN = 64
INVITE_ID_LEN = 16
MAX_EVENT_BYTES = 256 * 1024
MAX_PARENTS = 64
MAX_BOXES = 1000
MAX_BOX_BYTES = 4096
MAX_NAME_BOX = 512
MAX_PSK_BOX = 256
MAX_PENDING = 10_000      # events held while their parents are unknown; past it new ones are dropped (resent later)
MAX_DEAD = 100_000        # rejected hashes remembered (so their descendants are rejected without work)
VERSION = 1
U63 = 1 << 63

SIGN_PREFIX = b"p2psync membership event v1\x00"
HASH_PERSON = b"p2psync-member"

CURRENT, REMOVED, SUCCEEDED = "current", "removed", "succeeded"
PENDING, USED, CANCELLED = "pending", "used", "cancelled"


class MembershipError(ValueError):
    """An event is malformed or cannot be made; the message says what."""


def event_hash(raw: bytes, signature: bytes) -> bytes:
    """The 32-byte hash naming an event: blake2b of its signed bytes and its signature.

    The signature is covered so that a copy of an event with a damaged signature is another event
    (ignored: bad signature) and can never shadow the genuine one (Ed25519 as verified here is not
    malleable, so a genuine event has one signature).
    """
    return hashlib.blake2b(raw + signature, digest_size=HASH_LEN, person=HASH_PERSON).digest()


@dataclass(frozen=True, eq=False)
class Event:
    """One signed membership event; build it with make_event or decode_event. Equal when hashes are."""

    raw: bytes
    signature: bytes
    kind: str
    group: bytes
    signer: bytes
    parents: tuple[bytes, ...]
    wall_ms: int
    body: Mapping[str, object]
    hash: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", event_hash(self.raw, self.signature))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Event):
            return self.hash == other.hash
        return NotImplemented

    def __hash__(self) -> int:
        return int.from_bytes(self.hash[:8], "big")

    def __repr__(self) -> str:
        return f"Event({self.kind} {self.hash.hex()[:12]} by {self.signer.hex()[:12]})"


# ---------------------------------------------------------------- encoding

_SCHEMA: dict[str, dict[str, tuple]] = {
    "found": {"site": ("len", SITE_LEN), "sign": ("len", KEY_LEN), "dh": ("len", KEY_LEN),
              "name": ("max", MAX_NAME_BOX), "boxes": ("boxes",)},
    "add": {"site": ("len", SITE_LEN), "sign": ("len", KEY_LEN), "dh": ("len", KEY_LEN),
            "name": ("max", MAX_NAME_BOX), "role": ("role",), "invite": ("invite",)},
    "remove": {"site": ("len", SITE_LEN), "last": ("u63",)},
    "role": {"site": ("len", SITE_LEN), "role": ("role",)},
    "epoch": {"boxes": ("boxes",)},
    "share": {"boxes": ("boxes",), "epochs": ("hashes",)},
    "successor": {"site": ("len", SITE_LEN), "sign": ("len", KEY_LEN), "dh": ("len", KEY_LEN),
                  "name": ("max", MAX_NAME_BOX)},
    "invite": {"id": ("len", INVITE_ID_LEN), "expires": ("u63",), "role": ("role",), "psk": ("max", MAX_PSK_BOX)},
    "cancel": {"id": ("len", INVITE_ID_LEN)},
}


def _fail(msg: str) -> MembershipError:
    return MembershipError(msg)


def _check_bytes(v: object, what: str, n: int | None = None, most: int | None = None) -> bytes:
    if type(v) is not bytes:
        raise _fail(f"{what} must be bytes, got {type(v).__name__}")
    if n is not None and len(v) != n:
        raise _fail(f"{what} must be {n} bytes, got {len(v)}")
    if most is not None and len(v) > most:
        raise _fail(f"{what} must be at most {most} bytes, got {len(v)}")
    return v


def _check_u63(v: object, what: str) -> int:
    if type(v) is not int or not 0 <= v < U63:
        raise _fail(f"{what} must be an integer in [0, 2^63), got {v!r:.40}")
    return v


def _check_hashes(v: object, what: str, least: int, most: int) -> tuple[bytes, ...]:
    """A strictly increasing list of 32-byte hashes, of length least..most."""
    if type(v) is not list:
        raise _fail(f"{what} must be a list, got {type(v).__name__}")
    if not least <= len(v) <= most:
        raise _fail(f"{what}: {len(v)} entries (allowed {least}..{most})")
    prev = b""
    for h in v:
        _check_bytes(h, f"{what} entry", HASH_LEN)
        if h <= prev:
            raise _fail(f"{what} must be sorted and unique")
        prev = h
    return tuple(v)


def _check_body(kind: str, body: object) -> MappingProxyType:
    """The body as a read-only mapping, after checking every field of ``kind``'s schema."""
    schema = _SCHEMA[kind]
    if type(body) is not dict:
        raise _fail(f"{kind}: body must be a map, got {type(body).__name__}")
    if set(body) != set(schema) or not all(type(k) is str for k in body):
        extra = sorted(map(repr, set(body) - set(schema)))
        missing = sorted(set(schema) - set(body))
        raise _fail(f"{kind}: body keys wrong (extra {', '.join(extra) or 'none'}; missing {', '.join(missing) or 'none'})")
    out: dict[str, object] = {}
    for key, rule in schema.items():
        v, what = body[key], f"{kind}.{key}"
        tag = rule[0]
        if tag == "len":
            out[key] = _check_bytes(v, what, n=rule[1])
        elif tag == "max":
            out[key] = _check_bytes(v, what, most=rule[1])
        elif tag == "u63":
            out[key] = _check_u63(v, what)
        elif tag == "role":
            if type(v) is not str or v not in ROLES:
                raise _fail(f"{what} must be 'admin' or 'member', got {v!r:.40}")
            out[key] = v
        elif tag == "invite":
            _check_bytes(v, what)
            if len(v) not in (0, INVITE_ID_LEN):
                raise _fail(f"{what} must be empty or {INVITE_ID_LEN} bytes, got {len(v)}")
            out[key] = v
        elif tag == "hashes":
            out[key] = _check_hashes(v, what, 1, MAX_PARENTS)
        else:  # boxes
            if type(v) is not dict:
                raise _fail(f"{what} must be a map, got {type(v).__name__}")
            if len(v) > MAX_BOXES:
                raise _fail(f"{what}: {len(v)} boxes (at most {MAX_BOXES})")
            for site, box in v.items():
                _check_bytes(site, f"{what} site", SITE_LEN)
                _check_bytes(box, f"{what} box", most=MAX_BOX_BYTES)
            out[key] = MappingProxyType(dict(v))
    return MappingProxyType(out)


def _canonical(obj: object) -> object:
    """``obj`` with every map's keys sorted, ready for msgpack."""
    if isinstance(obj, Mapping):
        return {k: _canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_canonical(x) for x in obj]
    return obj


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


_INNER_LIMITS = dict(raw=False, strict_map_key=True, use_list=True, max_str_len=64, max_bin_len=MAX_EVENT_BYTES,
                     max_array_len=max(MAX_PARENTS, 7), max_map_len=MAX_BOXES, max_ext_len=0)
_OUTER_LIMITS = dict(raw=False, strict_map_key=True, use_list=True, max_str_len=0, max_bin_len=MAX_EVENT_BYTES,
                     max_array_len=2, max_map_len=0, max_ext_len=0)


def _parse(raw: bytes, signature: bytes) -> Event:
    """An Event from its signed bytes, checking everything that can be checked without keys."""
    _check_bytes(signature, "signature", SIG_LEN)
    try:
        fields = msgpack.unpackb(raw, **_INNER_LIMITS)
    except Exception as e:
        raise _fail(f"event is not valid msgpack: {e}") from None
    if type(fields) is not list or len(fields) != 7:
        raise _fail("event must be a list of 7 fields")
    version, kind, group, signer, parents, wall_ms, body = fields
    if type(version) is not int or version != VERSION:
        raise _fail(f"unknown event version {version!r:.20}")
    if type(kind) is not str or kind not in KINDS:
        raise _fail(f"unknown event kind {kind!r:.20}")
    _check_bytes(group, "group", GROUP_LEN)
    _check_bytes(signer, "signer", SITE_LEN)
    parents_t = _check_hashes(parents, "parents", 0 if kind == "found" else 1, 0 if kind == "found" else MAX_PARENTS)
    _check_u63(wall_ms, "wall_ms")
    frozen = _check_body(kind, body)
    if kind == "found" and frozen["site"] != signer:
        raise _fail("found: the signer must be the founding site")
    if kind == "successor" and frozen["site"] == signer:
        raise _fail("successor: the new site id must differ from the signer's")
    if _pack([VERSION, kind, group, signer, list(parents_t), wall_ms, _canonical(body)]) != raw:
        raise _fail("event is not canonically encoded (map keys sorted, minimal msgpack, no duplicate keys)")
    return Event(raw, signature, kind, group, signer, parents_t, wall_ms, frozen)


def make_event(kind: str, group: bytes, signer: bytes, signing_key: bytes, parents: Iterable[bytes], wall_ms: int,
               body: Mapping[str, object]) -> Event:
    """A new event signed with the 32-byte Ed25519 seed ``signing_key``; MembershipError if it would not decode."""
    if kind not in KINDS:
        raise _fail(f"unknown event kind {kind!r:.20}")
    try:
        plain = _canonical(body)
        if kind == "share" and isinstance(plain, dict) and isinstance(plain.get("epochs"), list):
            plain["epochs"] = sorted(set(plain["epochs"]))
        raw = _pack([VERSION, kind, group, signer, sorted(set(parents)), wall_ms, plain])
    except (TypeError, ValueError, OverflowError) as e:
        raise _fail(f"{kind}: cannot encode event: {e}") from None
    key = Ed25519PrivateKey.from_private_bytes(_check_bytes(signing_key, "signing key", KEY_LEN))
    ev = _parse(raw, key.sign(SIGN_PREFIX + raw))
    if len(encode_event(ev)) > MAX_EVENT_BYTES:
        raise _fail(f"{kind}: event of {len(raw)} bytes exceeds {MAX_EVENT_BYTES}")
    return ev


def encode_event(ev: Event) -> bytes:
    """The wire form of an event: msgpack [raw, signature]."""
    return _pack([ev.raw, ev.signature])


def decode_event(data: bytes) -> Event:
    """An event from its wire form, strictly checked (MembershipError otherwise); the signature is not verified."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(f"event must be bytes, got {type(data).__name__}")
    if len(data) > MAX_EVENT_BYTES:
        raise _fail(f"event of {len(data)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        outer = msgpack.unpackb(bytes(data), **_OUTER_LIMITS)
    except Exception as e:
        raise _fail(f"event is not valid msgpack: {e}") from None
    if type(outer) is not list or len(outer) != 2:
        raise _fail("event must be [raw, signature]")
    raw, signature = outer
    _check_bytes(raw, "raw event")
    if _pack([raw, signature]) != bytes(data):
        raise _fail("event is not canonically encoded")
    return _parse(raw, signature)


def verify_signature(ev: Event, sign_pub: bytes) -> bool:
    """True if ``ev`` was signed by the Ed25519 key ``sign_pub``."""
    try:
        Ed25519PublicKey.from_public_bytes(sign_pub).verify(ev.signature, SIGN_PREFIX + ev.raw)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def check_signatures(events: Iterable[Event], keys: dict[bytes, bytes]) -> dict[tuple[bytes, bytes], bool]:
    """Signature checks done ahead for ``MembershipLog.add`` (e.g. in a worker thread, the costly part).

    Each event is checked against the key ``keys`` (site -> signing key) has for its signer, or
    failing that the key an add, successor or found event among ``events`` gives it; the log
    still decides which key counts, from the event's causal past, and checks any other itself.
    """
    keys = dict(keys)
    for ev in events:
        if ev.kind in ("add", "successor"):
            keys.setdefault(ev.body["site"], ev.body["sign"])
        elif ev.kind == "found":
            keys.setdefault(ev.signer, ev.body["sign"])
    return {(ev.hash, keys[ev.signer]): verify_signature(ev, keys[ev.signer]) for ev in events if ev.signer in keys}


def public_keys(sign_private: bytes) -> bytes:
    """The 32-byte Ed25519 public key of a 32-byte private seed."""
    return Ed25519PrivateKey.from_private_bytes(sign_private).public_key().public_bytes_raw()


# ---------------------------------------------------------------- resolved state

@dataclass(frozen=True)
class Member:
    """One device ever added to the group, and what became of it."""

    site: bytes
    sign_pub: bytes
    dh_pub: bytes
    name_box: bytes
    role: str
    added_by: bytes
    added_ms: int
    added_event: bytes
    state: str  # "current" | "removed" | "succeeded"
    removed_by: bytes | None = None
    removed_ms: int | None = None
    last_dbv: int | None = None
    removed_reason: str | None = None
    predecessor: bytes | None = None
    successors: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Invite:
    """One invite: who made it, and whether it was used or cancelled."""

    id: bytes
    role: str
    expires_ms: int
    created_by: bytes
    created_ms: int
    event: bytes
    psk_box: bytes
    state: str  # "pending" | "used" | "cancelled"
    used_by: tuple[bytes, ...] = ()


Box = tuple[bytes, tuple[bytes, ...], bytes]


@dataclass(frozen=True)
class Membership:
    """The membership a set of events resolves to. ``members`` is in the canonical order of their add events."""

    group: bytes
    found: bytes
    members: Mapping[bytes, Member]
    invites: Mapping[bytes, Invite]
    epochs: tuple[bytes, ...]
    frontier: tuple[bytes, ...]
    boxes: Mapping[bytes, tuple[Box, ...]]
    heads: tuple[bytes, ...]
    ignored: Mapping[bytes, str]
    pending: tuple[bytes, ...]
    notices: tuple[str, ...]

    def member(self, site: bytes) -> Member | None:
        """The record of ``site`` in any state, or None if it was never added."""
        return self.members.get(site)

    def current(self) -> list[Member]:
        """The current members, sorted by site id."""
        return sorted((m for m in self.members.values() if m.state == CURRENT), key=lambda m: m.site)

    def by_dh(self, dh_pub: bytes) -> Member | None:
        """The newest record (any state) whose Noise static key is ``dh_pub``."""
        for m in reversed(self.members.values()):
            if m.dh_pub == dh_pub:
                return m
        return None

    def is_current(self, site: bytes) -> bool:
        """True if ``site`` is a current member."""
        m = self.members.get(site)
        return m is not None and m.state == CURRENT

    def is_admin(self, site: bytes) -> bool:
        """True if ``site`` is a current member with the admin role."""
        m = self.members.get(site)
        return m is not None and m.state == CURRENT and m.role == ROLE_ADMIN

    def admins(self) -> list[Member]:
        """The current admins, sorted by site id."""
        return [m for m in self.current() if m.role == ROLE_ADMIN]

    def cap(self, site: bytes) -> int | None:
        """For a removed device (directly or through a predecessor): its last db version that counts; else None."""
        m = self.members.get(site)
        return m.last_dbv if m is not None and m.state == REMOVED else None

    def lacking_shares(self) -> dict[bytes, tuple[bytes, ...]]:
        """Current site -> the frontier epochs it has no box for (an admin should send it a share)."""
        out = {}
        for m in self.current():
            have = {e for _, covered, _ in self.boxes.get(m.site, ()) for e in covered}
            lack = tuple(e for e in self.frontier if e not in have)
            if lack:
                out[m.site] = lack
        return out


def _h(b: bytes | None) -> str:
    return b.hex()[:12] if b else "-"


class _Pass:
    """The state of one resolution pass; copy() is cheap (records are frozen, dicts are copied)."""

    __slots__ = ("log", "members", "invites", "uses", "lost", "full", "epochs", "boxes", "notices")

    def __init__(self, log: MembershipLog, full: bool = False):
        self.log = log  # for the order of events: log.key and log.before
        self.members: dict[bytes, Member] = {}
        self.invites: dict[bytes, Invite] = {}
        self.uses: dict[bytes, tuple[tuple[bytes, bytes], ...]] = {}  # invite id -> ((add hash, site), ...)
        self.lost: dict[bytes, tuple[bytes, ...]] = {}  # site that was a current admin when removed or demoted ->
        # the events that removed or demoted it since
        self.full = full  # also collect epochs, boxes and notices
        self.epochs: list[bytes] = []
        self.boxes: dict[bytes, list[Box]] = {}
        self.notices: list[str] = []

    def copy(self) -> _Pass:
        p = _Pass.__new__(_Pass)
        p.log = self.log
        p.members, p.invites, p.uses, p.lost = dict(self.members), dict(self.invites), dict(self.uses), dict(self.lost)
        p.full, p.epochs, p.boxes, p.notices = False, [], {}, []
        return p

    def apply(self, ev: Event) -> None:
        """Apply one valid event."""
        getattr(self, "_" + ev.kind)(ev)

    def _note(self, text: str) -> None:
        if self.full:
            self.notices.append(text)

    def _box(self, ev: Event, covered: tuple[bytes, ...]) -> None:
        if self.full:
            for site, box in ev.body["boxes"].items():
                self.boxes.setdefault(site, []).append((ev.hash, covered, box))

    def _found(self, ev: Event) -> None:
        b = ev.body
        self.members[b["site"]] = Member(b["site"], b["sign"], b["dh"], b["name"], ROLE_ADMIN, ev.signer, ev.wall_ms,
                                         ev.hash, CURRENT)
        if self.full:
            self.epochs.append(ev.hash)
        self._box(ev, (ev.hash,))

    def _add(self, ev: Event) -> None:
        b = ev.body
        site = b["site"]
        if site in self.members:
            self._note(f"site {_h(site)} was added twice concurrently: the first add stands, "
                       f"add {_h(ev.hash)} has no effect")
            return
        self.members[site] = Member(site, b["sign"], b["dh"], b["name"], b["role"], ev.signer, ev.wall_ms, ev.hash,
                                    CURRENT)
        inv = self.invites.get(b["invite"])
        if inv is not None:
            self.uses[inv.id] = self.uses.get(inv.id, ()) + ((ev.hash, site),)
            self.invites[inv.id] = replace(inv, state=USED, used_by=inv.used_by + (site,))

    def _remove(self, ev: Event) -> None:
        site = ev.body["site"]
        self._remove_one(ev, site, f"removed by {_h(ev.signer)}")
        stack = list(self.members[site].successors)
        while stack:
            s = stack.pop()
            self._remove_one(ev, s, f"predecessor {_h(site)} removed by {_h(ev.signer)}")
            stack.extend(self.members[s].successors)
        self._keep_an_admin(ev)

    def _remove_one(self, ev: Event, site: bytes, reason: str) -> None:
        m, last = self.members[site], ev.body["last"]
        if m.state == REMOVED:
            if last > (m.last_dbv or 0):
                self.members[site] = replace(m, last_dbv=last)
            if site in self.lost:
                self.lost[site] += (ev.hash,)
            return
        if m.state == CURRENT and m.role == ROLE_ADMIN:
            self.lost[site] = (ev.hash,)
        self.members[site] = replace(m, state=REMOVED, removed_by=ev.signer, removed_ms=ev.wall_ms, last_dbv=last,
                                     removed_reason=reason)

    def _keep_an_admin(self, x: Event) -> None:
        """Never zero admins: restore one whose removals and demotions are x or concurrent with x."""
        before = self.log.before
        candidates = [s for s, hs in self.lost.items() if not any(before(h, x.hash) for h in hs)]
        restored = _keep_an_admin(self.members, candidates, self.log.key)
        if restored is not None:
            del self.lost[restored]
            self._note(f"no admin would remain: {_h(restored)} stays admin (its removal or demotion is void)")

    def _role(self, ev: Event) -> None:
        site, role = ev.body["site"], ev.body["role"]
        m = self.members[site]
        if m.state != CURRENT or m.role == role:
            if site in self.lost and role == ROLE_MEMBER:
                self.lost[site] += (ev.hash,)
            return
        self.members[site] = replace(m, role=role)
        if m.role == ROLE_ADMIN:
            self.lost[site] = (ev.hash,)
            self._keep_an_admin(ev)

    def _successor(self, ev: Event) -> None:
        b, old = ev.body, ev.signer
        site = b["site"]
        if site in self.members:
            self._note(f"site {_h(site)} was added twice concurrently: the first add stands, "
                       f"successor {_h(ev.hash)} has no effect")
            return
        m = self.members[old]
        new = Member(site, b["sign"], b["dh"], b["name"], m.role, old, ev.wall_ms, ev.hash, CURRENT, predecessor=old)
        if m.state == REMOVED:
            new = replace(new, state=REMOVED, removed_by=m.removed_by, removed_ms=m.removed_ms, last_dbv=m.last_dbv,
                          removed_reason=f"predecessor {_h(old)} removed")
        elif old in self.lost:
            self.lost[site] = self.lost[old]  # a demoted admin's continuation may get its rights back in its place
        self.members[site] = new
        self.members[old] = replace(m, state=SUCCEEDED if m.state == CURRENT else m.state,
                                    successors=m.successors + (site,))

    def _epoch(self, ev: Event) -> None:
        if self.full:
            self.epochs.append(ev.hash)
        self._box(ev, (ev.hash,))

    def _share(self, ev: Event) -> None:
        self._box(ev, ev.body["epochs"])

    def _invite(self, ev: Event) -> None:
        b = ev.body
        if b["id"] in self.invites:
            self._note(f"invite {b['id'].hex()[:6]} was made twice concurrently: the first stands")
            return
        self.invites[b["id"]] = Invite(b["id"], b["role"], b["expires"], ev.signer, ev.wall_ms, ev.hash, b["psk"],
                                       PENDING)

    def _cancel(self, ev: Event) -> None:
        inv = self.invites[ev.body["id"]]
        if inv.state == PENDING:
            self.invites[inv.id] = replace(inv, state=CANCELLED)


def _keep_an_admin(members: dict[bytes, Member], candidates: Iterable[bytes],
                   key: Callable[[bytes], tuple[int, bytes]]) -> bytes | None:
    """If no current admin is left, make the earliest-added candidate (not succeeded) a current admin; its site."""
    for m in members.values():
        if m.state == CURRENT and m.role == ROLE_ADMIN:
            return None
    candidates = [s for s in candidates if members[s].state != SUCCEEDED]
    if not candidates:
        return None
    s = min(candidates, key=lambda s: key(members[s].added_event))
    members[s] = replace(members[s], state=CURRENT, role=ROLE_ADMIN, removed_by=None, removed_ms=None, last_dbv=None,
                         removed_reason=None)
    return s


def _settle(p: _Pass) -> tuple[dict[bytes, Member], list[str]]:
    """The members after the invite double-use fix-up (and the no-admin rule again), and their notices."""
    members, notices = p.members, []
    voided: set[bytes] = set()
    for inv_id, uses in p.uses.items():
        if len(uses) < 2:
            continue
        if members is p.members:
            members = dict(members)
        keep = min(uses)
        losers = [site for h, site in sorted(uses) if h != keep[0]]
        for loser in losers:
            stack = [loser]
            while stack:
                s = stack.pop()
                reason = "invite used twice" if s == loser else f"predecessor {_h(loser)} joined with an invite used twice"
                members[s] = replace(members[s], state=REMOVED, removed_by=None, removed_ms=None, last_dbv=0,
                                     removed_reason=reason)
                voided.add(s)
                stack.extend(members[s].successors)
        n = "twice" if len(uses) == 2 else f"{len(uses)} times"
        notices.append(f"invite {inv_id.hex()[:6]} used {n}: {_h(keep[1])} stays, "
                       f"{', '.join(map(_h, losers))} {'is' if len(losers) == 1 else 'are'} removed")
    if voided:
        restored = _keep_an_admin(members, [s for s in p.lost if s not in voided], p.log.key)
        if restored is not None:
            notices.append(f"no admin would remain: {_h(restored)} stays admin (its removal or demotion is void)")
    if members and not any(m.state == CURRENT and m.role == ROLE_ADMIN for m in members.values()):
        notices.append("the group has no admin left")
    return members, notices


# ---------------------------------------------------------------- the log

def _bits(x: int) -> list[int]:
    """The indices of the set bits of ``x``."""
    out = []
    while x:
        low = x & -x
        out.append(low.bit_length() - 1)
        x ^= low
    return out


class _Forged(str):
    """A reason an event cannot be attributed to its signer (a bad signature, a signer unknown in its past).

    Such an event is *rejected* -- not kept, not passed on, its descendants
    rejected too -- where an event its signer did sign but had no right to
    is *ignored* (kept, without effect): anyone can make the former in any
    number (a relay database's thief too), only members the latter.
    """


class MembershipLog:
    """All events of one group, validated as they come (an event's validity depends only on its causal past)."""

    def __init__(self, found_hash: bytes):
        self.found = _check_bytes(found_hash, "found hash", HASH_LEN)
        self.group: bytes | None = None
        self.rejected = 0
        self._events: dict[bytes, Event] = {}
        self._order: list[bytes] = []  # acceptance order (topological): bit i of an ancestor set is _order[i]
        self._index: dict[bytes, int] = {}
        self._key: dict[bytes, tuple[int, bytes]] = {}  # (depth, hash)
        self._anc: dict[bytes, int] = {}  # strict ancestors, as a bitset over _index
        self._valid: dict[bytes, bool] = {}
        self._ignored: dict[bytes, str] = {}
        self._snap: dict[bytes, _Pass] = {}  # pass state of each event's inclusive past (before fix-ups)
        self._heads: set[bytes] = set()
        self._pending: dict[bytes, Event] = {}
        self._missing: dict[bytes, int] = {}  # pending hash -> parents still unknown
        self._waiting: dict[bytes, list[bytes]] = {}  # unknown parent -> pending children
        self._dead: set[bytes] = set()  # rejected hashes, so their descendants are rejected too
        self._pubs: dict[bytes, Ed25519PublicKey] = {}
        self._verified: dict[tuple[bytes, bytes], bool] = {}  # (hash, key) -> checked ahead (off the event loop)
        self.dropped_pending = 0
        self._state: Membership | None = None
        self._sorted: list[Event] | None = None

    def __contains__(self, h: object) -> bool:
        return h in self._events

    def key(self, h: bytes) -> tuple[int, bytes]:
        """The canonical sort key (depth, hash) of an accepted event."""
        return self._key[h]

    def before(self, a: bytes, b: bytes) -> bool:
        """True if accepted event ``a`` is a strict ancestor of accepted event ``b``."""
        return bool((self._anc[b] >> self._index[a]) & 1)

    def __len__(self) -> int:
        return len(self._events)

    def get(self, h: bytes) -> Event | None:
        """The accepted event with hash ``h``, or None."""
        return self._events.get(h)

    def events(self) -> list[Event]:
        """Every accepted event, in (depth, hash) order: parents before children."""
        if self._sorted is None:
            self._sorted = [self._events[h] for h in sorted(self._events, key=self._key.__getitem__)]
        return list(self._sorted)

    def add(self, events: Iterable[Event], verified: dict[tuple[bytes, bytes], bool] | None = None) -> list[Event]:
        """Take in events; return those new to the log (accepted now), parents before children.

        ``verified`` may hold signature checks done ahead, (event hash, signing key) -> valid,
        e.g. in a worker thread (``presign_check``); a check it lacks is done here.
        """
        self._verified = verified or {}
        try:
            return self._add(events)
        finally:
            self._verified = {}

    def _add(self, events: Iterable[Event]) -> list[Event]:
        accepted: list[Event] = []
        for ev in events:
            h = ev.hash
            if h in self._events or h in self._pending:
                continue
            if h in self._dead or (self.group is not None and ev.group != self.group) \
                    or (ev.kind == "found" and h != self.found):
                self._reject(h)
                continue
            missing = [p for p in ev.parents if p not in self._events]
            if any(p in self._dead for p in missing):
                self._reject(h)
                continue
            if missing:
                if len(self._pending) >= MAX_PENDING:
                    self.dropped_pending += 1   # a peer sends it again, with its parents, on a later exchange
                    continue
                self._pending[h] = ev
                self._missing[h] = len(missing)
                for p in missing:
                    self._waiting.setdefault(p, []).append(h)
                self._state = None
                continue
            self._accept_ready(ev, accepted)
        if accepted:
            self._state = None
            self._sorted = None
        return accepted

    def _reject(self, h: bytes) -> None:
        """Reject ``h`` and every pending event waiting on it."""
        stack = [h]
        if len(self._dead) >= MAX_DEAD:
            self._dead.clear()   # only a shortcut: a descendant of a forgotten one fails its own checks
        while stack:
            h = stack.pop()
            self.rejected += 1
            self._dead.add(h)
            self._state = None
            for child in self._waiting.pop(h, ()):
                if self._pending.pop(child, None) is not None:
                    del self._missing[child]
                    stack.append(child)

    def _accept_ready(self, ev: Event, accepted: list[Event]) -> None:
        """Accept ``ev`` (all parents known), then any pending events it completes."""
        queue = [ev]
        while queue:
            ev = queue.pop()
            if self.group is None and ev.kind == "found":
                self.group = ev.group
            if ev.group != self.group:
                self._reject(ev.hash)
                continue
            if not self._accept(ev):
                continue
            accepted.append(ev)
            for child in self._waiting.pop(ev.hash, ()):
                if child not in self._missing:  # rejected meanwhile, through another parent
                    continue
                self._missing[child] -= 1
                if not self._missing[child]:
                    del self._missing[child]
                    queue.append(self._pending.pop(child))

    def _accept(self, ev: Event) -> bool:
        """Add ``ev`` to the log (valid or ignored); False if it was rejected instead (a forgery)."""
        h = ev.hash
        anc = 0
        depth = 0
        for p in ev.parents:
            anc |= self._anc[p] | (1 << self._index[p])
            depth = max(depth, self._key[p][0] + 1)
        self._index[h] = len(self._order)
        self._order.append(h)
        self._events[h] = ev
        self._key[h] = (depth, h)
        self._anc[h] = anc
        base = self._past_state(ev)
        reason = self._check(ev, base)
        if isinstance(reason, _Forged):
            self._order.pop()
            for table in (self._index, self._events, self._key, self._anc):
                del table[h]
            self._reject(h)
            return False
        if reason is None:
            self._valid[h] = True
            snap = base.copy()
            snap.apply(ev)
            self._snap[h] = snap
        else:
            self._valid[h] = False
            self._ignored[h] = reason
            self._snap[h] = base  # an ignored event changes nothing
        self._heads.difference_update(ev.parents)
        self._heads.add(h)
        return True

    def _past_state(self, ev: Event) -> _Pass:
        """The pass state (before fix-ups) of the strict ancestors of ``ev``; not to be mutated."""
        if not ev.parents:
            return _Pass(self)
        if len(ev.parents) == 1:
            return self._snap[ev.parents[0]]
        order = sorted((self._order[i] for i in _bits(self._anc[ev.hash])), key=self._key.__getitem__)
        start, state = 0, None
        for i in range(len(order) - 1, -1, -1):
            c = order[i]
            if (self._anc[c].bit_count() + 1) == i + 1:  # c's inclusive past is exactly order[:i + 1]
                start, state = i + 1, self._snap[c]
                break
        state = state.copy() if state is not None else _Pass(self)
        for h in order[start:]:
            if self._valid[h]:
                state.apply(self._events[h])
        return state

    def _verify(self, ev: Event, sign_pub: bytes) -> bool:
        ahead = self._verified.get((ev.hash, sign_pub))
        if ahead is not None:
            return ahead
        pub = self._pubs.get(sign_pub)
        if pub is None:
            try:
                pub = self._pubs[sign_pub] = Ed25519PublicKey.from_public_bytes(sign_pub)
            except ValueError:
                return False
        try:
            pub.verify(ev.signature, SIGN_PREFIX + ev.raw)
        except InvalidSignature:
            return False
        return True

    def _check(self, ev: Event, base: _Pass) -> str | None:
        """Why ``ev`` does not count given the pass state of its causal past, or None if it counts."""
        b = ev.body
        if ev.kind == "found":
            return None if self._verify(ev, b["sign"]) else "bad signature (the found event must be self-signed)"
        members, _ = _settle(base)
        signer = members.get(ev.signer)
        if signer is None:
            return _Forged(f"signer {_h(ev.signer)} is not a member in the event's causal past")
        if not self._verify(ev, signer.sign_pub):
            return _Forged("bad signature")
        if signer.state != CURRENT:
            how = "removed" if signer.state == REMOVED else "succeeded by a new site id"
            return f"signer {_h(ev.signer)} had been {how} in the event's causal past"
        if ev.kind != "successor" and signer.role != ROLE_ADMIN:
            return f"signer {_h(ev.signer)} is not an admin in the event's causal past"
        kind = ev.kind
        if kind in ("add", "successor"):
            if b["site"] in members:
                return f"site {_h(b['site'])} was already added (a site id is never re-added)"
            if kind == "add" and b["invite"] and b["invite"] not in base.invites:
                return f"invite {b['invite'].hex()[:6]} is unknown in the event's causal past"
        elif kind == "remove":
            m = members.get(b["site"])
            if m is None:
                return f"site {_h(b['site'])} is not a member"
            if m.state == REMOVED:
                return f"site {_h(b['site'])} is already removed"
        elif kind == "role":
            m = members.get(b["site"])
            if m is None or m.state != CURRENT:
                return f"site {_h(b['site'])} is not a current member"
        elif kind == "share":
            anc = self._anc[ev.hash]
            for e in b["epochs"]:
                i = self._index.get(e)
                if i is None or not (anc >> i) & 1 or not self._valid[e] or self._events[e].kind not in ("found", "epoch"):
                    return f"epoch {_h(e)} is not a valid epoch in the event's causal past"
        elif kind == "invite":
            if b["id"] in base.invites:
                return f"invite {b['id'].hex()[:6]} already exists"
        elif kind == "cancel":
            if b["id"] not in base.invites:
                return f"invite {b['id'].hex()[:6]} is unknown in the event's causal past"
        return None

    def state(self) -> Membership:
        """The membership all accepted events resolve to (cached until add accepts something)."""
        if self._state is not None:
            return self._state
        p = _Pass(self, full=True)
        for ev in self.events():
            if self._valid[ev.hash]:
                p.apply(ev)
        members, notices = _settle(p)
        epochs = tuple(p.epochs)
        covered = 0
        for e in epochs:
            covered |= self._anc[e]
        frontier = tuple(sorted(e for e in epochs if not (covered >> self._index[e]) & 1))
        self._state = Membership(
            group=self.group or b"",
            found=self.found,
            members=MappingProxyType(members),
            invites=MappingProxyType(dict(p.invites)),
            epochs=epochs,
            frontier=frontier,
            boxes=MappingProxyType({s: tuple(v) for s, v in sorted(p.boxes.items())}),
            heads=tuple(sorted(self._heads)),
            ignored=MappingProxyType({h: self._ignored[h] for h in sorted(self._ignored)}),
            pending=tuple(sorted(self._pending)),
            notices=tuple(dict.fromkeys(p.notices + notices)),
        )
        return self._state
