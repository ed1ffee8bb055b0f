"""Production deployment: gunicorn.conf.py, and deploy/nginx-iris.conf in front of gunicorn.

What the app saw is read from its own JSON request log line (``remote_addr``, ``scheme``), found by the
request id each request sends. Behind a real nginx running the example site (TLS terminated with a
certificate made here), with clients bound to 127.0.0.2 and 127.0.0.3:
- the app sees the client's address as nginx saw it, and https with HSTS over TLS; http and no HSTS on the
  plain listener;
- a forged X-Forwarded-For or X-Forwarded-Proto from the client changes nothing;
- controls: a client that reaches gunicorn directly, or an app that trusts one hop too many, is fooled by
  the same forged header (why gunicorn binds loopback and IRIS_PROXY_HOPS must be exact).
Also: gunicorn.conf.py loads with its environment overrides, its timeouts cover the worst-case registration,
and with preload_app each worker starts with an empty database pool.

Needs Debian's nginx (`apt-get install nginx`; IRIS_NGINX names another binary). Without it the nginx tests
skip with that reason on a developer's machine and fail in CI (CI set), where .ci/run installs it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import runpy
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from iris import clerk, create_app, security
from iris.extensions import db
from tests.conftest import TEST_DATABASE_URL, make_test_app, migrate
from tests.test_register_api import PASSWORD, URL
from tests.tls import self_signed_certificate

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
NGINX_SITE = ROOT / "deploy" / "nginx-iris.conf"
# Debian installs it in /usr/sbin, which is not on every user's PATH.
NGINX = (
    shutil.which(os.environ["IRIS_NGINX"])
    if os.environ.get("IRIS_NGINX")
    else shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
)

CLIENT = "127.0.0.2"  # the client's source address over TLS
OTHER_CLIENT = "127.0.0.3"  # ... and over plain http
FORGED = "6.6.6.6"
STARTUP_SECONDS = 30
# Settings the tests choose themselves; a developer's shell must not leak in.
OWN_VARIABLES = (
    "FLASK_DEBUG",
    "GUNICORN_CMD_ARGS",
    "GUNICORN_BIND",
    "PORT",
    "WEB_CONCURRENCY",
    "GUNICORN_THREADS",
    "GUNICORN_PRELOAD",
    "GUNICORN_MAX_REQUESTS",
    "FORWARDED_ALLOW_IPS",
    "IRIS_PROXY_HOPS",
    "RATELIMIT_STORAGE_URI",
)


# --- gunicorn.conf.py ------------------------------------------------------------------------------------


def effective_config(**variables: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """``gunicorn --print-config -c gunicorn.conf.py wsgi:app`` (loads the app too) with ``variables`` set."""
    env = {name: value for name, value in os.environ.items() if name not in OWN_VARIABLES}
    env.update(
        DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",  # read, never connected to
        FLASK_SECRET_KEY="test",
        CLERK_SECRET_KEY="sk_test_unused",
        **variables,
    )
    finished = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--print-config", "-c", str(GUNICORN_CONF), "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    settings = dict(re.findall(r"^(\w+) += (.*)$", finished.stdout, re.MULTILINE))
    return finished, settings


def test_gunicorn_loads_the_config_file_and_the_app_with_environment_overrides():
    finished, settings = effective_config(
        WEB_CONCURRENCY="3", GUNICORN_THREADS="12", PORT="9123", GUNICORN_PRELOAD="true",
        GUNICORN_MAX_REQUESTS="1000",
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert settings["workers"] == "3"
    assert settings["threads"] == "12"
    assert settings["bind"] == "['127.0.0.1:9123']"  # gunicorn's own default for PORT would be 0.0.0.0
    assert settings["preload_app"] == "True"
    assert (settings["max_requests"], settings["max_requests_jitter"]) == ("1000", "100")
    assert settings["worker_class"] == "gthread"
    assert settings["graceful_timeout"] == "100"
    assert settings["keepalive"] == "5"
    assert settings["forwarded_allow_ips"] == "['127.0.0.1', '::1']"
    assert settings["secure_scheme_headers"] == "{'X-FORWARDED-PROTO': 'https'}"
    assert settings["accesslog"] == "None"
    assert settings["post_fork"] == "<post_fork()>"
    assert settings["control_socket_disable"] == "True"


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (
            {},
            {"workers": 2, "threads": 8, "bind": ["127.0.0.1:8000"], "preload_app": False, "max_requests": 0},
        ),
        ({"PORT": "9123"}, {"bind": ["127.0.0.1:9123"]}),
        (
            {"GUNICORN_BIND": "unix:/run/iris/gunicorn.sock, 127.0.0.1:8001", "PORT": "9123"},
            {"bind": ["unix:/run/iris/gunicorn.sock", "127.0.0.1:8001"]},
        ),
        ({"GUNICORN_PRELOAD": "off"}, {"preload_app": False}),
    ],
    ids=["defaults", "port", "gunicorn-bind-beats-port", "preload-off"],
)
def test_config_defaults_and_overrides(monkeypatch, variables, expected):
    for name in OWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = runpy.run_path(str(GUNICORN_CONF))
    for name, value in expected.items():
        assert settings[name] == value, name


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GUNICORN_THREADS", "eight", "GUNICORN_THREADS must be a whole number, not 'eight'"),
        ("WEB_CONCURRENCY", "0", "WEB_CONCURRENCY must be at least 1, not 0"),
        ("GUNICORN_PRELOAD", "maybe", "GUNICORN_PRELOAD must be 1/true/yes/on or 0/false/no/off"),
    ],
)
def test_a_bad_environment_value_stops_gunicorn_with_a_clear_message(variable, value, message):
    finished, _ = effective_config(**{variable: value})
    assert finished.returncode != 0
    assert message in finished.stderr


def test_timeouts_cover_the_worst_case_registration(monkeypatch):
    """graceful_timeout and nginx's proxy_read_timeout cover seven Clerk calls, each at its longest: a failed
    connect retried once, then the read timeout (iris/clerk.py). keepalive outlasts nginx's idle upstream
    connections, so nginx always closes them first."""
    for name in OWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    settings = runpy.run_path(str(GUNICORN_CONF))
    connect, read = clerk.DEFAULT_TIMEOUT
    one_call = connect * (1 + clerk.RETRIES.connect) + read
    # stale undo (find, delete), create, stray removal (find, delete), create again, lost-answer find
    worst_registration = 7 * one_call
    assert worst_registration == pytest.approx(98.7)
    assert settings["graceful_timeout"] >= worst_registration

    site = NGINX_SITE.read_text()
    assert nginx_seconds(site, "proxy_read_timeout") >= worst_registration
    assert nginx_seconds(site, "keepalive_timeout") < settings["keepalive"]


def nginx_seconds(site: str, directive: str) -> int:
    values = re.findall(rf"^\s*{directive} (\d+)s;", site, re.MULTILINE)
    assert len(values) == 1, f"one {directive} in {NGINX_SITE.name}"
    return int(values[0])


# --- gunicorn processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def app_environment(schema: str, standin, **variables: str) -> dict[str, str]:
    """The production environment for gunicorn, against ``schema`` of the test database and the stand-in."""
    url = sa.make_url(TEST_DATABASE_URL).set(
        drivername="postgresql", query={"options": f"-csearch_path={schema}"}
    )
    env = {name: value for name, value in os.environ.items() if name not in OWN_VARIABLES}
    env.update(
        DATABASE_URL=url.render_as_string(hide_password=False),
        FLASK_SECRET_KEY="test",
        CLERK_SECRET_KEY=standin.secret_key,
        CLERK_API_URL=standin.base_url,
        GUNICORN_BIND="127.0.0.1:0",
        PYTHONUNBUFFERED="1",
        **variables,
    )
    return env


class Gunicorn:
    """``gunicorn -c <config> <app>`` in its own process; its stderr and stdout go to a file."""

    def __init__(
        self, directory: Path, env: dict[str, str], *, app: str = "wsgi:app", config: Path = GUNICORN_CONF
    ):
        self.log_path = directory / f"gunicorn-{uuid.uuid4().hex[:6]}.log"
        self.command = [sys.executable, "-m", "gunicorn", "-c", str(config), app]
        self.env = env
        self.workers = int(env.get("WEB_CONCURRENCY", "2"))
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> Gunicorn:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            while time.monotonic() < deadline:
                text = self.text()
                found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
                if found and text.count("Booting worker") >= self.workers:
                    self.port = int(found.group(1))
                    if self._answers():
                        return self
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
            raise AssertionError("gunicorn did not start:\n" + self.text())
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _answers(self) -> bool:
        """A worker has loaded the app (without preload, workers boot before they import it)."""
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # graceful, as a deploy stops it
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON lines the app wrote (gunicorn's own lines are plain text)."""
        records = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records

    def request_line(self, request_id: str) -> dict[str, Any]:
        """The app's request log line for ``request_id`` (written before the response left)."""
        deadline = time.monotonic() + 5
        while True:
            for record in self.records():
                if record.get("logger") == "iris.request" and record.get("request_id") == request_id:
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no request log line for {request_id}:\n{self.text()[-4000:]}")
            time.sleep(0.05)


