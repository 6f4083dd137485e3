"""Run the benchmarks: python -m bench [store|sync|lan|scale|relay|relay-scale|membership|attest|capture|backup|soak|slow|all]."""

import subprocess
import sys
from pathlib import Path

from . import store_bench, sync_bench


def slow_tests() -> None:
    """The long fuzz and soak tests (pytest -m slow): not benchmarks, but too long for scripts/test."""
    print("slow tests (pytest -m slow)", flush=True)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow"], cwd=root)
    if r.returncode:
        raise SystemExit(r.returncode)


SUITES = {"store": store_bench.run, "sync": sync_bench.run}
try:
    from . import lan_bench
    SUITES["lan"] = lan_bench.run
except ImportError:
    pass
from . import relay_bench  # noqa: E402
SUITES["relay"] = relay_bench.run
from . import relay_scale_bench  # noqa: E402
SUITES["relay-scale"] = relay_scale_bench.run
from . import scale_bench  # noqa: E402
SUITES["scale"] = scale_bench.run
from . import membership_bench  # noqa: E402
SUITES["membership"] = membership_bench.run
from . import attest_bench  # noqa: E402
SUITES["attest"] = attest_bench.run
from . import capture_bench  # noqa: E402
SUITES["capture"] = capture_bench.run
from . import backup_bench  # noqa: E402
SUITES["backup"] = backup_bench.run
from . import soak_bench  # noqa: E402
SUITES["soak"] = soak_bench.run
SUITES["slow"] = slow_tests


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "all"
    names = [n for n in SUITES if n not in ("slow", "soak")] if which == "all" else [which]
    for name in names:
        if name not in SUITES:
            print(f"unknown suite {name!r}; known: {', '.join(SUITES)}, all", file=sys.stderr)
            return 2
        SUITES[name]()
        print()
    return 0


raise SystemExit(main(sys.argv[1:]))
