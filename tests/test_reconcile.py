"""`flask iris reconcile`, the full maintenance pass: drift repaired both ways against the Clerk stand-in over
HTTP, on real PostgreSQL; dry run; Clerk's rate limit and failures; the lock that keeps two passes apart."""

from __future__ import annotations

import contextlib
import os
import pty
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from clerk_standin import DEFAULT_SECRET_KEY
from iris import clerk
from iris.config import DEV_PUBLISHABLE_KEY
from iris.errors import RateLimited
from iris.extensions import db
from iris.maintenance import LOCK_KEY
from iris.models import User
from tests.helpers import (
    BAPI_HEADERS,
    TEST_DATABASE_URL,
    clerk_users,
    create_clerk_user,
    register,
)

ROOT = Path(__file__).resolve().parents[1]


def reconcile(app: Flask, *args: str):
    return app.test_cli_runner().invoke(args=["iris", "reconcile", *args])


def live_accounts(app: Flask) -> dict[str, str]:
    """clerk_user_id -> email of every live account."""
    with app.app_context():
        found = db.session.execute(
            sa.text(
                "SELECT clerk_user_id, email FROM users"
                " WHERE deleted_at IS NULL AND clerk_user_id IS NOT NULL"
            )
        ).all()
        db.session.rollback()
    return dict(found)


def delete_at_clerk(standin, clerk_user_id: str) -> None:
    requests.delete(
        f"{standin.api_url}/users/{clerk_user_id}", headers=BAPI_HEADERS, timeout=5
    ).raise_for_status()


def test_reconcile_repairs_drift_both_ways(app, client, standin):
    kept = register(client, "kept@bistro.example")
    gone = register(client, "gone@bistro.example")
    delete_at_clerk(standin, gone["clerk_user_id"])  # deleted in Clerk's dashboard; the webhook never came
    walkin = create_clerk_user(standin, "walkin@bistro.example")  # made by support in Clerk's dashboard
    stray = create_clerk_user(
        standin, "stray@bistro.example", external_id="0b5c6c1e-8d4f-4a0e-9d5b-3f4e8a1c2d3e"
    )

    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert live_accounts(app) == {
        kept["clerk_user_id"]: "kept@bistro.example",
        walkin["id"]: "walkin@bistro.example",
    }
    assert {user["id"] for user in clerk_users(standin)} == {kept["clerk_user_id"], walkin["id"]}
    assert stray["id"] not in result.output or "clerk_user_deleted" in result.output
    assert (
        "created 1" in result.output
        and "deleted 1" in result.output
        and "clerk_user_deleted 1" in result.output
    )
    assert "gone@bistro.example  (gone from Clerk)" in result.output

    again = reconcile(app)  # in step now: nothing more to do
    assert again.exit_code == 0
    assert "created 0" in again.output and "deleted 0" in again.output and "Changed:" not in again.output


def test_a_changed_address_at_clerk_moves_the_account(app, client, standin):
    registered = register(client, "old@bistro.example")
    with app.app_context():
        db.session.execute(sa.text("UPDATE users SET email = 'stale@bistro.example', clerk_updated_at = 1"))
        db.session.commit()
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert "stale@bistro.example -> old@bistro.example" in result.output
    assert live_accounts(app) == {registered["clerk_user_id"]: "old@bistro.example"}


