"""Request logs and application logs: one JSON line per request, request ids, and no secrets, ever."""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from clerk_standin import DEFAULT_SECRET_KEY
from iris.observability import json_handler
from tests.helpers import URL, migrate


@pytest.fixture
def log_lines():
    """Everything logged at DEBUG and above during the test, as our JSON handler writes it."""
    stream = io.StringIO()
    handler = json_handler(stream)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(previous)


def request_lines(lines):
    return [line for line in lines if line["logger"] == "iris.request"]


def test_one_json_line_per_request_with_the_documented_fields(client, log_lines):
    ok = client.get("/healthz")
    created = client.post(URL, json={"email": "a@b.example", "password": "correct horse battery"})
    refused = client.post(URL, json={"email": "nope", "password": "x"})
    missing = client.get("/api/v1/nothing?token=should-not-be-logged")

    lines = request_lines(log_lines())
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("GET", "/healthz", 200),
        ("POST", URL, 201),
        ("POST", URL, 422),
        ("GET", "/api/v1/nothing", 404),
    ]
    for line, response in zip(lines, [ok, created, refused, missing], strict=True):
        assert line["request_id"] == response.headers["X-Request-ID"]
        assert line["duration_ms"] >= 0
        assert line["remote_addr"] == "127.0.0.1"
        assert line["level"] == "INFO"
        assert "time" in line
    assert "should-not-be-logged" not in json.dumps(lines)


def test_application_logs_carry_the_request_id(client, standin, log_lines):
    standin.control.add_fault(method="POST", path="/v1/users", status=503, times=1)
    response = client.post(URL, json={"email": "a@b.example", "password": "correct horse battery"})
    assert response.status_code == 503
    clerk_lines = [line for line in log_lines() if line["logger"] == "iris.clerk"]
    assert clerk_lines
    assert {line["request_id"] for line in clerk_lines} == {response.headers["X-Request-ID"]}


def test_no_password_token_or_secret_key_reaches_the_logs(make_app, standin, log_lines, caplog):
    """Every registration path, errors included, with everything logged at DEBUG."""
    flask_secret = f"flask-{uuid.uuid4().hex}"
    app = make_app(SECRET_KEY=flask_secret, RATELIMIT_ENABLED=True, RATELIMIT_REGISTER="12/minute")
    migrate(app)
    client = app.test_client()
    password = f"Pw-{uuid.uuid4().hex}"
    token = standin.control.sign({"sub": "user_x", "sid": "sess_x", "exp": 4102444800, "iat": 1})
    caplog.set_level(logging.DEBUG)

    def register(email, **fault):
        if fault:
            standin.control.add_fault(method="POST", path="/v1/users", times=1, **fault)
        return client.post(
            URL,
            json={"email": email, "password": password},
            headers={"Authorization": f"Bearer {token}"},
        ).status_code

    statuses = [
        register("ok@b.example"),
        register("ok@b.example"),
        register("not-an-email"),
        register("r@b.example", status=429, retry_after=3),
        register("s@b.example", status=500),
        register("t@b.example", action="hang", seconds=3),
        register("u@b.example", action="drop"),
        register("v@b.example", action="garbage"),
        register("w@b.example", after_commit=True, status=500),
    ]
    client.post("/signup", data={"email": "page@b.example", "password": password})
    client.get("/signup", headers={"Cookie": f"__session={token}"})
    limited = [register("x@b.example") for _ in range(12)]  # on past the rate limit
    assert limited[-1] == 429
    assert statuses == [201, 409, 422, 429, 503, 503, 503, 502, 201]  # the last: a lost answer, found

    text = json.dumps(log_lines()) + caplog.text
    assert "iris.clerk" in text and "iris.request" in text  # the logs really were captured
    for secret in (password, token, DEFAULT_SECRET_KEY, flask_secret):
        assert secret not in text
