"""Helpers shared by test modules: building a test app, talking to the Clerk stand-in as a client would,
registering and signing in, reading the users table, checking the error envelope, and waiting for a condition.

No fixtures here (those live in conftest.py) and no state: everything a helper needs comes in as an argument.
Test modules import from here, never from each other or from conftest.py (tests/test_layout.py checks it).
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NoReturn
from urllib.parse import urlsplit

import flask_migrate
import jwt
import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from standardwebhooks.webhooks import Webhook

from clerk_standin import DEFAULT_AZP, DEFAULT_ISSUER, DEFAULT_SECRET_KEY, StandinServer
from iris import create_app, mail
from iris.config import database_uri
from iris.extensions import db

# The server every project machine has; TEST_DATABASE_URL points the tests at another one.
TEST_DATABASE_URL = database_uri(
    os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
)
PASSWORD = "correct horse battery staple"
# The keys of the user JSON, as the API contract gives them.
USER_JSON_FIELDS = frozenset(
    {"id", "email", "email_verified", "clerk_user_id", "role", "created_at", "updated_at"}
)
URL = "/api/v1/auth/register"
ME = "/api/v1/users/me"
# Read-only, so no test can change the headers another test sends.
BAPI_HEADERS = MappingProxyType({"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"})
# A trigger that makes completing the registration of fails@b.example fail, as a full disk would.
FAILING_TRIGGER = """
CREATE FUNCTION fail_completion() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'disk full (simulated)'; END; $$;
CREATE TRIGGER fail_completion BEFORE UPDATE OF clerk_user_id ON users
    FOR EACH ROW WHEN (NEW.email = 'fails@b.example') EXECUTE FUNCTION fail_completion();
"""


# ---- apps


# The signing secret of the tests' Clerk webhook endpoint (whsec_ and the base64 of 32 bytes).
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"iris-tests-webhook-signing-key-32").decode()


def svix_headers(
    body: str, *, svix_id: str, secret: str = WEBHOOK_SECRET, timestamp: int | None = None
) -> dict:
    """The three Svix headers for ``body``, signed with ``secret`` at ``timestamp`` (now by default). The
    header's timestamp and the signed one are the same second, read once."""
    moment = int(time.time()) if timestamp is None else timestamp
    signature = Webhook(secret).sign(svix_id, datetime.fromtimestamp(moment, UTC), body)
    return {"svix-id": svix_id, "svix-timestamp": str(moment), "svix-signature": signature}


def make_test_app(schema: str, clerk_api_url: str, **overrides: Any) -> Flask:
    """An app on ``schema`` of the test database talking to Clerk at ``clerk_api_url``; ``overrides`` replace
    any of its settings. The caller disposes of its engine (``dispose``). Tests use conftest's ``make_app``
    fixture, which passes the test's schema and the stand-in and disposes for them; this plain function is
    for code that runs outside a test's schema (server processes, subprocess scripts, scratch databases)."""
    settings = {
        "TESTING": True,
        # Unhandled errors become the real 500 response (and a logged traceback), as in production.
        "PROPAGATE_EXCEPTIONS": False,
        "SECRET_KEY": "test-secret-key",
        "WTF_CSRF_ENABLED": False,
        "SQLALCHEMY_DATABASE_URI": TEST_DATABASE_URL,
        "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"options": f"-csearch_path={schema}"}},
        "CLERK_API_URL": clerk_api_url,
        "CLERK_SECRET_KEY": DEFAULT_SECRET_KEY,
        # Short timeouts keep the hang tests quick; production uses iris.clerk.DEFAULT_TIMEOUT.
        "CLERK_TIMEOUT": (1.0, 1.5),
        # Links in mails; no MAIL_SERVER: mails go to the console unless a test gives its SMTP server.
        "IRIS_PUBLIC_URL": "https://iris.test",
        # Every test client is 127.0.0.1; the rate-limit tests switch limits back on.
        "RATELIMIT_ENABLED": False,
        # Clerk webhooks verify against this; `flask iris reconcile` retries a failed Clerk call at once.
        "CLERK_WEBHOOK_SIGNING_SECRET": WEBHOOK_SECRET,
        "IRIS_RECONCILE_RETRY_DELAYS": (0.05,),
    }
    settings.update(overrides)
    return create_app(settings)


