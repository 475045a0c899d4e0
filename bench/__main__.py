"""`python -m bench [local|gateway|memory|websocket|background|tools|store|ab ...]`: run the
named suites (default: all but ab)."""

from __future__ import annotations

import argparse
import importlib

SUITES = {
    "local": "bench.local_model",
    "gateway": "bench.gateway",
    "memory": "bench.history_memory",
    "websocket": "bench.websocket_turns",
    "background": "bench.background_runs",
    "tools": "bench.tool_loop",
    "store": "bench.store_path",
    "ab": "bench.ab",  # on request only: the working tree against BENCH_AB_BASE
}
DEFAULT = [name for name in SUITES if name != "ab"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all but ab)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    args = parser.parse_args()
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suites {unknown}; choose from {list(SUITES)}")
    for name in args.suites or DEFAULT:
        importlib.import_module(SUITES[name]).main(quick=args.quick)


if __name__ == "__main__":
    main()
