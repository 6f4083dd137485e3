"""Device identity files are private and round-trip; invite codes reject every typo clearly."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.identity import (
    INVITE_PREFIX,
    Device,
    Group,
    IdentityError,
    InviteError,
    create_device,
    day_number,
    invite_code,
    load_device,
    parse_invite,
    resolve_home,
)

GROUP = Group(bytes(range(16)), bytes(range(100, 132)))
CODE = invite_code(GROUP)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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


# --- create / load -----------------------------------------------------------


def test_create_then_load_round_trips(home: Path, tmp_path: Path) -> None:
    created = create_device(home, tmp_path / "app.db", name="laptop")
    loaded = load_device(home)
    assert loaded == created
    assert loaded.name == "laptop"
    assert loaded.db_path == tmp_path / "app.db"
    assert len(loaded.site_id) == 16
    assert len(loaded.static_public) == 32
    assert loaded.static_public != loaded.static_private


def test_files_are_private(home: Path, tmp_path: Path) -> None:
    create_device(home, tmp_path / "app.db")
    assert mode(home) == 0o700
    assert mode(home / "keys.json") == 0o600
    assert mode(home / "device.json") == 0o600
    assert sorted(p.name for p in home.iterdir()) == ["device.json", "keys.json"]


def test_files_are_private_even_with_a_permissive_umask(home: Path, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        create_device(home, tmp_path / "app.db")
    finally:
        os.umask(old)
    assert mode(home) == 0o700
    assert mode(home / "keys.json") == 0o600


def test_secrets_are_not_in_device_json_or_repr(home: Path, tmp_path: Path) -> None:
    device = create_device(home, tmp_path / "app.db")
    public = (home / "device.json").read_text()
    for secret in (device.static_private, device.group.key):
        assert secret.hex() not in public
        assert secret.hex() not in repr(device)
        assert repr(secret) not in repr(device)


def test_relative_db_path_is_stored_absolute(home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    create_device(home, Path("app.db"))
    assert load_device(home).db_path == tmp_path / "app.db"


def test_default_name_is_the_hostname(home: Path, tmp_path: Path) -> None:
    import socket

    assert create_device(home, tmp_path / "a.db").name == socket.gethostname().strip()


def test_unusable_name_is_refused_before_writing(home: Path, tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="--name"):
        create_device(home, tmp_path / "a.db", name="bad\nname")
    assert not home.exists()


def test_second_create_refuses_and_keeps_the_first(home: Path, tmp_path: Path) -> None:
    first = create_device(home, tmp_path / "app.db")
    with pytest.raises(IdentityError, match="already exists"):
        create_device(home, tmp_path / "other.db")
    assert load_device(home) == first


def test_create_joins_a_given_group(home: Path, tmp_path: Path) -> None:
    a = create_device(tmp_path / "a", tmp_path / "a.db")
    b = create_device(tmp_path / "b", tmp_path / "b.db", group=parse_invite(invite_code(a.group)))
    assert b.group == a.group
    assert b.site_id != a.site_id
    assert b.static_private != a.static_private


def test_create_in_an_existing_empty_directory(tmp_path: Path) -> None:
    device = create_device(tmp_path, tmp_path / "app.db")
    assert load_device(tmp_path) == device


def test_load_without_device_says_what_to_run(home: Path) -> None:
    with pytest.raises(IdentityError) as e:
        load_device(home)
    assert str(home) in str(e.value)
    assert "p2psync init --db PATH" in str(e.value)
    assert "p2psync join CODE --db PATH" in str(e.value)


def test_load_refuses_keys_readable_by_others(home: Path, tmp_path: Path) -> None:
    create_device(home, tmp_path / "app.db")
    os.chmod(home / "keys.json", 0o644)
    with pytest.raises(IdentityError) as e:
        load_device(home)
    assert f"chmod 600 {home / 'keys.json'}" in str(e.value)
    assert "644" in str(e.value)
    os.chmod(home / "keys.json", 0o600)
    load_device(home)


def test_load_reports_missing_keys(home: Path, tmp_path: Path) -> None:
    create_device(home, tmp_path / "app.db")
    (home / "keys.json").unlink()
    with pytest.raises(IdentityError, match="keys.json is missing"):
        load_device(home)


def test_interrupted_init_is_reported_by_load_and_create(home: Path, tmp_path: Path) -> None:
    create_device(home, tmp_path / "app.db")
    (home / "device.json").unlink()
    for attempt in (lambda: load_device(home), lambda: create_device(home, tmp_path / "a.db")):
        with pytest.raises(IdentityError, match="remove .*keys.json"):
            attempt()


@pytest.mark.parametrize(
    "file, edit, message",
    [
        ("device.json", lambda d: "{not json", "not valid JSON"),
        ("device.json", lambda d: "[]", "JSON object"),
        ("device.json", lambda d: {**d, "site_id": "abc"}, "site_id must be 32 hex digits"),
        ("device.json", lambda d: {**d, "site_id": "zz" * 16}, "site_id must be 32 hex"),
        ("device.json", lambda d: {**d, "group_id": None}, "group_id"),
        ("device.json", lambda d: {**d, "db_path": "rel.db"}, "db_path"),
        ("device.json", lambda d: {**d, "name": 3}, "name"),
        ("device.json", lambda d: {**d, "version": 9}, "version 9"),
        ("keys.json", lambda d: {**d, "group_key": "00"}, "group_key must be 64 hex"),
        ("keys.json", lambda d: {k: v for k, v in d.items() if k != "static_private"},
         "static_private"),
        ("keys.json", lambda d: b"\xff\xfe", "not valid JSON"),
    ],
)
def test_corrupt_files_give_a_clear_error(home, tmp_path, file, edit, message) -> None:
    create_device(home, tmp_path / "app.db")
    path = home / file
    new = edit(json.loads(path.read_text()))
    if isinstance(new, bytes):
        path.write_bytes(new)
    else:
        path.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(IdentityError) as e:
        load_device(home)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_device_and_group_validate_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Group(b"short", bytes(32))
    with pytest.raises(ValueError):
        Group(bytes(16), bytes(31))
    with pytest.raises(ValueError):
        Device(tmp_path, bytes(15), "n", tmp_path / "db", bytes(32), GROUP)


# --- derived keys ------------------------------------------------------------


def test_derived_keys_are_distinct_and_not_the_group_key() -> None:
    derived = [GROUP.tag_key(), GROUP.data_key(), GROUP.relay_token(), GROUP.psk()]
    assert all(len(k) == 32 for k in derived)
    assert len(set(derived + [GROUP.key])) == 5
    assert GROUP.relay_token() != GROUP.key
    assert GROUP.relay_token() != GROUP.data_key()


def test_derived_keys_depend_on_the_key_and_the_group_id() -> None:
    other_key = Group(GROUP.group_id, bytes(32))
    other_id = Group(bytes(16), GROUP.key)
    for g in (other_key, other_id):
        assert g.relay_token() != GROUP.relay_token()
        assert g.data_key() != GROUP.data_key()


def test_mdns_tag_changes_with_day_and_group() -> None:
    tags = {GROUP.mdns_tag(day) for day in range(19000, 19030)}
    assert len(tags) == 30
    assert GROUP.mdns_tag(19000) == GROUP.mdns_tag(19000)
    assert Group.generate().mdns_tag(19000) != GROUP.mdns_tag(19000)


def test_mdns_tag_is_short_hex_and_reveals_nothing_stable() -> None:
    tag = GROUP.mdns_tag(19000)
    assert 8 <= len(tag) <= 32
    int(tag, 16)
    for stable in (GROUP.group_id, GROUP.key, GROUP.tag_key(), GROUP.relay_token()):
        assert stable.hex()[:8] not in tag
    # Same group id, different key: a tag never follows from the public id alone.
    assert Group(GROUP.group_id, bytes(32)).mdns_tag(19000) != tag


def test_day_number() -> None:
    assert day_number(0) == 0
    assert day_number(86399.9) == 0
    assert day_number(86400) == 1


# --- invite codes ------------------------------------------------------------


def test_invite_round_trip() -> None:
    assert CODE.startswith(INVITE_PREFIX)
    assert CODE == CODE.strip() and "\n" not in CODE and "=" not in CODE
    assert CODE == CODE.lower()
    assert parse_invite(CODE) == GROUP
    fresh = Group.generate()
    assert parse_invite(invite_code(fresh)) == fresh


def test_invite_tolerates_surrounding_whitespace_and_case() -> None:
    assert parse_invite(f"  {CODE}\n") == GROUP
    assert parse_invite(CODE.upper()) == GROUP


def _changed(code: str, i: int) -> str:
    c = "b" if code[i] != "b" else "c"
    return code[:i] + c + code[i + 1 :]


@pytest.mark.parametrize(
    "code, message",
    [
        ("", "empty"),
        ("   \n", "empty"),
        (CODE[:-1], "truncated"),
        (CODE[:20], "truncated"),
        (INVITE_PREFIX, "truncated"),
        (CODE + "a", "too long"),
        (_changed(CODE, 10), "typo"),
        (_changed(CODE, len(CODE) - 1), "typo"),
        (_changed(CODE, len(CODE) - 4), "typo"),
        ("p2ps2-" + CODE[6:], "version 'p2ps2-'"),
        ("xyz1-" + CODE[6:], "should start with 'p2ps1-'"),
        (CODE[6:], "should start with"),
        ("hello world", "should start with"),
        (CODE[:10] + "0" + CODE[11:], "'0' at character 11"),
        (CODE[:10] + "=" + CODE[11:], "'='"),
        (CODE[:10] + "é" + CODE[11:], "'é'"),
        (CODE[:30] + " " + CODE[30:], "' ' at character 31"),
    ],
)
def test_malformed_invites_give_a_clear_error(code: str, message: str) -> None:
    with pytest.raises(InviteError) as e:
        parse_invite(code)
    assert message in str(e.value)


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
def test_any_mutation_parses_to_the_same_group_or_raises_invite_error(code: str) -> None:
    try:
        group = parse_invite(code)
    except InviteError as e:
        assert str(e)
    else:
        assert group == GROUP
