"""Relay processes for tests: `p2psync relay` started as a subprocess against a test database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agents import free_port, terminate, wait_until

PYTHON = sys.executable
START_TIMEOUT = 30.0


class RelayProcess:
    """One `p2psync relay` process; stop() by PID, log kept in a file."""

    def __init__(self, dsn: str, log_path: Path, tokens: list[str] = (), port: int | None = None,
                 env: dict[str, str] | None = None, args: list[str] = ()):
        self.dsn, self.log_path = dsn, Path(log_path)
        self.args = list(args)
        self.port = port or free_port()
        self.tokens = list(tokens)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> RelayProcess:
        argv = [PYTHON, "-m", "p2psync", "relay", "--dsn", self.dsn, "--listen", self.address,
                "--log-level", "debug"]
        for t in self.tokens:
            argv += ["--allow-group", t]
        argv += self.args
        with open(self.log_path, "a") as log:
            log.write(f"===== {time.strftime('%H:%M:%S')} start relay on {self.address}\n")
            log.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env={**os.environ, **self.env})
        if wait:
            wait_until(self._listening, START_TIMEOUT, interval=0.05, what=f"relay on {self.address} to listen")
        return self

    def _listening(self) -> bool:
        if not self.running:
            raise AssertionError(f"relay exited with {self.proc.returncode} while starting:\n{self.log()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM by PID; the relay must exit 0."""
        code = terminate(self.proc, timeout, "relay")
        assert code == 0, f"relay exited with {code} on SIGTERM:\n{self.log()[-3000:]}"
        return code

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        print(f"----- relay {self.address} ({self.log_path}) -----")
        print(self.log()[-20000:])


@pytest.fixture
def relays(tmp_path):
    """relays(dsn, tokens, args=[...]) -> a started RelayProcess; all stopped (by PID) afterwards."""
    started = []

    def _start(dsn: str, tokens: list[str], port: int | None = None, args: list[str] = ()) -> RelayProcess:
        r = RelayProcess(dsn, tmp_path / f"relay{len(started)}.log", tokens, port=port, args=args).start()
        started.append(r)
        return r

    yield _start
    for r in started:
        r.close()