# --- nginx -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    if NGINX is None:
        message = "nginx not installed (apt-get install nginx; IRIS_NGINX names another binary)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: it is required in CI, where .ci/run should install it")
        pytest.skip(message)
    return NGINX


def write_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for https://127.0.0.1 and its key, as files in ``directory``."""
    certificate, key = self_signed_certificate(dns_names=(), ca=False)
    certificate_path, key_path = directory / "tls.crt", directory / "tls.key"
    certificate_path.write_bytes(certificate)
    key_path.write_bytes(key)
    return certificate_path, key_path


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{NGINX_SITE.name} should contain {old!r} once; update this test with it"
    return text.replace(old, new)


def site_for_test(upstream_port: int, ports: dict[str, int], certificate: Path, key: Path) -> str:
    """deploy/nginx-iris.conf with loopback test ports and the test certificate, nothing else changed."""
    site = NGINX_SITE.read_text()
    site = replace_once(site, "server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    site = replace_once(site, "listen 80;", f"listen 127.0.0.1:{ports['redirect']};")
    site = replace_once(site, "listen 443 ssl;", f"listen 127.0.0.1:{ports['tls']} ssl;")
    site = replace_once(site, "listen [::]:80;", "")
    site = replace_once(site, "listen [::]:443 ssl;", "")
    live = "/etc/letsencrypt/live/accounts.example.com/"
    site = replace_once(site, live + "fullchain.pem", str(certificate))
    return replace_once(site, live + "privkey.pem", str(key))


def nginx_config(directory: Path, site_path: Path, plain_port: int) -> str:
    """A private main configuration: the site, plus a test-only plain-http listener with the site's own
    ``location /``, to show what the app sees without TLS."""
    site = NGINX_SITE.read_text()
    locations = re.findall(r"^    location / \{\n.*?^    \}\n", site, re.MULTILINE | re.DOTALL)
    assert len(locations) == 1, f"{NGINX_SITE.name} should have one `location /` block"
    return f"""
daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log {directory}/nginx-access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    include {site_path};
    server {{
        listen 127.0.0.1:{plain_port};
{locations[0]}    }}
}}
"""


class Nginx:
    """Debian's nginx in the foreground on a private prefix: no system configuration, pid file or log."""

    def __init__(self, binary: str, directory: Path, config: str, ports: list[int]):
        self.directory = directory
        self.config_path = directory / "nginx.conf"
        self.config_path.write_text(config)
        self.command = [
            binary,
            "-p",
            f"{directory}/",
            "-c",
            str(self.config_path),
            "-e",
            f"{directory}/nginx-error.log",
        ]
        self.ports = ports
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        with open(self.directory / "nginx-output.log", "wb") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            while not all(self._accepts(port) for port in self.ports):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("nginx did not start:\n" + self.log_text())
                time.sleep(0.05)
            return self
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @staticmethod
    def _accepts(port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log_text(self) -> str:
        parts = []
        for name in ("nginx-output.log", "nginx-error.log"):
            path = self.directory / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)


# --- the stack: client -> nginx -> gunicorn -> app -------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    request_id: str


@dataclass
class Stack:
    gunicorn: Gunicorn
    ports: dict[str, int]
    tls: ssl.SSLContext

    def call(
        self, listener: str, path: str = "/healthz", *, source: str, method: str = "GET",
        headers: dict[str, str] | None = None, body: bytes | None = None,
    ) -> Answer:  # fmt: skip
        """One request from ``source`` (a loopback address) to ``listener``: tls, plain, redirect or
        gunicorn (directly)."""
        port = self.gunicorn.port if listener == "gunicorn" else self.ports[listener]
        address = {"timeout": 10, "source_address": (source, 0)}
        if listener == "tls":
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=self.tls, **address)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", port, **address)
        request_id = f"deploy-{uuid.uuid4().hex}"
        try:
            connection.request(
                method, path, body=body, headers={"X-Request-ID": request_id, **(headers or {})}
            )
            response = connection.getresponse()
            return Answer(response.status, response.headers, response.read(), request_id)
        finally:
            connection.close()

    def seen(self, answer: Answer) -> dict[str, Any]:
        """What the app logged for this request."""
        return self.gunicorn.request_line(answer.request_id)


