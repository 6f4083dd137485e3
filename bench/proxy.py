"""A TCP proxy that counts the bytes it forwards (for the reconnect benchmark)."""

from __future__ import annotations

import socket
import threading


class CountingProxy:
    """Listens on 127.0.0.1:port and forwards to target, counting bytes each way."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            threading.Thread(target=self._pipe, args=(c, s, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, "down"), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, direction: str) -> None:
        try:
            while data := a.recv(65536):
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()
