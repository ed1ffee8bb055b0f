"""Machinery for tests/test_drills.py: a private PgBouncer, a private PostgreSQL cluster, the app served by
gunicorn in its own process, and a load driver.

Every server is started by the drill that needs it, on a free loopback port, from a temporary directory, and
stopped and removed again afterwards, whatever happened. Nothing here touches the shared PostgreSQL server
except through the database a drill creates (and drops) for itself.

PgBouncer and PostgreSQL refuse to run as root. When the tests run as root (as in CI), both run as the
``postgres`` system user: PgBouncer through its ``user`` setting, initdb and pg_ctl through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self

import psycopg
import requests
import sqlalchemy as sa

from tests import drill_app
from tests.helpers import ME, PASSWORD, URL, free_port, unavailable

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE_USER = "postgres"  # the system user the servers run as when the tests run as root
READYZ = "/readyz"


# ------------------------------------------------------------------------------------------ environment


def find_tool(name: str, package: str) -> str:
    """The path of ``name``: on PATH, else in the newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found is None:
        candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
        candidates.sort(key=lambda path: int(re.sub(r"\D", "", path.split("/")[4]) or 0), reverse=True)
        found = candidates[0] if candidates else None
    if found is None:
        unavailable(f"{name} not found: install the Debian package {package}")
    return found


def service_user() -> str | None:
    """The user the servers must run as: None when we are not root, else ``postgres`` (which must exist)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        unavailable(f"running as root, and there is no {SERVICE_USER!r} user to run PgBouncer/PostgreSQL as")
    if shutil.which("runuser") is None:
        unavailable("running as root, and runuser (util-linux) is missing")
    return SERVICE_USER


def private_directory(prefix: str, owner: str | None) -> str:
    """A fresh directory under the system temp dir, owned by ``owner`` (when given), mode 0700."""
    path = tempfile.mkdtemp(prefix=prefix)
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def libpq_url(url: sa.URL) -> str:
    """A SQLAlchemy URL as a libpq connection string for psycopg.connect."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def scratch_database(admin_engine: sa.Engine) -> Iterator[sa.URL]:
    """A new, empty database on ``admin_engine``'s server (the role needs CREATEDB); its URL.

    For tests that go through PgBouncer, which refuses the per-test schemas' ``options=-csearch_path=...``
    startup parameter. Dropped afterwards (WITH FORCE: even with connections left open), whatever happened.
    """
    name = f"iris_drill_{uuid.uuid4().hex[:10]}"
    with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_engine.url.set(database=name)
    finally:
        with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def read_text(path: str) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as handle:
        return handle.read()


