"""Shared test helpers.

Tests that need something the machine may lack (root, network namespaces,
Postgres, the sqlite3 shell) call ``require``: it skips with the reason on a
laptop and fails under CI=true, so CI never counts a skipped test as passing.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pg_fixtures"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip (or fail under CI=true) unless ``condition`` holds."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and this test cannot run: {reason}")
    pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long fuzz/soak runs; run by scripts/bench, not by scripts/test")
