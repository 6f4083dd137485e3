"""Run the benchmarks: python -m bench [store|sync|all]."""

import sys

from . import store_bench

SUITES = {"store": store_bench.run}


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "all"
    try:
        from . import sync_bench
        SUITES["sync"] = sync_bench.run
    except ImportError:
        pass
    names = list(SUITES) if which == "all" else [which]
    for name in names:
        if name not in SUITES:
            print(f"unknown suite {name!r}; known: {', '.join(SUITES)}, all", file=sys.stderr)
            return 2
        SUITES[name]()
        print()
    return 0


raise SystemExit(main(sys.argv[1:]))
