"""config.toml gives defaults, flags override it, and every bad value names its key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2psync.config import Config, ConfigError, load_config, parse_hostport


def write(home: Path, text: str) -> Path:
    path = home / "config.toml"
    path.write_text(text)
    return path


def error(home: Path, text: str) -> str:
    write(home, text)
    with pytest.raises(ConfigError) as e:
        load_config(home)
    return str(e.value)


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path)
    assert config == Config()
    assert config.listen == ("0.0.0.0", 7733)
    assert config.peers == ()
    assert config.interfaces == ()
    assert config.relay is None
    assert config.log_level == "info"
    assert config.mdns is True
    assert config.max_clock_skew == 60.0


def test_missing_home_gives_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "nowhere") == Config()


def test_every_key_is_read(tmp_path: Path) -> None:
    write(
        tmp_path,
        """
        listen = "127.0.0.1:0"
        peers = ["10.0.0.7:7733", "[fe80::1]:7000", "desk.local:7733"]
        interfaces = ["192.168.1.20"]
        relay = "relay.example.org:443"
        log_level = "DEBUG"
        mdns = false
        max_clock_skew = 5
        """,
    )
    config = load_config(tmp_path)
    assert config.listen == ("127.0.0.1", 0)
    assert config.peers == (("10.0.0.7", 7733), ("fe80::1", 7000), ("desk.local", 7733))
    assert config.interfaces == ("192.168.1.20",)
    assert config.relay == ("relay.example.org", 443)
    assert config.log_level == "debug"
    assert config.mdns is False
    assert config.max_clock_skew == 5.0


def test_override_replaces_only_given_values(tmp_path: Path) -> None:
    write(tmp_path, 'peers = ["10.0.0.7:7733"]\nrelay = "r.example:7733"\n')
    base = load_config(tmp_path)
    config = base.override(
        listen="0.0.0.0:9000", peers=None, relay=None, mdns=False, log_level=None
    )
    assert config.listen == ("0.0.0.0", 9000)
    assert config.peers == (("10.0.0.7", 7733),)
    assert config.relay == ("r.example", 7733)
    assert config.mdns is False
    assert config.log_level == "info"
    assert base.override() == base
    assert base.override(peers=["10.0.0.9:1"]).peers == (("10.0.0.9", 1),)


def test_override_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError) as e:
        Config().override(peers=["10.0.0.7:7733", "foo"])
    assert str(e.value).startswith('--peer "foo": expected HOST:PORT')
    with pytest.raises(ConfigError, match="--listen"):
        Config().override(listen="nope")
    with pytest.raises(ConfigError, match="--max-clock-skew"):
        Config().override(max_clock_skew=0)


def test_override_rejects_unknown_settings() -> None:
    with pytest.raises(TypeError, match="colour"):
        Config().override(colour="red")


def test_config_is_immutable() -> None:
    with pytest.raises(AttributeError):
        Config().mdns = False  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('peers = ["10.0.0.1:1", "foo"]', 'peers[1] = "foo": expected HOST:PORT'),
        ('peers = ["10.0.0.1:99999"]', "peers[0]"),
        ('peers = "10.0.0.1:7733"', "peers: expected a list"),
        ("peers = [7733]", "peers[0]: expected a HOST:PORT string, got an integer"),
        ('listen = "7733"', 'listen = "7733": expected HOST:PORT'),
        ('listen = "::1:7733"', "brackets"),
        ('relay = "relay:port"', "port 'port' is not a number"),
        ("relay = 1", "relay: expected a HOST:PORT string, got an integer"),
        ('interfaces = ["eth0"]', 'interfaces[0] = "eth0": expected an IPv4 address'),
        ('interfaces = ["::1"]', "interfaces[0]"),
        ('log_level = "verbose"', "log_level = \"verbose\": expected one of debug, info"),
        ('mdns = "no"', 'mdns: expected true or false, got "no"'),
        ("max_clock_skew = 0", "max_clock_skew = 0: expected a number of seconds greater than 0"),
        ("max_clock_skew = -1.5", "max_clock_skew"),
        ("max_clock_skew = nan", "max_clock_skew"),
        ("max_clock_skew = inf", "max_clock_skew"),
        ("max_clock_skew = true", "max_clock_skew: expected a number of seconds, got a boolean"),
        ('peer = ["10.0.0.1:1"]', "unknown key 'peer' (did you mean 'peers'?)"),
        ("[relay]\nhost = 'x'", "relay: expected a HOST:PORT string, got a table"),
        ("[server]\nport = 1", "unknown key 'server'"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'config.toml'}: ")
    assert expected in message


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    message = error(tmp_path, 'listen = "0.0.0.0:7733"\nmdns = yes\n')
    assert str(tmp_path / "config.toml") in message
    assert "invalid TOML" in message
    assert "line 2" in message


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_bytes(b'log_level = "\xff"\n')
    with pytest.raises(ConfigError, match="config.toml"):
        load_config(tmp_path)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read .*config.toml"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.7:7733", ("10.0.0.7", 7733)),
        ("desk.local:1", ("desk.local", 1)),
        ("my-host_1:65535", ("my-host_1", 65535)),
        ("[::1]:7733", ("::1", 7733)),
        ("[fe80::1%eth0]:7733", ("fe80::1%eth0", 7733)),
    ],
)
def test_parse_hostport_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", "foo", ":7733", "host:", "host:0", "host:65536", "host:-1", "host:+1", "host:7733 ",
        " host:7733", "::1:7733", "[::1]7733", "[::1:7733", "[nothost]:7733", "999.0.0.1:1",
        "a..b:1", "-a:1", "a b:1", "héllo:1", "host:٣",
    ],
)
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        parse_hostport(text, "where")


def test_parse_hostport_port_zero_only_when_allowed() -> None:
    assert parse_hostport("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="out of range 1-65535"):
        parse_hostport("127.0.0.1:0")
