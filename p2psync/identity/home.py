"""The device's home directory: who this device is and its private keys.

A home holds ``device.json`` (site id, name, database path, group id and the
hash of the group's found event, which pins the group's membership log) and
``keys.json`` (the X25519 Noise static private key and the Ed25519 signing
key). Both are created mode 0600 in a 0700 directory, written to a temporary
file first and published with ``os.link`` so they never appear half written
and never replace an existing device. No group secret is kept here: epoch
secrets live in the signed membership log, sealed to this device's key.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

DEVICE_FILE = "device.json"
KEYS_FILE = "keys.json"
RETIRED_FILE = "retired.json"   # keys of the sites this device continued from
FILE_VERSION = 2
SITE_ID_LEN = 16
GROUP_ID_LEN = 16
HASH_LEN = 32
KEY_LEN = 32
MAX_NAME_LEN = 64


class IdentityError(Exception):
    """The device identity is missing, corrupt or unsafe; the message says what to do."""


def resolve_home(arg: str | None) -> Path:
    """The home directory: ``--home``, else ``$P2PSYNC_HOME``, else the user data dir."""
    if arg:
        return Path(arg).expanduser().absolute()
    env = os.environ.get("P2PSYNC_HOME")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "p2psync"


@dataclass(frozen=True)
class DeviceKeys:
    """A device's private keys and site id, before or after it has a home."""

    site_id: bytes
    static_private: bytes = field(repr=False)
    sign_private: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> DeviceKeys:
        return cls(secrets.token_bytes(SITE_ID_LEN), X25519PrivateKey.generate().private_bytes_raw(),
                   Ed25519PrivateKey.generate().private_bytes_raw())

    @property
    def static_public(self) -> bytes:
        """The 32-byte X25519 public key that peers see in the handshake."""
        return X25519PrivateKey.from_private_bytes(self.static_private).public_key().public_bytes_raw()

    @property
    def sign_public(self) -> bytes:
        """The 32-byte Ed25519 public key that verifies this device's signatures."""
        return Ed25519PrivateKey.from_private_bytes(self.sign_private).public_key().public_bytes_raw()