def migrate(app: Flask) -> None:
    """Build ``app``'s schema the way production does: by running every migration."""
    with app.app_context():
        flask_migrate.upgrade()


def dispose(app: Flask) -> None:
    """Close ``app``'s database connections, so its schema or database can be dropped; first let its mail
    courier finish, so no mail is sent (nor a connection opened) after the test."""
    mail.wait_until_idle(app, 10)
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@contextmanager
def app_with(make_app: Callable[..., Flask], **overrides: Any) -> Iterator[Flask]:
    """A migrated app (from conftest's ``make_app``) with some settings changed, disposed afterwards."""
    app = make_app(**overrides)
    migrate(app)
    try:
        yield app
    finally:
        dispose(app)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the OS picks it), for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- accounts and session tokens


def register(client, email: str = "owner@bistro.example") -> dict:
    """Register through the API; the user JSON."""
    response = client.post(URL, json={"email": email, "password": PASSWORD})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.json


def session_token(standin, clerk_user_id: str, expires_in_seconds: int | None = None) -> str:
    """A session token minted as Clerk mints them: POST /v1/sessions, then POST /v1/sessions/{id}/tokens
    (valid for ``expires_in_seconds`` when given, else for the stand-in's default lifetime)."""
    session = requests.post(
        standin.api_url + "/sessions", json={"user_id": clerk_user_id}, headers=BAPI_HEADERS, timeout=10
    )
    session.raise_for_status()
    body = None if expires_in_seconds is None else {"expires_in_seconds": expires_in_seconds}
    token = requests.post(
        f"{standin.api_url}/sessions/{session.json()['id']}/tokens",
        json=body,
        headers=BAPI_HEADERS,
        timeout=10,
    )
    token.raise_for_status()
    return token.json()["jwt"]


def claims(sub: str | None, **changes) -> dict:
    """Clerk's v2 session claims for ``sub``, valid now; a change to None removes that claim."""
    now = int(time.time())
    values = {
        "azp": DEFAULT_AZP,
        "exp": now + 60,
        "iat": now,
        "iss": DEFAULT_ISSUER,
        "jti": secrets.token_hex(10),
        "nbf": now - 10,
        "sid": "sess_" + secrets.token_hex(12),
        "sts": "active",
        "sub": sub,
        "v": 2,
    }
    values.update(changes)
    return {name: value for name, value in values.items() if value is not None}


def bearer(token: str) -> dict[str, str]:
    """The Authorization header that presents ``token``."""
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes | dict) -> str:
    """``data`` (a dict becomes compact JSON) in the unpadded base64url of a JWT segment."""
    if isinstance(data, dict):
        data = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assert_unauthorized(response, token: str | None = None, *, token_given: bool = True) -> dict:
    """401 ``unauthorized`` with the RFC 6750 challenge, and the token nowhere in the answer."""
    assert response.status_code == 401, response.get_data(as_text=True)
    error = response.json["error"]
    assert error["code"] == "unauthorized"
    expected = 'Bearer error="invalid_token"' if token_given else "Bearer"
    assert response.headers["WWW-Authenticate"] == expected
    if token:
        assert token not in response.get_data(as_text=True)
        assert token not in str(response.headers)
    return error


# ---- the Clerk stand-in and the users table


def clerk_users(standin, **params) -> list[dict]:
    """Users the stand-in holds, read over its Backend API like any Clerk client would."""
    response = requests.get(
        standin.api_url + "/users",
        params={"limit": 500, **params},
        headers=BAPI_HEADERS,
        timeout=5,
    )
    response.raise_for_status()
    return response.json()


