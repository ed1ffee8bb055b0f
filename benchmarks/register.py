"""Registration and token-verification throughput under gunicorn, against the Clerk stand-in, on PostgreSQL.

What it measures, in one run (design.md, "Performance targets"):

1. ``POST /api/v1/auth/register`` throughput divided by ``GET /healthz`` throughput at Clerk latency 0: the
   same gunicorn server, the same load generator, the same number of clients.
2. Register throughput with Clerk answering ``POST /v1/users`` in 200 ms (a stand-in latency fault), for 16
   and 32 concurrent clients, against the ideal ``clients / 0.2 s``. Target: within 10% of ideal, i.e. the
   app's 5-connection database pool is not the limit; gunicorn's threads are.
3. TCP connections the stand-in accepted per 1,000 registrations (its ``/__standin/stats``), for the
   latency-0 and the 200 ms / 32-client scenarios. Target: at most gunicorn's total thread count, since the
   Clerk client keeps one keep-alive session per thread.
4. Authenticated ``GET /api/v1/users/me`` (a Clerk session token as ``Authorization: Bearer``) throughput
   divided by ``GET /healthz`` throughput, same clients and duration. Target: at least 0.6. And the
   ``GET /v1/jwks`` requests the stand-in saw during that scenario. Target: at most one per gunicorn worker
   process, since iris.auth caches the keys per process. The tokens are minted before the scenario through
   the stand-in's Backend API (``POST /v1/sessions``, ``POST /v1/sessions/{id}/tokens``, 600 s) for a user
   registered through the app; nothing verifies a token before the scenario, so each worker's first JWKS
   fetch falls inside it.

It creates a throwaway database ``iris_bench_<random>`` on PostgreSQL (127.0.0.1:5432, user postgres unless
``--pg-url`` says otherwise), runs the migrations with ``flask db upgrade``, starts the stand-in
(``python -m clerk_standin``) and gunicorn (gthread worker class) on free loopback ports, warms up, runs
the scenarios for a fixed time each, prints a table, stops everything and drops the database, also on
failure. The load generator is Python threads in this process, one ``requests.Session`` (keep-alive) per
client, and shares the machine's CPU with gunicorn, the stand-in and PostgreSQL; the table shows where the
CPU went (Linux ``/proc``; left out elsewhere).

Two things differ from production on purpose: every request comes from one address, so the per-IP rate limits
are raised out of reach (``FLASK_RATELIMIT_DEFAULT``/``FLASK_RATELIMIT_REGISTER``; the limiter still runs);
and a one-client latency-0 run is added as a diagnostic (the time one registration takes, no contention).
The table also gives gunicorn's CPU per request, which compares endpoints more fairly than throughput when
the load generator, not gunicorn, is the limit.

Targets are reported as PASS/MISS, not asserted. The exit status is 1 when a scenario saw an unexpected
status or a failed request, 2 when the benchmark could not run.

Run it from the repository root::

    .venv/bin/python benchmarks/register.py            # under a minute
    .venv/bin/python benchmarks/register.py --help     # durations, clients, gunicorn workers/threads, --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
STANDIN_SECRET_KEY = "sk_test_iris_local_standin"  # noqa: S105 (the stand-in's public default key)
PASSWORD = "bench-correct-horse-battery-staple"  # noqa: S105 (accepted by the stand-in's password rules)
CLERK_LATENCY_MS = 200
OTHER_CPU_WARNING = 0.10  # warn when other processes took more than this share of the CPUs
SLOW_TARGET = 0.9  # achieved / ideal at 200 ms Clerk latency
UNREACHABLE_LIMIT = "1000000 per minute"
REQUEST_TIMEOUT = 30.0  # seconds, per benchmark request (gunicorn's worker timeout is 30 s)
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
ME_TARGET = 0.6  # users/me throughput / healthz throughput
TOKEN_LIFETIME = 600  # seconds: minted session tokens must outlive the whole run (Clerk's default is 60)
JWKS_ROUTE = "GET /v1/jwks"


class BenchmarkError(RuntimeError):
    """The benchmark could not set itself up or run."""


# --------------------------------------------------------------------------- processes and database


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen[bytes], log: IO[bytes], what: str, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{what} exited with {process.returncode}:\n{tail(log)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise BenchmarkError(f"{what} did not answer {url} within {timeout:.0f} s:\n{tail(log)}")


def tail(log: IO[bytes], size: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-size:]


def notable_lines(log: IO[bytes]) -> list[str]:
    """What gunicorn and the app wrote to stderr, without the app's INFO lines (one per request)."""
    log.flush()
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()
    return [line for line in lines if line.strip() and '"level": "INFO"' not in line]


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