def end_process(process: subprocess.Popen | None, timeout: float) -> None:
    """Terminate a process this module started (by its pid), killing it if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class ServerProcess:
    """A server a drill runs as a child process from its own temporary directory, logging to a file there.

    Subclasses set ``log_name`` and ``stop_timeout`` and write ``start()``, which calls ``_launch``. Used as a
    context manager it is started on entry, and stopped and its directory removed on exit, whatever happened.
    """

    log_name = "server.log"
    stop_timeout = 10.0

    def __init__(self) -> None:
        self.directory = ""
        self.process: subprocess.Popen | None = None
        self._log_file: Any = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, self.log_name) if self.directory else ""

    def log_text(self) -> str:
        return read_text(self.log_path)

    def start(self) -> None:
        raise NotImplementedError

    def _launch(self, command: list[str], **popen: Any) -> None:
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, **popen)

    def stop(self) -> None:
        end_process(self.process, timeout=self.stop_timeout)
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)


# ------------------------------------------------------------------------------------------ PgBouncer


class PgBouncer(ServerProcess):
    """A private PgBouncer in transaction mode in front of one database, as Neon's pooler runs it.

    ``pool_size`` is PgBouncer's ``default_pool_size``: the number of server connections shared by all
    clients. PgBouncer before 1.21 has no ``max_prepared_statements`` at all (it never tracks prepared
    statements, which is what Neon's strictest setting, ``max_prepared_statements=0``, means); from 1.21 on
    it is set to 0 explicitly, since 1.24 defaults to 200.
    """

    log_name = "pgbouncer.log"

    def __init__(self, server: sa.URL, dbname: str, *, pool_size: int) -> None:
        super().__init__()
        self.binary = find_tool("pgbouncer", "pgbouncer")
        self.owner = service_user()
        self.server = server
        self.user = server.username or SERVICE_USER
        self.dbname = dbname
        self.pool_size = pool_size
        self.port = free_port()
        self.version_text = subprocess.run(
            [self.binary, "--version"], check=True, capture_output=True, text=True
        ).stdout.splitlines()[0]
        self.version = tuple(int(part) for part in re.findall(r"\d+", self.version_text)[:2])

    def url(self, base: sa.URL) -> sa.URL:
        """``base`` (driver, user) pointed at the pooler."""
        return base.set(host="127.0.0.1", port=self.port, database=self.dbname, password=None)

    def config(self) -> str:
        target = f"host={self.server.host or '127.0.0.1'} port={self.server.port or 5432}"
        target += f" dbname={self.dbname} user={self.user}"
        if self.server.password:
            target += f" password={self.server.password}"
        lines = [
            "[databases]",
            f"{self.dbname} = {target}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {os.path.join(self.directory, 'userlist.txt')}",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            "max_client_conn = 200",
            f"admin_users = {self.user}",
            "log_connections = 0",
            "log_disconnections = 0",
        ]
        if self.version >= (1, 21):
            lines.append("max_prepared_statements = 0")
        if self.owner is not None:
            lines.append(f"user = {self.owner}")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.directory = private_directory("iris-drill-pgbouncer-", self.owner)
        with open(os.path.join(self.directory, "userlist.txt"), "w") as handle:
            handle.write(f'"{self.user}" ""\n')
        ini = os.path.join(self.directory, "pgbouncer.ini")
        with open(ini, "w") as handle:
            handle.write(self.config())
        self._launch([self.binary, ini], cwd=self.directory)
        wait_until(self._answers, 15, f"PgBouncer on port {self.port}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"PgBouncer exited with {self.process.returncode}:\n{self.log_text()}")
        try:
            self.show("SHOW VERSION")
        except psycopg.OperationalError:
            return False
        return True

    def show(self, command: str) -> list[dict[str, Any]]:
        """Rows of an admin console command (``SHOW STATS``, ``SHOW SERVERS``, ...), as dicts."""
        dsn = f"host=127.0.0.1 port={self.port} dbname=pgbouncer user={self.user}"
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
            cursor = connection.execute(command)
            names = [column.name for column in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


# ------------------------------------------------------------------------------------------ PostgreSQL


class PrivateCluster:
    """A throwaway PostgreSQL cluster (initdb) on a free loopback port, trust auth, superuser ``postgres``.

    Used as a context manager it is created and started on entry, and stopped (fast, else immediate) and
    removed on exit, even when the drill failed.
    """

    def __init__(self) -> None:
        self.initdb = find_tool("initdb", "postgresql (the server)")
        self.pg_ctl = find_tool("pg_ctl", "postgresql (the server)")
        self.owner = service_user()
        self.port = free_port()
        self.directory = ""

    @property
    def data(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "postgresql.log") if self.directory else ""

    def url(self, database: str = "postgres") -> sa.URL:
        return sa.URL.create(
            "postgresql+psycopg", username="postgres", host="127.0.0.1", port=self.port, database=database
        )

    def _command(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.owner, "--"] if self.owner is not None else []
        return [*prefix, *args]

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            self._command(*args), capture_output=True, text=True, cwd=self.directory, timeout=90
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{os.path.basename(args[0])} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{self.log_text()[-4000:]}"
            )

    def create(self) -> None:
        self.directory = private_directory("iris-drill-postgres-", self.owner)
        self._run(self.initdb, "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.directory}"
            " -c fsync=off -c max_connections=40"
        )
        self._run(self.pg_ctl, "-D", self.data, "-l", self.log_path, "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        if not self.directory or not os.path.exists(os.path.join(self.data, "postmaster.pid")):
            return False
        status = subprocess.run(
            self._command(self.pg_ctl, "-D", self.data, "status"), capture_output=True, cwd=self.directory
        )
        return status.returncode == 0

    def create_database(self, name: str) -> None:
        with psycopg.connect(libpq_url(self.url()), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')

    def log_text(self) -> str:
        return read_text(self.log_path)

    def destroy(self) -> None:
        try:
            if self.running():
                try:
                    self.stop("fast")
                except (AssertionError, subprocess.TimeoutExpired):
                    self.stop("immediate")
        finally:
            if self.directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.create()
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()


# ------------------------------------------------------------------------------------------ the app


class AppServer(ServerProcess):
    """The app in its own process under gunicorn (one gthread worker), as production serves it.

    Built by ``tests.drill_app:create()`` from ``database_url`` and ``clerk_api_url``. Its stdout and stderr
    (gunicorn's log and the app's WARNING+ records, see ``tests.drill_app``) go to a file: ``log_text()``.
    """

    log_name = "app.log"
    stop_timeout = 20.0

    def __init__(self, database_url: sa.URL, clerk_api_url: str, *, threads: int) -> None:
        super().__init__()
        self.database_url = database_url
        self.clerk_api_url = clerk_api_url
        self.threads = threads
        self.port = free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="iris-drill-app-")
        env = {
            **os.environ,
            drill_app.DATABASE_URL_VARIABLE: self.database_url.render_as_string(hide_password=False),
            drill_app.CLERK_URL_VARIABLE: self.clerk_api_url,
        }
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            os.devnull,  # not a gunicorn.conf.py that may turn up in the working directory
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            str(self.threads),
            "--graceful-timeout",
            "5",
            "tests.drill_app:create()",
        ]
        self._launch(command, cwd=REPOSITORY, env=env)
        wait_until(self._answers, 60, f"the app on port {self.port}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the app server exited with {self.process.returncode}:\n{self.log_text()}")
        try:
            return requests.get(self.base_url + "/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False


def app_log_records(text: str) -> list[str]:
    """The log records in an ``AppServer`` log, each with its traceback: the app's own (WARNING and up, as
    ``LEVEL logger: message``) and gunicorn's errors (as ``ERROR gunicorn: ...``)."""
    records: list[str] = []
    in_record = False
    for line in text.splitlines():
        gunicorn = re.match(r"\[[^]]*\] \[\d+\] \[(ERROR|CRITICAL)\] (.*)", line)
        if line.startswith(drill_app.LOG_PREFIX + " "):
            records.append(line[len(drill_app.LOG_PREFIX) + 1 :])
            in_record = True
        elif gunicorn:
            records.append(f"{gunicorn.group(1)} gunicorn: {gunicorn.group(2)}")
            in_record = True
        elif line.startswith("["):  # gunicorn's other lines
            in_record = False
        elif in_record:  # a traceback line belongs to the record before it
            records[-1] += "\n" + line
    return records


