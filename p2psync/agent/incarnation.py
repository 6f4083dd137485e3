"""At start, before anything is sent: is this the database this device last ran on?

A restored backup, a database copied in from elsewhere, a VM rolled back to
a snapshot taken before the home was last written: the database then lacks
db versions this device stamped and sent, and its next stamps would reuse
those numbers for other contents, which peers (whose vectors already cover
them) would never ask for. The home records, after every stamp, the
incarnation id of the database and the newest db version stamped
(identity/succession.py). When the database is behind that record, or has
another incarnation, the device continues under a new site id:

1. new keys are generated and kept in the home (``successor.json``);
2. in one transaction: a ``successor`` event signed by the old key (no admin
   needed: docs/membership.md rule 9) joins the membership log, and our cells
   of versions after the last one known to be shared are stamped again under
   the new site id (``SqliteStore.continue_as``);
3. the home takes the new keys; the record is rewritten.

An interruption anywhere is finished at the next start. Peers learn the
successor from the membership log and verify the new site's versions with
its new key; the old site's later versions flow back to this device like
any other device's, so nothing written on either side is lost.

A copy whose database and home were copied together (a cloned disk) is
locally identical to the original: only peers can tell, by two manifests for
one version, which `status` reports (`CLONE?`). See docs/incarnations.md.
"""

from __future__ import annotations

import logging
import time

from ..group import GroupMembers, actions
from ..identity.home import Device, DeviceKeys
from ..identity.succession import (finish_succession, moved, pending_successor, place_of, read_record,
                                   start_succession, write_record)
from ..store import SqliteStore

log = logging.getLogger("p2psync.agent")


def ensure_incarnation(device: Device, forced: str | None = None,
                       after: int | None = None) -> tuple[Device, str | None]:
    """The device to run as, and one sentence if it had to continue under a new site id.

    ``forced``: why it must (a copy of it took a successor of its site): it continues after its
    newest version, every one of which is its own."""
    pending = pending_successor(device.home)
    if pending is not None:
        old, keys = pending
        store = _open_either(device, keys)
        try:
            if store.site_id == keys.site_id:           # stopped after the database moved: finish the home
                device = finish_succession(device, keys)
                inc, dbv = store.incarnation()
                write_record(device.home, device.site_id, inc, dbv, place_of(device.home, device.db_path))
                return device, None
        finally:
            store.close()
        # stopped before the database moved: start over, with the same keys
        return _succeed(device, keys, "a move to a new site id was interrupted")
    store = SqliteStore(device.db_path, device.site_id)
    try:
        inc, dbv = store.incarnation()
    finally:
        store.close()
    rec = read_record(device.home)
    here = place_of(device.home, device.db_path)
    if forced is not None:
        return _succeed(device, DeviceKeys.generate(), forced, None, inc, dbv,
                        after=dbv if after is None else min(after, dbv))
    if rec is None or rec.site_id != device.site_id:
        write_record(device.home, device.site_id, inc, dbv, here)      # first start with incarnations
        return device, None
    elsewhere = moved(rec, here)
    if rec.incarnation == inc and dbv >= rec.dbv and not elsewhere:
        if rec.place != here:
            write_record(device.home, device.site_id, inc, max(dbv, rec.dbv), here)
        return device, None
    if rec.incarnation != inc:
        why = "the database is not the one this device last ran on (copied in from elsewhere, or replaced)"
    elif dbv < rec.dbv:
        why = (f"the database ends at db version {dbv} but this device had stamped up to {rec.dbv}: it was "
               f"restored from a backup or rolled back")
    else:
        why = (f"its {' and '.join(elsewhere)} changed since it last ran: the device was copied (or moved), and "
               f"the original may still be running")
    return _succeed(device, DeviceKeys.generate(), why, rec, inc, dbv)


def _open_either(device: Device, keys: DeviceKeys) -> SqliteStore:
    from ..store import StoreError
    try:
        return SqliteStore(device.db_path, device.site_id)
    except StoreError:
        return SqliteStore(device.db_path, keys.site_id)


def _succeed(device: Device, keys: DeviceKeys, why: str, rec=None, inc=None, dbv=None,
             after: int | None = None) -> tuple[Device, str]:
    start_succession(device, keys) if not (device.home / "successor.json").exists() else None
    store = SqliteStore(device.db_path, device.site_id)
    try:
        if inc is None:
            inc, dbv = store.incarnation()
        # Versions up to ``after`` are known to hold what peers hold: the database's own, when it is an older
        # copy of the one the home last ran on; none, when it is another copy.
        if after is None:
            after = dbv if rec is not None and rec.incarnation == inc else 0
        members = GroupMembers(device.found, device.site_id, device.static_private, device.retired)
        members.load(store.member_events())
        events = []
        if members.state is not None and members.state.member(keys.site_id) is None:
            ev = actions.successor(device, members, keys, device.name, int(time.time() * 1000))
            events = members.pairs(members.add([ev]))
        moved = store.continue_as(keys.site_id, after, events)
        new = finish_succession(device, keys)
        inc2, dbv2 = store.incarnation()
        write_record(new.home, new.site_id, inc2, dbv2, place_of(new.home, new.db_path))
    finally:
        store.close()
    sentence = (f"This device continues as a new site id {new.site_id.hex()[:12]} (was {device.site_id.hex()[:12]}): "
                f"{why}. Its {moved} own versions after db version {after} were stamped again under the new id, "
                f"and what it lacks comes back from its peers; nothing needs doing.")
    log.warning("%s", sentence)
    return new, sentence