def test_a_dry_run_lists_the_drift_and_changes_nothing(app, client, standin):
    gone = register(client, "gone@bistro.example")
    delete_at_clerk(standin, gone["clerk_user_id"])
    walkin = create_clerk_user(standin, "walkin@bistro.example")
    stray = create_clerk_user(
        standin, "stray@bistro.example", external_id="0b5c6c1e-8d4f-4a0e-9d5b-3f4e8a1c2d3e"
    )

    result = reconcile(app, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "Would change:" in result.output
    assert "Dry run, nothing changed:" in result.output
    assert (
        "created 1" in result.output
        and "deleted 1" in result.output
        and "clerk_user_deleted 1" in result.output
    )
    assert live_accounts(app) == {gone["clerk_user_id"]: "gone@bistro.example"}
    assert {user["id"] for user in clerk_users(standin)} == {walkin["id"], stray["id"]}


def test_a_banned_stray_is_kept_at_clerk(app, client, standin):
    """A deactivated account keeps its Clerk user, banned, so that it can be reactivated."""
    registered = register(client, "banned@bistro.example")
    response = requests.post(
        f"{standin.api_url}/users/{registered['clerk_user_id']}/ban", headers=BAPI_HEADERS, timeout=5
    )
    assert response.status_code == 200, response.text
    with app.app_context():
        db.session.execute(sa.text("UPDATE users SET deleted_at = now() - interval '1 day'"))
        db.session.commit()
    assert reconcile(app).exit_code == 0
    assert [user["id"] for user in clerk_users(standin)] == [registered["clerk_user_id"]]


def test_a_live_clerk_user_whose_account_was_deleted_here_is_banned(app, client, standin):
    """Deleted here, still able to sign in at Clerk: banned (reversible by reactivating), not deleted."""
    registered = register(client, "closed@bistro.example")
    with app.app_context():
        db.session.execute(sa.text("UPDATE users SET deleted_at = now() - interval '1 day'"))
        db.session.commit()
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    [user] = clerk_users(standin)
    assert user["id"] == registered["clerk_user_id"] and user["banned"] is True
    assert "clerk_user_banned 1" in result.output
    assert "closed@bistro.example  (its account was deleted here)" in result.output
    assert "clerk_user_banned 0" in reconcile(app).output  # banned now: left alone


def test_an_account_deleted_moments_ago_is_left_alone_at_clerk(app, client, standin):
    """A request may be deleting its Clerk user right now; the next pass looks again."""
    register(client, "closing@bistro.example")
    with app.app_context():
        db.session.execute(sa.text("UPDATE users SET deleted_at = now()"))
        db.session.commit()
    assert reconcile(app).exit_code == 0
    assert len(clerk_users(standin)) == 1


def test_clerks_rate_limit_is_waited_out_for_its_retry_after(app, client, standin):
    register(client, "owner@bistro.example")
    standin.control.add_fault(
        method="GET", path="/v1/users", action="status", status=429, retry_after=1, times=1
    )
    started = time.monotonic()
    result = reconcile(app)
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert elapsed >= 1.0
    assert "failed 0" in result.output


def test_a_failing_page_is_asked_again_from_the_same_cursor(app, standin):
    for n in range(3):
        create_clerk_user(standin, f"walkin{n}@bistro.example")
    # Two 503s on the list: retried (IRIS_RECONCILE_RETRY_DELAYS), then the walk goes on where it was.
    app.config["IRIS_RECONCILE_RETRY_DELAYS"] = (0.05, 0.05)
    standin.control.add_fault(method="GET", path="/v1/users", action="status", status=503, times=2)
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert "created 3" in result.output


def test_when_clerk_stays_down_reconcile_says_where_it_stopped_and_exits_1(app, client, standin):
    register(client, "owner@bistro.example")
    standin.control.add_fault(method="GET", path="/v1/users", action="status", status=503)
    result = reconcile(app)
    assert result.exit_code == 1
    assert "Failed: counting Clerk's users" in result.stderr
    assert "Failed: the walk of Iris accounts stopped after the start; run again" in result.stderr
    assert len(live_accounts(app)) == 1  # nothing deleted for want of an answer
    standin.control.clear_faults()
    assert reconcile(app).exit_code == 0  # the next run carries on


def test_a_second_pass_while_one_runs_says_so_and_exits_0(app, client, standin):
    register(client, "owner@bistro.example")
    engine = sa.create_engine(TEST_DATABASE_URL)
    try:
        with engine.connect() as holder:
            holder.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
            result = reconcile(app)
            assert result.exit_code == 0, result.output
            assert "Another `flask iris reconcile` is running" in result.output
            holder.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
    finally:
        engine.dispose()
    assert "Summary:" in reconcile(app).output


def test_reconcile_forgets_webhook_ids_older_than_a_week(app):
    with app.app_context():
        db.session.execute(
            sa.text(
                "INSERT INTO clerk_webhook_deliveries (svix_id, event_type, received_at) VALUES"
                " ('msg_old', 'user.updated', now() - interval '8 days'),"
                " ('msg_new', 'user.updated', now() - interval '1 day')"
            )
        )
        db.session.commit()
    assert reconcile(app).exit_code == 0
    with app.app_context():
        left = db.session.execute(sa.text("SELECT svix_id FROM clerk_webhook_deliveries")).scalars().all()
    assert left == ["msg_new"]


@pytest.mark.slow
def test_reconcile_walks_every_page_of_clerks_users(app, standin):
    """1,201 users: three pages of 500 by cursor, every user seen once."""
    standin.control.bulk_create_users([{"email_address": f"walkin{n}@bistro.example"} for n in range(1201)])
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert "created 1201" in result.output
    assert standin.control.stats()["requests"]["GET /v1/users"] >= 3
    with app.app_context():
        assert db.session.execute(sa.select(sa.func.count()).select_from(User)).scalar_one() == 1201


def test_a_get_answered_429_is_clerks_rate_limit_with_its_retry_after(app, standin):
    """Not urllib3's retry: the client sees Clerk's 429 and its Retry-After (reconcile waits that long)."""
    standin.control.add_fault(
        method="GET", path="/v1/users/", action="status", status=429, retry_after=7, times=1
    )
    with app.app_context(), pytest.raises(RateLimited) as raised:
        clerk.get_user("user_2x")
    assert raised.value.retry_after == 7


def test_on_a_terminal_reconcile_shows_progress_and_in_cron_it_does_not(app, schema, standin):
    """The real `flask iris reconcile`, its stderr a pseudo-terminal (as for a person) and then a pipe."""
    for n in range(3):
        create_clerk_user(standin, f"walkin{n}@bistro.example")
    url = TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")
    environ = {
        **{name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ},
        "DATABASE_URL": f"{url}?options=-csearch_path%3D{schema}",
        "CLERK_API_URL": standin.base_url,
        "CLERK_SECRET_KEY": DEFAULT_SECRET_KEY,
        "FLASK_SECRET_KEY": "test",
        "IRIS_PUBLIC_URL": "https://iris.test",
        "CLERK_PUBLISHABLE_KEY": DEV_PUBLISHABLE_KEY,
        "IRIS_EMAIL_VERIFICATION": "off",
        "FLASK_APP": "wsgi",
        "COLUMNS": "100",
    }
    flask = [str(Path(sys.executable).parent / "flask"), "iris", "reconcile"]
    leader, follower = pty.openpty()
    with subprocess.Popen(flask, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=follower) as process:
        os.close(follower)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
            while chunk := os.read(leader, 4096):
                shown += chunk
        output = process.stdout.read().decode()
    os.close(leader)
    assert process.returncode == 0, output + shown.decode(errors="replace")
    assert "Clerk users" in shown.decode() and "3/3" in shown.decode()
    assert "created 3" in output

    piped = subprocess.run(
        flask, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60, check=False
    )
    assert piped.returncode == 0, piped.stderr
    assert "Clerk users" not in piped.stderr  # only log lines: no progress bar in a pipe
    assert "Summary: pending_completed 0" in piped.stdout


@pytest.mark.slow
def test_twenty_thousand_users_with_drift_each_way_are_brought_in_step(app, standin, schema):
    """20,000 Clerk users and 20,000 accounts, 1% drift of each kind; every drift repaired, nothing else
    touched, and a second pass finds nothing. (Its time and memory are measured by benchmarks/reconcile.py,
    not asserted here: docs/performance.md.)"""
    size, drift = 20_000, 200
    row_ids = [uuid.uuid4() for _ in range(size)]
    users = [
        {"email_address": f"owner{n}@bistro.example", "external_id": str(row_ids[n])} for n in range(size)
    ]
    clerk_ids = standin.control.bulk_create_users(users)
    standin.control.bulk_create_users([{"email_address": f"walkin{n}@bistro.example"} for n in range(drift)])
    rows_in = [
        {
            "id": row_ids[n],
            "email": f"stale{n}@bistro.example" if n < drift else f"owner{n}@bistro.example",
            "clerk_user_id": f"user_gone{n:022d}" if drift <= n < 2 * drift else clerk_ids[n],
        }
        for n in range(size)
    ]
    with app.app_context():
        db.session.execute(
            sa.text(
                "INSERT INTO users (id, email, clerk_user_id, role, email_verified_at)"
                " VALUES (:id, :email, :clerk_user_id, 'restaurant', now())"
            ),
            rows_in,
        )
        db.session.commit()

    result = reconcile(app)
    assert result.exit_code == 0, result.stderr
    summary = result.output.splitlines()[-1]
    for kind in ("created", "email_changed", "deleted", "clerk_user_deleted"):
        assert f" {kind} {drift}," in summary, summary
    assert "confirmed 0, unconfirmed 0" in summary and "failed 0" in summary
    with app.app_context():
        live = db.session.execute(
            sa.text("SELECT count(*) FROM users WHERE deleted_at IS NULL AND clerk_user_id IS NOT NULL")
        ).scalar_one()
        stale = db.session.execute(
            sa.text("SELECT count(*) FROM users WHERE email LIKE 'stale%'")
        ).scalar_one()
    assert live == size - drift + drift  # the gone ones deleted, the walk-ins added
    assert stale == 0
    again = reconcile(app)
    assert "Changed:" not in again.output and "failed 0" in again.output
