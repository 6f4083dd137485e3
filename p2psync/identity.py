"""Device identity and group membership, kept in the home directory.

A home holds ``device.json`` (site id, name, database path, group id) and
``keys.json`` (the X25519 static private key and the group key). Both are
created mode 0600 in a 0700 directory, written to a temporary file first and
published with ``os.link`` so they never appear half written and never replace
an existing device. Every key used on the wire is derived from the group key
with HKDF-SHA256 under its own label; the group key itself never leaves the
device except inside an invite code.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DEVICE_FILE = "device.json"
KEYS_FILE = "keys.json"
FILE_VERSION = 1
SITE_ID_LEN = 16
GROUP_ID_LEN = 16
KEY_LEN = 32
MAX_NAME_LEN = 64

INVITE_PREFIX = "p2ps1-"
INVITE_VERSION = 1
_CHECKSUM_LEN = 4
_INVITE_BYTES = 1 + GROUP_ID_LEN + KEY_LEN + _CHECKSUM_LEN
_INVITE_CHARS = (_INVITE_BYTES * 8 + 4) // 5
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


class IdentityError(Exception):
    """The device identity is missing, corrupt or unsafe; the message says what to do."""


class InviteError(ValueError):
    """An invite code is malformed; the message says how."""


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
class Group:
    """A sync group: a public id and the shared secret key that admits members."""

    group_id: bytes
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_bytes("group_id", self.group_id, GROUP_ID_LEN)
        _check_bytes("group key", self.key, KEY_LEN)

    @classmethod
    def generate(cls) -> Group:
        """A new group with a random id and key."""
        return cls(secrets.token_bytes(GROUP_ID_LEN), secrets.token_bytes(KEY_LEN))

    def _derive(self, label: bytes) -> bytes:
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=self.group_id,
            info=b"p2psync v1 " + label,
        )
        return hkdf.derive(self.key)

    def psk(self) -> bytes:
        """The 32-byte Noise pre-shared key for device-to-device handshakes."""
        return self._derive(b"noise psk")

    def tag_key(self) -> bytes:
        """The 32-byte key of the daily mDNS group tag."""
        return self._derive(b"mdns tag")

    def data_key(self) -> bytes:
        """The 32-byte key that encrypts cells stored at a relay."""
        return self._derive(b"relay data")

    def relay_token(self) -> bytes:
        """The 32-byte credential that admits this group at a relay (one-way from the key)."""
        return self._derive(b"relay token")

    def mdns_tag(self, day: int) -> str:
        """The group's mDNS tag for day number ``day`` (days since the Unix epoch, UTC)."""
        mac = hmac.new(self.tag_key(), day.to_bytes(8, "big", signed=True), hashlib.sha256)
        return mac.hexdigest()[:16]


def day_number(unix_time: float) -> int:
    """The UTC day number of ``unix_time``, as ``Group.mdns_tag`` expects."""
    return int(unix_time // 86400)


@dataclass(frozen=True)
class Device:
    """This device: its site id, name, database, static key and group."""

    home: Path
    site_id: bytes
    name: str
    db_path: Path
    static_private: bytes = field(repr=False)
    group: Group

    def __post_init__(self) -> None:
        _check_bytes("site_id", self.site_id, SITE_ID_LEN)
        _check_bytes("static_private", self.static_private, KEY_LEN)

    @property
    def static_public(self) -> bytes:
        """The 32-byte X25519 public key that peers see in the handshake."""
        private = X25519PrivateKey.from_private_bytes(self.static_private)
        return private.public_key().public_bytes_raw()


def create_device(
    home: Path, db_path: Path, name: str | None = None, group: Group | None = None
) -> Device:
    """Create a new device in ``home`` (in ``group``, else a new group); refuse if one exists."""
    home = Path(home).expanduser().absolute()
    _refuse_existing(home)
    device = Device(
        home=home,
        site_id=secrets.token_bytes(SITE_ID_LEN),
        name=_check_name(socket.gethostname() if name is None else name),
        db_path=Path(db_path).expanduser().absolute(),
        static_private=X25519PrivateKey.generate().private_bytes_raw(),
        group=group if group is not None else Group.generate(),
    )
    _make_home(home)
    keys = {
        "version": FILE_VERSION,
        "static_private": device.static_private.hex(),
        "group_key": device.group.key.hex(),
    }
    info = {
        "version": FILE_VERSION,
        "site_id": device.site_id.hex(),
        "name": device.name,
        "db_path": str(device.db_path),
        "group_id": device.group.group_id.hex(),
    }
    try:
        _write_new(home / KEYS_FILE, _dump(keys))
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
        group=Group(
            _hex_field(info, "group_id", GROUP_ID_LEN, device_path),
            _hex_field(keys, "group_key", KEY_LEN, keys_path),
        ),
    )


