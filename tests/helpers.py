"""Helpers shared by test modules: talking to the Clerk stand-in as a client would, reading the users table,
checking the error envelope, and waiting for a condition. No fixtures here (those live in conftest.py), and
no state."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import NoReturn

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from clerk_standin import DEFAULT_SECRET_KEY
from iris.extensions import db

PASSWORD = "correct horse battery staple"
URL = "/api/v1/auth/register"


def clerk_users(standin, **params) -> list[dict]:
    """Users the stand-in holds, read over its Backend API like any Clerk client would."""
    response = requests.get(
        standin.api_url + "/users",
        params={"limit": 500, **params},
        headers={"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"},
        timeout=5,
    )
    response.raise_for_status()
    return response.json()


def password_works(standin, clerk_user_id: str, password: str) -> bool:
    """Whether Clerk accepts ``password`` for the user (``POST /v1/users/{id}/verify_password``)."""
    response = requests.post(
        f"{standin.api_url}/users/{clerk_user_id}/verify_password",
        json={"password": password},
        headers={"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"},
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
