"""Real servers for tests: gunicorn with gunicorn.conf.py, and Debian's nginx running deploy/nginx-iris.conf
in front of it, each in its own process on free loopback ports, with its log in a file.

Test modules import from here (never from one another): tests/test_deployment.py checks what the app sees
behind the proxy, tests/test_forms_browser.py drives every form page through it in Chromium.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from iris.config import DEV_PUBLISHABLE_KEY
from tests.helpers import TEST_DATABASE_URL, dispose, free_port, make_test_app, migrate, unavailable
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
    # gunicorn.conf.py chooses the metrics directory itself (a private one per master) unless told.
    "IRIS_METRICS_DIR",
    "PROMETHEUS_MULTIPROC_DIR",
    "IRIS_METRICS_MASTER",
)


# --- gunicorn processes ----------------------------------------------------------------------------------


def app_environment(schema: str, standin, **variables: str) -> dict[str, str]:
    """The production environment for gunicorn, against ``schema`` of the test database and the stand-in;
    ``variables`` add to it or replace any of it."""
    url = sa.make_url(TEST_DATABASE_URL).set(
        drivername="postgresql", query={"options": f"-csearch_path={schema}"}
    )
    env = {name: value for name, value in os.environ.items() if name not in OWN_VARIABLES}
    env.update(
        DATABASE_URL=url.render_as_string(hide_password=False),
        FLASK_SECRET_KEY="test",
        IRIS_PUBLIC_URL="https://iris.test",
        # The stand-in's instance; its Frontend API (the handshake) answers on its own address.
        CLERK_PUBLISHABLE_KEY=DEV_PUBLISHABLE_KEY,
        CLERK_FRONTEND_API_URL=standin.base_url,
        MAIL_SERVER="127.0.0.1",
        MAIL_PORT="1",  # nothing listens: mails stay in the outbox unless a test passes its own server
        CLERK_SECRET_KEY=standin.secret_key,
        CLERK_API_URL=standin.base_url,
        # A port chosen here, not 0: with reuse_port every worker binds the address itself.
        GUNICORN_BIND=f"127.0.0.1:{free_port()}",
        PYTHONUNBUFFERED="1",
    )
    env.update(variables)
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
                found = re.fullmatch(r"127\.0\.0\.1:(\d+)", self.env.get("GUNICORN_BIND", ""))
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


def gunicorn_settings() -> dict[str, Any]:
    """gunicorn.conf.py's module namespace, read in this process as gunicorn reads it; what reading it does
    to the environment (the metrics directory, PROMETHEUS_MULTIPROC_DIR) is undone, so no later test or
    server inherits it."""
    saved = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory() as directory:
            os.environ["IRIS_METRICS_DIR"] = directory
            return runpy.run_path(str(GUNICORN_CONF))
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- nginx -----------------------------------------------------------------------------------------------


def require_nginx() -> str:
    """nginx's path. Without nginx: skip on a developer's machine; fail in CI (CI set), where .ci/run
    installs it."""
    if NGINX is None:
        unavailable("nginx not installed (apt-get install nginx; IRIS_NGINX names another binary)")
    return NGINX


def write_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for https://127.0.0.1 and its key, as files in ``directory``."""
    certificate, key = self_signed_certificate(dns_names=(), ca=False)
    certificate_path, key_path = directory / "tls.crt", directory / "tls.key"
    certificate_path.write_bytes(certificate)
    key_path.write_bytes(key)
    return certificate_path, key_path


def replace_once(text: str, old: str, new: str, *, times: int = 1) -> str:
    """``text`` with ``old`` (which must occur exactly ``times`` times) replaced by ``new``."""
    assert text.count(old) == times, (
        f"{NGINX_SITE.name} should contain {old!r} {times} time(s); update this test with it"
    )
    return text.replace(old, new)


# The name the site's servers answer to in tests (besides 127.0.0.1), sent as SNI by the default-server tests.
TEST_SERVER_NAME = "iris.test"


