"""The report: the figures and ratios of the measured scenarios, PASS or MISS per target, the printed table.

``build_report`` turns the scenarios into the figures (also what ``--json`` writes); ``print_report`` prints
the table and one line per target. The targets are those in docs/performance.md. They are reported, not
asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from benchmarks.scenarios import CLERK_LATENCY_MS, ROOT, Scenario

SLOW_TARGET = 0.9  # achieved / ideal at 200 ms Clerk latency
ME_TARGET = 0.6  # users/me throughput / healthz throughput
OTHER_CPU_WARNING = 0.10  # warn when other processes took more than this share of the CPUs


def code_version() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}" + (f" + uncommitted changes in {len(dirty)} paths" if dirty else "")


def build_report(args: argparse.Namespace, scenarios: list[Scenario]) -> dict[str, Any]:
    threads_total = args.workers * args.threads
    healthz, me, _, register0, *slow = scenarios
    ratio = register0.throughput / healthz.throughput if healthz.throughput else 0.0
    me_ratio = me.throughput / healthz.throughput if healthz.throughput else 0.0
    # Connections: the latency-0 run and the slow run with the most clients.
    connection_scenarios = [register0, *([max(slow, key=lambda s: s.clients)] if slow else [])]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "code": args.code_version,
        "gunicorn": {
            "worker_class": "gthread",
            "workers": args.workers,
            "threads": args.threads,
            "command": args.gunicorn_command,
        },
        "threads_total": threads_total,
        "scenarios": [
            {
                "name": s.name,
                "clients": s.clients,
                "clerk_latency_ms": s.clerk_latency_ms,
                "seconds": s.duration,
                "ok": s.ok,
                "throughput": round(s.throughput, 1),
                "p50_ms": round(s.p50_ms, 1),
                "p95_ms": round(s.p95_ms, 1),
                "errors": s.errors,
                # client/gunicorn/standin/postgres: CPU seconds in the window; busy/other: share of all CPUs
                "cpu": {k: round(v, 3) for k, v in s.cpu.items()},
                "standin": s.standin,
            }
            for s in scenarios
        ],
        "register_over_healthz": round(ratio, 3),
        "gunicorn_cpu_ms_per_request": {
            s.path: round(1000 * s.cpu["gunicorn"] / s.ok, 3)
            for s in (healthz, me, register0)
            if s.cpu and s.ok
        },
        "users_me": {
            "over_healthz": round(me_ratio, 3),
            "target": ME_TARGET,
            "pass": me_ratio >= ME_TARGET,
            "jwks_requests": me.jwks_requests,
            "workers": args.workers,
            "worker_processes_seen": me.worker_processes or None,
            "jwks_pass": me.jwks_requests <= args.workers,
        },
        "slow": [
            {
                "clients": s.clients,
                "achieved": round(s.throughput, 1),
                "ideal": round(s.ideal, 1),
                "ratio": round(s.throughput / s.ideal, 3),
                "pass": s.throughput >= SLOW_TARGET * s.ideal,
            }
            for s in slow
        ],
        "connections": [
            {
                "scenario": f"{s.name}, {s.clients} clients",
                "registrations": s.registrations,
                "accepted": s.standin.get("connections_accepted", 0),
                "carrying_v1": s.standin.get("connections", 0),
                "accepted_per_1000": round(s.per_thousand("connections_accepted"), 2),
                "carrying_per_1000": round(s.per_thousand("connections"), 2),
                "pass": s.per_thousand("connections_accepted") <= threads_total,
            }
            for s in connection_scenarios
        ],
    }
    return report


def print_report(args: argparse.Namespace, scenarios: list[Scenario], report: dict[str, Any]) -> None:
    verdict = {True: "PASS", False: "MISS"}
    print()
    print(
        f"gunicorn gthread: {args.workers} workers x {args.threads} threads"
        f" = {report['threads_total']} threads;"
        f" {report['machine']['cpus']} CPUs, Python {report['machine']['python']};"
        " the load generator runs on the same CPUs"
    )
    print(report["gunicorn"]["command"])
    print(f"code: {report['code']}")
    print()
    header = f"{'scenario':<24}{'clients':>8}{'ok':>7}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}"
    cpu_header = f"{'busy':>6}{'other':>7}{'client':>8}{'gunicorn':>9}{'stand-in':>9}{'postgres':>9}"
    print(header + cpu_header + f"{'db in use':>14}")
    for s in scenarios:
        line = (
            f"{s.name:<24}{s.clients:>8}{s.ok:>7}{s.throughput:>9.1f}{s.p50_ms:>9.1f}{s.p95_ms:>9.1f}"
            f"{sum(s.errors.values()):>8}"
        )
        if s.cpu and s.ok:
            line += f"{100 * s.cpu['busy']:>5.0f}%{100 * s.cpu['other']:>6.0f}%" + "".join(
                f"{1000 * s.cpu[key] / s.ok:>{width}.2f}"
                for key, width in (("client", 8), ("gunicorn", 9), ("standin", 9), ("postgres", 9))
            )
        if "db_connections" in s.cpu:
            use = f"{s.cpu['db_in_use_mean']:.1f}/{s.cpu['db_in_use_max']:.0f}/{s.cpu['db_connections']:.0f}"
            line += f"{use:>14}"
        print(line)
        if s.errors:
            print(f"{'':<24}unexpected answers: {s.errors}")
    print(
        "busy: all CPUs; other: CPU used by processes other than these four (PostgreSQL background work,"
        " the kernel, anything else on the machine); client ... postgres: ms of CPU per ok request"
    )
    print(
        f"db in use: the app's PostgreSQL connections in use, mean/max/open (the pools hold at most"
        f" {args.workers} x 5 = {5 * args.workers}), sampled every 0.1 s"
    )
    healthz, me, _, register0, *_ = scenarios
    cpu_ms = report["gunicorn_cpu_ms_per_request"]
    print()
    print(
        f"1. register / healthz at Clerk 0 ms, {register0.clients} clients: {register0.throughput:.1f} /"
        f" {healthz.throughput:.1f} req/s = {report['register_over_healthz']:.3f}"
        " (target: 'a large fraction'; no number set)"
    )
    per_health, per_register = cpu_ms.get(healthz.path), cpu_ms.get(register0.path)
    if per_health and per_register:
        print(
            f"   gunicorn CPU per request: healthz {per_health:.2f} ms, register {per_register:.2f} ms"
            f" (ratio {per_health / per_register:.3f})"
        )
    print(f"2. register at Clerk {CLERK_LATENCY_MS} ms (target: achieved >= {SLOW_TARGET:.0%} of ideal):")
    for row in report["slow"]:
        print(
            f"   {row['clients']:>3} clients: achieved {row['achieved']:.1f}/s, ideal {row['ideal']:.1f}/s,"
            f" achieved/ideal {row['ratio']:.3f}  {verdict[row['pass']]}"
        )
    limit = report["threads_total"]
    print(f"3. Clerk connections per 1,000 registrations (target: accepted <= {limit}, the thread count):")
    for row in report["connections"]:
        print(
            f"   {row['scenario']}: {row['registrations']} registrations, {row['accepted']} accepted"
            f" ({row['accepted_per_1000']:.2f} per 1,000), {row['carrying_v1']} carried them"
            f" ({row['carrying_per_1000']:.2f} per 1,000)  {verdict[row['pass']]}"
        )
    mine = report["users_me"]
    print(
        f"4. users/me (Bearer token) / healthz, {me.clients} clients: {me.throughput:.1f} /"
        f" {healthz.throughput:.1f} req/s = {mine['over_healthz']:.3f}"
        f" (target: >= {ME_TARGET})  {verdict[mine['pass']]}"
    )
    per_me = cpu_ms.get(me.path)
    if per_health and per_me:
        print(
            f"   gunicorn CPU per request: healthz {per_health:.2f} ms, users/me {per_me:.2f} ms"
            f" (ratio {per_health / per_me:.3f})"
        )
    seen = f"; {mine['worker_processes_seen']} worker processes seen" if mine["worker_processes_seen"] else ""
    print(
        f"   GET /v1/jwks at the stand-in during the users/me scenario: {mine['jwks_requests']}"
        f" (target: <= {mine['workers']}, one per gunicorn worker{seen})  {verdict[mine['jwks_pass']]}"
    )
    busiest = max((s.cpu.get("other", 0.0) for s in scenarios), default=0.0)
    if busiest > OTHER_CPU_WARNING:
        print(
            f"\nwarning: other processes used up to {busiest:.0%} of the CPUs during a scenario; these"
            " numbers are lower than this code can do on a quiet machine. Run again when it is idle."
        )
    if any(s.errors for s in scenarios):
        print("\nsome scenarios saw unexpected answers: exit status 1")
