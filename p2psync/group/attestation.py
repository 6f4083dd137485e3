"""The keys that sign and check versions (model/attest.py), as this device's membership gives them."""

from __future__ import annotations

from ..model.attest import Signer, Verifier, cell_key, leaf_hasher
from .members import GroupMembers


def verifier_for(state) -> Verifier:
    """A Verifier over the signing keys of every device a resolved membership ever added (removed
    ones too: their versions up to their cap still count; ``GroupMembers.screen`` applies the cap)."""
    keys = {s: m.sign_pub for s, m in state.members.items()} if state is not None else {}
    return Verifier(state.group if state is not None else b"", keys)


class Attestation:
    """Signer and verifier for one device, rebuilt when the membership log changes.

    Every member ever added has its signing key here, removed ones too: their versions up to
    the cap the log sets for them still count (``GroupMembers.screen`` applies the cap).
    """

    def __init__(self, members: GroupMembers, sign_private: bytes):
        self.members, self._sign_private = members, sign_private
        self._state = None
        self._verifier: Verifier | None = None
        self._hasher = None
        self.signer: Signer | None = None

    def refresh(self) -> bool:
        """Bring the keys up to date with the log; whether this device can sign and check (it holds
        the group's founding secret)."""
        m = self.members
        if m.state is self._state and self._hasher is not None:
            return True
        ring = m.keys
        secret = ring.secrets.get(m.found) if ring is not None else None
        if secret is None or m.state is None:
            return False
        key = cell_key(m.state.group, secret)
        if self._hasher is None:
            self._hasher = leaf_hasher(key)
            self.signer = Signer(m.state.group, m.site, self._sign_private, key)
        self._verifier = verifier_for(m.state)
        self._state = m.state
        return True

    def __call__(self):
        """(Verifier, leaf hasher) for ``SqliteStore.attestor`` (called from the store's thread)."""
        return self._verifier, self._hasher
