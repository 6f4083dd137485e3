"""The systemd user unit verifies, and the agent speaks the notify protocol to a real socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "p2psync.service"


def test_user_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "systemd-analyze is not installed (Debian package systemd)")
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    r = subprocess.run([tool, "verify", "--user", str(UNIT)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    text = UNIT.read_text()
    for needed in ("Type=notify", "WatchdogSec=", "Restart=on-failure"):
        assert needed in text


def _device(tmp_path: Path) -> Path:
    home, db = tmp_path / "home", tmp_path / "app.db"
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    c.close()
    for args in (["init", "--db", str(db)], ["track", "t"]):
        subprocess.run([sys.executable, "-m", "p2psync", "--home", str(home), *args], check=True,
                       capture_output=True)
    return home


def test_agent_notifies_ready_watchdog_and_stopping(tmp_path):
    home = _device(tmp_path)
    sock_dir = Path(tempfile.mkdtemp(prefix="p2pn"))  # short path: sun_path is 108 bytes
    path = sock_dir / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(15)
    env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    p = subprocess.Popen([sys.executable, "-m", "p2psync", "--home", str(home), "run", "--listen",
                          "127.0.0.1:0", "--no-mdns"], env=env, stderr=subprocess.PIPE)
    try:
        got = []
        while not any("READY=1" in g for g in got) or sum("WATCHDOG=1" in g for g in got) < 2:
            got.append(s.recv(4096).decode())
        ready = next(g for g in got if "READY=1" in g)
        assert "STATUS=listening on 127.0.0.1:" in ready
        p.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in g for g in got):
            got.append(s.recv(4096).decode())
        assert p.wait(15) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        s.close()
        shutil.rmtree(sock_dir)