def invite_code(group: Group) -> str:
    """A one-line code that carries ``group`` (id and key) to a new device."""
    body = bytes([INVITE_VERSION]) + group.group_id + group.key
    raw = body + _invite_checksum(body)
    return INVITE_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def parse_invite(code: str) -> Group:
    """The group in invite ``code``; InviteError saying what is wrong with it."""
    code = code.strip()
    if not code:
        raise InviteError("the invite code is empty: copy it from `p2psync invite` on a member")
    if not code.isascii():
        bad = next(c for c in code if not c.isascii())
        raise InviteError(f"the invite code contains {bad!r}, which never appears in one")
    lowered = code.lower()
    if not lowered.startswith(INVITE_PREFIX):
        other = re.match(r"p2ps\d+-", lowered)
        if other:
            raise InviteError(
                f"invite code version {other.group()!r} is not supported by this "
                f"p2psync (it reads {INVITE_PREFIX!r}): use the same p2psync version"
            )
        raise InviteError(f"not a p2psync invite code: it should start with {INVITE_PREFIX!r}")
    payload = lowered[len(INVITE_PREFIX):]
    for i, c in enumerate(payload):
        if c not in _B32_ALPHABET:
            pos = len(INVITE_PREFIX) + i + 1
            raise InviteError(
                f"the invite code has {code[pos - 1]!r} at character {pos}, which never "
                f"appears in one (codes use a-z and 2-7): check for a typo"
            )
    if len(payload) != _INVITE_CHARS:
        how = "truncated" if len(payload) < _INVITE_CHARS else "too long"
        raise InviteError(
            f"the invite code is {how}: {len(payload)} characters after {INVITE_PREFIX!r}, "
            f"expected {_INVITE_CHARS}; copy the whole line"
        )
    padded = payload.upper() + "=" * (-len(payload) % 8)
    try:
        raw = base64.b32decode(padded)
    except binascii.Error as e:  # pragma: no cover - the checks above exclude it
        raise InviteError(f"the invite code cannot be decoded: {e}") from e
    body, checksum = raw[:-_CHECKSUM_LEN], raw[-_CHECKSUM_LEN:]
    canonical = base64.b32encode(raw).decode("ascii").rstrip("=").lower()
    if canonical != payload or not hmac.compare_digest(checksum, _invite_checksum(body)):
        raise InviteError(
            "the invite code's checksum does not match, so it has a typo: "
            "copy it again from `p2psync invite`"
        )
    if body[0] != INVITE_VERSION:
        raise InviteError(f"invite format {body[0]} is not supported by this p2psync")
    return Group(body[1 : 1 + GROUP_ID_LEN], body[1 + GROUP_ID_LEN :])


def _invite_checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_CHECKSUM_LEN, person=b"p2psync invite").digest()


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


def _refuse_existing(home: Path) -> None:
    if (home / DEVICE_FILE).exists():
        raise IdentityError(
            f"a device already exists in {home}: use another --home, or remove "
            f"{home} to start over (this deletes the device and its keys)"
        )
    if (home / KEYS_FILE).exists():
        raise IdentityError(_unfinished(home))
    if home.exists() and not home.is_dir():
        raise IdentityError(f"{home} exists and is not a directory: choose another --home")


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
            f"holds the group key: run `chmod 600 {path}`, and if others could have read "
            f"it, start a new group"
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
    if version != FILE_VERSION:
        raise IdentityError(
            f"{path} has format version {version!r}, this p2psync reads "
            f"{FILE_VERSION}: use the p2psync that created it"
        )
    return data


def _hex_field(data: dict, key: str, length: int, path: Path) -> bytes:
    value = data.get(key)
    problem = f"{key} must be {2 * length} hex digits"
    if not isinstance(value, str) or len(value) != 2 * length:
        raise IdentityError(_corrupt(path, problem))
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise IdentityError(_corrupt(path, problem)) from None


def _corrupt(path: Path, problem: str) -> str:
    return (
        f"{path} is corrupt: {problem}; restore it from a backup, or move "
        f"{path.parent} away and `p2psync join` the group again"
    )
