"""Registration and token-verification throughput under gunicorn, against the Clerk stand-in, on PostgreSQL.

The entry point: reads the options, runs the scenarios (``scenarios.py``, with the load from ``load.py``) and
prints the report (``report.py``). What it measures, how, and the targets: docs/performance.md. Targets are
reported as PASS/MISS, not asserted. The exit status is 1 when a scenario saw an unexpected status or a
failed request, 2 when the benchmark could not run.

Run it from the repository root::

    .venv/bin/python -m benchmarks            # under a minute
    .venv/bin/python -m benchmarks --help     # durations, clients, gunicorn workers/threads, --json
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from benchmarks.load import BenchmarkError
from benchmarks.report import build_report, code_version, print_report
from benchmarks.scenarios import run_scenarios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2: one per core)")
    parser.add_argument("--threads", type=int, default=32, help="gunicorn threads per worker (default 32)")
    parser.add_argument(
        "--ratio-clients",
        type=int,
        default=16,
        help="clients for the healthz and latency-0 runs (default 16)",
    )
    parser.add_argument(
        "--slow-clients",
        type=int,
        nargs="+",
        default=[16, 32],
        help="client counts for the 200 ms runs (default 16 32)",
    )
    parser.add_argument("--duration", type=float, default=6.0, help="seconds measured per scenario (6)")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds of load before measuring (1)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load (3)")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    parser.add_argument("--time-limit", type=int, default=180, help="abort after this many seconds (180)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1 or args.ratio_clients < 1 or min(args.slow_clients) < 1:
        parser.error("workers, threads and client counts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def out_of_time(signum: int, frame: object) -> None:
        raise BenchmarkError(f"the benchmark ran longer than --time-limit {args.time_limit} s")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.signal(signal.SIGTERM, out_of_time)
    signal.alarm(args.time_limit)
    try:
        return run(args)
    except (BenchmarkError, psycopg.Error, OSError, subprocess.SubprocessError) as error:
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)


def run(args: argparse.Namespace) -> int:
    args.code_version = code_version()
    scenarios, logged = run_scenarios(args)
    if logged:
        print(f"gunicorn and the app logged {len(logged)} lines above INFO; the last ones:")
        print("\n".join(logged[-20:]))
    report = build_report(args, scenarios)
    print_report(args, scenarios, report)
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 1 if any(scenario.errors for scenario in scenarios) else 0


if __name__ == "__main__":
    sys.exit(main())
