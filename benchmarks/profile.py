"""Where a request's CPU goes: a CPU-time cProfile of the app in-process, one request at a time.

    .venv/bin/python -m benchmarks.profile [--requests 300] [--top 25] [--only healthz users_me register]

It sets up what ``python -m benchmarks`` does (a throwaway PostgreSQL database, migrated; the Clerk stand-in
and an SMTP sink in their own processes) and builds the app with ``create_app()`` from the same environment
as the benchmark's gunicorn, so production's settings apply: JSON request logs (to /dev/null here), the rate
limiter, email verification, the statement bound, the pool. Requests go through Flask's test client in this
process, so gunicorn's own HTTP handling is not in these figures (the benchmark's "app CPU" includes it).

For each endpoint it first measures the mean CPU per request without the profiler (``time.process_time``
over ``--requests`` requests), then profiles as many more and prints the top functions by cumulative and by
own time. cProfile inflates code made of many small calls, so read shares, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

from benchmarks.scenarios import (
    HOST,
    PASSWORD,
    admin_tokens,
    app_environment,
    bearer,
    database_url,
    free_port,
    migrate_database,
    session_tokens,
    start_smtp_sink,
    start_standin,
    stop,
    throwaway_database,
)
from benchmarks.wrk import BenchmarkError

ENDPOINTS = ("healthz", "users_me", "admin_users", "register")


@contextlib.contextmanager
def services(pg_url: str) -> Iterator[dict[str, str]]:
    """A migrated throwaway database, the stand-in and an SMTP sink; yields the app's environment."""
    with tempfile.TemporaryFile() as log, throwaway_database(pg_url) as db_name:
        standin_port, smtp_port = free_port(), free_port()
        standin_url = f"http://{HOST}:{standin_port}"
        env = app_environment(standin_url, database_url(pg_url, db_name), smtp_port)
        env["IRIS_EMAIL_VERIFICATION"] = "required"
        migrate_database(env)
        standin = smtp = None
        try:
            standin = start_standin(standin_port, log)
            smtp = start_smtp_sink(smtp_port, log)
            yield env
        finally:
            stop(smtp)
            stop(standin)


def build_app(env: dict[str, str]):
    """``create_app()`` reading ``env`` as gunicorn's workers would, its logs going to /dev/null."""
    os.environ.clear()
    os.environ.update(env)
    from iris import create_app

    saved, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115 (kept open: the log handler's stream)
    try:
        return create_app()
    finally:
        sys.stderr = saved


def requesters(app, standin_url: str, db_url: str) -> dict[str, Callable[[], None]]:
    """One callable per endpoint, each making one request and checking its status."""
    client = app.test_client()
    base = {"REMOTE_ADDR": "127.0.0.1"}

    def expect(response, status: int) -> None:
        if response.status_code != status:
            body = response.get_data(as_text=True)
            raise BenchmarkError(f"expected {status}, got {response.status_code}: {body}")

    # The benchmark's users/me user and its admin (promoted in the database, as the benchmark does), over
    # real HTTP to the same app; the admin listing then has a full first page.
    server = _WsgiServer(app)
    try:
        register_url = server.url + "/api/v1/auth/register"
        me = bearer(session_tokens(register_url, standin_url, 1))[0]
        admin = bearer(admin_tokens(register_url, standin_url, db_url, 1)[0])[0]
    finally:
        server.stop()

    def register() -> None:
        email = f"profile-{uuid.uuid4().hex}@iris-bench.example.com"
        expect(
            client.post(
                "/api/v1/auth/register", json={"email": email, "password": PASSWORD}, environ_base=base
            ),
            201,
        )

    return {
        "healthz": lambda: expect(client.get("/healthz", environ_base=base), 200),
        "users_me": lambda: expect(client.get("/api/v1/users/me", headers=me, environ_base=base), 200),
        "admin_users": lambda: expect(client.get("/api/v1/users", headers=admin, environ_base=base), 200),
        "register": register,
    }


class _WsgiServer:
    """The app on a loopback port in a thread, only to register the users/me user over real HTTP."""

    def __init__(self, app) -> None:
        import threading

        from werkzeug.serving import make_server

        self._server = make_server(HOST, 0, app, threaded=True)
        self.url = f"http://{HOST}:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()


def cpu_per_request(request: Callable[[], None], count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        request()
    return (time.process_time() - started) / count * 1000


def profile(request: Callable[[], None], count: int, top: int) -> str:
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for _ in range(count):
        request()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=300, help="requests per endpoint and phase (300)")
    parser.add_argument("--top", type=int, default=25, help="functions listed per sort order (25)")
    parser.add_argument("--only", nargs="+", choices=ENDPOINTS, default=list(ENDPOINTS))
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    with services(args.pg_url) as env:
        app = build_app(env)
        calls = requesters(app, env["CLERK_API_URL"], env["DATABASE_URL"])
        summary = []
        for name in args.only:
            request = calls[name]
            count = max(10, args.requests // 10) if name == "register" else args.requests
            cpu_per_request(request, max(5, count // 10))  # warm caches (JWKS, pool, templates)
            cpu = cpu_per_request(request, count)
            summary.append(f"{name}: {cpu:.2f} ms of CPU per request ({count} requests, no profiler)")
            print(f"==== {name}: {count} profiled requests", flush=True)
            print(profile(request, count, args.top), flush=True)
        print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
