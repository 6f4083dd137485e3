"""The systemd units verify (the relay's is hardened), and the agent speaks the notify protocol to a real socket."""

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
RELAY_UNIT = ROOT / "systemd" / "p2psync-relay.service"
RELAY_HARDENING = (
    "DynamicUser=yes", "ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes",
    "PrivateDevices=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces=yes",
    "LockPersonality=yes", "MemoryDenyWriteExecute=yes", "SystemCallFilter=@system-service",
    "CapabilityBoundingSet=", "Restart=on-failure", "EnvironmentFile=-/etc/p2psync/relay.env",
)


def test_user_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "systemd-analyze is not installed (Debian package systemd)")
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    r = subprocess.run([tool, "verify", "--user", str(UNIT)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    text = UNIT.read_text()
    for needed in ("Type=notify", "WatchdogSec=", "Restart=on-failure"):
        assert needed in text


def _unit_settings(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip() and line[0] not in "#;["}


def test_relay_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "systemd-analyze is not installed (Debian package systemd)")
    # verify insists that ExecStart's binary exists: point it at this venv's p2psync in a copy
    exe = Path(sys.executable).with_name("p2psync")
    require(exe.exists(), f"{exe} is missing (pip install -e .)")
    text = RELAY_UNIT.read_text()
    assert "ExecStart=/usr/local/bin/p2psync relay " in text
    unit = tmp_path / RELAY_UNIT.name
    unit.write_text(text.replace("ExecStart=/usr/local/bin/p2psync ", f"ExecStart={exe} "))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_relay_unit_is_hardened():
    settings = _unit_settings(RELAY_UNIT)
    missing = [d for d in RELAY_HARDENING if d not in settings]
    assert not missing, missing
    assert "ExecStart=/usr/local/bin/p2psync relay --listen ${P2PSYNC_RELAY_LISTEN}" in settings
    assert not any("--dsn" in s for s in settings), "the DSN (and its password) must not be on the command line"
    for needed in ("Type=simple", "WantedBy=multi-user.target", "Wants=network-online.target"):
        assert needed in settings
    after = next(s for s in settings if s.startswith("After="))
    assert {"network-online.target", "postgresql.service"} <= set(after[len("After="):].split())
    # systemd's own offline review scores the file; 2.0 or less is "OK" (the scale is 0-10, threshold x10)
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "systemd-analyze is not installed (Debian package systemd)")
    r = subprocess.run([tool, "security", "--offline=true", "--threshold=20", str(RELAY_UNIT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr


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
