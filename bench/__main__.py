"""`python -m bench [local|gateway|keyed|limits|store|memory|footprint|websocket|background|
tools|search|ab|production|soak ...]`: run the named suites (default: all but ab, production
and soak)."""

from __future__ import annotations

import argparse
import importlib

SUITES = {
    "local": "bench.local_model",
    "gateway": "bench.gateway",
    "keyed": "bench.keyed_path",
    "memory": "bench.history_memory",
    "websocket": "bench.websocket_turns",
    "background": "bench.background_runs",
    "tools": "bench.tool_loop",
    "limits": "bench.limits",
    "store": "bench.store_path",
    "search": "bench.response_search",
    "footprint": "bench.footprint",
    # On request only: the working tree against BENCH_AB_BASE; the production topology beside
    # LiteLLM (minutes, throwaway PostgreSQL and Redis servers); the soak (an hour by default).
    "ab": "bench.ab",
    "production": "bench.production",
    "soak": "bench.soak",
}
ON_REQUEST = ("ab", "production", "soak")
DEFAULT = [name for name in SUITES if name not in ON_REQUEST]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "suites",
        nargs="*",
        help=f"any of {', '.join(SUITES)} (default: all but {', '.join(ON_REQUEST)})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument(
        "--minutes", type=float, default=60.0, help="how long the soak runs (default: 60)"
    )
    args = parser.parse_args()
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suites {unknown}; choose from {list(SUITES)}")
    for name in args.suites or DEFAULT:
        options = {"minutes": args.minutes} if name == "soak" else {}
        importlib.import_module(SUITES[name]).main(quick=args.quick, **options)


if __name__ == "__main__":
    main()