def create_clerk_user(standin, email: str, password: str = PASSWORD, external_id: str | None = None) -> dict:
    """A user made straight at the stand-in's Backend API, as Clerk's dashboard would (with no external_id
    unless one is given)."""
    response = requests.post(
        standin.api_url + "/users",
        json={"email_address": [email], "password": password, "external_id": external_id},
        headers=BAPI_HEADERS,
        timeout=5,
    )
    assert response.status_code == 200, response.text
    return response.json()


def bapi(standin, method: str, path: str, **body: Any) -> Any:
    """One call to the stand-in's Backend API with the secret key, as a Clerk client makes it; asserts 200."""
    response = requests.request(
        method, standin.api_url + path, json=body or None, headers=BAPI_HEADERS, timeout=5
    )
    assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
    return response.json()


def add_primary_address(standin, clerk_user_id: str, email: str) -> None:
    """What a person does in Clerk's account portal: add an address (verified there) and make it primary."""
    bapi(
        standin,
        "POST",
        "/email_addresses",
        user_id=clerk_user_id,
        email_address=email,
        verified=True,
        primary=True,
    )


def password_works(standin, clerk_user_id: str, password: str) -> bool:
    """Whether Clerk accepts ``password`` for the user (``POST /v1/users/{id}/verify_password``)."""
    response = requests.post(
        f"{standin.api_url}/users/{clerk_user_id}/verify_password",
        json={"password": password},
        headers=BAPI_HEADERS,
        timeout=5,
    )
    if response.status_code == 422:
        return False
    response.raise_for_status()
    return response.json() == {"verified": True}


def rows(app: Flask) -> list[sa.Row]:
    with app.app_context():
        return db.session.execute(
            sa.text("SELECT id, email, clerk_user_id, role, deleted_at FROM users")
        ).all()


def expire_leases(app: Flask) -> None:
    """Let time pass for pending registrations: every lease runs out now, as if IRIS_PENDING_TIMEOUT_SECONDS
    had gone by."""
    with app.app_context():
        db.session.execute(
            sa.text(
                "UPDATE users SET pending_until = now() - interval '1 second' WHERE clerk_user_id IS NULL"
            )
        )
        db.session.commit()


def clerk_posts(standin) -> int:
    return standin.control.stats()["requests"].get("POST /v1/users", 0)


