"""Production deployment: gunicorn.conf.py, and deploy/nginx-iris.conf in front of gunicorn.

What the app saw is read from its own JSON request log line (``remote_addr``, ``scheme``), found by the
request id each request sends. Behind a real nginx running the example site (TLS terminated with a
certificate made here), with clients bound to 127.0.0.2 and 127.0.0.3:
- the app sees the client's address as nginx saw it, and https with HSTS over TLS; http and no HSTS on the
  plain listener;
- a forged X-Forwarded-For or X-Forwarded-Proto from the client changes nothing;
- controls: a client that reaches gunicorn directly, or an app that trusts one hop too many, is fooled by
  the same forged header (why gunicorn binds loopback and IRIS_PROXY_HOPS must be exact);
- a form posted over TLS on a test port is accepted: the Host reaches the app with its port.
Also: gunicorn.conf.py loads with its environment overrides, its timeouts cover the worst-case registration,
and with preload_app each worker starts with an empty database pool.

Needs Debian's nginx (`apt-get install nginx`; IRIS_NGINX names another binary). Without it the nginx tests
skip with that reason on a developer's machine and fail in CI (CI set), where .ci/run installs it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from iris import clerk, create_app, security
from iris.config import DEV_PUBLISHABLE_KEY
from iris.extensions import db
from tests.helpers import PASSWORD, URL
from tests.servers import (
    GUNICORN_CONF,
    NGINX_SITE,
    OWN_VARIABLES,
    ROOT,
    TEST_SERVER_NAME,
    Gunicorn,
    Site,
    app_environment,
    behind_nginx,
    gunicorn_settings,
    migrated_schema,
)

CLIENT = "127.0.0.2"  # the client's source address over TLS
OTHER_CLIENT = "127.0.0.3"  # ... and over plain http
FORGED = "6.6.6.6"


# --- gunicorn.conf.py ------------------------------------------------------------------------------------


def effective_config(**variables: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """``gunicorn --print-config -c gunicorn.conf.py wsgi:app`` (loads the app too) with ``variables`` set."""
    env = {name: value for name, value in os.environ.items() if name not in OWN_VARIABLES}
    env.update(
        DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",  # read, never connected to
        FLASK_SECRET_KEY="test",
        IRIS_PUBLIC_URL="https://iris.test",
        MAIL_SERVER="127.0.0.1",
        CLERK_SECRET_KEY="sk_test_unused",
        CLERK_PUBLISHABLE_KEY=DEV_PUBLISHABLE_KEY,
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
            {
                "workers": 2,
                "threads": 8,
                "bind": ["127.0.0.1:8000"],
                "preload_app": False,
                "max_requests": 0,
                "reuse_port": True,
            },
        ),
        ({"PORT": "9123"}, {"bind": ["127.0.0.1:9123"]}),
        (
            {"GUNICORN_BIND": "unix:/run/iris/gunicorn.sock, 127.0.0.1:8001", "PORT": "9123"},
            {"bind": ["unix:/run/iris/gunicorn.sock", "127.0.0.1:8001"], "reuse_port": False},
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
    settings = gunicorn_settings()
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
    settings = gunicorn_settings()
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


# --- the stack: client -> nginx -> gunicorn -> app -------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    request_id: str


@dataclass
class Stack:
    site: Site
    tls: ssl.SSLContext

    @property
    def gunicorn(self) -> Gunicorn:
        return self.site.gunicorn

    def call(
        self, listener: str, path: str = "/healthz", *, source: str, method: str = "GET",
        headers: dict[str, str] | None = None, body: bytes | None = None,
    ) -> Answer:  # fmt: skip
        """One request from ``source`` (a loopback address) to ``listener``: tls, plain, redirect or
        gunicorn (directly)."""
        port = self.gunicorn.port if listener == "gunicorn" else self.site.ports[listener]
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
    with migrated_schema(admin_engine) as name:
        yield name


@pytest.fixture(scope="module")
def stack(deployment_schema, standin_server, tmp_path_factory) -> Iterator[Stack]:
    """gunicorn (gunicorn.conf.py, IRIS_PROXY_HOPS=1, 2 workers) behind nginx running the example site."""
    directory = tmp_path_factory.mktemp("deployment")
    env = app_environment(deployment_schema, standin_server, IRIS_PROXY_HOPS="1", WEB_CONCURRENCY="2")
    with behind_nginx(directory, env) as site:
        yield Stack(site, ssl.create_default_context(cafile=str(site.certificate)))


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


def test_a_form_posted_over_tls_on_a_port_other_than_443_is_accepted(stack):
    """Over https Flask-WTF wants the Referer's origin to be https://<Host>/: nginx must pass on the Host with
    the port the browser used (``$http_host``; ``$host`` drops it). The browser tests do this in Chromium."""
    page = stack.call("tls", "/signup", source=CLIENT)
    assert page.status == 200
    token = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page.body).group(1).decode()
    cookie = page.headers["Set-Cookie"].split(";")[0]
    origin = f"https://127.0.0.1:{stack.site.ports['tls']}"
    email = f"{uuid.uuid4().hex[:10]}@form.example"
    form = f"csrf_token={token}&email={email}&password={PASSWORD.replace(' ', '+')}".encode()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Cookie": cookie,
        "Referer": origin + "/signup",
    }
    answer = stack.call("tls", "/signup", source=CLIENT, method="POST", headers=headers, body=form)
    assert answer.status == 303, answer.body
    assert answer.headers["Location"] == "/signup/done"


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


# --- what nginx itself keeps and answers: the access log, unknown hosts -----------------------------------


SECRET = "eyJ1c2VyIjoiMGI1YyIsImVtYWlsIjoidmljdGltQGJpc3Ryby5leGFtcGxlIn0.secret-part"


def access_log_lines(stack: Stack, request_ids: list[str]) -> str:
    """The site's access log (the file the test configuration gave its `access_log` lines) once it holds a
    line for each of ``request_ids``' requests: nginx writes a line when the request ends."""
    deadline = time.monotonic() + 5
    while True:
        text = stack.site.access_log.read_text() if stack.site.access_log.exists() else ""
        if len(text.splitlines()) >= len(request_ids) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_nginxs_access_log_shows_links_without_their_tokens_and_no_query_strings(stack):
    """/verify-email/<token>, /invitations/<token> and the API's accept are logged with `<token>` in place of
    the token; a query string (a Clerk handshake, a search for an address) as `?<query>`; a Referer as its
    origin only, since the page a request came from can be a link with a token."""
    stack.site.access_log.write_text("")  # only this test's lines from here on
    calls = [
        stack.call("tls", f"/verify-email/{SECRET}", source=CLIENT),
        stack.call("tls", f"/invitations/{SECRET}", source=CLIENT),
        stack.call("tls", f"/api/v1/invitations/{SECRET}/accept", source=CLIENT, method="POST"),
        stack.call("tls", "/api/v1/users?q=victim%40bistro.example", source=CLIENT),
        stack.call("tls", f"/signup?__clerk_handshake={SECRET}", source=CLIENT),
        stack.call(
            "tls",
            "/static/iris.css",
            source=CLIENT,
            headers={"Referer": f"https://iris.test/verify-email/{SECRET}"},
        ),
        stack.call("redirect", f"/verify-email/{SECRET}", source=CLIENT),  # plain http, before the redirect
    ]
    log = access_log_lines(stack, [call.request_id for call in calls])
    assert len(log.splitlines()) == len(calls), log
    assert SECRET not in log and "secret-part" not in log
    assert "victim" not in log
    for masked in (
        '"GET /verify-email/<token> HTTP/1.1"',
        '"GET /invitations/<token> HTTP/1.1"',
        '"POST /api/v1/invitations/<token>/accept HTTP/1.1"',
        '"GET /api/v1/users?<query> HTTP/1.1"',
        '"GET /signup?<query> HTTP/1.1"',
        '"GET /static/iris.css HTTP/1.1"',
        '"https://iris.test"',
    ):
        assert masked in log, log
    assert log.count(f"{CLIENT} - ") == len(calls)  # the real client's address, one line per request


