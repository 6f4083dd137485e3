"""Notifier sends the exact sd_notify datagrams to a real Unix datagram socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2psync.agent.sdnotify import Notifier


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd, named in $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", os.fspath(path))
        yield sock


def test_ready_watchdog_status_stopping(systemd: socket.socket) -> None:
    n = Notifier()
    assert n.enabled
    assert n.ready()
    assert systemd.recv(4096) == b"READY=1"
    assert n.ready("serving 2 peers")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=serving 2 peers"
    assert n.watchdog()
    assert systemd.recv(4096) == b"WATCHDOG=1"
    assert n.status("syncing\nwith bob")
    assert systemd.recv(4096) == b"STATUS=syncing with bob"
    assert n.stopping()
    assert systemd.recv(4096) == b"STOPPING=1"
    assert n.notify(ERRNO=5, STATUS="failed")
    assert systemd.recv(4096) == b"ERRNO=5\nSTATUS=failed"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"p2psync-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_no_env_is_a_silent_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready("x")
    assert not n.watchdog()
    assert n.watchdog_interval() is None


def test_vanished_socket_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", os.fspath(tmp_path / "gone"))
    assert not Notifier().watchdog()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier().watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier().watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ["", "0", "soon"]:
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert Notifier().watchdog_interval() is None
