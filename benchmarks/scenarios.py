"""What the benchmark measures: the servers it starts, the endpoints it loads, the Clerk latency of each run.

It creates a throwaway database ``iris_bench_<random>`` on PostgreSQL and migrates it, and starts the Clerk
stand-in (``python -m clerk_standin``). Then, for each route, it starts gunicorn as production runs it (the
repository's gunicorn.conf.py: gthread, its workers and threads unless --workers/--threads override them via
WEB_CONCURRENCY/GUNICORN_THREADS) on a free loopback port: "direct" loads gunicorn straight with wrk's
keep-alive connections; "nginx" puts nginx in front (a plain-HTTP copy of the deploy/ site's upstream and
``location /``) and runs the app with IRIS_PROXY_HOPS=1, as behind the real proxy. A fresh gunicorn per route,
so each starts with cold JWKS caches. For each it warms up and runs the scenarios in order: healthz,
authenticated users/me, the admin list (``GET /api/v1/users``: a full first page of 50 accounts, as an account
the benchmark promotes to admin in its database), register with one connection and with each slow connection
count at Clerk latency 0, then register at a Clerk latency of 200 ms (a stand-in fault) for each slow
connection count. The stand-in's stats are reset before each scenario and read after it. Across each measuring
window it samples the CPU used by each component and by each gunicorn worker (Linux ``/proc``), and the app's
database connections in use. At the end it stops every server and drops the database, also on failure. The
load itself comes from ``wrk.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
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

from benchmarks.wrk import REQUEST_TIMEOUT, UNIQUE, BenchmarkError, Result, Target, drive
from iris.config import DEV_PUBLISHABLE_KEY

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
NGINX_SITE = ROOT / "deploy" / "nginx-iris.conf"
HOST = "127.0.0.1"
HOST_SMTP = HOST + ":%d"
STANDIN_SECRET_KEY = "sk_test_iris_local_standin"  # noqa: S105 (the stand-in's public default key)
PASSWORD = "bench-correct-horse-battery-staple"  # noqa: S105 (accepted by the stand-in's password rules)
CLERK_LATENCY_MS = 200
UNREACHABLE_LIMIT = "1000000 per minute"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
TOKEN_LIFETIME = 600  # seconds: minted session tokens must outlive the whole run (Clerk's default is 60)
JWKS_ROUTE = "GET /v1/jwks"
ADMIN_LIST_PATH = "/api/v1/users"
LIST_PAGE = 50  # the admin listing's default page size (iris.accounts.DEFAULT_LIMIT)


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


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: IO[bytes], what: str, timeout: float
) -> None:
    """Wait until something accepts TCP connections on ``port``; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{what} exited with {process.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.1)
    raise BenchmarkError(f"{what} did not listen on {port} within {timeout:.0f} s:\n{tail(log)}")


def tail(log: IO[bytes], size: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-size:]


def notable_lines(log: IO[bytes]) -> list[str]:
    """What gunicorn and the app wrote to stderr, without INFO lines (the app's one per request, gunicorn's
    start and stop)."""
    log.flush()
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()
    return [
        line for line in lines if line.strip() and '"level": "INFO"' not in line and "] [INFO] " not in line
    ]


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


