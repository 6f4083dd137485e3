"""The agent's side of membership: the log in memory and in the database, pushes, checks, joins.

How this works: the log is read from the database at start. Events come in
three ways: from a peer (a Members event on any session, LAN or relay),
from the CLI (``p2psync invite``, ``remove``, ``role`` write events to the
database; the watcher sees the file change and the mark move), or from a
join this agent serves. Whatever is new is stored, passed on to every other
session at once, and then every session is checked again: one whose peer
is no longer a current member is sent the log and an Error and closed,
which is how a removal closes the removed device's sessions everywhere
within moments. If the log says this device itself was removed, the agent
stops syncing (it keeps answering ``status``) and says so. An admin's agent
also sends key shares to current members that lack a current epoch's
secret (a device added concurrently with a rotation).
"""

from __future__ import annotations

import logging
import time

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..group import ActionError, Admission, GroupMembers
from ..group import actions
from ..model import Batch
from ..model.membership import Invite
from ..group.attestation import Attestation
from ..net.join_io import receive_frame
from ..protocol.join import (JoinProtocolError, JoinReply, decode_request, encode_reply, signed_part)

log = logging.getLogger("p2psync.agent")

PUSH_TIMEOUT = 2.0
JOIN_TIMEOUT = 10.0
MAX_INVITE_PSKS = 16


