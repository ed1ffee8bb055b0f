"""``flask iris``: the ``users`` listing, and how every command fails: one ``Error:`` line on stderr and exit
status 1, a traceback only with ``--verbose``. Real PostgreSQL through ``app.test_cli_runner()``; the
configuration failure through the real ``flask`` and ``gunicorn`` commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import Result
from flask import Flask

from iris.cli import iris_cli
from iris.extensions import db
from tests.helpers import free_port, register

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def execute(app: Flask, statement: str, **params) -> None:
    with app.app_context():
        db.session.execute(sa.text(statement), params)
        db.session.commit()


def users(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["iris", "users", *args])


@pytest.fixture
def accounts(app: Flask, client) -> Flask:
    """Five accounts, oldest first: an active one, a deleted one, a pending registration, an unconfirmed one
    (its email address not confirmed yet), an active admin; created at fixed instants (UTC) so the order and
    the local times are known."""
    register(client, "first@bistro.example")
    register(client, "gone@bistro.example")
    register(client, "new@bistro.example")
    register(client, "boss@iris.example")
    execute(
        app,
        "INSERT INTO users (id, email, role, pending_owner, pending_until)"
        " VALUES (gen_random_uuid(), 'half@bistro.example', 'restaurant', gen_random_uuid(), now())",
    )
    created = {
        "first@bistro.example": "2026-01-15 12:00:00+00",
        "gone@bistro.example": "2026-03-29 00:30:00+00",  # 01:30 in Stockholm, before the clocks go forward
        "half@bistro.example": "2026-07-01 09:15:00+00",
        "new@bistro.example": "2026-09-10 08:00:00+00",
        "boss@iris.example": "2026-11-26 12:15:00+00",
    }
    for email, moment in created.items():
        execute(app, "UPDATE users SET created_at = :moment WHERE email = :email", moment=moment, email=email)
    execute(app, "UPDATE users SET role = 'admin' WHERE email = 'boss@iris.example'")
    execute(app, "UPDATE users SET email_verified_at = now() WHERE email <> 'new@bistro.example'")
    execute(
        app,
        "UPDATE users SET deleted_at = '2026-04-01 10:00:00+00' WHERE email = 'gone@bistro.example'",
    )
    return app


def table(result: Result) -> list[list[str]]:
    """The rows under the header, split on the column gaps (two spaces or more)."""
    lines = result.stdout.splitlines()
    return [[cell for cell in line.split("  ") if cell.strip()] for line in lines[1:-1]]


def test_users_lists_live_accounts_newest_first_in_the_configured_zone(accounts):
    result = users(accounts)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["email", "role", "status", "created", "(Europe/Stockholm)", "deleted"]
    assert [[cell.strip() for cell in row] for row in table(result)] == [
        ["boss@iris.example", "admin", "active", "2026-11-26 13:15", "-"],
        ["new@bistro.example", "restaurant", "unconfirmed", "2026-09-10 10:00", "-"],
        ["half@bistro.example", "restaurant", "pending", "2026-07-01 11:15", "-"],
        ["first@bistro.example", "restaurant", "active", "2026-01-15 13:00", "-"],
    ]
    assert lines[-1] == "4 accounts"
    # Aligned: every row starts its columns where the header does.
    starts = [lines[0].index("role"), lines[0].index("status")]
    for line in lines[1:-1]:
        assert [line[start - 2 : start] for start in starts] == ["  ", "  "]
        assert line[starts[0]] != " " and line[starts[1]] != " "


def test_users_filters_by_email_part_role_and_deleted(accounts):
    assert [row[0] for row in table(users(accounts, "--email", "BISTRO"))] == [
        "new@bistro.example",
        "half@bistro.example",
        "first@bistro.example",
    ]
    assert [row[0] for row in table(users(accounts, "--role", "admin"))] == ["boss@iris.example"]

    deleted = users(accounts, "--deleted")
    assert [[cell.strip() for cell in row] for row in table(deleted)] == [
        ["gone@bistro.example", "restaurant", "deleted", "2026-03-29 01:30", "2026-04-01 12:00"]
    ]
    assert deleted.stdout.splitlines()[-1] == "1 account"

    everyone = users(accounts, "--all", "--email", "bistro", "--role", "restaurant")
    assert [row[0] for row in table(everyone)] == [
        "new@bistro.example",
        "half@bistro.example",
        "gone@bistro.example",
        "first@bistro.example",
    ]


def test_users_email_filter_is_a_plain_substring_not_a_pattern(accounts):
    assert users(accounts, "--email", "%").stdout == "0 accounts\n"
    assert users(accounts, "--email", "_").stdout == "0 accounts\n"


def test_users_shows_times_in_iris_timezone(make_app, client, accounts):
    app = make_app(IRIS_TIMEZONE="America/New_York")
    result = users(app, "--role", "admin")
    assert result.stdout.splitlines()[0].split()[3:5] == ["created", "(America/New_York)"]
    assert table(result)[0][3].strip() == "2026-11-26 07:15"


def test_users_help_says_what_status_means(runner):
    text = runner.invoke(args=["iris", "users", "--help"]).output
    assert '"pending" (a registration still in flight' in " ".join(text.split())
    assert '"unconfirmed" (a complete account whose email address is not confirmed yet)' in " ".join(
        text.split()
    )


def test_an_unknown_role_is_refused_by_click_with_exit_2(runner):
    result = runner.invoke(args=["iris", "users", "--role", "owner"])
    assert result.exit_code == 2
    assert "'owner' is not one of 'restaurant', 'admin'" in result.stderr


# ---- failures: one line, exit 1


def unreachable_app(make_app) -> Flask:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/iris"
    return make_app(SQLALCHEMY_DATABASE_URI=url)


@pytest.mark.parametrize("command", [["users"], ["reconcile"]])
def test_an_unreachable_database_is_one_line_and_exit_1(make_app, command):
    result = unreachable_app(make_app).test_cli_runner().invoke(args=["iris", *command])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == "Error: database unreachable: OperationalError; try again later.\n"


def test_an_unexpected_error_is_one_line_unless_verbose(app, monkeypatch):
    def broken() -> None:
        raise KeyError("postgresql://iris:secret@db/iris")

    monkeypatch.setattr("iris.registration.reconcile", broken)
    runner = app.test_cli_runner()

    quiet = runner.invoke(args=["iris", "reconcile"])
    assert quiet.exit_code == 1
    assert quiet.stderr == (
        "Error: unexpected KeyError in `flask iris reconcile`;"
        " `flask iris --verbose reconcile ...` shows the traceback.\n"
    )
    assert "secret" not in quiet.output

    verbose = runner.invoke(args=["iris", "--verbose", "reconcile"])
    assert isinstance(verbose.exception, KeyError)  # raised on: the flask command prints the traceback


def test_the_group_offers_verbose():
    assert "--verbose" in [option for param in iris_cli.params for option in param.opts]


def flask_command(*args: str, **environ: str) -> subprocess.CompletedProcess:
    """The real ``flask`` command in the repository, with only ``environ`` beyond PATH and HOME."""
    base = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    return subprocess.run(
        [str(BIN / "flask"), *args],
        cwd=ROOT,
        env={**base, **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


MISSING = (
    "Iris cannot start: missing required configuration DATABASE_URL, CLERK_SECRET_KEY, FLASK_SECRET_KEY,"
    " CLERK_PUBLISHABLE_KEY, IRIS_PUBLIC_URL, MAIL_SERVER."
)


@pytest.mark.parametrize(
    "command", [["iris", "token", "owner@bistro.example"], ["iris", "users"], ["db", "upgrade"]]
)
def test_without_configuration_the_flask_command_says_so_in_one_line(command):
    finished = flask_command(*command)
    assert finished.returncode == 1
    assert finished.stdout == ""
    [line] = finished.stderr.splitlines()
    assert line.startswith(f"Error: {MISSING}")
    assert "Traceback" not in finished.stderr


def test_without_configuration_gunicorn_still_refuses_to_start():
    base = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "--bind",
            f"127.0.0.1:{free_port()}",
            "wsgi:app",
        ],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode != 0
    assert MISSING in finished.stderr
    assert "Worker failed to boot" in finished.stderr


def test_users_on_an_empty_database_says_0_accounts(app):
    result = users(app)
    assert result.exit_code == 0
    assert result.stdout == "0 accounts\n"