def site_for_test(
    upstream_port: int, ports: dict[str, int], certificate: Path, key: Path, access_log: Path
) -> str:
    """deploy/nginx-iris.conf with loopback test ports, server names, the test certificate and the test
    access log, nothing else changed.

    ``redirect``: the plain-http port, shared by the site's redirect server and the plain default server, so
    a request's Host picks one as in production. ``tls_shared``: the https port shared by the site's server
    and the TLS default server, so the client's SNI and Host pick one as in production. ``tls``: the site's
    https server alone, for clients that connect to https://127.0.0.1 (Chromium, http.client): a client
    sends no SNI to an IP address, and nginx then hands the handshake to the port's default server, which in
    production refuses it (every browser sends SNI for a real host name).
    """
    site = NGINX_SITE.read_text()
    site = replace_once(site, "server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    site = replace_once(site, "listen 80;", f"listen 127.0.0.1:{ports['redirect']};")
    site = replace_once(
        site, "listen 80 default_server;", f"listen 127.0.0.1:{ports['redirect']} default_server;"
    )
    site = replace_once(
        site,
        "listen 443 ssl;",
        f"listen 127.0.0.1:{ports['tls']} ssl;\n    listen 127.0.0.1:{ports['tls_shared']} ssl;",
    )
    site = replace_once(
        site, "listen 443 ssl default_server;", f"listen 127.0.0.1:{ports['tls_shared']} ssl default_server;"
    )
    for listen in ("80;", "443 ssl;", "80 default_server;", "443 ssl default_server;"):
        site = replace_once(site, f"listen [::]:{listen}", "")
    site = replace_once(
        site, "server_name accounts.example.com;", f"server_name 127.0.0.1 {TEST_SERVER_NAME};", times=2
    )
    site = replace_once(site, "/var/log/nginx/iris-access.log", str(access_log), times=4)
    live = "/etc/letsencrypt/live/accounts.example.com/"
    site = replace_once(site, live + "fullchain.pem", str(certificate))
    return replace_once(site, live + "privkey.pem", str(key))


def nginx_config(directory: Path, site_path: Path, plain_port: int) -> str:
    """A private main configuration: the site, plus a test-only plain-http listener with the site's own
    ``location /``, to show what the app sees without TLS."""
    site = NGINX_SITE.read_text()
    locations = re.findall(r"^    location / \{\n.*?^    \}\n", site, re.MULTILINE | re.DOTALL)
    assert len(locations) == 1, f"{NGINX_SITE.name} should have one `location /` block"
    return nginx_main(
        directory,
        f"""    include {site_path};
    server {{
        listen 127.0.0.1:{plain_port};
{locations[0]}    }}
""",
    )


def nginx_main(directory: Path, servers: str) -> str:
    """A private main configuration in ``directory`` (pid, logs, temporary files) holding ``servers``."""
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
{servers}}}
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


@contextlib.contextmanager
def tls_proxy(directory: Path, port: int, upstream_port: int, certificate: Path) -> Iterator[str]:
    """nginx on ``port`` terminating TLS (``certificate``, its key beside it as ``write_certificate`` leaves
    it) for the plain-http server on ``upstream_port``: the stand-in, whose Frontend API and Account Portal
    pages are https in production, as Secure cookies need. Yields its https origin."""
    binary = require_nginx()
    key = certificate.with_name("tls.key")
    config = nginx_main(
        directory,
        f"""    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto https;
        }}
    }}
""",
    )
    with Nginx(binary, directory, config, [port]):
        yield f"https://127.0.0.1:{port}"


# --- the site: nginx -> gunicorn -> app ------------------------------------------------------------------


@contextlib.contextmanager
def migrated_schema(admin_engine: sa.Engine) -> Iterator[str]:
    """A schema of the test database with every migration applied, for a server process; dropped after."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    try:
        # Migrations never call Clerk, so the app needs no real Clerk URL.
        app = make_test_app(name, "http://127.0.0.1:1")
        migrate(app)
        dispose(app)
        yield name
    finally:
        with admin_engine.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))


@dataclass
class Site:
    """gunicorn behind nginx running the example site. nginx's ``ports``: ``tls`` (the site's https server),
    ``tls_shared`` (the same server beside the TLS default server), ``redirect`` (its plain-http server,
    beside the plain default server) and ``plain`` (a test-only plain-http listener, see nginx_config). The
    site's servers write their access log to ``access_log``."""

    gunicorn: Gunicorn
    nginx: Nginx
    ports: dict[str, int]
    certificate: Path
    access_log: Path

    @property
    def https_url(self) -> str:
        return site_url(self.ports)


def site_url(ports: dict[str, int]) -> str:
    """The site's https origin, as its IRIS_PUBLIC_URL names it in the browser tests."""
    return f"https://127.0.0.1:{ports['tls']}"


def site_ports() -> dict[str, int]:
    """Free ports for nginx's listeners (see ``Site``), chosen before anything starts, so that the app's
    IRIS_PUBLIC_URL can name the site's real origin."""
    return {"tls": free_port(), "tls_shared": free_port(), "redirect": free_port(), "plain": free_port()}


@contextlib.contextmanager
def behind_nginx(directory: Path, env: dict[str, str], ports: dict[str, int] | None = None) -> Iterator[Site]:
    """gunicorn (gunicorn.conf.py, ``env``) behind deploy/nginx-iris.conf with a certificate made here for
    https://127.0.0.1, on ``ports`` (``site_ports``, chosen here when not given). Skips (fails in CI) without
    nginx, before anything starts."""
    binary = require_nginx()
    certificate, key = write_certificate(directory)
    with Gunicorn(directory, env) as gunicorn:
        ports = ports or site_ports()
        site_path = directory / "iris-site.conf"
        access_log = directory / "iris-access.log"
        site_path.write_text(site_for_test(gunicorn.port, ports, certificate, key, access_log))
        config = nginx_config(directory, site_path, ports["plain"])
        with Nginx(binary, directory, config, list(ports.values())) as nginx:
            yield Site(gunicorn, nginx, ports, certificate, access_log)
