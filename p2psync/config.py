"""Agent settings: ``config.toml`` in the home directory, then command-line flags."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.toml"
DEFAULT_PORT = 7733
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_CLOCK_SKEW_RANGE = (0.001, 365 * 86400.0)
RECONCILE_INTERVAL_RANGE = (1.0, 7 * 86400.0)   # seconds: a second to a week   # seconds: a millisecond to a year (ports: 1-65535, listen 0-65535)

HostPort = tuple[str, int]

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")

# The command-line flag that sets each field, for error messages.
_FLAGS = {
    "listen": "--listen",
    "peers": "--peer",
    "interfaces": "--interface",
    "relay": "--relay",
    "log_level": "--log-level",
    "mdns": "--no-mdns",
    "max_clock_skew": "--max-clock-skew",
    "track_new_columns": "track_new_columns",      # config file only
    "reconcile_interval": "reconcile_interval",    # config file only
    "max_peers": "max_peers",                      # config file only
}


class ConfigError(ValueError):
    """A setting is invalid; the message names the file or flag, the key and the value."""


@dataclass(frozen=True)
class Config:
    """The agent's settings; addresses are parsed into (host, port)."""

    listen: HostPort = ("0.0.0.0", DEFAULT_PORT)
    peers: tuple[HostPort, ...] = ()
    interfaces: tuple[str, ...] = ()
    relay: HostPort | None = None
    log_level: str = "info"
    mdns: bool = True
    max_clock_skew: float = 60.0
    track_new_columns: bool = True      # columns added to a tracked table are synced at once
    reconcile_interval: float = 600.0   # seconds between passes looking for writes capture missed
    max_peers: int = 64                 # LAN sessions at once (the relay's is extra)

    def override(self, **cli_values: object) -> Config:
        """This config with the given command-line values (None = flag not given) in place.

        Values are raw flag values: strings for addresses (a list of them for
        ``peers`` and ``interfaces``, which replace the file's lists). Invalid
        values raise ConfigError naming the flag.
        """
        unknown = set(cli_values) - set(_FLAGS)
        if unknown:
            raise TypeError(f"Config.override() got unknown settings: {sorted(unknown)}")
        changes = {
            key: _VALIDATORS[key](value, _FLAGS[key])
            for key, value in cli_values.items()
            if value is not None
        }
        return dataclasses.replace(self, **changes)


def load_config(home: Path) -> Config:
    """The settings in ``home/config.toml``; defaults if the file does not exist."""
    path = Path(home) / CONFIG_FILE
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    except ValueError as e:  # tomllib lets some through, e.g. an integer of over 4300 digits
        raise ConfigError(f"{path}: invalid TOML: {str(e).split(';')[0]}") from e
    return config_from_dict(data, str(path))


