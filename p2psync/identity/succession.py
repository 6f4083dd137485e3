"""What the home remembers of its database, and moving the home to a successor's keys.

``incarnation.json`` holds the incarnation id of the database this device last
ran on and the newest db version it stamped there, rewritten after every stamp
(agent/incarnation.py compares it with the database at start). It is replaced
by rename and not fsynced: after a power cut it may lag a little, so that a
restored database a few versions older than the last stamp can go unnoticed
here; peers then tell the two apart by their signatures (two manifests for
one version), which status reports.

``successor.json`` holds the new keys while the device moves to a new site id,
so an interruption at any point is finished at the next start.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from .home import (DEVICE_FILE, FILE_VERSION, KEYS_FILE, RETIRED_FILE, Device, DeviceKeys, IdentityError, _dump, _fsync_dir,
                   _hex_field, _read_json, _write_new)

RECORD_FILE = "incarnation.json"
SUCCESSOR_FILE = "successor.json"


@dataclass(frozen=True)
class Record:
    site_id: bytes
    incarnation: bytes
    dbv: int
    place: dict | None = None     # where the device ran: home, database path and file, machine (``place_of``)


def place_of(home: Path, db_path: Path) -> dict:
    """Where this device runs: a home or database copied elsewhere (another path, file or machine) differs."""
    try:
        st = os.stat(db_path)
        file = [st.st_dev, st.st_ino]
    except OSError:
        file = None
    try:
        machine = Path("/etc/machine-id").read_text().strip() or None
    except OSError:
        machine = None
    return {"home": str(Path(home).absolute()), "db": str(Path(db_path).absolute()), "file": file, "machine": machine}


def moved(rec: Record, now: dict) -> list[str]:
    """What differs between where the record was written and ``now`` (nothing for an older record)."""
    if rec.place is None:
        return []
    names = {"home": "home directory", "db": "database path", "file": "database file", "machine": "machine"}
    return [names[k] for k in names if rec.place.get(k) is not None and now.get(k) is not None
            and rec.place.get(k) != now.get(k)]


def read_record(home: Path) -> Record | None:
    path = Path(home) / RECORD_FILE
    if not path.exists():
        return None
    try:
        data = _read_json(path)
        dbv = data.get("dbv")
        if not isinstance(dbv, int) or dbv < 0:
            raise IdentityError("bad dbv")
        place = data.get("place")
        return Record(_hex_field(data, "site_id", 16, path), _hex_field(data, "incarnation", 16, path), dbv,
                      place if isinstance(place, dict) else None)
    except IdentityError:
        return None   # a damaged record is rewritten; peers still catch a clone or rollback


def write_record(home: Path, site_id: bytes, incarnation: bytes, dbv: int, place: dict | None = None) -> None:
    path = Path(home) / RECORD_FILE
    tmp = path.with_name(f".{RECORD_FILE}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(_dump({"version": FILE_VERSION, "site_id": site_id.hex(), "incarnation": incarnation.hex(),
                           "dbv": dbv, "place": place}))
    os.replace(tmp, path)


def pending_successor(home: Path) -> tuple[bytes, DeviceKeys] | None:
    """(old site id, new keys) of a move to a successor that was started and not finished."""
    path = Path(home) / SUCCESSOR_FILE
    if not path.exists():
        return None
    data = _read_json(path)
    keys = DeviceKeys(_hex_field(data, "site_id", 16, path), _hex_field(data, "static_private", 32, path),
                      _hex_field(data, "sign_private", 32, path))
    return _hex_field(data, "old_site_id", 16, path), keys


def start_succession(device: Device, keys: DeviceKeys) -> None:
    """Keep the successor's keys in the home before anything else changes (fsynced)."""
    _write_new(device.home / SUCCESSOR_FILE, _dump({
        "version": FILE_VERSION, "old_site_id": device.site_id.hex(), "site_id": keys.site_id.hex(),
        "static_private": keys.static_private.hex(), "sign_private": keys.sign_private.hex()}))
    _fsync_dir(device.home)


def finish_succession(device: Device, keys: DeviceKeys) -> Device:
    """Make the successor's keys this home's device keys; the device as it is now."""
    home = device.home
    retired = device.retired + ((device.site_id, device.static_private),)
    new = replace(device, site_id=keys.site_id, static_private=keys.static_private, sign_private=keys.sign_private,
                  retired=retired)
    info = json.loads((home / DEVICE_FILE).read_text())
    info["site_id"] = keys.site_id.hex()
    old_keys = {"version": FILE_VERSION, "sites": [{"site_id": s.hex(), "static_private": k.hex()} for s, k in retired]}
    # retired keys first: a device whose keys.json is new must never lack the boxes sealed to its past
    for name, data in ((RETIRED_FILE, old_keys),
                       (KEYS_FILE, {"version": FILE_VERSION, "static_private": keys.static_private.hex(),
                                    "sign_private": keys.sign_private.hex()}),
                       (DEVICE_FILE, info)):
        tmp = home / f".{name}.{secrets.token_hex(4)}.new"
        _write_new(tmp, _dump(data))
        os.replace(tmp, home / name)
    _fsync_dir(home)
    (home / SUCCESSOR_FILE).unlink()
    _fsync_dir(home)
    return new
