"""The command line: argument parsing and output formatting only."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .agent.control import ControlError
from .config import ConfigError, load_config, parse_hostport
from .identity import (IdentityError, InviteError, create_device, invite_code, load_device,
                       parse_invite, resolve_home)
from .store import SqliteStore, StoreError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DEFAULT_RELAY_PORT = 7744


class UsageError(Exception):
    """A usage or configuration error (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="device directory (default: $P2PSYNC_HOME or ~/.local/share/p2psync)")
    p = argparse.ArgumentParser(prog="p2psync", description="Peer-to-peer sync of SQLite databases.",
                                parents=[common])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("init", parents=[common], help="new device in a new sync group")
    c.add_argument("--db", required=True, help="the application's SQLite database")
    c.add_argument("--name", help="a name for this device (default: host name)")

    c = sub.add_parser("invite", parents=[common], help="print a one-line invite code for this group")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("join", parents=[common], help="new device in an existing group")
    c.add_argument("code", help="invite code printed by `p2psync invite` on a member")
    c.add_argument("--db", required=True)
    c.add_argument("--name")

    c = sub.add_parser("track", parents=[common], help="start syncing tables (existing rows included)")
    c.add_argument("tables", nargs="+", metavar="TABLE")

    c = sub.add_parser("run", parents=[common], help="run the agent in the foreground")
    c.add_argument("--listen", metavar="HOST:PORT")
    c.add_argument("--peer", action="append", metavar="HOST:PORT", help="static peer (repeatable)")
    c.add_argument("--relay", metavar="HOST:PORT")
    c.add_argument("--no-mdns", action="store_true", help="static peers and relay only")
    c.add_argument("--interface", action="append", metavar="ADDR", help="interface address for mDNS (repeatable)")
    c.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    c = sub.add_parser("status", parents=[common], help="device, peers, lag, held changes")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("release", parents=[common], help="apply held changes (clock skew) now")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("relay-token", parents=[common], help="print a credential admitting this group to a relay")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("relay", help="run a relay peer backed by Postgres (stores only ciphertext)")
    c.add_argument("--dsn", default=os.environ.get("P2PSYNC_RELAY_DSN"),
                   help="Postgres connection string (default: $P2PSYNC_RELAY_DSN)")
    c.add_argument("--listen", metavar="HOST:PORT", default=f"0.0.0.0:{DEFAULT_RELAY_PORT}")
    c.add_argument("--allow-group", action="append", default=[], metavar="TOKEN",
                   help="admit the group whose `p2psync relay-token` is TOKEN (repeatable; remembered in Postgres)")
    c.add_argument("--admit-only", action="store_true", help="admit the --allow-group tokens, then exit")
    c.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    return p


def _home(args) -> Path:
    return resolve_home(getattr(args, "home", None))


def cmd_init(args) -> int:
    db = Path(args.db).absolute()
    device = create_device(_home(args), db, args.name)
    SqliteStore(db, device.site_id).close()
    print(f"device {device.name} ({device.site_id.hex()[:12]}) created in {device.home}")
    print(f"database: {db}")
    print("next: `p2psync track TABLE` then `p2psync run`; add devices with `p2psync invite`")
    return EXIT_OK


def cmd_join(args) -> int:
    try:
        group = parse_invite(args.code)
    except InviteError as e:
        raise UsageError(f"invalid invite code: {e}") from e
    db = Path(args.db).absolute()
    device = create_device(_home(args), db, args.name, group=group)
    SqliteStore(db, device.site_id).close()
    print(f"device {device.name} ({device.site_id.hex()[:12]}) joined group {group.group_id.hex()[:12]}")
    return EXIT_OK


def cmd_invite(args) -> int:
    device = load_device(_home(args))
    code = invite_code(device.group)
    print(json.dumps({"invite": code}) if args.json else code)
    return EXIT_OK


def cmd_relay_token(args) -> int:
    device = load_device(_home(args))
    token = device.group.relay_token().hex()
    print(json.dumps({"relay_token": token}) if args.json else token)
    return EXIT_OK


def cmd_track(args) -> int:
    device = load_device(_home(args))
    store = SqliteStore(device.db_path, device.site_id)
    try:
        for t in args.tables:
            spec = store.track(t)
            print(f"tracking {t}: key ({', '.join(spec.pk)}), {len(spec.cols)} other columns")
            if spec.unique:
                print(f"warning: {t} has UNIQUE constraints besides its primary key; if two devices "
                      f"insert the same unique value under different keys, sync between them stops "
                      f"with a constraint error until one of the rows is changed", file=sys.stderr)
        store.release_held(int(time.time() * 1000))
    finally:
        store.close()
    return EXIT_OK


def cmd_run(args) -> int:
    from .agent.agent import run_agent

    home = _home(args)
    device = load_device(home)
    config = load_config(home).override(
        listen=args.listen, peers=args.peer, relay=args.relay, interfaces=args.interface,
        log_level=args.log_level, mdns=False if args.no_mdns else None)
    return run_agent(device, config)


def _control_request(args, req: dict) -> dict:
    from .agent.control import AgentNotRunning, request

    home = _home(args)
    load_device(home)
    try:
        return request(home / "agent.sock", req)
    except AgentNotRunning as e:
        raise RuntimeError(str(e)) from e


def cmd_status(args) -> int:
    st = _control_request(args, {"cmd": "status"})
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    from .agent.status_text import format_status

    print(format_status(st))
    return EXIT_OK


def cmd_release(args) -> int:
    st = _control_request(args, {"cmd": "release"})
    print(json.dumps(st) if args.json else f"released {st.get('released', 0)} held changes")
    return EXIT_OK


def cmd_relay(args) -> int:
    from .protocol.relay_preamble import group_ref

    try:
        from .relay.server import run_relay
    except ImportError as e:
        raise RuntimeError(f"the relay needs psycopg ({e}); install p2psync with its relay extra: "
                           f"pip install 'p2psync[relay]'") from e

    if not args.dsn:
        raise UsageError("relay needs --dsn (or P2PSYNC_RELAY_DSN), e.g. --dsn 'host=127.0.0.1 dbname=p2psync user=relay'")
    listen = parse_hostport(args.listen, "--listen")
    admit = []
    for t in args.allow_group:
        try:
            token = bytes.fromhex(t.strip())
        except ValueError:
            token = b""
        if len(token) != 32:
            raise UsageError(f"--allow-group {t[:20]!r}: a relay token is 64 hex digits, as printed by "
                             f"`p2psync relay-token` on a device of the group")
        admit.append((group_ref(token), token))
    return run_relay(args.dsn, listen, admit, admit_only=args.admit_only, log_level=args.log_level)


COMMANDS = {"init": cmd_init, "join": cmd_join, "invite": cmd_invite, "track": cmd_track, "run": cmd_run,
            "status": cmd_status, "release": cmd_release, "relay-token": cmd_relay_token,
            "relay": cmd_relay}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError, InviteError) as e:
        print(f"p2psync: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (IdentityError, StoreError, ControlError, RuntimeError, OSError) as e:
        print(f"p2psync: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_OK
