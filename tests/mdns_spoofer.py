"""An mDNS attacker for the virtual LAN tests: fake p2psync adverts and a hostile TCP endpoint.

Usage: mdns_spoofer.py PLAN_JSON, where PLAN_JSON is an object with
  "interface": the IPv4 address to send mDNS from (this namespace's address),
  "listen": [ip, port] of a TCP server that accepts connections and answers
            with garbage (a 2-byte length prefix and random bytes), or null,
  "services": a list of {"instance", "server", "address", "port", "txt"}:
            each is advertised as ``instance._p2psync._tcp.local.`` with
            SRV target ``server`` (a host name ending in ``.local.``), one A
            record ``address`` and the TXT entries ``txt``.
Adverts skip probing, so a real device's instance and host name can be
reused. Prints JSON lines: {"ev": "ready"} once everything is advertised; on
stdin closing it withdraws every advert (zeroconf sends goodbyes for all of
them, including the names it spoofed), prints {"ev": "bye", "connections": n}
(the TCP connections the hostile server accepted) and exits 0.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

from zeroconf import IPVersion, ServiceInfo, Zeroconf

SERVICE_TYPE = "_p2psync._tcp.local."


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


class GarbageServer:
    """Accepts TCP connections and answers each with junk, then keeps reading until the peer gives up."""

    def __init__(self, ip: str, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(64)
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        conn.settimeout(20)
        try:
            junk = os.urandom(96)
            conn.sendall(len(junk).to_bytes(2, "big") + junk + os.urandom(64))
            while conn.recv(4096):
                pass
        except OSError:
            pass
        finally:
            conn.close()


def main(plan: dict) -> int:
    server = GarbageServer(*plan["listen"]) if plan.get("listen") else None
    zc = Zeroconf(interfaces=[plan["interface"]], ip_version=IPVersion.V4Only)
    try:
        for s in plan["services"]:
            info = ServiceInfo(SERVICE_TYPE, f"{s['instance']}.{SERVICE_TYPE}", port=s["port"],
                               properties=s["txt"], server=s["server"],
                               addresses=[socket.inet_aton(s["address"])])
            zc.register_service(info, cooperating_responders=True)
        say(ev="ready")
        sys.stdin.read()
    finally:
        zc.close()  # goodbyes for every advert, spoofed names included
    say(ev="bye", connections=server.connections if server else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