def stop(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; only the process we started."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@contextlib.contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    """Create ``iris_bench_<random>``, yield its name, and drop it (forcibly) afterwards."""
    name = f"iris_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + name


def app_environment(standin_url: str, db_url: str) -> dict[str, str]:
    """The process environment without any Iris/Flask/Clerk settings of the caller, plus ours."""
    prefixes = ("FLASK_", "CLERK_", "IRIS_", "DATABASE_URL", "RATELIMIT_", "GUNICORN_", "WEB_CONCURRENCY")
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    env.update(
        CLERK_API_URL=standin_url,
        CLERK_SECRET_KEY=STANDIN_SECRET_KEY,
        DATABASE_URL=db_url,
        FLASK_SECRET_KEY="bench",  # noqa: S106 (a throwaway key for a throwaway server)
        FLASK_SKIP_DOTENV="1",  # a developer's .env must not change what is measured
        # Every benchmark request comes from one address: raise the per-IP limits out of reach, so the
        # limiter still runs (and costs what it costs) but never answers 429.
        FLASK_RATELIMIT_DEFAULT=UNREACHABLE_LIMIT,
        FLASK_RATELIMIT_REGISTER=UNREACHABLE_LIMIT,
    )
    return env


class StandinControl:
    """The stand-in's control API over one kept-alive connection, so control calls do not add to the
    stand-in's ``connections_accepted`` (clerk_standin.StandinControl opens one per call)."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url + "/__standin"
        self.session = requests.Session()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        response = self.session.request(method, self.base + path, json=payload, timeout=10)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        self._call("POST", "/reset")

    def add_fault(self, **fault: Any) -> dict[str, Any]:
        return self._call("POST", "/faults", fault)

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")


# --------------------------------------------------------------------------- CPU accounting (Linux /proc)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads); 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass
class CpuProbe:
    """Samples CPU seconds per component: the load generator (this process), gunicorn (master and workers),
    the stand-in, the PostgreSQL backends serving the benchmark database, and the whole machine; and how
    many of the app's database connections are in use."""

    gunicorn_pid: int
    standin_pid: int
    admin_url: str
    db_name: str
    enabled: bool = field(default_factory=lambda: Path("/proc/stat").exists())

    def sample(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        backends: dict[int, float] = {}
        with contextlib.suppress(psycopg.Error):
            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.db_name,)
                ).fetchall()
            backends = {pid: process_cpu(pid) for (pid,) in rows}
        busy, total = machine_ticks()
        return {
            "client": time.process_time(),
            "gunicorn": sum(process_cpu(pid) for pid in [self.gunicorn_pid, *children(self.gunicorn_pid)]),
            "standin": process_cpu(self.standin_pid),
            "postgres": backends,
            "machine": (busy, total),
        }

    def database_connections(self, until: float, every: float = 0.1) -> dict[str, float]:
        """Sample the app's PostgreSQL connections until ``until`` (perf_counter): how many exist, and how
        many are in use (running a statement or inside a transaction, i.e. checked out of a pool), on
        average and at most. In use close to all of them, all the time, would make the pools the limit."""
        samples: list[tuple[int, int]] = []
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn,
        ):
            while time.perf_counter() < until:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE state <> 'idle'), count(*) FROM pg_stat_activity"
                    " WHERE datname = %s AND backend_type = 'client backend'",
                    (self.db_name,),
                ).fetchone()
                if row is not None:
                    samples.append((int(row[0]), int(row[1])))
                time.sleep(max(0.0, min(every, until - time.perf_counter())))
        if not samples:
            return {}
        return {
            "db_in_use_mean": sum(busy for busy, _ in samples) / len(samples),
            "db_in_use_max": max(busy for busy, _ in samples),
            "db_connections": max(total for _, total in samples),
        }

    @staticmethod
    def difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        """CPU seconds used between two samples, per component, plus ``busy`` (fraction of all CPUs)."""
        if not before or not after:
            return {}
        postgres = sum(cpu - before["postgres"].get(pid, 0.0) for pid, cpu in after["postgres"].items())
        busy = after["machine"][0] - before["machine"][0]
        total = after["machine"][1] - before["machine"][1]
        used = {
            "client": after["client"] - before["client"],
            "gunicorn": after["gunicorn"] - before["gunicorn"],
            "standin": after["standin"] - before["standin"],
            "postgres": postgres,
        }
        # Everything else that ran: PostgreSQL's own background processes, the kernel, and any other work on
        # the machine (on a shared box, other people's test runs), as a fraction of all CPUs.
        other = busy / CLK_TCK - sum(used.values())
        return {
            **used,
            "busy": busy / total if total else 0.0,
            "other": max(0.0, other) / (total / CLK_TCK) if total else 0.0,
        }


