"""Rate limits per client IP: the registration limit shared by the API and the page, the default limit,
and, with Redis, one limit shared by several gunicorn workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests
import sqlalchemy as sa

from iris.config import DEV_PUBLISHABLE_KEY
from tests.helpers import PASSWORD, TEST_DATABASE_URL, URL, assert_error, migrate

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def limited_app(make_app):
    app = make_app(
        RATELIMIT_ENABLED=True, RATELIMIT_REGISTER="2 per minute", RATELIMIT_DEFAULT="5 per minute"
    )
    migrate(app)
    return app


def register(client, email, remote_addr="203.0.113.7"):
    return client.post(
        URL, json={"email": email, "password": PASSWORD}, environ_base={"REMOTE_ADDR": remote_addr}
    )


def test_the_api_answers_429_with_retry_after_over_the_registration_limit(limited_app):
    client = limited_app.test_client()
    assert register(client, "a@b.example").status_code == 201
    assert register(client, "a@b.example").status_code == 409  # refusals count too
    response = register(client, "c@b.example")
    assert_error(response, 429, "rate_limited")
    assert 0 < int(response.headers["Retry-After"]) <= 61  # the window ends on a whole second


def test_the_page_and_the_api_share_one_registration_limit_and_the_page_says_so_kindly(limited_app):
    client = limited_app.test_client()
    assert register(client, "a@b.example").status_code == 201
    form = {"email": "b@b.example", "password": PASSWORD}
    assert client.post("/signup", data=form, environ_base={"REMOTE_ADDR": "203.0.113.7"}).status_code == 303
    response = client.post("/signup", data=form, environ_base={"REMOTE_ADDR": "203.0.113.7"})
    assert response.status_code == 429
    assert response.mimetype == "text/html"
    assert int(response.headers["Retry-After"]) > 0
    page = response.get_data(as_text=True)
    assert "Too many attempts" in page
    assert re.search(r"Please try again in about \d+ seconds", page)
    # Viewing the form is not registering: the page still opens.
    assert client.get("/signup", environ_base={"REMOTE_ADDR": "203.0.113.7"}).status_code == 200


def test_limits_are_per_client_ip(limited_app):
    client = limited_app.test_client()
    for n in range(2):
        assert register(client, f"{n}@b.example", remote_addr="203.0.113.7").status_code == 201
    assert register(client, "x@b.example", remote_addr="203.0.113.7").status_code == 429
    assert register(client, "y@b.example", remote_addr="198.51.100.9").status_code == 201


def test_the_default_limit_covers_pages_and_spares_health_checks(limited_app):
    client = limited_app.test_client()
    statuses = [client.get("/signup").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    assert all(client.get("/healthz").status_code == 200 for _ in range(10))


# Two gunicorn sync workers in front of a schema of the test database. Sync workers take one connection at
# a time, so two requests in flight at once are served by two different processes.
def start_gunicorn(schema, standin, storage_uri, prefix):
    url = sa.make_url(TEST_DATABASE_URL).set(
        drivername="postgresql", query={"options": f"-csearch_path={schema}"}
    )
    env = {
        **os.environ,
        "DATABASE_URL": url.render_as_string(hide_password=False),
        "FLASK_SECRET_KEY": "test",
        "CLERK_SECRET_KEY": standin.secret_key,
        "CLERK_API_URL": standin.base_url,
        # Required in production (IRIS_PUBLIC_URL, CLERK_PUBLISHABLE_KEY) and while verification is on
        # (MAIL_SERVER); nothing listens on port 1, so mails stay unsent.
        "IRIS_PUBLIC_URL": "https://iris.test",
        "CLERK_PUBLISHABLE_KEY": DEV_PUBLISHABLE_KEY,
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": "1",
        "RATELIMIT_STORAGE_URI": storage_uri,
        "FLASK_RATELIMIT_REGISTER": "3 per minute",
        "FLASK_RATELIMIT_KEY_PREFIX": prefix,
    }
    env.pop("FLASK_DEBUG", None)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn", "--config", os.devnull,  # not ./gunicorn.conf.py
            "--worker-class", "sync", "--workers", "2",
            "--bind", "127.0.0.1:0", "--access-logfile", "-", "--access-logformat", "pid=%(p)s status=%(s)s",
            "wsgi:app",
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = [re.search(r"Listening at: http://127.0.0.1:(\d+)", line) for line in lines]
        ports = [m.group(1) for m in found if m]
        if ports and sum("Booting worker" in line for line in lines) == 2:
            return process, reader, f"http://127.0.0.1:{ports[0]}", lines
        time.sleep(0.1)
    process.kill()
    raise AssertionError("gunicorn did not start:\n" + "".join(lines))


def register_in_pairs(base_url, standin, pairs):
    """Two registrations at a time, each slowed at Clerk, so both workers must serve."""
    standin.control.add_fault(method="POST", path="/v1/users", latency_ms=300)
    statuses = []
    for _ in range(pairs):
        threads = []
        for _ in range(2):
            email = f"{uuid.uuid4().hex[:10]}@b.example"

            def post(email=email):
                response = requests.post(
                    base_url + URL, json={"email": email, "password": PASSWORD}, timeout=10
                )
                statuses.append(response.status_code)

            threads.append(threading.Thread(target=post))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return statuses


def served_by(lines):
    return {m.group(1) for line in lines if (m := re.search(r"pid=<?(\d+)>? status=(201|429)", line))}


@pytest.mark.parametrize(
    ("storage", "shared"),
    [(REDIS_URL, True), ("memory://", False)],
    ids=["redis-shares-one-limit", "memory-counts-per-worker"],
)
def test_two_gunicorn_workers_share_one_limit_only_with_redis(app, schema, standin, storage, shared):
    prefix = f"iris-test-{uuid.uuid4().hex[:8]}"
    process, reader, base_url, lines = start_gunicorn(schema, standin, storage, prefix)
    try:
        statuses = register_in_pairs(base_url, standin, pairs=3)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        reader.join(timeout=5)
        process.stdout.close()
    assert len(served_by(lines)) == 2, "both workers must have served registrations"
    if shared:
        assert sorted(statuses) == [201] * 3 + [429] * 3
        client = redis.Redis.from_url(REDIS_URL)
        keys = client.keys(f"*{prefix}*")
        assert keys  # the counters really lived in Redis
        client.delete(*keys)
    else:
        # Per-process counters: each worker lets its own three through.
        assert statuses.count(201) > 3
