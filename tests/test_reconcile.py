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
    create_marked_clerk_user,
    dispose,
    instance_mark,
    make_test_app,
    migrate,
    register,
    run_sql,
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
    # A create of ours that landed after its row was settled: our mark, an id no row has.
    stray = create_marked_clerk_user(standin, "stray@bistro.example", mark=instance_mark(app))

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
    stray = create_marked_clerk_user(standin, "stray@bistro.example", mark=instance_mark(app))

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


# ---- Iris deletes at Clerk only what it made


def test_only_a_stray_carrying_our_mark_is_deleted_others_are_reported_and_left_alone(app, standin):
    """On a shared Clerk instance a UUID external_id unknown here is not proof of anything: a user another
    Iris database made (its own mark) or another application made (no mark) survives every pass, and is
    listed as not ours; our own stray (our mark) is deleted."""
    ours = create_marked_clerk_user(standin, "ours@bistro.example", mark=instance_mark(app))
    foreign = create_marked_clerk_user(standin, "foreign@bistro.example", mark=str(uuid.uuid4()))
    unmarked = create_marked_clerk_user(standin, "unmarked@bistro.example", mark=None)

    for _ in range(2):  # the second pass too: reported each time, never touched
        result = reconcile(app)
        assert result.exit_code == 0, result.output
        assert {user["id"] for user in clerk_users(standin)} == {foreign["id"], unmarked["id"]}
        assert all(user["banned"] is False for user in clerk_users(standin))
        assert "not_ours 2" in result.output
        listed = result.output.split("Not ours, left alone", 1)[1].split("Summary:", 1)[0]
        assert foreign["id"] in listed and unmarked["id"] in listed and ours["id"] not in listed
    assert "clerk_user_deleted 0" in result.output
    assert live_accounts(app) == {}  # nor made accounts here


@pytest.mark.parametrize("mark", ["foreign", None], ids=["another-database", "no-mark"])
def test_a_clerk_user_naming_a_deleted_row_here_is_banned_only_with_our_mark(app, standin, mark):
    """A row deleted here whose id a live Clerk user carries as external_id, while the row itself names
    another Clerk user (a copy of this database made the Clerk user): banned only if our mark says we made
    it."""
    row_id = uuid.uuid4()
    run_sql(
        app,
        "INSERT INTO users (id, email, clerk_user_id, role, deleted_at) VALUES"
        " (:id, 'copied@bistro.example', 'user_somebody_else', 'restaurant', now() - interval '1 day')",
        id=row_id,
    )
    given = str(uuid.uuid4()) if mark == "foreign" else None
    theirs = create_marked_clerk_user(standin, "copied@bistro.example", mark=given, external_id=str(row_id))
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    [kept] = clerk_users(standin)
    assert (kept["id"], kept["banned"]) == (theirs["id"], False)
    assert "clerk_user_banned 0" in result.output and "not_ours 1" in result.output

    mine = create_marked_clerk_user(  # control: the same with our mark is banned
        standin, "mine@bistro.example", mark=instance_mark(app), external_id=str(row_id := uuid.uuid4())
    )
    run_sql(
        app,
        "INSERT INTO users (id, email, clerk_user_id, role, deleted_at) VALUES"
        " (:id, 'mine@bistro.example', 'user_another', 'restaurant', now() - interval '1 day')",
        id=row_id,
    )
    assert "clerk_user_banned 1" in reconcile(app).output
    assert {user["id"]: user["banned"] for user in clerk_users(standin)} == {
        theirs["id"]: False,
        mine["id"]: True,
    }


def test_two_checkouts_sharing_one_clerk_leave_each_others_users_alone(app, client, standin, admin_engine):
    """Two databases (two schemas) behind one stand-in, as two checkouts on one machine or staging and
    production on one Clerk instance: a reconcile in either deletes, bans and imports nothing of the other's,
    and both keep their accounts."""
    other_schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{other_schema}"'))
    other = make_test_app(other_schema, standin.base_url)
    try:
        migrate(other)
        assert instance_mark(other) != instance_mark(app)
        mine = register(client, "mine@bistro.example")
        theirs = register(other.test_client(), "theirs@bistro.example")
        # Each side also has a stray of its own (a create that landed after its row was settled).
        my_stray = create_marked_clerk_user(standin, "my-stray@bistro.example", mark=instance_mark(app))
        their_stray = create_marked_clerk_user(
            standin, "their-stray@bistro.example", mark=instance_mark(other)
        )

        here = reconcile(app)
        assert here.exit_code == 0, here.output
        assert {user["id"] for user in clerk_users(standin)} == {
            mine["clerk_user_id"],
            theirs["clerk_user_id"],
            their_stray["id"],
        }
        assert "clerk_user_deleted 1" in here.output and "not_ours 2" in here.output
        there = reconcile(other)
        assert there.exit_code == 0, there.output
        assert {user["id"] for user in clerk_users(standin)} == {
            mine["clerk_user_id"],
            theirs["clerk_user_id"],
        }
        assert all(user["banned"] is False for user in clerk_users(standin))
        assert my_stray["id"] not in {user["id"] for user in clerk_users(standin)}
        assert live_accounts(app) == {mine["clerk_user_id"]: "mine@bistro.example"}
        assert live_accounts(other) == {theirs["clerk_user_id"]: "theirs@bistro.example"}
    finally:
        dispose(other)
        with admin_engine.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{other_schema}" CASCADE'))


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


def test_reconcile_forgets_webhook_ids_older_than_30_days(app):
    with app.app_context():
        db.session.execute(
            sa.text(
                "INSERT INTO clerk_webhook_deliveries (svix_id, event_type, received_at) VALUES"
                " ('msg_old', 'user.updated', now() - interval '31 days'),"
                " ('msg_new', 'user.updated', now() - interval '8 days')"
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
    # The users whose rows will name another Clerk user (strays): made as Iris makes them, with our mark,
    # since only a marked stray is deleted. The rest in bulk (made before marks existed, as far as it shows).
    strays = range(drift, 2 * drift)
    mark = instance_mark(app)
    bulk = iter(standin.control.bulk_create_users([user for n, user in enumerate(users) if n not in strays]))
    clerk_ids = [
        create_marked_clerk_user(
            standin, users[n]["email_address"], mark=mark, external_id=users[n]["external_id"]
        )["id"]
        if n in strays
        else next(bulk)
        for n in range(size)
    ]
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