# --------------------------------------------------------------------------- load generator


@dataclass
class Scenario:
    name: str
    path: str
    expected: int
    clients: int
    duration: float
    clerk_latency_ms: int = 0
    ok: int = 0  # expected answers completed inside the measuring window
    throughput: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # unexpected statuses/exceptions, whole scenario
    cpu: dict[str, float] = field(default_factory=dict)
    standin: dict[str, Any] = field(default_factory=dict)
    worker_processes: int = 0  # distinct gunicorn workers seen before and after the scenario (Linux only)

    @property
    def ideal(self) -> float:
        return self.clients / (self.clerk_latency_ms / 1000) if self.clerk_latency_ms else 0.0

    @property
    def registrations(self) -> int:
        return int(self.standin.get("requests", {}).get("POST /v1/users", 0))

    @property
    def jwks_requests(self) -> int:
        return int(self.standin.get("requests", {}).get(JWKS_ROUTE, 0))

    def per_thousand(self, key: str) -> float:
        count = self.standin.get(key, 0)
        return 1000 * count / self.registrations if self.registrations else float("nan")


Request = Callable[[requests.Session], requests.Response]
Prepare = Callable[[requests.Session, int], None]  # sets up client number i's session (e.g. its token)


def run_load(
    request: Request,
    expected: int,
    clients: int,
    ramp: float,
    duration: float,
    probe: CpuProbe | None,
    prepare: Prepare | None = None,
) -> tuple[list[tuple[float, float, int | str]], float, float, dict[str, float]]:
    """Run ``clients`` threads that repeat ``request`` back to back for ``ramp + duration`` seconds.

    Returns every (end time, latency, status or exception name), the window start and end (perf_counter)
    and the CPU used inside the window.
    """
    records: list[tuple[float, float, int | str]] = []
    lock = threading.Lock()
    start = time.perf_counter()
    window_start = start + ramp
    window_end = window_start + duration

    def client(number: int) -> None:
        mine: list[tuple[float, float, int | str]] = []
        with requests.Session() as session:
            if prepare is not None:
                prepare(session, number)
            while (began := time.perf_counter()) < window_end:
                status: int | str
                try:
                    status = request(session).status_code
                except requests.RequestException as error:
                    status = type(error).__name__
                ended = time.perf_counter()
                mine.append((ended, ended - began, status))
        with lock:
            records.extend(mine)

    threads = [
        threading.Thread(target=client, args=(i,), daemon=True, name=f"client-{i}") for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, window_start - time.perf_counter()))
    before = probe.sample() if probe else {}
    pool = probe.database_connections(window_end) if probe else {}
    time.sleep(max(0.0, window_end - time.perf_counter()))
    after = probe.sample() if probe else {}
    join_by = time.monotonic() + REQUEST_TIMEOUT + 5
    for thread in threads:
        thread.join(max(0.0, join_by - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise BenchmarkError("load generator threads did not stop")
    return records, window_start, window_end, {**CpuProbe.difference(before, after), **pool}


def summarise(
    scenario: Scenario, records: list[tuple[float, float, int | str]], lo: float, hi: float
) -> None:
    in_window = sorted(
        latency for ended, latency, status in records if status == scenario.expected and lo <= ended < hi
    )
    scenario.ok = len(in_window)
    scenario.throughput = scenario.ok / (hi - lo)
    if in_window:
        scenario.p50_ms = 1000 * in_window[len(in_window) // 2]
        scenario.p95_ms = 1000 * in_window[min(len(in_window) - 1, int(len(in_window) * 0.95))]
    errors = Counter(str(status) for _, _, status in records if status != scenario.expected)
    scenario.errors = dict(errors)


# --------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    standin: subprocess.Popen[bytes] | None = None
    gunicorn: subprocess.Popen[bytes] | None = None
    with (
        tempfile.TemporaryFile() as standin_log,
        tempfile.TemporaryFile() as gunicorn_log,
        tempfile.TemporaryDirectory(prefix="iris_bench_") as scratch,
        throwaway_database(args.pg_url) as db_name,
    ):
        try:
            standin_port, app_port = free_port(), free_port()
            standin_url, app_url = f"http://{HOST}:{standin_port}", f"http://{HOST}:{app_port}"
            env = app_environment(standin_url, database_url(args.pg_url, db_name))
            print(f"database {db_name}: migrating", flush=True)
            migrate = subprocess.run(
                [str(BIN / "flask"), "db", "upgrade"], cwd=ROOT, env=env, capture_output=True, timeout=60
            )
            if migrate.returncode != 0:
                raise BenchmarkError("flask db upgrade failed:\n" + migrate.stderr.decode(errors="replace"))

            standin = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "clerk_standin",
                    "--quiet",
                    "--host",
                    HOST,
                    "--port",
                    str(standin_port),
                ],
                cwd=ROOT,
                stdout=standin_log,
                stderr=subprocess.STDOUT,
            )
            wait_for(standin_url + "/__standin/health", standin, standin_log, "the Clerk stand-in", 20)
            # An empty config file: every setting is on this command line; the repository's gunicorn.conf.py
            # (production settings, read from the working directory by default) is not read.
            empty_config = Path(scratch) / "gunicorn_bench.conf.py"
            empty_config.write_text("# empty: every setting is on the command line\n")
            command = [str(BIN / "gunicorn"), "--config", str(empty_config), "--worker-class", "gthread"]
            command += ["--workers", str(args.workers), "--threads", str(args.threads)]
            command += ["--bind", f"{HOST}:{app_port}", "--log-level", "warning", "--graceful-timeout", "5"]
            command += ["wsgi:app"]
            args.gunicorn_command = "gunicorn " + " ".join(command[1:]).replace(str(empty_config), "<empty>")
            print(args.gunicorn_command, flush=True)
            gunicorn = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=gunicorn_log, stderr=subprocess.STDOUT
            )
            wait_for(app_url + "/healthz", gunicorn, gunicorn_log, "gunicorn", 30)

            control = StandinControl(standin_url)
            probe = CpuProbe(gunicorn.pid, standin.pid, args.pg_url, db_name)
            scenarios = measure(args, app_url, standin_url, control, probe)
        finally:
            stop(gunicorn)
            stop(standin)
        logged = notable_lines(gunicorn_log)
        print(f"database {db_name}: dropped", flush=True)
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


