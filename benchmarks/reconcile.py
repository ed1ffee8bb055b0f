"""`flask iris reconcile` at scale: time, CPU and memory of the whole pass, N Clerk users and N accounts.

For each size it makes a throwaway database (migrated), a fresh Clerk stand-in in its own process, N Clerk
users (the stand-in's bulk control call) and N matching rows, then 1% drift of each kind: rows whose address
changed at Clerk, rows whose Clerk user is gone, Clerk users with no row. Then it runs the pass in this
process three times: the repairing pass and a steady pass (nothing to change), timed, and one more steady
pass under ``tracemalloc`` for the peak of Python memory it allocated. Figures, not verdicts:
docs/performance.md keeps them with the command that produced them. Run it from the repository root::

    .venv/bin/python -m benchmarks.reconcile                  # 2,000 and 20,000
    .venv/bin/python -m benchmarks.reconcile --sizes 2000 20000 50000
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import requests

from benchmarks.scenarios import (
    HOST,
    STANDIN_SECRET_KEY,
    database_url,
    free_port,
    process_cpu,
    stop,
    throwaway_database,
    wait_for,
)

DRIFT = 0.01


@contextlib.contextmanager
def standin() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    with tempfile.TemporaryFile() as log:
        command = [sys.executable, "-m", "clerk_standin", "--host", HOST, "--port", str(port), "--quiet"]
        process = subprocess.Popen(command, stdout=log, stderr=log)
        url = f"http://{HOST}:{port}"
        try:
            wait_for(url + "/__standin/health", process, log, "the stand-in", 30)
            yield url, process
        finally:
            stop(process)


def seed(standin_url: str, db_url: str, size: int) -> dict[str, int]:
    """N Clerk users and N rows pointing at each other, then 1% drift of each kind; returns the drift."""
    drift = max(1, int(size * DRIFT))
    row_ids = [uuid.uuid4() for _ in range(size)]
    users = [
        {"email_address": f"owner{n}@bistro.example", "external_id": str(row_ids[n])} for n in range(size)
    ]
    users += [{"email_address": f"walkin{n}@bistro.example"} for n in range(drift)]  # no row: made in Clerk
    answer = requests.post(standin_url + "/__standin/users/bulk", json={"users": users}, timeout=300)
    answer.raise_for_status()
    clerk_ids = answer.json()["ids"][:size]
    columns = "id, email, clerk_user_id, role, email_verified_at"
    with (
        psycopg.connect(db_url) as conn,
        conn.cursor() as cursor,
        cursor.copy(f"COPY users ({columns}) FROM STDIN") as copy,
    ):
        for n in range(size):
            email = f"stale{n}@bistro.example" if n < drift else f"owner{n}@bistro.example"
            clerk_id = f"user_gone{n:022d}" if drift <= n < 2 * drift else clerk_ids[n]
            copy.write_row((row_ids[n], email, clerk_id, "restaurant", "2026-01-01T00:00:00Z"))
    return {"email_changed": drift, "deleted": drift, "created": drift}


def app_for(standin_url: str, db_url: str):
    from iris import create_app

    return create_app(
        {
            "SQLALCHEMY_DATABASE_URI": db_url.replace("postgresql://", "postgresql+psycopg://"),
            "CLERK_API_URL": standin_url,
            "CLERK_SECRET_KEY": STANDIN_SECRET_KEY,
            "SECRET_KEY": "bench",
            "IRIS_EMAIL_VERIFICATION": "off",
        }
    )


def one_pass(app, *, traced: bool = False) -> dict[str, Any]:
    from iris import maintenance

    with app.app_context():
        if traced:
            tracemalloc.start()
        started, cpu = time.perf_counter(), time.process_time()
        report = maintenance.run()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        peak = tracemalloc.get_traced_memory()[1] if traced else None
        if traced:
            tracemalloc.stop()
    changes = {kind: count for kind, count in report.counts.items() if count}
    return {"seconds": seconds, "app_cpu": cpu, "peak_mib": peak and peak / 2**20, "changes": changes}


def measure(size: int, admin_url: str) -> dict[str, Any]:
    import flask_migrate

    with throwaway_database(admin_url) as name, standin() as (standin_url, process):
        db_url = database_url(admin_url, name)
        app = app_for(standin_url, db_url)
        with app.app_context():
            flask_migrate.upgrade()
        expected = seed(standin_url, db_url, size)
        standin_cpu = process_cpu(process.pid)
        stats_before = requests.get(standin_url + "/__standin/stats", timeout=10).json()["requests"]
        repair = one_pass(app)
        stats_after = requests.get(standin_url + "/__standin/stats", timeout=10).json()["requests"]
        steady = one_pass(app)
        standin_cpu = process_cpu(process.pid) - standin_cpu
        traced = one_pass(app, traced=True)
        with app.app_context():
            from iris.extensions import db

            db.engine.dispose()
    clerk_requests = sum(stats_after.values()) - sum(stats_before.values())
    return {
        "size": size,
        "expected": expected,
        "repair": repair,
        "steady": steady,
        "traced": traced,
        "clerk_requests": clerk_requests,
        "standin_cpu": standin_cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reconcile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[2000, 20000], help="users (default 2000 20000)"
    )
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    args = parser.parse_args(argv)
    results = [measure(size, args.pg_url) for size in args.sizes]
    print(
        f"{'users':>7} {'repair s':>9} {'app CPU s':>10} {'steady s':>9} {'app CPU s':>10}"
        f" {'peak MiB':>9} {'Clerk requests':>15}  changes (expected)"
    )
    for result in results:
        repair, steady = result["repair"], result["steady"]
        print(
            f"{result['size']:>7} {repair['seconds']:>9.1f} {repair['app_cpu']:>10.1f}"
            f" {steady['seconds']:>9.1f} {steady['app_cpu']:>10.1f} {result['traced']['peak_mib']:>9.1f}"
            f" {result['clerk_requests']:>15}"
            f"  {repair['changes']} ({result['expected']})"
        )
    if len(results) > 1:
        small, large = results[0], results[-1]
        print(
            f"peak memory {large['size']} / {small['size']} users:"
            f" {large['traced']['peak_mib'] / small['traced']['peak_mib']:.2f}"
        )
    wrong = [r for r in results if any(r["repair"]["changes"].get(k) != v for k, v in r["expected"].items())]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