@pytest.fixture(scope="module")
def deployment_schema(admin_engine: sa.Engine, standin_server) -> Iterator[str]:
    """A migrated schema for the module's gunicorn, dropped at the end of the module."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    app = make_test_app(name)
    migrate(app)
    with app.app_context():
        db.engine.dispose()
    yield name
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))


@pytest.fixture(scope="module")
def stack(nginx_binary, deployment_schema, standin_server, tmp_path_factory) -> Iterator[Stack]:
    """gunicorn (gunicorn.conf.py, IRIS_PROXY_HOPS=1, 2 workers) behind nginx running the example site."""
    directory = tmp_path_factory.mktemp("deployment")
    env = app_environment(deployment_schema, standin_server, IRIS_PROXY_HOPS="1", WEB_CONCURRENCY="2")
    certificate, key = write_certificate(directory)
    with Gunicorn(directory, env) as gunicorn:
        ports = {"tls": free_port(), "redirect": free_port(), "plain": free_port()}
        site_path = directory / "iris-site.conf"
        site_path.write_text(site_for_test(gunicorn.port, ports, certificate, key))
        config = nginx_config(directory, site_path, ports["plain"])
        with Nginx(nginx_binary, directory, config, list(ports.values())):
            yield Stack(gunicorn, ports, ssl.create_default_context(cafile=str(certificate)))


def test_over_tls_the_app_sees_the_client_address_and_https_and_sends_hsts(stack):
    answer = stack.call("tls", source=CLIENT)
    assert answer.status == 200
    assert answer.headers["Strict-Transport-Security"] == security.HSTS
    seen = stack.seen(answer)
    assert (seen["remote_addr"], seen["scheme"]) == (CLIENT, "https")


def test_over_plain_http_the_app_sees_http_and_sends_no_hsts(stack):
    answer = stack.call("plain", source=OTHER_CLIENT)
    assert answer.status == 200
    assert "Strict-Transport-Security" not in answer.headers
    seen = stack.seen(answer)
    assert (seen["remote_addr"], seen["scheme"]) == (OTHER_CLIENT, "http")


@pytest.mark.parametrize(
    ("listener", "source", "scheme"), [("tls", CLIENT, "https"), ("plain", OTHER_CLIENT, "http")]
)
def test_forged_forwarding_headers_from_the_client_change_nothing(stack, listener, source, scheme):
    forged = {
        "X-Forwarded-For": f"{FORGED}, 10.0.0.1",
        "X-Forwarded-Proto": "https" if scheme == "http" else "http",
    }
    answer = stack.call(listener, source=source, headers=forged)
    assert answer.status == 200
    assert ("Strict-Transport-Security" in answer.headers) is (scheme == "https")
    seen = stack.seen(answer)
    assert (seen["remote_addr"], seen["scheme"]) == (source, scheme)


def test_a_registration_and_the_readiness_check_go_through_the_proxy(stack):
    email = f"{uuid.uuid4().hex[:10]}@proxy.example"
    body = json.dumps({"email": email, "password": PASSWORD}).encode()
    created = stack.call(
        "tls", URL, source=CLIENT, method="POST", body=body, headers={"Content-Type": "application/json"}
    )
    assert created.status == 201, created.body
    assert created.headers["Location"].startswith("/api/v1/users/")
    assert json.loads(created.body)["email"] == email
    assert stack.seen(created)["remote_addr"] == CLIENT

    ready = stack.call("tls", "/readyz", source=CLIENT)
    assert (ready.status, json.loads(ready.body)) == (200, {"status": "ok", "database": "ok"})


def test_plain_http_on_the_public_port_only_redirects_to_https(stack):
    answer = stack.call("redirect", "/signup?from=ad", source=CLIENT)
    assert answer.status == 301
    assert answer.headers["Location"] == "https://127.0.0.1/signup?from=ad"
    assert "X-Request-ID" not in answer.headers  # nginx answered; the app never saw it


def test_control_a_client_that_reaches_gunicorn_directly_chooses_its_own_address_and_scheme(stack):
    """Why gunicorn binds loopback: ProxyFix believes whoever is directly connected to be the proxy."""
    forged = {"X-Forwarded-For": FORGED, "X-Forwarded-Proto": "https"}
    answer = stack.call("gunicorn", source=CLIENT, headers=forged)
    assert answer.status == 200
    assert answer.headers["Strict-Transport-Security"] == security.HSTS
    seen = stack.seen(answer)
    assert (seen["remote_addr"], seen["scheme"]) == (FORGED, "https")


# --- IRIS_PROXY_HOPS in the app itself -------------------------------------------------------------------


def request_through(app, headers: dict[str, str], caplog) -> tuple[Any, logging.LogRecord]:
    """One request as gunicorn hands it over from the local nginx; returns the response and its log record."""
    caplog.set_level(logging.INFO, logger="iris.request")
    caplog.clear()
    response = app.test_client().get("/healthz", headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    [record] = [record for record in caplog.records if record.name == "iris.request"]
    return response, record


def test_control_one_hop_too_many_lets_the_client_choose_its_address(schema, caplog):
    """IRIS_PROXY_HOPS=2 behind one nginx: the forged X-Forwarded-For value is taken for the client."""
    headers = {"X-Forwarded-For": f"{FORGED}, {CLIENT}", "X-Forwarded-Proto": "https"}  # as nginx sends it
    _, exact = request_through(make_test_app(schema, IRIS_PROXY_HOPS=1), headers, caplog)
    assert exact.remote_addr == CLIENT
    _, too_many = request_through(make_test_app(schema, IRIS_PROXY_HOPS=2), headers, caplog)
    assert too_many.remote_addr == FORGED


def test_with_two_hops_the_scheme_the_proxies_pass_on_still_counts(schema, caplog):
    """A load balancer terminates TLS and nginx passes its X-Forwarded-Proto on: one value, ``https``."""
    headers = {"X-Forwarded-For": f"203.0.113.9, {CLIENT}", "X-Forwarded-Proto": "https"}
    response, record = request_through(make_test_app(schema, IRIS_PROXY_HOPS=2), headers, caplog)
    assert record.remote_addr == "203.0.113.9"
    assert record.scheme == "https"
    assert response.headers["Strict-Transport-Security"] == security.HSTS


# --- preload_app and fork --------------------------------------------------------------------------------


def preloaded_app():
    """gunicorn factory (``tests.test_deployment:preloaded_app()``): wsgi.py's app, after the master has run
    one query, as a warm-up would, leaving its connection open in the pool. ``/_test/db`` reports the
    worker's pid, its database backend's pid, the master's, and how many idle connections the worker's pool
    held when its first request arrived."""
    app = create_app()
    with app.app_context():
        master_backend = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        db.session.remove()
    pool_at_first_request: list[int] = []

    @app.before_request
    def note_the_pool() -> None:
        if not pool_at_first_request:
            pool_at_first_request.append(db.engine.pool.checkedin())

    @app.get("/_test/db")
    def backend():
        time.sleep(0.3)  # keeps this worker's only thread busy, so a second request goes to the other worker
        backend_pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        db.session.rollback()
        return {
            "worker": os.getpid(),
            "backend": backend_pid,
            "master_backend": master_backend,
            "pool_at_first_request": pool_at_first_request[0],
        }

    return app


def get_backend(base_url: str) -> dict[str, Any]:
    response = requests.get(base_url + "/_test/db", headers={"Connection": "close"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    "hook", [True, False], ids=["post_fork-empties-the-pool", "control-without-the-hook"]
)
def test_with_preload_each_worker_starts_with_an_empty_database_pool(schema, standin, tmp_path, hook):
    config = GUNICORN_CONF
    if not hook:  # the same file without its post_fork hook
        config = tmp_path / "no-post-fork.conf.py"
        config.write_text(
            f"exec(compile(open({str(GUNICORN_CONF)!r}).read(), 'gunicorn.conf.py', 'exec'))\ndel post_fork\n"
        )
    env = app_environment(
        schema, standin, WEB_CONCURRENCY="2", GUNICORN_THREADS="1", GUNICORN_PRELOAD="1",
        # One connection per worker at a time: while one worker is busy, the other accepts.
        GUNICORN_CMD_ARGS="--worker-connections 1",
    )  # fmt: skip
    with Gunicorn(tmp_path, env, app="tests.test_deployment:preloaded_app()", config=config) as server:
        base_url = f"http://127.0.0.1:{server.port}"
        if hook:
            answers: list[dict[str, Any]] = []
            with ThreadPoolExecutor(max_workers=2) as pool:
                for _ in range(10):  # rounds of two at once, until both workers have answered
                    answers += pool.map(lambda _: get_backend(base_url), range(2))
                    if len({answer["worker"] for answer in answers}) == 2:
                        break
            workers = {answer["worker"]: answer for answer in answers}
            assert len(workers) == 2, answers
            assert all(answer["pool_at_first_request"] == 0 for answer in answers)
            master_backend = answers[0]["master_backend"]
            backends = {answer["backend"] for answer in workers.values()}
            assert master_backend not in backends
            assert len(backends) == 2  # one connection of its own per worker
        else:
            answer = get_backend(base_url)  # one at a time: sharing a socket concurrently would corrupt it
            assert answer["pool_at_first_request"] == 1
            assert answer["backend"] == answer["master_backend"]  # the master's connection, in a worker
        log = server.text()
    for trouble in ("Traceback", "[ERROR]", '"level": "ERROR"', "SSL"):
        assert trouble not in log, log