def session_tokens(register_url: str, standin_url: str, count: int) -> list[str]:
    """Register one user through the app, then mint ``count`` Clerk session tokens for it, one session each,
    through the stand-in's Backend API (as ``flask iris token`` does), valid for ``TOKEN_LIFETIME`` s."""
    email = f"bench-me-{uuid.uuid4().hex}@iris-bench.example.com"
    with requests.Session() as http:
        answer = http.post(register_url, json={"email": email, "password": PASSWORD}, timeout=REQUEST_TIMEOUT)
        if answer.status_code != 201:
            raise BenchmarkError(
                f"registering the users/me user answered {answer.status_code}: {answer.text}"
            )
        clerk_user_id = answer.json()["clerk_user_id"]
        http.headers["Authorization"] = f"Bearer {STANDIN_SECRET_KEY}"
        tokens = []
        for _ in range(count):
            session = http.post(standin_url + "/v1/sessions", json={"user_id": clerk_user_id}, timeout=10)
            if session.status_code != 200:
                raise BenchmarkError(
                    f"stand-in POST /v1/sessions answered {session.status_code}: {session.text}"
                )
            token = http.post(
                f"{standin_url}/v1/sessions/{session.json()['id']}/tokens",
                json={"expires_in_seconds": TOKEN_LIFETIME},
                timeout=10,
            )
            if token.status_code != 200:
                raise BenchmarkError(f"stand-in POST .../tokens answered {token.status_code}: {token.text}")
            tokens.append(token.json()["jwt"])
    return tokens


