"""A process that runs MdnsDiscovery and prints what it sees, for tests across namespaces.

Usage: mdns_peer.py SITE_HEX GROUP_ID_HEX GROUP_KEY_HEX PORT [INTERFACE_IP]
Prints JSON lines on stdout: {"ev": "started", "before": t, "after": t} once
advertising (times from time.monotonic(), which all namespaces share), then
{"ev": "seen" | "gone", ...} per event. Says goodbye and exits when stdin closes.
"""

from __future__ import annotations

import json
import sys
import time

import trio

from p2psync.discovery import MdnsDiscovery, PeerGone
from groups import TagGroup as Group


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def main(argv: list[str]) -> None:
    site, gid, key, port = argv[:4]
    interfaces = [argv[4]] if len(argv) > 4 else None
    disc = MdnsDiscovery(bytes.fromhex(site), Group(bytes.fromhex(gid), bytes.fromhex(key)),
                         int(port), interfaces)
    async with trio.open_nursery() as nursery:
        before = time.monotonic()
        await nursery.start(disc.run)
        say(ev="started", before=before, after=time.monotonic(), instance=disc.instance)

        async def report() -> None:
            async for e in disc:
                if isinstance(e, PeerGone):
                    say(ev="gone", instance=e.instance, t=time.monotonic())
                else:
                    say(ev="seen", instance=e.instance, addresses=e.addresses, tag_ok=e.tag_ok,
                        t=time.monotonic())

        nursery.start_soon(report)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