def assert_nothing_left(app: Flask, standin) -> None:
    assert rows(app) == []
    assert clerk_users(standin) == []


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.json["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


def unavailable(reason: str) -> NoReturn:
    """A tool a test needs is missing: skip on a developer's machine, fail in CI (``CI`` set), where .ci/run
    installs everything and no test may quietly skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: these tests must run there, so this fails instead of skipping)")
    pytest.skip(reason)


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")


# ---- mail


class Mailbox:
    """What a test SMTP server (``smtp_server``) received: ``messages`` (``email.message.EmailMessage``),
    ``raw`` (each message's bytes as received), ``peers`` (the client address of each message's connection:
    one address per connection the sender opened) and ``connections`` (open now). Subclass it to change how
    the server answers."""

    def __init__(self, port: int | None = None) -> None:
        self.messages: list[Any] = []
        self.raw: list[bytes] = []
        self.peers: list[Any] = []
        self.connections = 0
        self.port = port or free_port()

    async def handle_DATA(self, server, session, envelope) -> str:
        self.raw.append(envelope.original_content or envelope.content)
        self.peers.append(session.peer)
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 5.0, to: str | None = None) -> list[Any]:
        """The messages (those to ``to`` when given) once there are ``count`` of them: the app mails from a
        background thread after it answered. Raises AssertionError, naming what arrived, after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            arrived = [message for message in self.messages if to is None or message["To"] == to]
            if len(arrived) >= count:
                return arrived
            if time.monotonic() > deadline:
                got = [(message["To"], message["Subject"]) for message in self.messages]
                raise AssertionError(
                    f"expected {count} mails{f' to {to}' if to else ''} in {timeout} s, got {got}"
                )
            time.sleep(0.01)


@contextmanager
def smtp_server(port: int | None = None, mailbox: Mailbox | None = None) -> Iterator[Any]:
    """A real SMTP server (aiosmtpd) on ``port`` (default: a free loopback port), or on ``mailbox``'s port.
    Yields the ``Mailbox`` (``mailbox`` when given): ``.port``, ``.messages``, ``.raw``, ``.peers``.

    It stops once its clients have hung up (5 s at most): the app's mail courier quits only after recording
    the mail it sent, and a server stopped under an open connection leaves an unclosed transport behind."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    class CountingSMTP(SMTP):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.event_handler.connections += 1

        def connection_lost(self, error) -> None:
            super().connection_lost(error)
            self.event_handler.connections -= 1

    class CountingController(Controller):
        def factory(self) -> SMTP:
            return CountingSMTP(self.handler, **self.SMTP_kwargs)

    mailbox = mailbox or Mailbox(port)
    controller = CountingController(mailbox, hostname="127.0.0.1", port=mailbox.port)
    controller.start()
    try:
        yield mailbox
    finally:
        deadline = time.monotonic() + 5
        while mailbox.connections > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        controller.stop()


def mailed_link(mailbox: Mailbox, address: str) -> str:
    """The verification link's path in the one mail ``address`` got (waiting for it to arrive)."""
    [message] = mailbox.wait_for(1, to=address)
    return link_in(message)


def link_in(message: Any) -> str:
    """The verification link's path in a received mail's plain text part."""
    text = message.get_body(preferencelist=("plain",)).get_content()
    [link] = [word for word in text.split() if "/verify-email/" in word]
    return urlsplit(link).path


# ---- accounts over their life: admins, deactivation, the audit trail

# A trigger that makes soft-deleting (or undeleting) the account of fails@b.example fail, like a full disk.
FAILING_SOFT_DELETE = """
CREATE FUNCTION fail_soft_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'disk full (simulated)'; END; $$;
CREATE TRIGGER fail_soft_delete BEFORE UPDATE OF deleted_at ON users
    FOR EACH ROW WHEN (NEW.email = 'fails@b.example') EXECUTE FUNCTION fail_soft_delete();
"""
REPAIRED_SOFT_DELETE = "DROP TRIGGER fail_soft_delete ON users"


def run_sql(app: Flask, statement: str, **params: Any) -> None:
    """Run one SQL statement (or several, without parameters) on ``app``'s schema and commit."""
    with app.app_context():
        db.session.execute(sa.text(statement), params)
        db.session.commit()


def signed_in_admin(client, app: Flask, standin, email: str = "admin@iris.example") -> tuple[dict, dict]:
    """A registered, confirmed admin (made one the way `flask iris promote` leaves it) and the Authorization
    header of a session token for it, valid 10 minutes."""
    user = register(client, email)
    run_sql(app, "UPDATE users SET role = 'admin', email_verified_at = now() WHERE id = :id", id=user["id"])
    user["role"] = "admin"
    return user, bearer(session_token(standin, user["clerk_user_id"], 600))


# The events registrations record (iris.registration), a failed attempt's included: left out of
# ``audit_events`` unless asked for, so that a test about what happens to an account afterwards sees only
# that. Events of one transaction share their occurred_at, so they come in the order of their action.
REGISTRATION_EVENTS = ("registration_started", "registered", "registration_undone")


def audit_events(app: Flask, *, registration: bool = False) -> list[sa.Row]:
    """Every audit event, oldest first: action, target_id, actor_id, actor_name, request_id; those of
    ``REGISTRATION_EVENTS`` only with ``registration``."""
    with app.app_context():
        found = db.session.execute(
            sa.text(
                "SELECT action, target_id, actor_id, actor_name, request_id FROM audit_events"
                " ORDER BY occurred_at, action"
            )
        ).all()
    return [event for event in found if registration or event.action not in REGISTRATION_EVENTS]


def clerk_user_state(standin, clerk_user_id: str) -> dict | None:
    """The Clerk user as the stand-in's Backend API shows it (``banned`` included), or None when deleted."""
    response = requests.get(f"{standin.api_url}/users/{clerk_user_id}", headers=BAPI_HEADERS, timeout=5)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()


# The password the stand-in's own tests give the users they make (StandinApi.create_user).
STANDIN_PASSWORD = "a fine long passphrase"


class StandinApi:
    """A minimal Backend API caller for one stand-in server (its base URL and secret key, short timeouts) and
    its control API; for the stand-in's own tests, which run it without a database."""

    def __init__(self, server: StandinServer):
        self.base = server.base_url
        self.headers = {"Authorization": f"Bearer {server.secret_key}"}

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        timeout = kwargs.pop("timeout", 10)
        return requests.request(method, self.base + path, headers=headers, timeout=timeout, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        if body is not None:
            kwargs["json"] = body
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def patch(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        if body is not None:
            kwargs["json"] = body
        return self.request("PATCH", path, **kwargs)

    def create_user(self, email: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("password", STANDIN_PASSWORD)
        response = self.post("/v1/users", {"email_address": [email], **fields})
        assert response.status_code == 200, response.text
        return response.json()

    def control(self, method: str, path: str, body: Any = None) -> requests.Response:
        return requests.request(method, f"{self.base}/__standin{path}", json=body, timeout=30)

    def fault(self, **fault: Any) -> dict[str, Any]:
        response = self.control("POST", "/faults", fault)
        assert response.status_code == 201, response.text
        return response.json()

    def stats(self) -> dict[str, Any]:
        return self.control("GET", "/stats").json()

    def jwks_key(self, token: str) -> Any:
        kid = jwt.get_unverified_header(token)["kid"]
        keys = self.get("/v1/jwks").json()["keys"]
        jwk = next(k for k in keys if k["kid"] == kid)
        return jwt.PyJWK(jwk).key


def only_clerk_error(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    """Assert a Clerk error envelope with exactly one error of ``code``; return that error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["clerk_trace_id"], str) and body["clerk_trace_id"]
    assert [e["code"] for e in body["errors"]] == [code], body
    error = body["errors"][0]
    assert error["message"] and error["long_message"]
    return error


def user_ids(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, list)
    return [user["id"] for user in body]


# ---- the instance mark: which Clerk users this database made


def instance_mark(app: Flask) -> str:
    """``app``'s database's id (the one ``iris_instance`` row), as Iris puts it in its Clerk users'
    ``private_metadata.iris_instance``."""
    with app.app_context():
        return str(db.session.execute(sa.text("SELECT id FROM iris_instance")).scalar_one())


def create_marked_clerk_user(
    standin, email: str, *, mark: str | None, external_id: str | None = None
) -> dict:
    """A user made straight at the stand-in's Backend API carrying ``mark`` as the Iris database that made it
    (``private_metadata.iris_instance``; None: no mark, as any other application's users, or Iris's own
    before users were marked) and an ``external_id`` (a fresh UUID unless given)."""
    metadata = {} if mark is None else {"iris_instance": mark}
    return bapi(
        standin,
        "POST",
        "/users",
        email_address=[email],
        password=PASSWORD,
        external_id=external_id or str(uuid.uuid4()),
        private_metadata=metadata,
    )


# ---- database roles: the runtime role and the owner (migrations/versions/0009_runtime_role.py)


@contextmanager
def login_role(admin_engine: sa.Engine, prefix: str = "iris_app") -> Iterator[str]:
    """A new LOGIN role, neither superuser nor owner of anything, named ``prefix`` and a random suffix:
    roles are cluster-wide and tests run side by side, each in its schema. Afterwards its sessions are ended,
    and everything it owns or was granted in the test database goes with it (``DROP OWNED``)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'CREATE ROLE "{name}" LOGIN'))
    try:
        yield name
    finally:
        with admin_engine.begin() as connection:
            connection.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :name"),
                {"name": name},
            )
            connection.execute(sa.text(f'DROP OWNED BY "{name}"'))
            connection.execute(sa.text(f'DROP ROLE "{name}"'))


def url_as(role: str) -> str:
    """TEST_DATABASE_URL connecting as ``role`` (the test server trusts loopback: no password)."""
    url = sa.make_url(TEST_DATABASE_URL).set(username=role, password=None)
    return url.render_as_string(hide_password=False)
