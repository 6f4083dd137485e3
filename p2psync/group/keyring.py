"""What this device can unlock: its epoch secrets, opened from the boxes the log holds for it.

How this works: every found, epoch and share event in the membership log
may carry a box for this device (HPKE to its X25519 static key). Opening
them gives (epoch event hash, secret) pairs. The current epoch is the log's
frontier; its keys derive from all frontier secrets together. Older keys
stay usable for reading what was sealed before a rotation and for
handshakes with members that have not yet heard of it, so the ring also
derives every epoch that a device may have sealed or dialled under: each
epoch alone, every frontier some event's causal past had, and every pair of
concurrent epochs.
"""

from __future__ import annotations

import itertools
import logging

import msgpack

from ..identity.keys import BoxError, EpochKeys, open_box, relay_psk
from ..model.membership import Membership

log = logging.getLogger("p2psync.group")


def box_payload(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """What a box carries: (epoch event hash, secret) pairs; b"" names the event holding the box."""
    return msgpack.packb([[h, s] for h, s in pairs], use_bin_type=True)


def _open_payload(data: bytes) -> list[tuple[bytes, bytes]]:
    items = msgpack.unpackb(data, raw=False, use_list=True, max_array_len=1000, max_bin_len=64)
    out = []
    for h, s in items:
        if type(h) is not bytes or type(s) is not bytes or len(s) != 32 or len(h) not in (0, 32):
            raise ValueError("malformed box payload")
        out.append((h, s))
    return out


class KeyRing:
    """The epoch keys one device holds in one state of the membership log."""

    def __init__(self, membership: Membership, site: bytes, dh_private: bytes, epoch_parents: dict,
                 retired: tuple[tuple[bytes, bytes], ...] = ()):
        """``epoch_parents``: epoch event hash -> the epoch events in its causal past (from the log).
        ``retired``: (site, X25519 private key) of the sites this device continued from (a successor
        event): boxes sealed to them before it moved on are this device's too."""
        self.group_id = membership.group
        self.secrets: dict[bytes, bytes] = {}
        owners = [(site, dh_private)] + list(retired)
        boxes = [(s, k, b) for s, k in owners for b in membership.boxes.get(s, ())]
        for box_site, key, (event_hash, covered, box) in boxes:
            try:
                pairs = _open_payload(open_box(key, box, self.group_id, box_site))
            except (BoxError, ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                log.warning("a key box for this device in membership event %s does not open; ignored",
                            event_hash.hex()[:12])
                continue
            for h, secret in pairs:
                h = h or event_hash
                if h in covered:
                    self.secrets[h] = secret
        frontier = tuple(membership.frontier)
        self.missing = tuple(h for h in frontier if h not in self.secrets)
        held_frontier = [h for h in frontier if h in self.secrets]
        self.current: EpochKeys | None = self._keys(held_frontier) if held_frontier else None
        founding = self.secrets.get(membership.found)
        self.relay_psk: bytes | None = relay_psk(self.group_id, founding) if founding else None
        # every epoch set anyone may have used, newest first
        order = [h for h in reversed(membership.epochs) if h in self.secrets]
        sets: list[tuple[bytes, ...]] = []
        if held_frontier:
            sets.append(tuple(sorted(held_frontier)))
        for h in order:
            past = [p for p in epoch_parents.get(h, ()) if p in self.secrets]
            sets.append((h,))
            maximal = [p for p in past if not any(p in epoch_parents.get(q, ()) for q in past if q != p)]
            if len(maximal) > 1:
                sets.append(tuple(sorted(maximal)))
        for a, b in itertools.combinations(order[:32], 2):
            if a not in epoch_parents.get(b, ()) and b not in epoch_parents.get(a, ()):
                sets.append(tuple(sorted((a, b))))
        self.all: list[EpochKeys] = []
        self.by_key_id: dict[bytes, EpochKeys] = {}
        for s in sets:
            k = self._keys(s)
            if k.key_id not in self.by_key_id:
                self.by_key_id[k.key_id] = k
                self.all.append(k)

    def _keys(self, hashes) -> EpochKeys:
        return EpochKeys.derive(self.group_id, [(h, self.secrets[h]) for h in hashes])

    def psks(self) -> list[bytes]:
        """Noise PSKs to accept, the current epoch's first."""
        return [k.psk() for k in self.all]

    def mdns_tags(self, day: int) -> set[str]:
        """Every epoch's mDNS tag for ``day`` (members that missed a rotation still advertise an old one)."""
        return {k.mdns_tag(day) for k in self.all}

    def open_sealed(self, blob: bytes, ad: bytes) -> bytes:
        """Open a small item sealed under any epoch this device holds; BoxError if none opens it."""
        k = self.by_key_id.get(blob[:8])
        if k is None:
            raise BoxError("sealed under an epoch key this device does not hold")
        return k.open(blob, ad)
