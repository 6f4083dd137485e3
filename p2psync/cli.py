"""The command line: argument parsing and output formatting only."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

from .agent.control import ControlError
from .config import ConfigError, load_config, parse_hostport
from .group import ActionError, GroupMembers
from .group import actions
from .identity import (DeviceKeys, IdentityError, InviteError, check_name, create_device, encode_invite,
                       load_device, parse_duration, parse_invite, refuse_existing, resolve_home)
from .model.membership import ROLE_ADMIN, ROLE_MEMBER
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
    c.add_argument("--reset-sync-state", action="store_true",
                   help="first drop p2psync's tables from the database (one synced by p2psync 0.1); rows stay")

    c = sub.add_parser("invite", parents=[common], help="print a single-use invite code (admins)")
    c.add_argument("--expires", default="24h", metavar="DURATION", help="e.g. 30m, 24h, 7d (default 24h)")
    c.add_argument("--admin", action="store_true", help="the new device joins as an admin")
    c.add_argument("--address", action="append", metavar="HOST:PORT",
                   help="where the new device reaches an admin (default: this agent's listen addresses)")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("invites", parents=[common], help="pending invites; --cancel ID cancels one (admins)")
    c.add_argument("--cancel", metavar="ID")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("join", parents=[common], help="new device in an existing group")
    c.add_argument("code", help="invite code printed by `p2psync invite` on an admin")
    c.add_argument("--db", required=True)
    c.add_argument("--name")
    c.add_argument("--timeout", default="10m", metavar="DURATION", help="how long to wait for an admin (default 10m)")
    c.add_argument("--admin", action="append", metavar="HOST:PORT", dest="admins",
                   help="an admin's address, tried before the code's")
    c.add_argument("--reset-sync-state", action="store_true",
                   help="first drop p2psync's tables from the database (one synced by p2psync 0.1); rows stay")

    c = sub.add_parser("devices", parents=[common], help="the group's devices: name, role, added by, last seen")
    c.add_argument("--all", action="store_true", help="also removed and retired devices")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("remove", parents=[common], help="remove a device from the group and rotate keys (admins)")
    c.add_argument("device", metavar="DEVICE", help="name or site id prefix")

    c = sub.add_parser("role", parents=[common], help="make a device admin or member (admins)")
    c.add_argument("device", metavar="DEVICE", help="name or site id prefix")
    c.add_argument("role", choices=[ROLE_ADMIN, ROLE_MEMBER])

    c = sub.add_parser("track", parents=[common], help="start syncing tables (existing rows included)")
    c.add_argument("tables", nargs="+", metavar="TABLE")

    c = sub.add_parser("backup", parents=[common], help="consistent copy of the database and its sync state "
                       "(the agent may run)")
    c.add_argument("dest", metavar="DEST", help="the file to write")
    c.add_argument("--force", action="store_true", help="replace DEST if it exists")

    c = sub.add_parser("restore", parents=[common], help="put a backup of this device back (agent stopped)")
    c.add_argument("src", metavar="SRC", help="a file written by `p2psync backup` on this device")
    c.add_argument("--db", metavar="PATH", help="the database to restore into (default: this device's)")

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
    c.add_argument("--pool-size", type=int, default=None, metavar="N",
                   help="Postgres connections this relay process uses at most, shared by all its sessions "
                        "(default 10; plus one for LISTEN)")
    c.add_argument("--max-sessions", type=int, default=None, metavar="N",
                   help="device sessions this relay process holds at most; more are told to retry later "
                        "(default 2000)")
    c.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    return p


def _home(args) -> Path:
    return resolve_home(getattr(args, "home", None))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _open(device) -> tuple[SqliteStore, GroupMembers]:
    store = SqliteStore(device.db_path, device.site_id)
    members = GroupMembers(device.found, device.site_id, device.static_private, device.retired)
    members.load(store.member_events())
    return store, members


def _persist(store: SqliteStore, members: GroupMembers, events, home: Path | None = None) -> None:
    """Store new events; tell a running agent so it passes them on at once (it would notice anyway)."""
    members.add(events)
    store.add_member_events(members.pairs(events))
    if home is not None:
        from .agent.control import ControlError as _CE, request

        try:
            request(home / "agent.sock", {"cmd": "members-changed"})
        except _CE:
            pass


def cmd_init(args) -> int:
    home = _home(args)
    refuse_existing(home)
    db = Path(args.db).absolute()
    name = check_name(args.name)
    retrack = _reset(db) if args.reset_sync_state else []
    keys = DeviceKeys.generate()
    group_id = os.urandom(16)
    found = actions.found_group(keys, name, group_id, _now_ms())
    store = SqliteStore(db, keys.site_id)
    try:
        members = GroupMembers(found.hash, keys.site_id, keys.static_private)
        _persist(store, members, [found])
    finally:
        store.close()
    device = create_device(home, db, name, keys, group_id, found.hash)
    print(f"device {device.name} ({device.site_id.hex()[:12]}) created in {device.home}, admin of a new group")
    print(f"database: {db}")
    _retrack(device, retrack)
    print("next: `p2psync track TABLE` then `p2psync run`; add devices with `p2psync invite`")
    return EXIT_OK


def _reset(db: Path) -> list[str]:
    from .store.sqlite import forget_sync_state

    tables = forget_sync_state(db)
    print(f"dropped p2psync's sync state from {db} (rows kept); tables to track again: "
          f"{', '.join(tables) or 'none'}")
    return tables


def _retrack(device, tables: list[str]) -> None:
    if not tables:
        return
    store = SqliteStore(device.db_path, device.site_id)
    try:
        for t in tables:
            store.track(t)
    finally:
        store.close()
    print(f"tracking again: {', '.join(tables)} (their rows are this device's changes now)")


def _agent_listen(home: Path) -> str | None:
    from .agent.control import ControlError as _CE, request

    try:
        return request(home / "agent.sock", {"cmd": "status"}).get("listen")
    except _CE:
        return None


def _invite_addresses(args, home: Path) -> list[tuple[str, int]]:
    if args.address:
        return [parse_hostport(a, "--address") for a in args.address]
    listen = _agent_listen(home)
    host, port = parse_hostport(listen, "listen") if listen else load_config(home).listen
    if host not in ("0.0.0.0", "", "::"):
        return [(host, port)]
    import ifaddr

    found = [ip.ip for a in ifaddr.get_adapters() for ip in a.ips
             if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
    return [(h, port) for h in list(dict.fromkeys(found))[:3]] or [("127.0.0.1", port)]


def cmd_invite(args) -> int:
    device = load_device(_home(args))
    try:
        seconds = parse_duration(args.expires)
    except ValueError as e:
        raise UsageError(f"--expires: {e}") from e
    addresses = _invite_addresses(args, device.home)
    relay = load_config(device.home).relay
    store, members = _open(device)
    try:
        now = _now_ms()
        code, ev = actions.invite(device, members, ROLE_ADMIN if args.admin else ROLE_MEMBER,
                                  now + int(seconds * 1000), now, addresses, f"{relay[0]}:{relay[1]}" if relay else None)
        _persist(store, members, [ev], device.home)
    finally:
        store.close()
    text = encode_invite(code)
    if args.json:
        print(json.dumps({"invite": text, "id": code.id.hex()[:8], "role": "admin" if args.admin else "member",
                          "expires": _when(code.expires_ms), "addresses": [f"{h}:{p}" for h, p in addresses]}))
    else:
        print(text)
        print(f"single use, expires {_when(code.expires_ms)}; an admin's agent must be running when the new device "
              f"joins (`p2psync join CODE --db PATH`)", file=sys.stderr)
    return EXIT_OK


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def cmd_invites(args) -> int:
    device = load_device(_home(args))
    store, members = _open(device)
    try:
        invites = sorted(members.state.invites.values(), key=lambda i: i.created_ms)
        now = _now_ms()
        if args.cancel:
            prefix = args.cancel.strip().lower()
            match = [i for i in invites if i.id.hex().startswith(prefix)]
            if len(match) != 1:
                raise UsageError(f"--cancel {args.cancel!r}: {'no' if not match else 'more than one'} invite has "
                                 f"that id; `p2psync invites` lists them")
            inv = match[0]
            if inv.state != "pending":
                raise UsageError(f"invite {inv.id.hex()[:8]} is already {inv.state}")
            _persist(store, members, [actions.cancel_invite(device, members, inv.id, now)], device.home)
            print(f"invite {inv.id.hex()[:8]} cancelled: a device presenting it is refused")
            return EXIT_OK
        pending = [i for i in invites if i.state == "pending" and i.expires_ms > now]
        rows = [{"id": i.id.hex()[:8], "role": i.role, "created_by": members.name_of(i.created_by),
                 "created": _when(i.created_ms), "expires": _when(i.expires_ms)} for i in pending]
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no pending invites")
    else:
        for r in rows:
            print(f"{r['id']}  {r['role']:<6}  by {r['created_by']:<16} {r['created']}  expires {r['expires']}")
    return EXIT_OK


def cmd_join(args) -> int:
    import trio

    from .net.join_client import JoinFailed, ask_to_join

    try:
        code = parse_invite(args.code)
    except InviteError as e:
        raise UsageError(f"invalid invite code: {e}") from e
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as e:
        raise UsageError(f"--timeout: {e}") from e
    home = _home(args)
    refuse_existing(home)
    db = Path(args.db).absolute()
    name = check_name(args.name)
    if _now_ms() > code.expires_ms + 60_000:
        raise RuntimeError(f"this invite code expired at {_when(code.expires_ms)}; ask an admin for a new one")
    keys = DeviceKeys.generate()
    addresses = [parse_hostport(a, "--admin") for a in (args.admins or [])] + list(code.addresses)
    tty = sys.stderr.isatty()

    def progress(msg: str) -> None:
        if tty:
            print(f"\r\033[K{msg}", end="", file=sys.stderr, flush=True)
        else:
            print(msg, file=sys.stderr, flush=True)

    try:
        reply = trio.run(ask_to_join, code, keys, name, addresses, timeout, progress)
    except JoinFailed as e:
        raise RuntimeError(str(e)) from e
    finally:
        if tty:
            print(file=sys.stderr)
    if not reply.ok:
        raise RuntimeError(f"the admin refused to admit this device: {reply.message}")
    members = GroupMembers(code.found, keys.site_id, keys.static_private)
    members.load(list(reply.events))
    me = members.me
    if me is None or me.state != "current":
        raise RuntimeError("the admin's reply does not make this device a member (a broken or hostile admin); "
                           "nothing was written")
    retrack = _reset(db) if args.reset_sync_state else []
    store = SqliteStore(db, keys.site_id)
    try:
        store.add_member_events(members.pairs(members.log.events()))
    finally:
        store.close()
    device = create_device(home, db, name, keys, code.group_id, code.found)
    _retrack(device, retrack)
    print(f"device {device.name} ({device.site_id.hex()[:12]}) joined group {code.group_id.hex()[:12]} as "
          f"{me.role}, added by {members.name_of(me.added_by)}")
    if members.keys is None or members.keys.current is None:
        print("warning: the admin sent no key of the current epoch yet; the agent gets it when it next "
              "meets an admin", file=sys.stderr)
    return EXIT_OK


def _find_member(members: GroupMembers, text: str):
    text = text.strip()
    all_members = list(members.state.members.values())
    exact = [m for m in all_members if members.name_of(m.site) == text and m.state == "current"]
    if len(exact) == 1:
        return exact[0]
    pre = [m for m in all_members if m.site.hex().startswith(text.lower())] if len(text) >= 4 else []
    if len(pre) == 1:
        return pre[0]
    if exact or pre:
        raise UsageError(f"{text!r} names more than one device; use a longer site id prefix (`p2psync devices`)")
    raise UsageError(f"no device named {text!r} or with a site id starting so; `p2psync devices` lists them")


def cmd_devices(args) -> int:
    from .agent.control import ControlError as _CE, request

    device = load_device(_home(args))
    store, members = _open(device)
    store.close()
    try:
        seen = request(device.home / "agent.sock", {"cmd": "devices"})
    except _CE:
        seen = {}
    connected = set(seen.get("connected", []))
    last = seen.get("last_seen", {})
    rows = []
    for m in sorted(members.state.members.values(), key=lambda m: (m.added_ms, m.site)):
        if m.state != "current" and not args.all:
            continue
        site = m.site.hex()
        rows.append({"name": members.name_of(m.site), "site": site, "role": m.role, "state": m.state,
                     "added_by": members.name_of(m.added_by), "added": _when(m.added_ms),
                     "last_seen": "this device" if m.site == device.site_id else
                     ("connected" if site in connected else _when(int(last[site] * 1000)) if site in last else "-"),
                     "this_device": m.site == device.site_id,
                     **({"removed_by": members.name_of(m.removed_by) if m.removed_by else None,
                         "removed": _when(m.removed_ms)} if m.state == "removed" else {})})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for r in rows:
        mark = "*" if r["this_device"] else " "
        extra = f"  removed by {r['removed_by']} {r['removed']}" if r["state"] == "removed" else \
            (f"  ({r['state']})" if r["state"] != "current" else "")
        print(f"{mark} {r['name']:<16} {r['site'][:12]}  {r['role']:<6}  added by {r['added_by']:<16} "
              f"{r['added']}  last seen {r['last_seen']}{extra}")
    return EXIT_OK


def cmd_remove(args) -> int:
    device = load_device(_home(args))
    store, members = _open(device)
    try:
        target = _find_member(members, args.device)
        if target.site == device.site_id:
            raise UsageError("a device cannot remove itself; ask another admin")
        last = store.version_vector()[target.site]
        try:
            events = actions.remove(device, members, target, last, _now_ms())
        except ActionError as e:
            raise UsageError(str(e)) from e
        _persist(store, members, events, device.home)
    finally:
        store.close()
    print(f"removed {members.who(target.site)}; its changes after db version {last} are refused everywhere")
    print("a new key epoch started: members get it as they sync; the removed device can no longer connect "
          "to any member or relay that has heard of this")
    return EXIT_OK


def cmd_role(args) -> int:
    device = load_device(_home(args))
    store, members = _open(device)
    try:
        target = _find_member(members, args.device)
        try:
            ev = actions.set_role(device, members, target, args.role, _now_ms())
        except ActionError as e:
            raise UsageError(str(e)) from e
        _persist(store, members, [ev], device.home)
    finally:
        store.close()
    print(f"{members.who(target.site)} is now {args.role}")
    return EXIT_OK


def cmd_relay_token(args) -> int:
    device = load_device(_home(args))
    store, members = _open(device)
    store.close()
    psk = members.keys.relay_psk if members.keys else None
    if psk is None:
        raise RuntimeError("this device holds no key of its group yet; run the agent until it has synced")
    token = (device.group_id + device.found + psk).hex()
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


def cmd_backup(args) -> int:
    from .store.backup import backup

    device = load_device(_home(args))
    r = backup(device.db_path, Path(args.dest), force=args.force)
    print(f"backed up {device.db_path} to {r.dest}: {r.rows} rows, {r.pages} pages, {r.bytes / 2**20:.1f} MiB "
          f"in {r.seconds:.2f} s, integrity check ok")
    return EXIT_OK


def cmd_restore(args) -> int:
    from .agent.control import AgentNotRunning, request
    from .store.backup import restore

    home = _home(args)
    device = load_device(home)
    try:
        request(home / "agent.sock", {"cmd": "status"})
    except AgentNotRunning:
        pass
    except ControlError as e:
        raise RuntimeError(f"cannot tell whether an agent is running for {home} ({e}); make sure it is stopped, "
                           f"then run restore again") from None
    else:
        raise RuntimeError(f"an agent is running for {home}; stop it (Ctrl-C, or `systemctl --user stop p2psync`) "
                           f"and run restore again")
    r = restore(Path(args.src), Path(args.db).absolute() if args.db else device.db_path, device.site_id)
    kept = f"; the previous database is kept as {r.kept}" if r.kept else ""
    print(f"restored {r.db} from {r.src}: {r.rows} rows, {r.pages} pages in {r.seconds:.2f} s{kept}")
    return EXIT_OK


def cmd_run(args) -> int:
    from .agent.agent import run_agent

    home = _home(args)
    device = load_device(home)
    config = load_config(home).override(
        listen=args.listen, peers=args.peer, relay=args.relay, interfaces=args.interface,
        log_level=args.log_level, mdns=False if args.no_mdns else None)
    try:
        return run_agent(device, config)
    except BaseExceptionGroup as group:   # the agent's nursery wraps what stopped it
        cause = _only_leaf(group)
        if not (isinstance(cause, OSError) and cause.errno in _LISTEN_ERRNOS):
            raise
        host, port = config.listen
        raise ConfigError(f"cannot listen on {host}:{port}: {cause.strerror}; give --listen (or `listen` in "
                          f"{home / 'config.toml'}) an address of this machine and a free port") from None


_LISTEN_ERRNOS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}


def _only_leaf(error: BaseException) -> BaseException:
    """The one exception inside nested exception groups, or the outermost group if there are several."""
    inner = error
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return error if isinstance(inner, BaseExceptionGroup) else inner


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
    if "error" in st:   # e.g. a held change stamped past the clock limit (model/hlc.py)
        why = str(st["error"]).removeprefix("request failed: ")
        raise RuntimeError(f"release refused: {why} (what was not released stays held; see `p2psync status`)")
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
            raw = bytes.fromhex(t.strip())
        except ValueError:
            raw = b""
        if len(raw) != 80:
            raise UsageError(f"--allow-group {t[:20]!r}: a relay token is 160 hex digits, as printed by "
                             f"`p2psync relay-token` on a device of the group (tokens of p2psync 0.1 had 64)")
        group_id, found, psk = raw[:16], raw[16:48], raw[48:]
        admit.append((group_ref(psk), psk, group_id, found))
    from .store.pg_pool import DEFAULT_SIZE
    for name, n in (("--pool-size", args.pool_size), ("--max-sessions", args.max_sessions)):
        if n is not None and n < 1:
            raise UsageError(f"{name} {n}: must be at least 1")
    return run_relay(args.dsn, listen, admit, admit_only=args.admit_only, log_level=args.log_level,
                     pool_size=args.pool_size or DEFAULT_SIZE, max_sessions=args.max_sessions,
                     shared_reads=os.environ.get("P2PSYNC_RELAY_SHARED_READS", "1") != "0")


COMMANDS = {"init": cmd_init, "join": cmd_join, "invite": cmd_invite, "invites": cmd_invites, "track": cmd_track,
            "run": cmd_run, "status": cmd_status, "release": cmd_release, "relay-token": cmd_relay_token,
            "relay": cmd_relay, "devices": cmd_devices, "remove": cmd_remove, "role": cmd_role,
            "backup": cmd_backup, "restore": cmd_restore}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError, InviteError, ActionError) as e:
        print(f"p2psync: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (IdentityError, StoreError, ControlError, RuntimeError, OSError) as e:
        print(f"p2psync: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_OK
