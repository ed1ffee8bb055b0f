"""What the benchmark measures: the servers it starts, the endpoints it loads, the Clerk latency of each run.

It creates a throwaway database ``iris_bench_<random>`` on PostgreSQL and migrates it, starts the Clerk
stand-in (``python -m clerk_standin``) and gunicorn (gthread) on free loopback ports, warms up, and runs
the scenarios in order: healthz, authenticated users/me, register with one client and with the ratio clients
at Clerk latency 0, then register at a Clerk latency of 200 ms (a stand-in fault) for each slow client count.
The stand-in's stats are reset before each scenario and read after it. It also samples, across each measuring
window, the CPU used by each component (Linux ``/proc``) and the app's database connections in use. At the
end it stops both servers and drops the database, also on failure. The load itself comes from ``load.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
import requests

from benchmarks.load import REQUEST_TIMEOUT, BenchmarkError, Result, Target, drive

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
STANDIN_SECRET_KEY = "sk_test_iris_local_standin"  # noqa: S105 (the stand-in's public default key)
PASSWORD = "bench-correct-horse-battery-staple"  # noqa: S105 (accepted by the stand-in's password rules)
CLERK_LATENCY_MS = 200
UNREACHABLE_LIMIT = "1000000 per minute"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
TOKEN_LIFETIME = 600  # seconds: minted session tokens must outlive the whole run (Clerk's default is 60)
JWKS_ROUTE = "GET /v1/jwks"


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

    def observe(self, until: float) -> dict[str, float]:
        """The driver's observer: CPU used per component from now until ``until`` (perf_counter), and the
        database connections in use over that time."""
        before = self.sample()
        pool = self.database_connections(until)
        time.sleep(max(0.0, until - time.perf_counter()))
        after = self.sample()
        return {**self.difference(before, after), **pool}

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
            # The load generator runs in this process (load.py); a driver that runs elsewhere would need its
            # own process's CPU here.
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


# --------------------------------------------------------------------------- scenarios


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

    def record(self, result: Result) -> None:
        self.ok, self.throughput = result.ok, result.throughput
        self.p50_ms, self.p95_ms = result.p50_ms, result.p95_ms
        self.errors = result.errors
        self.cpu = result.observed

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


def new_registration() -> dict[str, str]:
    """A register request's body, with an email no other request uses."""
    return {"email": f"bench-{uuid.uuid4().hex}@iris-bench.example.com", "password": PASSWORD}


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
    healthz = Target("GET", app_url + "/healthz", 200)
    register = Target("POST", register_url, 201, body=new_registration)

    # Warm-up: imports, thread pools, database pools and Clerk keep-alive sessions in every thread. Not
    # users/me: no token is verified before its scenario, so each worker's first JWKS fetch is counted.
    warm_clients = max([args.ratio_clients, *args.slow_clients])
    print(f"warm-up: {args.warmup:.0f} s, {warm_clients} clients", flush=True)
    control.reset()
    for target in (healthz, register):
        bad = drive(target, warm_clients, 0, args.warmup / 2).errors
        if bad:
            print(f"  warm-up saw unexpected answers: {bad}", flush=True)

    # One session token per users/me client. They are JWTs: the stand-in's reset before each scenario (which
    # forgets its users and sessions but keeps its signing key) does not invalidate them.
    tokens = session_tokens(register_url, standin_url, args.ratio_clients)
    users_me = Target(
        "GET",
        app_url + "/api/v1/users/me",
        200,
        headers=[{"Authorization": f"Bearer {token}"} for token in tokens],
    )

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
    targets = {"/healthz": healthz, "/api/v1/users/me": users_me, "/api/v1/auth/register": register}
    for scenario in plan:
        print(
            f"{scenario.name}, {scenario.clients} clients: {args.ramp:g} s + {scenario.duration:g} s",
            flush=True,
        )
        control.reset()  # also forgets the stand-in's users and sessions; emails are unique anyway
        if scenario.clerk_latency_ms:
            control.add_fault(method="POST", path="/v1/users", latency_ms=scenario.clerk_latency_ms)
        workers_before = set(children(probe.gunicorn_pid)) if probe.enabled else set()
        scenario.record(
            drive(targets[scenario.path], scenario.clients, args.ramp, scenario.duration, probe.observe)
        )
        scenario.standin = control.stats()
        if probe.enabled:
            scenario.worker_processes = len(workers_before | set(children(probe.gunicorn_pid)))
    return plan


def run_scenarios(args: argparse.Namespace) -> tuple[list[Scenario], list[str]]:
    """Set up the database and both servers, run every scenario, tear it all down. Returns the scenarios
    and the lines gunicorn and the app logged above INFO. Sets ``args.gunicorn_command``."""
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
    return scenarios, logged