def migrate_database(env: dict[str, str]) -> None:
    """``flask db upgrade`` on the database of ``env``'s DATABASE_URL."""
    migrate = subprocess.run(
        [str(BIN / "flask"), "db", "upgrade"], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    if migrate.returncode != 0:
        raise BenchmarkError("flask db upgrade failed:\n" + migrate.stderr.decode(errors="replace"))


def start_standin(port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """The Clerk stand-in on ``port``, once it answers its health check."""
    command = [sys.executable, "-m", "clerk_standin", "--quiet", "--host", HOST, "--port", str(port)]
    standin = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wait_for(f"http://{HOST}:{port}/__standin/health", standin, log, "the Clerk stand-in", 20)
    return standin


def start_smtp_sink(port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """An SMTP server on ``port`` that accepts and discards every mail, once it listens."""
    command = [sys.executable, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink", "-l", HOST_SMTP % port]
    smtp = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port, smtp, log, "the SMTP sink", 20)
    return smtp


def app_environment(standin_url: str, db_url: str, smtp_port: int = 1) -> dict[str, str]:
    """The process environment without any Iris/Flask/Clerk settings of the caller, plus ours."""
    prefixes = ("FLASK_", "CLERK_", "IRIS_", "DATABASE_URL", "RATELIMIT_", "GUNICORN_", "WEB_CONCURRENCY")
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    env.update(
        CLERK_API_URL=standin_url,
        CLERK_SECRET_KEY=STANDIN_SECRET_KEY,
        DATABASE_URL=db_url,
        FLASK_SECRET_KEY="bench",  # noqa: S106 (a throwaway key for a throwaway server)
        FLASK_SKIP_DOTENV="1",  # a developer's .env must not change what is measured
        # Email verification is on, as in production: each registration queues a mail, which the worker's
        # courier thread sends over SMTP after the request, here to a local sink (aiosmtpd) on ``smtp_port``.
        IRIS_PUBLIC_URL="https://accounts.example.com",
        CLERK_PUBLISHABLE_KEY=DEV_PUBLISHABLE_KEY,
        MAIL_SERVER=HOST,
        MAIL_PORT=str(smtp_port),
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


def process_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def write_calls(pid: int) -> int:
    """Write system calls the process has made (``syscw`` of /proc/<pid>/io); 0 when unreadable."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("syscw:"):
                return int(line.split()[1])
    return 0


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def established_to(port: int) -> set[int]:
    """Socket inodes of the established TCP connections whose local port is ``port`` (IPv4)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


@dataclass
class CpuProbe:
    """Samples CPU seconds per component: the load generator (wrk, a child of this process), the gunicorn
    workers (each one, and their sum: the app's own CPU), nginx (master and workers, when in front), the
    stand-in, the PostgreSQL backends serving the benchmark database, and the whole machine; how many of the
    app's database connections are in use; and, per gunicorn worker, its write system calls (a proxy for the
    requests it served) and the client connections it held halfway through the window."""

    gunicorn_pid: int
    standin_pid: int
    admin_url: str
    db_name: str
    app_port: int
    nginx_pid: int | None = None
    enabled: bool = field(default_factory=lambda: Path("/proc/stat").exists())

    def observe(self, until: float) -> dict[str, float]:
        """The driver's observer: CPU used per component from now until ``until`` (perf_counter), and the
        database connections in use over that time."""
        before = self.sample()
        middle = time.perf_counter() + (until - time.perf_counter()) / 2
        pool = self.database_connections(middle)
        held = self.connections_per_worker()
        pool_late = self.database_connections(until)
        time.sleep(max(0.0, until - time.perf_counter()))
        after = self.sample()
        return {**self.difference(before, after), **merge_pool(pool, pool_late), **held}

    def workers(self) -> list[int]:
        return sorted(children(self.gunicorn_pid))

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
        nginx = [self.nginx_pid, *children(self.nginx_pid)] if self.nginx_pid else []
        # wrk exits at the end of its run but stays a zombie, CPU times readable, until the driver reaps it.
        clients = [pid for pid in children(os.getpid()) if process_comm(pid) == "wrk"]
        return {
            "client": {pid: process_cpu(pid) for pid in clients},
            "workers": {pid: (process_cpu(pid), write_calls(pid)) for pid in self.workers()},
            "nginx": sum(process_cpu(pid) for pid in nginx),
            "standin": process_cpu(self.standin_pid),
            "postgres": backends,
            "machine": (busy, total),
        }

    def connections_per_worker(self) -> dict[str, float]:
        """Client connections to gunicorn's port held by each worker, now (keep-alive connections stay with
        the worker that accepted them)."""
        if not self.enabled:
            return {}
        established = established_to(self.app_port)
        return {
            f"worker{n}_conns": len(socket_inodes(pid) & established)
            for n, pid in enumerate(self.workers(), start=1)
        }

    def database_connections(self, until: float, every: float = 0.1) -> list[tuple[int, int]]:
        """Sample the app's PostgreSQL connections until ``until`` (perf_counter): (in use, open). In use
        means running a statement or inside a transaction, i.e. checked out of a pool."""
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
        return samples

    @staticmethod
    def difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        """CPU seconds used between two samples, per component, plus ``busy`` (fraction of all CPUs), and
        per gunicorn worker (numbered by pid order) its CPU seconds and write system calls."""
        if not before or not after:
            return {}
        postgres = sum(cpu - before["postgres"].get(pid, 0.0) for pid, cpu in after["postgres"].items())
        client = sum(cpu - before["client"].get(pid, 0.0) for pid, cpu in after["client"].items())
        per_worker = {}
        for n, (pid, (cpu, writes)) in enumerate(sorted(after["workers"].items()), start=1):
            cpu_before, writes_before = before["workers"].get(pid, (0.0, 0))
            per_worker[f"worker{n}_cpu"] = cpu - cpu_before
            per_worker[f"worker{n}_writes"] = writes - writes_before
        busy = after["machine"][0] - before["machine"][0]
        total = after["machine"][1] - before["machine"][1]
        used = {
            "client": client,
            "gunicorn": sum(v for k, v in per_worker.items() if k.endswith("_cpu")),
            "nginx": after["nginx"] - before["nginx"],
            "standin": after["standin"] - before["standin"],
            "postgres": postgres,
        }
        # Everything else that ran: the gunicorn master, PostgreSQL's own background processes, the kernel,
        # this script, and any other work on the machine (on a shared box, other people's test runs), as a
        # fraction of all CPUs.
        other = busy / CLK_TCK - sum(used.values())
        return {
            **used,
            **per_worker,
            "busy": busy / total if total else 0.0,
            "other": max(0.0, other) / (total / CLK_TCK) if total else 0.0,
        }


def merge_pool(*parts: list[tuple[int, int]]) -> dict[str, float]:
    """Mean and max of the app's database connections in use, and the most open, over the samples."""
    samples = [sample for part in parts for sample in part]
    if not samples:
        return {}
    return {
        "db_in_use_mean": sum(busy for busy, _ in samples) / len(samples),
        "db_in_use_max": max(busy for busy, _ in samples),
        "db_connections": max(total for _, total in samples),
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
    route: str = "direct"  # "direct": wrk straight at gunicorn; "nginx": wrk -> nginx -> gunicorn
    ok: int = 0  # expected answers completed inside the measuring window
    requests: int = 0  # all answers completed inside the measuring window
    throughput: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # unexpected statuses / socket errors
    cpu: dict[str, float] = field(default_factory=dict)
    standin: dict[str, Any] = field(default_factory=dict)
    worker_processes: int = 0  # distinct gunicorn workers seen before and after the scenario (Linux only)
    # Verification mails still queued in the workers' couriers when the window closed, the seconds they took
    # to go out, and the workers' CPU seconds meanwhile (``drain_mail``); zeros for other scenarios.
    mail_at_start: int = 0  # mails queued when the window opened: the ramp's registrations'
    mail_backlog: int = 0
    mail_drain_s: float = 0.0
    mail_drain_cpu_s: float = 0.0

    @property
    def mail_cpu_ms(self) -> float:
        """The workers' CPU per mail while only the couriers ran (the drain), in ms; 0 without a drain."""
        return 1000 * self.mail_drain_cpu_s / self.mail_backlog if self.mail_backlog else 0.0

    def record(self, result: Result) -> None:
        self.ok, self.requests, self.throughput = result.ok, result.requests, result.throughput
        self.p50_ms, self.p95_ms = result.p50_ms, result.p95_ms
        self.errors = result.errors
        self.cpu = result.observed

    @property
    def ideal(self) -> float:
        return self.clients / (self.clerk_latency_ms / 1000) if self.clerk_latency_ms else 0.0

    @property
    def app_cpu_ms(self) -> float:
        """The gunicorn workers' CPU per answer served in the window, in ms (nan without /proc), counting
        the CPU their mail couriers spent after the window on the mails still queued then: a registration's
        mail is sent after its answer (iris.mail), and its cost belongs to the registration."""
        if "gunicorn" not in self.cpu or not self.requests:
            return float("nan")
        # The window's CPU includes sending some mails of the ramp's registrations (queued when it opened),
        # and the drain sends the rest of the window's own: charge the window for its own mails only.
        own_mails_ms = self.mail_cpu_ms * (self.mail_backlog - self.mail_at_start)
        return (1000 * self.cpu["gunicorn"] + own_mails_ms) / self.requests

    @property
    def registrations(self) -> int:
        return int(self.standin.get("requests", {}).get("POST /v1/users", 0))

    @property
    def jwks_requests(self) -> int:
        return int(self.standin.get("requests", {}).get(JWKS_ROUTE, 0))

    def per_thousand(self, key: str) -> float:
        count = self.standin.get(key, 0)
        return 1000 * count / self.registrations if self.registrations else float("nan")


# A register request's body: wrk puts a part no other request of the run has in place of UNIQUE.
REGISTRATION = json.dumps({"email": f"bench-{UNIQUE}@iris-bench.example.com", "password": PASSWORD})


def register_account(register_url: str, what: str) -> str:
    """Register one user through the app, with a fresh email ``bench-<what>-...``; its Clerk user id."""
    email = f"bench-{what}-{uuid.uuid4().hex}@iris-bench.example.com"
    answer = requests.post(register_url, json={"email": email, "password": PASSWORD}, timeout=REQUEST_TIMEOUT)
    if answer.status_code != 201:
        raise BenchmarkError(f"registering a bench-{what} user answered {answer.status_code}: {answer.text}")
    return answer.json()["clerk_user_id"]


def mint_tokens(standin_url: str, clerk_user_id: str, count: int) -> list[str]:
    """``count`` Clerk session tokens for the user, one session each, minted through the stand-in's Backend
    API (as ``flask iris token`` does), valid for ``TOKEN_LIFETIME`` s. The app verifies none of them."""
    with requests.Session() as http:
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


def session_tokens(register_url: str, standin_url: str, count: int) -> list[str]:
    """Register one user through the app, then mint ``count`` session tokens for it."""
    return mint_tokens(standin_url, register_account(register_url, "me"), count)


def promote(db_url: str, clerk_user_id: str) -> None:
    """Make the live account with ``clerk_user_id`` an admin: role 'admin', what ``flask iris promote``
    changes in the row (``updated_at`` moves by the table's trigger). The admin listing asks nothing else of
    the caller (``iris.auth.is_admin``: the role; no confirmed address).

    Written directly, not through ``flask iris promote``: the command promotes only an account whose owner
    confirmed the email address, and the benchmark's accounts are unconfirmed (email verification is on; the
    mail goes to a sink). The ``promoted`` audit event the command also records is left out: nothing measured
    reads the audit trail, and the database is thrown away."""
    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
        changed = conn.execute(
            "UPDATE users SET role = 'admin' WHERE clerk_user_id = %s AND deleted_at IS NULL",
            (clerk_user_id,),
        ).rowcount
    if changed != 1:
        raise BenchmarkError(f"promoting {clerk_user_id} changed {changed} rows, not 1")


def listed_accounts(db_url: str) -> int:
    """How many accounts the admin listing shows (complete and live; ``iris.accounts.list_accounts``)."""
    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FROM users WHERE clerk_user_id IS NOT NULL AND deleted_at IS NULL"
        ).fetchone()
    return int(row[0]) if row else 0


def admin_tokens(register_url: str, standin_url: str, db_url: str, count: int) -> tuple[list[str], int]:
    """Register one more user through the app, promote it in the database, and mint ``count`` session tokens
    for it. Registers more users if needed so the listing's first page is full (the warm-up's registrations
    normally fill it many times over). Returns the tokens and the number of accounts listed."""
    clerk_user_id = register_account(register_url, "admin")
    promote(db_url, clerk_user_id)
    for _ in range(LIST_PAGE - listed_accounts(db_url)):
        register_account(register_url, "fill")
    return mint_tokens(standin_url, clerk_user_id, count), listed_accounts(db_url)


def bearer(tokens: list[str]) -> list[dict[str, str]]:
    """Header sets for ``Target.headers``: one ``Authorization: Bearer`` per token, taken in turn."""
    return [{"Authorization": f"Bearer {token}"} for token in tokens]


MAIL_DRAIN_TIMEOUT = 120.0  # seconds; the couriers of 2 workers send hundreds of mails in a few seconds


def queued_mails(db_url: str) -> int:
    """Verification mails committed and not tried yet: what the workers' couriers still hold (iris.mail)."""
    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
        unsent = "SELECT count(*) FROM mail_outbox WHERE sent_at IS NULL AND attempts = 0"
        row = conn.execute(unsent).fetchone()
    return int(row[0]) if row else 0


def drain_mail(db_url: str, probe: CpuProbe) -> tuple[int, float, float]:
    """Wait until the couriers have tried every queued mail: (mails queued when called, seconds taken, the
    gunicorn workers' CPU seconds meanwhile). Raises BenchmarkError after ``MAIL_DRAIN_TIMEOUT``."""
    before, started = probe.sample(), time.perf_counter()
    backlog = left = queued_mails(db_url)
    while left and time.perf_counter() - started < MAIL_DRAIN_TIMEOUT:
        time.sleep(0.05)
        left = queued_mails(db_url)
    if left:
        raise BenchmarkError(f"{left} of {backlog} mails still queued after {MAIL_DRAIN_TIMEOUT:g} s")
    seconds = time.perf_counter() - started
    cpu = probe.difference(before, probe.sample()).get("gunicorn", 0.0) if probe.enabled else 0.0
    return backlog, seconds, cpu


def measure(
    args: argparse.Namespace,
    route: str,
    app_url: str,
    standin_url: str,
    db_url: str,
    control: StandinControl,
    probe: CpuProbe,
) -> list[Scenario]:
    register_url = app_url + "/api/v1/auth/register"
    healthz = Target("GET", app_url + "/healthz", 200)
    register = Target("POST", register_url, 201, body=REGISTRATION)

    # Warm-up: imports, thread pools, database pools and Clerk keep-alive sessions in every thread. Not
    # users/me: no token is verified before its scenario, so each worker's first JWKS fetch is counted.
    warm_clients = max([args.ratio_clients, *args.slow_clients])
    print(f"[{route}] warm-up: {args.warmup:g} s, {warm_clients} connections", flush=True)
    control.reset()
    for target in (healthz, register):
        bad = drive(target, warm_clients, 0, max(1, args.warmup // 2)).errors
        if bad:
            print(f"  warm-up saw unexpected answers: {bad}", flush=True)

    # Session tokens for the users/me requests, taken in turn. They are JWTs: the stand-in's reset before each
    # scenario (which forgets its users and sessions but keeps its signing key) does not invalidate them.
    tokens = session_tokens(register_url, standin_url, args.ratio_clients)
    users_me = Target("GET", app_url + "/api/v1/users/me", 200, headers=bearer(tokens))
    # The same for an admin, for the admin list. Minted, not verified: users/me's JWKS count stays cold.
    tokens, listed = admin_tokens(register_url, standin_url, db_url, args.ratio_clients)
    admin_list = Target("GET", app_url + ADMIN_LIST_PATH, 200, headers=bearer(tokens))
    print(f"[{route}] admin list: {listed} accounts listed, pages of {LIST_PAGE}", flush=True)

    def scenario(name: str, path: str, expected: int, clients: int, duration: float, latency: int = 0):
        return Scenario(name, path, expected, clients, duration, latency, route)

    register_path = "/api/v1/auth/register"
    plan = [
        scenario("healthz", "/healthz", 200, args.ratio_clients, args.duration),
        # Right after healthz, with the same connections and duration: the two are divided.
        scenario("users/me, Bearer", "/api/v1/users/me", 200, args.ratio_clients, args.duration),
        # After users/me (so no token is verified before it), the same connections and duration: the first
        # page of the admin listing, a full one. Reported with its ratios to healthz; no target.
        scenario("admin list, Bearer", ADMIN_LIST_PATH, 200, args.ratio_clients, args.duration),
        # One connection, no contention: the time a registration takes end to end (a diagnostic, no target).
        scenario("register, Clerk 0 ms", register_path, 201, 1, min(args.duration, 3)),
        *(
            scenario("register, Clerk 0 ms", register_path, 201, clients, args.duration)
            for clients in args.slow_clients
        ),
        *(
            scenario(
                f"register, Clerk {CLERK_LATENCY_MS} ms", register_path, 201, clients, args.duration, lat
            )
            for clients in args.slow_clients
            for lat in [CLERK_LATENCY_MS]
        ),
    ]
    targets = {
        "/healthz": healthz,
        "/api/v1/users/me": users_me,
        ADMIN_LIST_PATH: admin_list,
        register_path: register,
    }
    for item in plan:
        print(
            f"[{route}] {item.name}, {item.clients} connections: {args.ramp:g} s + {item.duration:g} s",
            flush=True,
        )
        # No scenario starts while mails of an earlier one are still being sent: their CPU is not its own.
        drain_mail(db_url, probe)
        control.reset()  # also forgets the stand-in's users and sessions; emails are unique anyway
        if item.clerk_latency_ms:
            control.add_fault(method="POST", path="/v1/users", latency_ms=item.clerk_latency_ms)
        workers_before = set(probe.workers()) if probe.enabled else set()
        observe = probe.observe
        if item.path == register_path:

            def observe(until: float, item: Scenario = item) -> dict[str, float]:
                item.mail_at_start = queued_mails(db_url)
                return probe.observe(until)

        item.record(drive(targets[item.path], item.clients, args.ramp, item.duration, observe))
        item.standin = control.stats()
        if item.path == register_path:
            item.mail_backlog, item.mail_drain_s, item.mail_drain_cpu_s = drain_mail(db_url, probe)
        if probe.enabled:
            item.worker_processes = len(workers_before | set(probe.workers()))
    return plan


# --------------------------------------------------------------------------- servers


def gunicorn_settings(env: dict[str, str]) -> tuple[int, int]:
    """(workers, threads) that gunicorn.conf.py sets in ``env``."""
    code = (
        "import json, runpy; c = runpy.run_path('gunicorn.conf.py');"
        " print(json.dumps([c['workers'], c['threads']]))"
    )
    answer = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    if answer.returncode != 0:
        raise BenchmarkError("reading gunicorn.conf.py failed:\n" + answer.stderr)
    workers, threads = json.loads(answer.stdout)
    return int(workers), int(threads)


@contextlib.contextmanager
def gunicorn_server(env: dict[str, str], log: IO[bytes], workers: int) -> Iterator[tuple[int, int]]:
    """gunicorn with the repository's gunicorn.conf.py (production settings), bound to a free loopback port
    through GUNICORN_BIND; yields (master pid, port) once every worker answers."""
    port = free_port()
    command = [str(BIN / "gunicorn"), "--config", str(GUNICORN_CONF), "wsgi:app"]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**env, "GUNICORN_BIND": f"{HOST}:{port}"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://{HOST}:{port}/healthz", process, log, "gunicorn", 30)
        deadline = time.monotonic() + 30
        while len(children(process.pid)) < workers:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"gunicorn did not start {workers} workers:\n{tail(log)}")
            time.sleep(0.1)
        yield process.pid, port
    finally:
        stop(process)


def nginx_config(directory: Path, listen_port: int, upstream_port: int) -> str:
    """A private nginx configuration: the deploy/ site's upstream (keep-alive to gunicorn) and its
    ``location /`` (the same proxy settings), served over plain HTTP on ``listen_port``. Main settings as
    Debian's nginx.conf ships them (worker_processes auto, 768 connections per worker, an access log)."""
    site = NGINX_SITE.read_text()
    upstream = re.findall(r"^upstream iris_app \{\n.*?^\}\n", site, re.MULTILINE | re.DOTALL)
    location = re.findall(r"^    location / \{\n.*?^    \}\n", site, re.MULTILINE | re.DOTALL)
    if len(upstream) != 1 or len(location) != 1 or upstream[0].count("server 127.0.0.1:8000;") != 1:
        raise BenchmarkError(f"{NGINX_SITE} should have one `upstream iris_app` and one `location /`")
    upstream_block = upstream[0].replace("server 127.0.0.1:8000;", f"server {HOST}:{upstream_port};")
    return f"""daemon off;
worker_processes auto;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log notice;
events {{ worker_connections 768; }}
http {{
    sendfile on;
    tcp_nopush on;
    access_log {directory}/nginx-access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
{upstream_block}
    server {{
        listen {HOST}:{listen_port};
        client_max_body_size 1m;
{location[0]}    }}
}}
"""


@contextlib.contextmanager
def nginx_server(directory: Path, upstream_port: int) -> Iterator[tuple[int, int]]:
    """nginx in the foreground on a private prefix in front of gunicorn; yields (master pid, port)."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if binary is None:
        raise BenchmarkError("nginx is not installed (apt-get install -y nginx)")
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(nginx_config(directory, port, upstream_port))
    command = [binary, "-p", f"{directory}/", "-c", str(config), "-e", f"{directory}/nginx-error.log"]
    with open(directory / "nginx-output.log", "w+b") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(f"http://{HOST}:{port}/healthz", process, log, "nginx", 20)
            yield process.pid, port
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGQUIT)  # graceful shutdown
            stop(process)


def run_scenarios(args: argparse.Namespace) -> tuple[list[Scenario], list[str]]:
    """Set up the database and the stand-in; for each route (straight at gunicorn, through nginx) start a
    fresh gunicorn (and nginx), run every scenario, stop them; tear it all down. Returns the scenarios and the
    lines gunicorn and the app logged above INFO. Sets ``args.gunicorn_command``, ``args.workers`` and
    ``args.threads`` (what gunicorn.conf.py made of them) and ``args.nginx_config``."""
    standin: subprocess.Popen[bytes] | None = None
    smtp: subprocess.Popen[bytes] | None = None
    scenarios: list[Scenario] = []
    logged: list[str] = []
    with (
        tempfile.TemporaryFile() as standin_log,
        tempfile.TemporaryDirectory(prefix="iris_bench_") as scratch,
        throwaway_database(args.pg_url) as db_name,
    ):
        try:
            standin_port, smtp_port = free_port(), free_port()
            standin_url, db_url = f"http://{HOST}:{standin_port}", database_url(args.pg_url, db_name)
            env = app_environment(standin_url, db_url, smtp_port)
            env["IRIS_EMAIL_VERIFICATION"] = args.email_verification
            if args.workers is not None:
                env["WEB_CONCURRENCY"] = str(args.workers)
            if args.threads is not None:
                env["GUNICORN_THREADS"] = str(args.threads)
            args.workers, args.threads = gunicorn_settings(env)
            print(f"database {db_name}: migrating", flush=True)
            migrate_database(env)
            standin = start_standin(standin_port, standin_log)
            smtp = start_smtp_sink(smtp_port, standin_log)
            control = StandinControl(standin_url)
            overrides = " ".join(
                f"{name}={env[name]}" for name in ("WEB_CONCURRENCY", "GUNICORN_THREADS") if name in env
            )
            args.gunicorn_command = (
                f"IRIS_EMAIL_VERIFICATION={args.email_verification} {overrides + ' ' if overrides else ''}"
                f"GUNICORN_BIND={HOST}:<port>"
                " gunicorn --config gunicorn.conf.py wsgi:app"
            )
            print(args.gunicorn_command, flush=True)
            for route in args.routes:
                # A fresh gunicorn per route: each route starts with cold JWKS caches (so its fetches are
                # counted), and behind nginx the app trusts one proxy hop, as in production.
                route_env = {**env, "IRIS_PROXY_HOPS": "1"} if route == "nginx" else env
                with (
                    tempfile.TemporaryFile() as gunicorn_log,
                    gunicorn_server(route_env, gunicorn_log, args.workers) as (gunicorn_pid, app_port),
                    contextlib.ExitStack() as stack,
                ):
                    url, nginx_pid = f"http://{HOST}:{app_port}", None
                    if route == "nginx":
                        directory = Path(scratch) / "nginx"
                        directory.mkdir(exist_ok=True)
                        nginx_pid, nginx_port = stack.enter_context(nginx_server(directory, app_port))
                        url = f"http://{HOST}:{nginx_port}"
                        args.nginx_config = (directory / "nginx.conf").read_text()
                    probe = CpuProbe(gunicorn_pid, standin.pid, args.pg_url, db_name, app_port, nginx_pid)
                    scenarios += measure(args, route, url, standin_url, db_url, control, probe)
                    stack.close()
                    logged += [f"[{route}] {line}" for line in notable_lines(gunicorn_log)]
        finally:
            stop(smtp)
            stop(standin)
        print(f"database {db_name}: dropped", flush=True)
    return scenarios, logged
