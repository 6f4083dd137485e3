"""Device homes are private and round-trip; invite codes reject every typo clearly."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import stat
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.identity import (
    DEVICE_FILE,
    INVITE_PREFIX,
    KEYS_FILE,
    Device,
    DeviceKeys,
    IdentityError,
    InviteCode,
    InviteError,
    check_name,
    create_device,
    encode_invite,
    load_device,
    parse_duration,
    parse_invite,
    refuse_existing,
    resolve_home,
)
from p2psync.identity.invites import MAX_ADDRESSES, invite_id, invite_psk

GROUP_ID = bytes(range(16))
FOUND = bytes(range(100, 132))
SECRET = bytes(range(200, 216))
EXPIRES_MS = 28_333_334 * 60_000  # a whole minute: codes carry minutes
INVITE = InviteCode(GROUP_ID, FOUND, SECRET, EXPIRES_MS,
                    (("192.168.1.20", 7000), ("fe80::1", 7001)), "relay.example.org:443")
CODE = encode_invite(INVITE)
B32 = set("abcdefghijklmnopqrstuvwxyz234567")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make(home: Path, db: Path, name: str = "laptop", keys: DeviceKeys | None = None) -> Device:
    return create_device(home, db, name, keys or DeviceKeys.generate(), GROUP_ID, FOUND)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "home"


# --- home resolution ---------------------------------------------------------


def test_resolve_home_prefers_arg_then_env_then_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PSYNC_HOME", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_home(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_home(None) == tmp_path / "env"
    monkeypatch.delenv("P2PSYNC_HOME")
    assert resolve_home(None) == tmp_path / "xdg" / "p2psync"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert resolve_home(None) == tmp_path / "user" / ".local" / "share" / "p2psync"


def test_resolve_home_is_absolute(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_home("rel") == tmp_path / "rel"
    monkeypatch.setenv("P2PSYNC_HOME", "envrel")
    assert resolve_home(None) == tmp_path / "envrel"


def test_resolve_home_ignores_a_relative_xdg_data_home(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("P2PSYNC_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "relative/xdg")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert resolve_home(None) == tmp_path / "user" / ".local" / "share" / "p2psync"


# --- keys --------------------------------------------------------------------


def test_generated_keys_are_fresh_and_well_formed() -> None:
    a, b = DeviceKeys.generate(), DeviceKeys.generate()
    assert len(a.site_id) == 16
    assert len(a.static_private) == len(a.static_public) == 32
    assert len(a.sign_private) == len(a.sign_public) == 32
    assert a.static_public != a.static_private and a.sign_public != a.sign_private
    assert a.site_id != b.site_id
    assert a.static_private != b.static_private and a.sign_private != b.sign_private
    for secret in (a.static_private, a.sign_private):
        assert secret.hex() not in repr(a) and repr(secret) not in repr(a)


# --- create / load -----------------------------------------------------------


def test_create_then_load_round_trips(home: Path, tmp_path: Path) -> None:
    keys = DeviceKeys.generate()
    created = make(home, tmp_path / "app.db", keys=keys)
    loaded = load_device(home)
    assert loaded == created
    assert loaded.home == home
    assert loaded.name == "laptop"
    assert loaded.db_path == tmp_path / "app.db"
    assert loaded.site_id == keys.site_id
    assert loaded.keys == keys
    assert loaded.group_id == GROUP_ID
    assert loaded.found == FOUND
    assert loaded.static_public == keys.static_public
    assert loaded.sign_public == keys.sign_public


def test_files_are_private(home: Path, tmp_path: Path) -> None:
    make(home, tmp_path / "app.db")
    assert mode(home) == 0o700
    assert mode(home / KEYS_FILE) == 0o600
    assert mode(home / DEVICE_FILE) == 0o600
    assert sorted(p.name for p in home.iterdir()) == ["device.json", "keys.json"]


def test_files_are_private_even_with_a_permissive_umask(home: Path, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make(home, tmp_path / "app.db")
    finally:
        os.umask(old)
    assert mode(home) == 0o700
    assert mode(home / KEYS_FILE) == 0o600
    assert mode(home / DEVICE_FILE) == 0o600


def test_secrets_are_not_in_device_json_or_repr(home: Path, tmp_path: Path) -> None:
    device = make(home, tmp_path / "app.db")
    public = (home / DEVICE_FILE).read_text()
    for secret in (device.static_private, device.sign_private):
        assert secret.hex() not in public
        assert secret.hex() not in repr(device)
        assert repr(secret) not in repr(device)
        assert secret.hex() in (home / KEYS_FILE).read_text()


def test_home_holds_no_group_secret(home: Path, tmp_path: Path) -> None:
    make(home, tmp_path / "app.db")
    keys = json.loads((home / KEYS_FILE).read_text())
    info = json.loads((home / DEVICE_FILE).read_text())
    assert set(keys) == {"version", "static_private", "sign_private"}
    assert set(info) == {"version", "site_id", "name", "db_path", "group_id", "found"}
    assert keys["version"] == info["version"] == 2


def test_relative_db_path_is_stored_absolute(home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make(home, Path("app.db"))
    assert load_device(home).db_path == tmp_path / "app.db"
    assert json.loads((home / DEVICE_FILE).read_text())["db_path"] == str(tmp_path / "app.db")


def test_default_name_is_the_hostname(home: Path, tmp_path: Path) -> None:
    assert check_name(None) == socket.gethostname().strip()
    assert make(home, tmp_path / "a.db", name=check_name(None)).name == socket.gethostname().strip()


def test_default_name_uses_a_patched_hostname(monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: " box-7 ")
    assert check_name(None) == "box-7"
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    with pytest.raises(IdentityError, match="--name"):
        check_name(None)


def test_check_name_strips_and_bounds_the_length() -> None:
    assert check_name("  laptop \n") == "laptop"
    assert check_name("x" * 64) == "x" * 64
    assert check_name("Büro-PC") == "Büro-PC"


@pytest.mark.parametrize("name", ["bad\nname", "", "   ", "x" * 65, "tab\there", "nul\x00"])
def test_unusable_name_is_refused_before_writing(home: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(IdentityError, match="--name"):
        check_name(name)
    with pytest.raises(IdentityError, match="--name"):
        make(home, tmp_path / "a.db", name=name)
    assert not home.exists()


def test_second_create_refuses_and_keeps_the_first(home: Path, tmp_path: Path) -> None:
    first = make(home, tmp_path / "app.db")
    with pytest.raises(IdentityError, match="already exists"):
        make(home, tmp_path / "other.db", name="other")
    with pytest.raises(IdentityError, match="already exists"):
        refuse_existing(home)
    assert load_device(home) == first


def test_refuse_existing_allows_a_missing_or_empty_home(home: Path, tmp_path: Path) -> None:
    refuse_existing(home)
    home.mkdir(parents=True)
    refuse_existing(home)
    (tmp_path / "file").write_text("x")
    with pytest.raises(IdentityError, match="not a directory"):
        refuse_existing(tmp_path / "file")
    with pytest.raises(IdentityError, match="not a directory"):
        make(tmp_path / "file", tmp_path / "a.db")


def test_two_devices_of_one_group_differ_in_keys(tmp_path: Path) -> None:
    a = make(tmp_path / "a", tmp_path / "a.db")
    b = make(tmp_path / "b", tmp_path / "b.db")
    assert (a.group_id, a.found) == (b.group_id, b.found)
    assert a.site_id != b.site_id
    assert a.static_private != b.static_private
    assert a.sign_private != b.sign_private


def test_create_in_an_existing_empty_directory(tmp_path: Path) -> None:
    device = make(tmp_path, tmp_path / "app.db")
    assert load_device(tmp_path) == device


def test_load_without_device_says_what_to_run(home: Path) -> None:
    with pytest.raises(IdentityError) as e:
        load_device(home)
    assert str(home) in str(e.value)
    assert "p2psync init --db PATH" in str(e.value)
    assert "p2psync join CODE --db PATH" in str(e.value)


def test_load_refuses_keys_readable_by_others(home: Path, tmp_path: Path) -> None:
    make(home, tmp_path / "app.db")
    os.chmod(home / KEYS_FILE, 0o644)
    with pytest.raises(IdentityError) as e:
        load_device(home)
    assert f"chmod 600 {home / KEYS_FILE}" in str(e.value)
    assert "644" in str(e.value)
    os.chmod(home / KEYS_FILE, 0o600)
    load_device(home)


def test_load_reports_missing_keys(home: Path, tmp_path: Path) -> None:
    make(home, tmp_path / "app.db")
    (home / KEYS_FILE).unlink()
    with pytest.raises(IdentityError, match="keys.json is missing"):
        load_device(home)


def test_interrupted_init_is_reported_by_load_and_create(home: Path, tmp_path: Path) -> None:
    make(home, tmp_path / "app.db")
    (home / DEVICE_FILE).unlink()
    for attempt in (lambda: load_device(home), lambda: make(home, tmp_path / "a.db"),
                    lambda: refuse_existing(home)):
        with pytest.raises(IdentityError, match="remove .*keys.json"):
            attempt()


def _without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(
    "file, edit, message",
    [
        ("device.json", lambda d: "{not json", "not valid JSON"),
        ("device.json", lambda d: "[]", "JSON object"),
        ("device.json", lambda d: {**d, "site_id": "abc"}, "site_id must be 32 hex digits"),
        ("device.json", lambda d: {**d, "site_id": "zz" * 16}, "site_id must be 32 hex"),
        # bytes.fromhex skips spaces: 32 characters, but only 11 bytes
        pytest.param("device.json", lambda d: {**d, "site_id": "00 " * 10 + "00"}, "site_id must be 32 hex",
                     id="site_id-hex-with-spaces"),
        ("device.json", _without("site_id"), "site_id"),
        ("device.json", lambda d: {**d, "group_id": None}, "group_id must be 32 hex digits"),
        ("device.json", _without("group_id"), "group_id"),
        ("device.json", lambda d: {**d, "found": "00" * 31}, "found must be 64 hex digits"),
        ("device.json", lambda d: {**d, "found": 7}, "found must be 64 hex"),
        ("device.json", _without("found"), "found"),
        ("device.json", lambda d: {**d, "db_path": "rel.db"}, "db_path"),
        ("device.json", _without("db_path"), "db_path"),
        ("device.json", lambda d: {**d, "name": 3}, "name"),
        ("device.json", lambda d: {**d, "name": ""}, "name"),
        ("device.json", lambda d: {**d, "version": 9}, "version 9"),
        ("device.json", _without("version"), "version None"),
        ("keys.json", lambda d: {**d, "sign_private": "00"}, "sign_private must be 64 hex"),
        pytest.param("keys.json", lambda d: {**d, "sign_private": " " + "00" * 31 + " "},
                     "sign_private must be 64 hex", id="sign_private-hex-with-spaces"),
        ("keys.json", _without("sign_private"), "sign_private"),
        ("keys.json", lambda d: {**d, "static_private": "g" * 64}, "static_private must be 64 hex"),
        ("keys.json", _without("static_private"), "static_private"),
        ("keys.json", lambda d: {**d, "version": 3}, "version 3"),
        ("keys.json", lambda d: b"\xff\xfe", "not valid JSON"),
        ("keys.json", lambda d: "null", "JSON object"),
    ],
)
def test_corrupt_files_give_a_clear_error(home, tmp_path, file, edit, message) -> None:
    make(home, tmp_path / "app.db")
    path = home / file
    new = edit(json.loads(path.read_text()))
    if isinstance(new, bytes):
        path.write_bytes(new)
    else:
        path.write_text(new if isinstance(new, str) else json.dumps(new))
    assert mode(home / KEYS_FILE) == 0o600
    with pytest.raises(IdentityError) as e:
        load_device(home)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def _write_v1_home(home: Path, tmp_path: Path) -> None:
    home.mkdir(parents=True, mode=0o700)
    files = {
        DEVICE_FILE: {"version": 1, "site_id": "11" * 16, "name": "old", "db_path": str(tmp_path / "old.db"),
                      "group_id": "22" * 16},
        KEYS_FILE: {"version": 1, "static_private": "33" * 32, "group_key": "44" * 32},
    }
    for name, data in files.items():
        fd = os.open(home / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)


def test_a_v1_home_points_to_the_upgrade_notes(home: Path, tmp_path: Path) -> None:
    _write_v1_home(home, tmp_path)
    with pytest.raises(IdentityError) as e:
        load_device(home)
    assert str(home) in str(e.value)
    assert "0.1" in str(e.value)
    assert 'README "Upgrading from 0.1"' in str(e.value)
    # and a new init there refuses rather than overwrite the old device
    with pytest.raises(IdentityError, match="already exists"):
        make(home, tmp_path / "app.db")
    assert json.loads((home / KEYS_FILE).read_text())["group_key"] == "44" * 32


def test_device_validates_lengths(tmp_path: Path) -> None:
    good = dict(home=tmp_path, site_id=bytes(16), name="n", db_path=tmp_path / "db", static_private=bytes(32),
                sign_private=bytes(32), group_id=bytes(16), found=bytes(32))
    Device(**good)
    for field, bad in [("site_id", bytes(15)), ("static_private", bytes(31)), ("sign_private", bytes(33)),
                       ("group_id", b"short"), ("found", bytes(16)), ("site_id", "00" * 16)]:
        with pytest.raises(ValueError, match=field):
            Device(**{**good, field: bad})


# --- invite codes ------------------------------------------------------------


def test_invite_round_trip() -> None:
    assert CODE.startswith(INVITE_PREFIX) and INVITE_PREFIX == "p2ps2-"
    assert CODE == CODE.strip() and "\n" not in CODE and "=" not in CODE
    assert CODE == CODE.lower()
    assert set(CODE[len(INVITE_PREFIX):]) <= B32
    assert parse_invite(CODE) == INVITE
    assert parse_invite(CODE).secret == SECRET


@pytest.mark.parametrize(
    "code",
    [
        InviteCode(bytes(16), bytes(32), bytes(16), 0),
        InviteCode(os.urandom(16), os.urandom(32), os.urandom(16), 60_000, (("10.0.0.1", 1),), None),
        InviteCode(GROUP_ID, FOUND, SECRET, EXPIRES_MS, (("2001:db8::1", 65535),), "r"),
        InviteCode(GROUP_ID, FOUND, SECRET, EXPIRES_MS, (), "relay.example.org:443"),
    ],
)
def test_invite_round_trips_its_fields(code: InviteCode) -> None:
    assert parse_invite(encode_invite(code)) == code


def test_invite_expiry_rounds_down_to_the_minute() -> None:
    code = InviteCode(GROUP_ID, FOUND, SECRET, EXPIRES_MS + 59_999)
    assert parse_invite(encode_invite(code)).expires_ms == EXPIRES_MS


def test_invite_keeps_at_most_max_addresses() -> None:
    addrs = tuple((f"10.0.0.{i}", 7000 + i) for i in range(MAX_ADDRESSES + 2))
    parsed = parse_invite(encode_invite(InviteCode(GROUP_ID, FOUND, SECRET, 0, addrs)))
    assert parsed.addresses == addrs[:MAX_ADDRESSES]


def test_invite_secret_is_not_in_repr() -> None:
    assert SECRET.hex() not in repr(INVITE) and repr(SECRET) not in repr(INVITE)


def test_invite_id_and_psk_are_one_way_from_the_secret() -> None:
    assert INVITE.id == invite_id(SECRET) and len(INVITE.id) == 16
    assert INVITE.psk == invite_psk(SECRET) and len(INVITE.psk) == 32
    assert SECRET not in (INVITE.id, INVITE.psk)
    assert INVITE.id != INVITE.psk[:16]
    other = bytes(16)
    assert invite_id(other) != INVITE.id and invite_psk(other) != INVITE.psk
    assert INVITE.id.hex() not in CODE and INVITE.psk.hex() not in CODE


def test_invite_tolerates_surrounding_whitespace_and_case() -> None:
    assert parse_invite(f"  {CODE}\n") == INVITE
    assert parse_invite(f"\t{CODE}\r\n") == INVITE
    assert parse_invite(CODE.upper()) == INVITE
    assert parse_invite(CODE[:20].upper() + CODE[20:]) == INVITE


def _changed(code: str, i: int) -> str:
    c = "b" if code[i] != "b" else "c"
    return code[:i] + c + code[i + 1 :]


def _with_body(body: bytes) -> str:
    """A code whose checksum matches ``body``, whatever it holds."""
    raw = body + hashlib.blake2b(body, digest_size=4, person=b"p2psync invite").digest()
    return INVITE_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def _packed(*fields) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


GOOD_FIELDS = (2, GROUP_ID, FOUND, SECRET, 0, [], "")


@pytest.mark.parametrize(
    "code, message",
    [
        ("", "empty"),
        ("   \n", "empty"),
        (CODE[:20], "truncated"),
        (INVITE_PREFIX, "truncated"),
        (_changed(CODE, 10), "typo"),
        (_changed(CODE, len(CODE) - 1), "typo"),
        (_changed(CODE, len(CODE) - 4), "typo"),
        (CODE[:10] + CODE[11] + CODE[10] + CODE[12:], "typo"),
        ("p2ps1-" + CODE[6:], "version 'p2ps1-'"),
        ("P2PS1-" + CODE[6:].upper(), "version 'p2ps1-' is not supported"),
        ("p2ps3-" + CODE[6:], "ask an admin for a new code"),
        ("xyz2-" + CODE[6:], "should start with 'p2ps2-'"),
        (CODE[6:], "should start with"),
        ("hello world", "should start with"),
        (CODE[:10] + "0" + CODE[11:], "'0' at character 11"),
        (CODE[:10] + "1" + CODE[11:], "'1' at character 11"),
        (CODE[:10] + "8" + CODE[11:], "'8' at character 11"),
        (CODE.upper()[:12] + "9" + CODE.upper()[13:], "'9' at character 13"),
        (CODE[:10] + "=" + CODE[11:], "'='"),
        (CODE[:10] + "é" + CODE[11:], "'é'"),
        (CODE[:30] + " " + CODE[30:], "' ' at character 31"),
        (CODE[:30] + "-" + CODE[30:], "'-' at character 31"),
        (_with_body(_packed(3, *GOOD_FIELDS[1:])), "invite format 3 is not supported"),
        (_with_body(_packed(2, GROUP_ID[:15], *GOOD_FIELDS[2:])), "contents are malformed"),
        (_with_body(_packed(*GOOD_FIELDS[:5], [[b"\x0a\x00\x00\x01", 0]], "")), "contents are malformed"),
        (_with_body(_packed(*GOOD_FIELDS[:5], [[b"\x0a\x00\x01", 80]], "")), "contents are malformed"),
        (_with_body(_packed(*GOOD_FIELDS[:4], -1, [], "")), "contents are malformed"),
        (_with_body(_packed(*GOOD_FIELDS, "extra")), "contents are malformed"),
        (_with_body(_packed(*GOOD_FIELDS) + b"\x00"), "contents are malformed"),
        (_with_body(bytes(80)), "contents are malformed"),
    ],
)
def test_malformed_invites_give_a_clear_error(code: str, message: str) -> None:
    with pytest.raises(InviteError) as e:
        parse_invite(code)
    assert message in str(e.value)


@pytest.mark.parametrize("k", range(1, 10))
def test_cut_short_invites_say_so(k: int) -> None:
    with pytest.raises(InviteError) as e:
        parse_invite(CODE[:-k])
    assert "truncated" in str(e.value) or "cut short" in str(e.value)
    assert "copy" in str(e.value)


@pytest.mark.parametrize("k", range(1, 10))
def test_invites_with_extra_characters_are_refused(k: int) -> None:
    with pytest.raises(InviteError) as e:
        parse_invite(CODE + "a" * k)
    assert "checksum does not match" in str(e.value) or "extra characters" in str(e.value)
    assert "copy" in str(e.value)


def test_invite_error_is_a_value_error() -> None:
    assert issubclass(InviteError, ValueError)


def _mutations():
    n = len(CODE)
    replace = st.builds(
        lambda i, c: CODE[:i] + c + CODE[i + 1 :], st.integers(0, n - 1), st.characters()
    )
    insert = st.builds(
        lambda i, s: CODE[:i] + s + CODE[i:], st.integers(0, n), st.text(min_size=1, max_size=3)
    )
    delete = st.builds(
        lambda i, k: CODE[:i] + CODE[i + k :], st.integers(0, n - 1), st.integers(1, 5)
    )
    swap = st.builds(
        lambda i: CODE[:i] + CODE[i + 1] + CODE[i] + CODE[i + 2 :], st.integers(0, n - 2)
    )
    return st.one_of(replace, insert, delete, swap, st.text())


@given(_mutations())
def test_any_mutation_parses_to_the_same_code_or_raises_invite_error(code: str) -> None:
    try:
        parsed = parse_invite(code)
    except InviteError as e:
        assert str(e)
    else:
        assert parsed == INVITE


_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
         | st.binary(max_size=40) | st.text(max_size=20))
_value = st.recursive(_leaf, lambda c: st.lists(c, max_size=8)
                      | st.dictionaries(st.integers(-9, 9) | st.text(max_size=3), c, max_size=3), max_leaves=20)
_fields = st.tuples(
    st.sampled_from([2, 1, 3, True]),
    st.binary(min_size=16, max_size=16) | _value,
    st.binary(min_size=32, max_size=32) | _value,
    st.binary(min_size=16, max_size=16) | _value,
    st.integers(-5, 2**41) | _value,
    st.lists(st.tuples(st.binary(min_size=4, max_size=4) | _value, st.integers(-1, 70_000) | _value)
             | st.lists(_value, max_size=3), max_size=5) | _value,
    st.text(max_size=30) | _value,
).map(lambda f: msgpack.packb(list(f), use_bin_type=True))


@given(st.one_of(_fields, _value.map(lambda v: msgpack.packb(v, use_bin_type=True).ljust(76, b"\0")),
                 st.binary(min_size=76, max_size=200)))
def test_any_body_with_a_good_checksum_parses_or_raises_invite_error(body: bytes) -> None:
    try:
        parsed = parse_invite(_with_body(body))
    except InviteError as e:
        assert str(e)
    else:
        assert isinstance(parsed, InviteCode)
        assert len(parsed.group_id) == 16 and len(parsed.found) == 32 and len(parsed.secret) == 16
        assert parsed.expires_ms % 60_000 == 0


# --- durations ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("90", 90), ("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 7 * 86400), ("1.5h", 5400),
     (" 2h\n", 7200), ("2 h", 7200), ("365d", 365 * 86400), ("0.5s", 0.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text, message",
    [("", "not a duration"), ("h", "not a duration"), ("abc", "not a duration"), ("1w", "not a duration"),
     ("-1h", "not a duration"), ("1e3", "not a duration"), ("1h30m", "not a duration"), (None, "not a duration"),
     ("0", "more than 0"), ("0s", "more than 0"), ("366d", "at most 365 days"), ("9" * 400, "at most 365 days")],
)
def test_parse_duration_rejects(text, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert message in str(e.value)
    assert repr(text) in str(e.value)
