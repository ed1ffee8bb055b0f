"""Registration and token-check throughput and CPU per request: wrk at gunicorn, straight and via nginx.

The entry point: reads the options, runs the scenarios (``scenarios.py``, with the load from ``wrk.py``) and
prints the report (``report.py``). gunicorn runs with the repository's gunicorn.conf.py, against the Clerk
stand-in, on PostgreSQL. The scenarios: healthz, users/me, the admin list (an admin's first page of accounts),
register. What it measures, how, and the targets: docs/performance.md. Targets are reported as PASS/MISS, not
asserted; the admin list has none and is reported only. The exit status is 1 when a scenario saw an
unexpected status or a failed request, 2 when the benchmark could not run.

Run it from the repository root::

    .venv/bin/python -m benchmarks            # about three minutes (make bench)
    .venv/bin/python -m benchmarks --help     # durations, connections, gunicorn workers/threads, --json
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from benchmarks.report import build_report, code_version, print_report
from benchmarks.scenarios import run_scenarios
from benchmarks.wrk import BenchmarkError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="gunicorn workers, passed as WEB_CONCURRENCY (default: gunicorn.conf.py's, 2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="gunicorn threads per worker, passed as GUNICORN_THREADS (default: gunicorn.conf.py's, 8)",
    )
    parser.add_argument(
        "--routes",
        nargs="+",
        choices=["direct", "nginx"],
        default=["direct", "nginx"],
        help="direct: wrk straight at gunicorn; nginx: through nginx (default both, in that order)",
    )
    parser.add_argument(
        "--email-verification",
        choices=["required", "off"],
        default="required",
        help="IRIS_EMAIL_VERIFICATION (default required, as in production: a mail per registration)",
    )
    parser.add_argument(
        "--ratio-clients",
        type=int,
        default=16,
        help="connections for the healthz, users/me and admin list runs and the register/healthz ratio"
        " (default 16)",
    )
    parser.add_argument(
        "--slow-clients",
        type=int,
        nargs="+",
        default=[16, 32],
        help="connection counts for the register runs at Clerk 0 and 200 ms (default 16 32)",
    )
    parser.add_argument("--duration", type=int, default=6, help="whole seconds measured per scenario (6)")
    parser.add_argument("--ramp", type=int, default=1, help="whole seconds of load before measuring (1)")
    parser.add_argument("--warmup", type=int, default=4, help="whole seconds of warm-up load per route (4)")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    parser.add_argument("--time-limit", type=int, default=400, help="abort after this many seconds (400)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    counts = [n for n in (args.workers, args.threads) if n is not None]
    if min([*counts, args.ratio_clients, *args.slow_clients]) < 1:
        parser.error("workers, threads and connection counts must be at least 1")
    if args.duration < 1 or args.ramp < 0 or args.warmup < 0:
        parser.error("--duration must be at least 1 s, --ramp and --warmup at least 0")
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