@dataclass(frozen=True)
class Device:
    """This device: its site id, name, database, keys and group."""

    home: Path
    site_id: bytes
    name: str
    db_path: Path
    static_private: bytes = field(repr=False)
    sign_private: bytes = field(repr=False)
    group_id: bytes
    found: bytes          # hash of the group's found event
    # (site id, X25519 private key) of the sites this device continued from (identity/succession.py)
    retired: tuple[tuple[bytes, bytes], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _check_bytes("site_id", self.site_id, SITE_ID_LEN)
        _check_bytes("static_private", self.static_private, KEY_LEN)
        _check_bytes("sign_private", self.sign_private, KEY_LEN)
        _check_bytes("group_id", self.group_id, GROUP_ID_LEN)
        _check_bytes("found", self.found, HASH_LEN)

    @property
    def keys(self) -> DeviceKeys:
        return DeviceKeys(self.site_id, self.static_private, self.sign_private)

    @property
    def static_public(self) -> bytes:
        return self.keys.static_public

    @property
    def sign_public(self) -> bytes:
        return self.keys.sign_public


def check_name(name: str | None) -> str:
    """A usable device name (default: the host name); IdentityError saying how to fix it."""
    return _check_name(socket.gethostname() if name is None else name)


def create_device(home: Path, db_path: Path, name: str, keys: DeviceKeys, group_id: bytes,
                  found: bytes) -> Device:
    """Write a new device's home; refuse if one exists."""
    home = Path(home).expanduser().absolute()
    refuse_existing(home)
    device = Device(home=home, site_id=keys.site_id, name=_check_name(name),
                    db_path=Path(db_path).expanduser().absolute(), static_private=keys.static_private,
                    sign_private=keys.sign_private, group_id=group_id, found=found)
    _make_home(home)
    private = {"version": FILE_VERSION, "static_private": keys.static_private.hex(),
               "sign_private": keys.sign_private.hex()}
    info = {"version": FILE_VERSION, "site_id": device.site_id.hex(), "name": device.name,
            "db_path": str(device.db_path), "group_id": group_id.hex(), "found": found.hex()}
    try:
        _write_new(home / KEYS_FILE, _dump(private))
        _write_new(home / DEVICE_FILE, _dump(info))
    except FileExistsError as e:
        raise IdentityError(f"another p2psync created a device in {home} at the same time") from e
    except OSError as e:
        raise IdentityError(f"cannot write the device to {home}: {e.strerror or e}") from e
    _fsync_dir(home)
    return device


def load_device(home: Path) -> Device:
    """The device stored in ``home``; IdentityError if missing, corrupt or unsafe."""
    home = Path(home).expanduser().absolute()
    device_path, keys_path = home / DEVICE_FILE, home / KEYS_FILE
    if not device_path.exists():
        if keys_path.exists():
            raise IdentityError(_unfinished(home))
        raise IdentityError(
            f"no device in {home}: run `p2psync init --db PATH` "
            f"or `p2psync join CODE --db PATH` first"
        )
    if not keys_path.exists():
        raise IdentityError(
            f"{keys_path} is missing, so this device's keys are lost: restore it from a "
            f"backup, or move {home} away and `p2psync join` the group again"
        )
    _check_private(keys_path)
    info = _read_json(device_path)
    keys = _read_json(keys_path)
    name = info.get("name")
    db_path = info.get("db_path")
    if not isinstance(name, str) or not name:
        raise IdentityError(_corrupt(device_path, "name must be a non-empty string"))
    if not isinstance(db_path, str) or not os.path.isabs(db_path):
        raise IdentityError(_corrupt(device_path, "db_path must be an absolute path"))
    return Device(
        home=home,
        site_id=_hex_field(info, "site_id", SITE_ID_LEN, device_path),
        name=name,
        db_path=Path(db_path),
        static_private=_hex_field(keys, "static_private", KEY_LEN, keys_path),
        sign_private=_hex_field(keys, "sign_private", KEY_LEN, keys_path),
        group_id=_hex_field(info, "group_id", GROUP_ID_LEN, device_path),
        found=_hex_field(info, "found", HASH_LEN, device_path),
        retired=_retired(home / RETIRED_FILE),
    )


def _retired(path: Path) -> tuple[tuple[bytes, bytes], ...]:
    """The keys of sites this device continued from (``retired.json``; none if absent)."""
    if not path.exists():
        return ()
    _check_private(path)
    data = _read_json(path)
    items = data.get("sites")
    if not isinstance(items, list):
        raise IdentityError(_corrupt(path, "sites must be a list"))
    return tuple((_hex_field(i, "site_id", SITE_ID_LEN, path), _hex_field(i, "static_private", KEY_LEN, path))
                 for i in items if isinstance(i, dict))


def refuse_existing(home: Path) -> None:
    """IdentityError if ``home`` already holds a device (or the start of one)."""
    home = Path(home).expanduser().absolute()
    if (home / DEVICE_FILE).exists():
        raise IdentityError(
            f"a device already exists in {home}: use another --home, or remove "
            f"{home} to start over (this deletes the device and its keys)"
        )
    if (home / KEYS_FILE).exists():
        raise IdentityError(_unfinished(home))
    if home.exists() and not home.is_dir():
        raise IdentityError(f"{home} exists and is not a directory: choose another --home")


def _check_bytes(what: str, value: object, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise ValueError(f"{what} must be {length} bytes")


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LEN or not name.isprintable():
        raise IdentityError(
            f"device name {name!r} is not usable: give --name with 1 to "
            f"{MAX_NAME_LEN} printable characters"
        )
    return name


def _unfinished(home: Path) -> str:
    return (
        f"{home} holds {KEYS_FILE} but no {DEVICE_FILE} (an interrupted init or join): "
        f"remove {home / KEYS_FILE} and run the command again"
    )


def _make_home(home: Path) -> None:
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        home.mkdir(mode=0o700)
    except FileExistsError:
        return
    except OSError as e:
        raise IdentityError(f"cannot create {home}: {e.strerror or e}") from e
    os.chmod(home, 0o700)


def _dump(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600) holding ``data``; FileExistsError if it exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            _write_direct(path, data, flags)  # filesystem without hard links
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _write_direct(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_private(path: Path) -> None:
    if os.name != "posix":
        return
    st = path.stat()
    if st.st_mode & 0o077:
        raise IdentityError(
            f"{path} is accessible by other users (mode {st.st_mode & 0o777:03o}) and it "
            f"holds this device's private keys: run `chmod 600 {path}`, and if others could have "
            f"read it, remove this device from the group and join it again"
        )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IdentityError(_corrupt(path, f"not valid JSON ({e})")) from e
    if not isinstance(data, dict):
        raise IdentityError(_corrupt(path, "expected a JSON object"))
    version = data.get("version")
    if version == 1:
        raise IdentityError(
            f"{path.parent} was made by p2psync 0.1, whose shared group key cannot be taken back; "
            f"this version admits devices by signed membership. Upgrade by making the group anew: "
            f"see README \"Upgrading from 0.1\" (your database keeps its rows)")
    if version != FILE_VERSION:
        raise IdentityError(
            f"{path} has format version {version!r}, this p2psync reads "
            f"{FILE_VERSION}: use the p2psync that created it"
        )
    return data


def _hex_field(data: dict, key: str, length: int, path: Path) -> bytes:
    value = data.get(key)
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-fA-F]{{{2 * length}}}", value):
        raise IdentityError(_corrupt(path, f"{key} must be {2 * length} hex digits"))
    return bytes.fromhex(value)


def _corrupt(path: Path, problem: str) -> str:
    return (
        f"{path} is corrupt: {problem}; restore it from a backup, or move "
        f"{path.parent} away and `p2psync join` the group again"
    )