def config_from_dict(data: dict, source: str) -> Config:
    """The settings in parsed TOML ``data``; errors name ``source`` and the key."""
    for key in data:
        if key not in _FLAGS:
            hint = difflib.get_close_matches(key, _FLAGS, n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            known = ", ".join(_FLAGS)
            raise ConfigError(f"{source}: unknown key {key!r}{also}; known keys: {known}")
    values = {key: _VALIDATORS[key](value, f"{source}: {key}") for key, value in data.items()}
    return Config(**values)


def parse_hostport(s: str, where: str | None = None, *, allow_port_zero: bool = False) -> HostPort:
    """``(host, port)`` from "HOST:PORT" or "[IPv6]:PORT"; ConfigError naming ``where``."""

    def bad(why: str) -> ConfigError:
        shown = json.dumps(s, ensure_ascii=False)
        prefix = _at(where, shown) if where else shown
        example = f"192.168.1.20:{DEFAULT_PORT}"
        return ConfigError(f"{prefix}: expected HOST:PORT such as {example} ({why})")

    if not isinstance(s, str):
        raise ConfigError(f"{where or 'address'}: expected a HOST:PORT string, got {_kind(s)}")
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1 : end + 2] != ":":
            raise bad("an IPv6 address in brackets must be followed by :PORT")
        host, port_text = s[1:end], s[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep:
            raise bad("no port")
        if ":" in host:
            raise bad("write IPv6 addresses in brackets, e.g. [::1]:7733")
        if not _valid_host(host):
            raise bad(f"{host!r} is not a host name or IPv4 address")
    if not (port_text.isascii() and port_text.isdigit()):
        raise bad(f"port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise bad(f"port {port} is out of range {low}-65535")
    return host, port


def _valid_host(host: str) -> bool:
    if not host or len(host) > 253 or not host.isascii():
        return False
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return all(_LABEL.fullmatch(label) for label in labels)


def _listen(value: object, where: str) -> HostPort:
    return parse_hostport(value, where, allow_port_zero=True)  # type: ignore[arg-type]


def _relay(value: object, where: str) -> HostPort:
    return parse_hostport(value, where)  # type: ignore[arg-type]


def _peers(value: object, where: str) -> tuple[HostPort, ...]:
    items = _string_list(value, where, "HOST:PORT")
    return tuple(parse_hostport(item, _item(where, i)) for i, item in enumerate(items))


def _interfaces(value: object, where: str) -> tuple[str, ...]:
    result = []
    for i, item in enumerate(_string_list(value, where, "IPv4 address")):
        try:
            result.append(str(ipaddress.IPv4Address(item)))
        except ValueError:
            shown = json.dumps(item, ensure_ascii=False)
            raise ConfigError(
                f"{_at(_item(where, i), shown)}: expected an IPv4 address, e.g. 192.168.1.20"
            ) from None
    return tuple(result)


def _string_list(value: object, where: str, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of {what} strings, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{_item(where, i)}: expected a {what} string, got {_kind(item)}")
    return list(value)


def _log_level(value: object, where: str) -> str:
    if isinstance(value, str) and value.lower() in LOG_LEVELS:
        return value.lower()
    shown = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else _kind(value)
    raise ConfigError(f"{_at(where, shown)}: expected one of {', '.join(LOG_LEVELS)}")


def _boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {_kind(value)}")
    return value


def _max_clock_skew(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number of seconds, got {_kind(value)}")
    low, high = MAX_CLOCK_SKEW_RANGE
    shown = _number(value)
    if not (value > 0 and (isinstance(value, int) or math.isfinite(value))):
        raise ConfigError(f"{_at(where, shown)}: expected a number of seconds greater than 0")
    if not low <= value <= high:
        raise ConfigError(f"{_at(where, shown)}: out of range; expected a number of seconds from "
                          f"{low:g} to {high:.0f} (one year)")
    return float(value)


def _reconcile_interval(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a number of seconds, got {_kind(value)}")
    low, high = RECONCILE_INTERVAL_RANGE
    if not low <= value <= high:
        raise ConfigError(f"{_at(where, _number(value))}: out of range; expected a number of seconds from "
                          f"{low:g} to {high:.0f} (a week)")
    return float(value)


def _max_peers(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a whole number of peers, got {_kind(value)}")
    if not 1 <= value <= 1024:
        raise ConfigError(f"{_at(where, _number(value))}: out of range; expected 1 to 1024 peers")
    return value


def _number(value: int | float) -> str:
    """``value`` as an error message shows it: an integer of many digits is abridged."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:8]}... (an integer of {len(text)} digits)"


def _item(where: str, i: int) -> str:
    """Where item ``i`` of a list came from: ``file: peers[1]``, or the flag itself."""
    return where if where.startswith("--") else f"{where}[{i}]"


def _at(where: str, shown: str) -> str:
    """``file: key = value`` for the config file, ``--flag value`` for the command line."""
    return f"{where} {shown}" if where.startswith("--") else f"{where} = {shown}"


def _kind(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    names = {bool: "a boolean", int: "an integer", float: "a number", list: "a list"}
    return names.get(type(value), "a table" if isinstance(value, dict) else type(value).__name__)


_VALIDATORS = {
    "listen": _listen,
    "peers": _peers,
    "interfaces": _interfaces,
    "relay": _relay,
    "log_level": _log_level,
    "mdns": _boolean,
    "max_clock_skew": _max_clock_skew,
    "track_new_columns": _boolean,
    "reconcile_interval": _reconcile_interval,
    "max_peers": _max_peers,
}
