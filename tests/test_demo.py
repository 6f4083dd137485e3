"""scripts/demo: the README's main job runs, shows rows arriving on every device, and stops cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]


def run_demo(*args: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "scripts/demo.py"), *args], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"demo exited with {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def last_screen(out: str) -> dict[str, tuple[int, str]]:
    """device -> (todo count, peers line) from the last screen the demo printed."""
    screens = out.split("p2psync demo: ")
    lines = re.findall(r"^\[(\w+)\] (\d+) todos, \d+ done; peers: (.*)$", screens[-1], re.M)
    return {name: (int(n), peers) for name, n, peers in lines}


@pytest.mark.parametrize("mode", ["loopback", "relay"])
def test_the_demo_shows_every_device_with_the_same_todos(mode):
    if mode == "relay":
        sys.path.insert(0, str(ROOT / "tests"))
        from pg_fixtures import find_pg_bindir
        require(find_pg_bindir() is not None, "no Postgres server binaries (Debian package postgresql)")
    out = run_demo(f"--{mode}", "--duration", "14")
    screen = last_screen(out)
    assert set(screen) == {"laptop", "desktop", "tablet"}, out[-2000:]
    counts = {n for n, _ in screen.values()}
    assert max(counts) >= 2 and max(counts) - min(counts) <= 1, screen  # at most the last write in flight
    for name, (_, peers) in screen.items():
        assert "connected" in peers, f"{name}: {peers}"
        if mode == "relay":
            assert peers.startswith("relay "), f"{name} must only know the relay: {peers}"
    assert "agents stopped" in out