def measure(
    args: argparse.Namespace, app_url: str, standin_url: str, control: StandinControl, probe: CpuProbe
) -> list[Scenario]:
    register_url = app_url + "/api/v1/auth/register"
    me_url = app_url + "/api/v1/users/me"

    def healthz(session: requests.Session) -> requests.Response:
        return session.get(app_url + "/healthz", timeout=REQUEST_TIMEOUT)

    def register(session: requests.Session) -> requests.Response:
        email = f"bench-{uuid.uuid4().hex}@iris-bench.example.com"
        return session.post(
            register_url, json={"email": email, "password": PASSWORD}, timeout=REQUEST_TIMEOUT
        )

    def users_me(session: requests.Session) -> requests.Response:
        return session.get(me_url, timeout=REQUEST_TIMEOUT)

    # Warm-up: imports, thread pools, database pools and Clerk keep-alive sessions in every thread. Not
    # users/me: no token is verified before its scenario, so each worker's first JWKS fetch is counted.
    warm_clients = max([args.ratio_clients, *args.slow_clients])
    print(f"warm-up: {args.warmup:.0f} s, {warm_clients} clients", flush=True)
    control.reset()
    for request, expected in ((healthz, 200), (register, 201)):
        records, _, _, _ = run_load(request, expected, warm_clients, 0, args.warmup / 2, None)
        bad = Counter(str(status) for _, _, status in records if status != expected)
        if bad:
            print(f"  warm-up saw unexpected answers: {dict(bad)}", flush=True)

    # One session token per users/me client. They are JWTs: the stand-in's reset before each scenario (which
    # forgets its users and sessions but keeps its signing key) does not invalidate them.
    tokens = session_tokens(register_url, standin_url, args.ratio_clients)

    def with_token(session: requests.Session, number: int) -> None:
        session.headers["Authorization"] = f"Bearer {tokens[number % len(tokens)]}"

    plan = [
        Scenario("healthz, Clerk 0 ms", "/healthz", 200, args.ratio_clients, args.duration),
        # Right after healthz, with the same clients and duration: the two are divided (target 4).
        Scenario("users/me, Bearer token", "/api/v1/users/me", 200, args.ratio_clients, args.duration),
        # One client, no contention: the time a registration takes end to end (a diagnostic, no target).
        Scenario("register, Clerk 0 ms", "/api/v1/auth/register", 201, 1, min(args.duration, 3.0)),
        Scenario("register, Clerk 0 ms", "/api/v1/auth/register", 201, args.ratio_clients, args.duration),
        *(
            Scenario(
                f"register, Clerk {CLERK_LATENCY_MS} ms",
                "/api/v1/auth/register",
                201,
                clients,
                args.duration,
                CLERK_LATENCY_MS,
            )
            for clients in args.slow_clients
        ),
    ]
    requests_for: dict[str, tuple[Request, Prepare | None]] = {
        "/healthz": (healthz, None),
        "/api/v1/users/me": (users_me, with_token),
        "/api/v1/auth/register": (register, None),
    }
    for scenario in plan:
        print(
            f"{scenario.name}, {scenario.clients} clients: {args.ramp:g} s + {scenario.duration:g} s",
            flush=True,
        )
        control.reset()  # also forgets the stand-in's users and sessions; emails are unique anyway
        if scenario.clerk_latency_ms:
            control.add_fault(method="POST", path="/v1/users", latency_ms=scenario.clerk_latency_ms)
        request, prepare = requests_for[scenario.path]
        workers_before = set(children(probe.gunicorn_pid)) if probe.enabled else set()
        records, lo, hi, cpu = run_load(
            request, scenario.expected, scenario.clients, args.ramp, scenario.duration, probe, prepare
        )
        summarise(scenario, records, lo, hi)
        scenario.cpu = cpu
        scenario.standin = control.stats()
        if probe.enabled:
            scenario.worker_processes = len(workers_before | set(children(probe.gunicorn_pid)))
    return plan


# --------------------------------------------------------------------------- report


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
        " (design.md: 'a large fraction'; no number set)"
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


if __name__ == "__main__":
    sys.exit(main())
