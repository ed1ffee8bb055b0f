"""Shared fixtures: a fresh PostgreSQL schema per test, built by running the real migrations.

TEST_DATABASE_URL picks the server (default: the local one every project machine has). When it cannot be
reached the tests fail; they never skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import flask_migrate
import pytest
import sqlalchemy as sa
from flask import Flask

from clerk_standin import DEFAULT_SECRET_KEY, StandinServer
from iris import create_app
from iris.config import database_uri
from iris.extensions import db

TEST_DATABASE_URL = database_uri(
    os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
)


@pytest.fixture(scope="session")
def admin_engine() -> Iterator[sa.Engine]:
    engine = sa.create_engine(TEST_DATABASE_URL, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


# Apps made during the current test; their engines are closed before the test's schema is dropped.
_apps: list[Flask] = []


@pytest.fixture
def schema(admin_engine: sa.Engine) -> Iterator[str]:
    """A throwaway schema, dropped after the test (after closing every app engine the test made)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    yield name
    while _apps:
        with _apps.pop().app_context():
            db.session.remove()
            db.engine.dispose()
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))


_standin_url = "http://127.0.0.1:1"  # replaced by the standin_server fixture


@pytest.fixture(scope="session")
def standin_server() -> Iterator[StandinServer]:
    """The local Clerk stand-in, on a free loopback port, for the whole run."""
    global _standin_url
    with StandinServer() as server:
        _standin_url = server.base_url
        yield server


@pytest.fixture(autouse=True)
def standin(standin_server: StandinServer) -> Iterator[StandinServer]:
    """The stand-in, emptied (users, sessions, faults, counters) after every test."""
    yield standin_server
    standin_server.app.reset()


def make_test_app(schema: str, **overrides) -> Flask:
    """An app on ``schema`` talking to the stand-in; ``overrides`` replace any of its settings."""
    settings = {
        "TESTING": True,
        # Unhandled errors become the real 500 response (and a logged traceback), as in production.
        "PROPAGATE_EXCEPTIONS": False,
        "SECRET_KEY": "test-secret-key",
        "WTF_CSRF_ENABLED": False,
        "SQLALCHEMY_DATABASE_URI": TEST_DATABASE_URL,
        "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"options": f"-csearch_path={schema}"}},
        "CLERK_API_URL": _standin_url,
        "CLERK_SECRET_KEY": DEFAULT_SECRET_KEY,
        # Short timeouts keep the hang tests quick; production uses iris.clerk.DEFAULT_TIMEOUT.
        "CLERK_TIMEOUT": (1.0, 1.5),
        # Every test client is 127.0.0.1; the rate-limit tests switch limits back on.
        "RATELIMIT_ENABLED": False,
    }
    settings.update(overrides)
    app = create_app(settings)
    _apps.append(app)
    return app


def migrate(app: Flask) -> None:
    with app.app_context():
        flask_migrate.upgrade()


@pytest.fixture
def app(schema: str) -> Flask:
    app = make_test_app(schema)
    migrate(app)
    return app


@pytest.fixture
def client(app: Flask):
    return app.test_client()


@pytest.fixture
def runner(app: Flask):
    return app.test_cli_runner()
