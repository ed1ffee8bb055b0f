"""Shared fixtures, and nothing else: a fresh PostgreSQL schema per test, built by running the real
migrations, and the local Clerk stand-in. Helpers that are not fixtures live in tests/helpers.py.

TEST_DATABASE_URL picks the server (default: the local one every project machine has). When it cannot be
reached the tests fail; they never skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from flask import Flask

from clerk_standin import StandinServer
from tests.helpers import TEST_DATABASE_URL, StandinApi, dispose, make_test_app, migrate


@pytest.fixture(scope="session")
def admin_engine() -> Iterator[sa.Engine]:
    engine = sa.create_engine(TEST_DATABASE_URL, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def schema(admin_engine: sa.Engine) -> Iterator[str]:
    """A throwaway schema, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    yield name
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))


@pytest.fixture(scope="session")
def standin_server() -> Iterator[StandinServer]:
    """The local Clerk stand-in, on a free loopback port, for the whole run. Its webhooks (off until a test
    points them somewhere) retry on Svix's schedule sped up a thousandfold: 5 ms, 0.3 s, 1.8 s, ..."""
    with StandinServer(webhook_retry_scale=0.001) as server:
        yield server


@pytest.fixture(autouse=True)
def standin(standin_server: StandinServer) -> Iterator[StandinServer]:
    """The stand-in, emptied (users, sessions, faults, counters) after every test."""
    yield standin_server
    standin_server.app.reset()


@pytest.fixture
def api(standin: StandinServer) -> StandinApi:
    """A ``StandinApi`` on the test's stand-in (a module may give its own ``standin``), reset first."""
    api = StandinApi(standin)
    assert api.control("POST", "/reset").status_code == 200
    return api


@pytest.fixture
def make_app(schema: str, standin_server: StandinServer) -> Iterator[Callable[..., Flask]]:
    """``make_app(**overrides)``: an app on this test's schema talking to the stand-in, with ``overrides``
    replacing any of its settings (tests.helpers.make_test_app); not migrated (tests.helpers.migrate).

    Every app it made is disposed after the test and before ``schema`` drops the schema: this fixture depends
    on ``schema``, so pytest tears this one down first."""
    apps: list[Flask] = []

    def make(**overrides) -> Flask:
        app = make_test_app(schema, standin_server.base_url, **overrides)
        apps.append(app)
        return app

    yield make
    for app in apps:
        dispose(app)


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    app = make_app()
    migrate(app)
    return app


@pytest.fixture
def client(app: Flask):
    return app.test_client()


@pytest.fixture
def runner(app: Flask):
    return app.test_cli_runner()


@pytest.fixture
def smtp() -> Iterator:
    """A real SMTP server (aiosmtpd) on a free loopback port: ``.port``, and ``.messages`` received
    (``email.message.EmailMessage``). See tests.helpers.smtp_server."""
    from tests.helpers import smtp_server

    with smtp_server() as received:
        yield received