# ------------------------------------------------------------------------------------------ load


@dataclass
class Outcome:
    """One request a client thread made: what, when (time.monotonic), and how it ended."""

    kind: str  # "register", "readyz" or "me"
    started: float
    ended: float
    status: int | None  # None: no HTTP answer (timeout, refused, reset)
    code: str | None = None  # the error envelope's code
    body: Any = None
    email: str | None = None
    error: str | None = None  # the client-side exception, when there was no answer
    token: str | None = None  # the session token sent, if any
    request_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in (200, 201)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Driver:
    """Client threads driving the app over real HTTP, recording every request's ``Outcome``.

    Each thread repeats: register a new, unique email; GET /readyz; GET /api/v1/users/me with one of
    ``tokens`` (when given). ``registrations`` bounds each thread's rounds; ``stop()`` ends them earlier.
    """

    def __init__(
        self,
        base_url: str,
        *,
        threads: int,
        registrations: int,
        tokens: list[str] | None = None,
        timeout: tuple[float, float] = (5.0, 30.0),
    ) -> None:
        self.base_url = base_url
        self.threads = threads
        self.registrations = registrations
        self.tokens = tokens or []
        self.timeout = timeout
        self.tag = uuid.uuid4().hex[:8]
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.workers: list[threading.Thread] = []
        self.crashes: list[str] = []
        self.started_at = 0.0
        self.finished_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.workers = [
            threading.Thread(target=self._work, args=(n,), name=f"drill-client-{n}", daemon=True)
            for n in range(self.threads)
        ]
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        self.stopping.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        alive = [worker.name for worker in self.workers if worker.is_alive()]
        self.finished_at = time.monotonic()
        assert not alive, f"client threads still running after {timeout:.0f} s: {alive}"

    def run(self, timeout: float) -> None:
        """Start, and wait until every thread has done its registrations."""
        self.start()
        self.join(timeout)

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)

    def _work(self, n: int) -> None:
        try:
            with requests.Session() as session:
                for i in range(self.registrations):
                    if self.stopping.is_set():
                        return
                    email = f"drill-{self.tag}-{n}-{i}@drill.example"
                    self._request(session, "register", "POST", URL, email=email)
                    self._request(session, "readyz", "GET", READYZ)
                    if self.tokens:
                        token = self.tokens[(n + i) % len(self.tokens)]
                        self._request(session, "me", "GET", ME, token=token)
        except Exception as error:  # a bug in the driver must fail the drill, not vanish with its thread
            self.crashes.append(f"{type(error).__name__}: {error}")

    def _request(
        self, session: requests.Session, kind: str, method: str, path: str, *, email=None, token=None
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        payload = {"email": email, "password": PASSWORD} if email else None
        started = time.monotonic()
        try:
            response = session.request(
                method, self.base_url + path, json=payload, headers=headers, timeout=self.timeout
            )
        except requests.RequestException as error:
            outcome = Outcome(
                kind, started, time.monotonic(), None, email=email, error=repr(error), token=token
            )
        else:
            ended = time.monotonic()
            try:
                body = response.json()
            except ValueError:
                body = response.text
            code = None
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                code = body["error"].get("code")
            outcome = Outcome(
                kind,
                started,
                ended,
                response.status_code,
                code,
                body,
                email,
                token=token,
                request_id=response.headers.get("X-Request-ID"),
            )
        with self.lock:
            self.outcomes.append(outcome)


def label(outcome: Outcome) -> str:
    """``"201"``, ``"503 database_unavailable"`` (status and error code), or ``"no answer"``."""
    if outcome.status is None:
        return "no answer"
    return str(outcome.status) + (f" {outcome.code}" if outcome.code else "")


def status_counts(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """``{kind: {label: count}}``, e.g. ``{"register": {"201": 250, "503 database_unavailable": 12}}``."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        per_kind = counts.setdefault(outcome.kind, {})
        per_kind[label(outcome)] = per_kind.get(label(outcome), 0) + 1
    return counts


# ------------------------------------------------------------------------------------------ Clerk


def clerk_users(standin_api_url: str, secret_key: str) -> list[dict[str, Any]]:
    """Every user the stand-in holds, paged over its Backend API as any Clerk client would."""
    users: list[dict[str, Any]] = []
    with requests.Session() as session:
        for page in range(1000):
            response = session.get(
                standin_api_url + "/users",
                params={"limit": 500, "offset": page * 500, "order_by": "created_at"},
                headers={"Authorization": f"Bearer {secret_key}"},
                timeout=30,
            )
            response.raise_for_status()
            batch = response.json()
            users.extend(batch)
            if len(batch) < 500:
                return users
    raise AssertionError("the stand-in holds more than 500,000 users")


def create_clerk_user(standin_api_url: str, secret_key: str, email: str, external_id: str) -> str:
    """Create a user at the stand-in (as a registration that died after Clerk answered would have)."""
    response = requests.post(
        standin_api_url + "/users",
        json={"email_address": [email], "password": PASSWORD, "external_id": external_id},
        headers={"Authorization": f"Bearer {secret_key}"},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()["id"]