def exchange(port: int, *, host: str, sni: str | None, tls: bool, request_id: str, cafile: str) -> bytes:
    """One raw GET /healthz with this Host header, over TLS with this SNI (None: none, as for an IP address)
    or plain; the bytes that came back (b"" when the server closed without answering). Raises ssl.SSLError
    when the handshake is refused."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection: socket.socket = raw
    try:
        if tls:
            context = ssl.create_default_context(cafile=cafile)
            context.check_hostname = False  # the test certificate names 127.0.0.1; the chain is still checked
            connection = context.wrap_socket(raw, server_hostname=sni)
        headers = f"Host: {host}\r\nX-Request-ID: {request_id}\r\nConnection: close\r\n"
        connection.sendall(f"GET /healthz HTTP/1.1\r\n{headers}\r\n".encode())
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            pass  # closed without an answer
        return answer
    finally:
        connection.close()


def test_a_request_for_an_unknown_host_never_reaches_the_app(stack):
    """The site's default servers, on the site's own ports: `Host: evil.example` over plain http is closed
    without an answer (444); over TLS a handshake for any name but ours, or with no name, is refused; a
    request naming another Host after a handshake for ours is closed unanswered too. The real name works on
    the same ports, and the app's log shows none of the others."""
    cafile = str(stack.site.certificate)
    ports = stack.site.ports
    sent: list[str] = []

    def ask(port: int, *, host: str, sni: str | None, tls: bool) -> bytes:
        sent.append(f"deploy-{uuid.uuid4().hex}")
        return exchange(port, host=host, sni=sni, tls=tls, request_id=sent[-1], cafile=cafile)

    assert ask(ports["redirect"], host="evil.example", sni=None, tls=False) == b""
    for sni in ("evil.example", None):
        with pytest.raises(ssl.SSLError):
            ask(ports["tls_shared"], host="evil.example", sni=sni, tls=True)
    assert ask(ports["tls_shared"], host="evil.example", sni=TEST_SERVER_NAME, tls=True) == b""
    refused = list(sent)

    # Controls on the same ports: the site's own name is answered, by nginx (redirect) and by the app.
    redirect = ask(ports["redirect"], host=TEST_SERVER_NAME, sni=None, tls=False)
    assert redirect.startswith(b"HTTP/1.1 301"), redirect[:200]
    answered = ask(ports["tls_shared"], host=TEST_SERVER_NAME, sni=TEST_SERVER_NAME, tls=True)
    assert answered.startswith(b"HTTP/1.1 200"), answered[:200]
    assert stack.gunicorn.request_line(sent[-1])["status"] == 200

    log = stack.gunicorn.text()
    assert "evil.example" not in log
    assert not any(request_id in log for request_id in refused)


