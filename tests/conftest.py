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


@pytest.fixture
def schema(admin_engine: sa.Engine) -> Iterator[str]:
    """A throwaway schema, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    yield name
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))


def make_test_app(schema: str, **overrides) -> Flask:
    """An app on ``schema`` with the test configuration; ``overrides`` replace any of its keys."""
    settings = {
        "TESTING": True,
        "SECRET_KEY": "test-secret-key",
        "WTF_CSRF_ENABLED": False,
        "SQLALCHEMY_DATABASE_URI": TEST_DATABASE_URL,
        "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"options": f"-csearch_path={schema}"}},
    }
    settings.update(overrides)
    return create_app(settings)


def migrate(app: Flask) -> None:
    with app.app_context():
        flask_migrate.upgrade()


@pytest.fixture
def app(schema: str) -> Iterator[Flask]:
    app = make_test_app(schema)
    migrate(app)
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app: Flask):
    return app.test_client()


@pytest.fixture
def runner(app: Flask):
    return app.test_cli_runner()