class GroupService:
    """Membership for one running agent."""

    def __init__(self, agent):
        self.agent = agent
        self.device = agent.device
        self.members = GroupMembers(self.device.found, self.device.site_id, self.device.static_private,
                                     self.device.retired)
        self.members.load(agent.store.member_events())
        self.mark = agent.store.member_mark()
        self.attestation = Attestation(self.members, self.device.sign_private)
        self.arm_attestation()
        self.counters = {"sessions_refused": 0, "changes_refused": 0, "joins_served": 0, "joins_refused": 0}
        self.removed_logged = False
        self.notices_logged: set[str] = set()
        self.last_seen: dict[bytes, float] = {}
        self._lock = trio.Lock()

    # -- keys for handshakes ---------------------------------------------------------

    def member_psks(self) -> list[bytes]:
        """PSKs a responder accepts from members: every epoch this device holds, current first."""
        ring = self.members.keys
        return ring.psks() if ring is not None else []

    def initiator_psk(self, attempt: int) -> bytes | None:
        """The PSK to dial with: the current epoch's, and older ones on later attempts (a peer that
        missed a rotation accepts only what it knows)."""
        psks = self.member_psks()[:4]
        return psks[attempt % len(psks)] if psks else None

    def join_candidates(self, now_ms: int) -> list[tuple[bytes, Invite]]:
        """(PSK, invite) for invites this admin can answer (pending, and recent used/cancelled/expired
        ones too, so their joiners hear why they are refused)."""
        if not self.members.state.is_admin(self.device.site_id) or self.members.keys is None:
            return []
        out = []
        invites = sorted(self.members.state.invites.values(), key=lambda i: i.created_ms, reverse=True)
        for inv in invites[:MAX_INVITE_PSKS]:
            try:
                psk = self.members.keys.open_sealed(inv.psk_box, b"invite" + inv.id)
            except Exception:
                continue
            out.append((psk, inv))
        return out

    # -- checks ---------------------------------------------------------------------------

    def admit(self, conn) -> Admission:
        return self.members.admit(conn.remote_static)

    def screen(self, conn, batch: Batch) -> Batch:
        """``batch`` without what the membership refuses (counted, logged)."""
        out, refused, whose = self.members.screen(batch)
        if refused:
            self.counters["changes_refused"] += refused
            log.warning("refused %d changes from %s: they come from devices that are not members, or from removed "
                        "devices after their removal (%s)", refused, conn.label,
                        ", ".join(self.members.who(s) for s in whose))
        return out

    # -- events in --------------------------------------------------------------------------

    async def on_members(self, conn, decoded) -> None:
        new = self.members.take(decoded)
        if new and self.agent.store.signer is not None:
            # before any await: the batches that follow on this session may come from a device these
            # events just added, and must be checked against its key
            self.attestation.refresh()
        if new:
            await self.spread(new, conn)

    def arm_attestation(self) -> bool:
        """Give the store the keys to sign our versions and check others' (once we hold the group's
        founding secret; until then nothing is signed, and what we stamp is signed once we do)."""
        if not self.attestation.refresh():
            return False
        store = self.agent.store
        first = store.signer is None
        store.attestor = self.attestation
        store.signer = self.attestation.signer
        return first

    async def reload(self) -> None:
        """Pick up events another process (the CLI) wrote to the database."""
        mark = await self.agent.worker.call(self.agent.store.member_mark)
        if mark == self.mark:
            return
        self.mark = mark
        encoded = await self.agent.worker.call(self.agent.store.member_events)
        new = self.members.load(encoded)
        if new:
            await self.spread(new, None, persist=False)

    async def add_local(self, events) -> None:
        """Events this agent signed (a join it served, key shares): store, spread, check."""
        self.members.add(events)   # actions may have added some already: store and pass on all of them
        if events:
            await self.spread(list(events), None)

    async def spread(self, new, source, persist: bool = True) -> None:
        """Store ``new`` events, pass them to every other session, then re-check every session."""
        async with self._lock:
            for ev in new:
                log.info("membership: %s by %s", ev.kind, self.members.who(ev.signer))
            self._check_succeeded()   # before any await: the session that brought it may be ending
            if persist:
                await self.agent.worker.call(self.agent.store.add_member_events, self.members.pairs(new))
                self.mark = await self.agent.worker.call(self.agent.store.member_mark)
            encoded = tuple(self.members.encoded(new))
            conns = [c for c in self.agent.connections() if c is not source and c.admitted]
            async with trio.open_nursery() as n:
                for c in conns:
                    n.start_soon(self._push, c, encoded)
            self._log_state()
            if self.arm_attestation():
                await self.agent.worker.call(self.agent.store.sign_versions)
        await self.recheck()
        chores = actions.shares_for_lacking(self.device, self.members, _now_ms())
        if chores:
            log.info("membership: sending key shares to %d devices that lack the current epoch",
                     sum(len(e.body["boxes"]) for e in chores))
            await self.add_local(chores)

    @staticmethod
    async def _push(conn, encoded) -> None:
        with trio.move_on_after(PUSH_TIMEOUT):
            await conn.push_members(encoded)

    def _log_state(self) -> None:
        for notice in self.members.state.notices:
            if notice not in self.notices_logged:
                self.notices_logged.add(notice)
                log.warning("membership: %s", notice)

    async def recheck(self) -> None:
        """Close sessions whose peer is no longer a member; stop syncing if we are not one."""
        me = self.members.removed_self()
        if me is not None:
            self.agent.stop_syncing(self.removal_text())
            return
        if self._check_succeeded():
            return
        for key, link in list(self.agent.links.items()):
            if not link.conn.admitted:
                continue   # still in its membership exchange, which checks it once it has merged the peer's log
            adm = self.members.admit(key)
            if not adm.ok:
                self.counters["sessions_refused"] += 1
                link.conn.member = adm.member
                log.warning("closing the session with %s (%s): %s", self.members.who(adm.member.site)
                            if adm.member else key.hex()[:12], link.address, adm.reason)
                with trio.move_on_after(1):
                    try:
                        await link.conn.refuse(adm.reason)
                    except Exception:
                        pass
                link.scope.cancel()

    def _check_succeeded(self) -> bool:
        """A successor of our site that we did not sign: a copy of this device (home and database) runs
        elsewhere and retired our site id; we continue under a successor of our own (agent/incarnation.py)."""
        mine = self.members.me
        if mine is None or mine.state != "succeeded":
            return False
        self.agent.continue_elsewhere(
            f"a copy of this device (its home and database copied elsewhere) continues as "
            f"{self.members.who(mine.successors[-1])}, which retires this site id")
        return True

    def removal_text(self) -> str:
        me = self.members.removed_self()
        if me is None:
            return ""
        by = self.members.who(me.removed_by) if me.removed_by else "the membership rules"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(me.removed_ms / 1000)) if me.removed_ms else "?"
        why = f" ({me.removed_reason})" if me.removed_reason and not me.removed_reason.startswith("removed by") else ""
        return (f"this device was removed from the group by {by} on {when}{why}; it no longer syncs. Its data "
                f"stays here. To take part again, ask an admin for a new invite and join with a new --home")

    # -- joins ------------------------------------------------------------------------------

    async def serve_join(self, ns, invite: Invite, label: str) -> None:
        """Answer a device that completed the handshake with an invite's PSK."""
        try:
            with trio.fail_after(JOIN_TIMEOUT):
                req = decode_request(await receive_frame(ns))
                reply = await self._admit_joiner(ns, req, invite, label)
                await ns.send_all(encode_reply(reply))
        except (JoinProtocolError, EOFError, trio.TooSlowError, trio.BrokenResourceError, OSError) as e:
            self.counters["joins_refused"] += 1
            log.warning("join attempt from %s failed: %s", label, e or type(e).__name__)

    async def _admit_joiner(self, ns, req, invite: Invite, label: str) -> JoinReply:
        st = self.members.state
        inv = st.invites.get(invite.id, invite)
        now = _now_ms()
        refusal = None
        if inv.state == "used":
            refusal = "this invite code was already used; ask an admin for a new one (`p2psync invite`)"
        elif inv.state == "cancelled":
            refusal = "this invite code was cancelled; ask an admin for a new one"
        elif now > inv.expires_ms:
            refusal = (f"this invite code expired at {time.strftime('%Y-%m-%d %H:%M', time.localtime(inv.expires_ms / 1000))}; "
                       f"ask an admin for a new one")
        elif not st.is_admin(self.device.site_id):
            refusal = "the device you reached is no longer an admin; try another admin"
        if refusal is None:
            try:
                Ed25519PublicKey.from_public_bytes(req.sign_pub).verify(req.signature,
                                                                         signed_part(ns.handshake_hash, req.site))
            except (InvalidSignature, ValueError):
                refusal = "the join request's signature does not verify"
        if refusal is None:
            try:
                events = actions.admit(self.device, self.members, req.site, req.sign_pub, ns.remote_static,
                                       req.name, inv.role, inv.id, now)
            except ActionError as e:
                refusal = str(e)
        if refusal is not None:
            self.counters["joins_refused"] += 1
            log.warning("refused a join from %s (%r): %s", label, req.name, refusal)
            return JoinReply(False, refusal)
        await self.add_local(events)
        self.counters["joins_served"] += 1
        log.info("admitted %s (%s) as %s with invite %s", req.name, req.site.hex()[:12], inv.role, inv.id.hex()[:8])
        return JoinReply(True, f"admitted by {self.device.name}", tuple(self.members.encoded()))

    # -- status -------------------------------------------------------------------------------

    def status(self, vv=None) -> dict:
        st = self.members.state
        notices = list(st.notices)
        for m in st.members.values():
            cap = st.cap(m.site)
            if vv is not None and cap is not None and vv[m.site] > cap:
                notices.append(f"this device applied {vv[m.site] - cap} versions of {self.members.who(m.site)} written "
                               f"after its removal counted (db versions {cap + 1}..{vv[m.site]}); other devices refuse "
                               f"them, so they stay here only: re-enter those rows on a member if they matter")
        if self.members.keys is None or self.members.keys.missing:
            notices.append("this device lacks the key of the group's current epoch; an admin's agent sends it when "
                           "they next meet (until then, the relay and members that rotated may refuse it)")
        me = self.members.me
        ring = self.members.keys
        out = {
            "role": me.role if me else None,
            "state": me.state if me else "unknown",
            "members": len(st.current()),
            "admins": len(st.admins()),
            "removed": self.removal_text() or None,
            "pending_invites": sum(1 for i in st.invites.values() if i.state == "pending"
                                   and i.expires_ms > _now_ms()),
            "ignored_events": len(st.ignored),
            "notices": notices,
            "missing_keys": bool(ring is None or ring.missing),
            **self.counters,
        }
        return out


def _now_ms() -> int:
    return int(time.time() * 1000)


__all__ = ["GroupService"]