# --- IRIS_PROXY_HOPS in the app itself -------------------------------------------------------------------


def request_through(app, headers: dict[str, str], caplog) -> tuple[Any, logging.LogRecord]:
    """One request as gunicorn hands it over from the local nginx; returns the response and its log record."""
    caplog.set_level(logging.INFO, logger="iris.request")
    caplog.clear()
    response = app.test_client().get("/healthz", headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    [record] = [record for record in caplog.records if record.name == "iris.request"]
    return response, record


def test_control_one_hop_too_many_lets_the_client_choose_its_address(make_app, caplog):
    """IRIS_PROXY_HOPS=2 behind one nginx: the forged X-Forwarded-For value is taken for the client."""
    headers = {"X-Forwarded-For": f"{FORGED}, {CLIENT}", "X-Forwarded-Proto": "https"}  # as nginx sends it
    _, exact = request_through(make_app(IRIS_PROXY_HOPS=1), headers, caplog)
    assert exact.remote_addr == CLIENT
    _, too_many = request_through(make_app(IRIS_PROXY_HOPS=2), headers, caplog)
    assert too_many.remote_addr == FORGED


def test_with_two_hops_the_scheme_the_proxies_pass_on_still_counts(make_app, caplog):
    """A load balancer terminates TLS and nginx passes its X-Forwarded-Proto on: one value, ``https``."""
    headers = {"X-Forwarded-For": f"203.0.113.9, {CLIENT}", "X-Forwarded-Proto": "https"}
    response, record = request_through(make_app(IRIS_PROXY_HOPS=2), headers, caplog)
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
