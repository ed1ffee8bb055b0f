"""`flask iris check`: the connection test of the production deployment, end to end.

The databases are real: the local PostgreSQL (no SSL), a closed port, and a private cluster with SSL on
(tests/check_cluster.py). Clerk is the stand-in over real HTTP.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import Result
from flask import Flask

from clerk_standin import DEFAULT_SECRET_KEY
from tests import drill_support
from tests.check_cluster import SSLCluster
from tests.helpers import TEST_DATABASE_URL, login_role, migrate, url_as
from tests.tls import self_signed_certificate

DB_PASSWORD = sa.make_url(TEST_DATABASE_URL).password or "db-password-never-printed"  # trust ignores it


def check(app: Flask) -> Result:
    return app.test_cli_runner().invoke(args=["iris", "check"])


def with_password(url: str, password: str = DB_PASSWORD) -> str:
    """``url`` with ``password`` in its userinfo and (libpq allows both) in its query string."""
    parsed = sa.make_url(url).set(password=password)
    return parsed.update_query_dict({"password": password}).render_as_string(hide_password=False)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def role_line(result: Result) -> str:
    """The outcome line of the ``database role`` check."""
    return outcome(result, "database role")


def outcome(result: Result, name: str) -> str:
    """The outcome line printed under the check called ``name``."""
    lines = result.output.splitlines()
    return lines[[line.split("  ")[0] for line in lines].index(name) + 1]


# ---- plain PostgreSQL and the stand-in


def test_every_check_passes_and_says_what_it_found(make_app, standin):
    result = check(make_app())
    assert result.exit_code == 0, result.output
    pooled = outcome(result, "database (pooled)")
    assert re.fullmatch(r"  OK +\d+ ms  PostgreSQL \d+\.\d+.*, not encrypted \(sslmode=prefer\)", pooled)
    assert "database (direct)  not set, migrations use the pooled URL" in result.output
    assert f"clerk              {standin.base_url}, sk_test_ key" in result.output
    assert re.fullmatch(r"  OK +\d+ ms  key accepted, 1 signing key\(s\)", outcome(result, "clerk"))
    # The suite connects as the superuser postgres: a warning, which passes.
    assert "database role      runtime role iris_app (IRIS_DB_RUNTIME_ROLE)" in result.output
    assert re.fullmatch(
        r"  WARN +\d+ ms  postgres is a superuser, whom no privilege binds: .*", role_line(result)
    )
    assert result.output.endswith("\nOK: all 3 checks passed, 1 with a warning\n")


def test_the_direct_url_is_checked_too_and_no_password_or_key_is_printed(make_app):
    app = make_app(
        SQLALCHEMY_DATABASE_URI=with_password(TEST_DATABASE_URL),
        DATABASE_URL_DIRECT=with_password(TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgres://")),
    )
    result = check(app)
    assert result.exit_code == 0, result.output
    assert "  OK " in outcome(result, "database (direct)")
    assert result.output.endswith("\nOK: all 4 checks passed, 1 with a warning\n")
    assert ":***@" in result.output and "password=***" in result.output
    assert DB_PASSWORD not in result.output
    assert DEFAULT_SECRET_KEY not in result.output


def test_an_unreachable_database_fails_fast_with_exit_1(make_app):
    url = with_password(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/iris")
    result = check(make_app(SQLALCHEMY_DATABASE_URI=url, DATABASE_URL_DIRECT=url))
    assert result.exit_code == 1
    assert "  FAIL" in outcome(result, "database (pooled)") and "Connection refused" in result.output
    assert "  FAIL" in outcome(result, "database (direct)")
    assert "  OK " in outcome(result, "clerk")
    assert "database role      not checked, the pooled database did not answer" in result.output
    assert result.output.endswith("\nFAILED: 2 of 3 checks failed\n")
    assert DB_PASSWORD not in result.output


def test_a_wrong_clerk_key_fails_as_key_invalid_without_printing_it(make_app):
    key = "sk_live_wrong_key_that_must_never_be_printed"
    result = check(make_app(CLERK_SECRET_KEY=key))
    assert result.exit_code == 1
    assert "sk_live_ key" in result.output
    assert "  FAIL" in outcome(result, "clerk") and "key invalid" in outcome(result, "clerk")
    assert result.output.endswith("\nFAILED: 1 of 3 checks failed\n")
    assert key not in result.output


def test_clerk_unreachable_fails(make_app):
    result = check(make_app(CLERK_API_URL=f"http://127.0.0.1:{closed_port()}"))
    assert result.exit_code == 1
    assert "  FAIL" in outcome(result, "clerk") and "Clerk unreachable" in outcome(result, "clerk")
    assert result.output.endswith("\nFAILED: 1 of 3 checks failed\n")


def test_a_development_sqlite_database_is_checked_without_ssl_questions(make_app, tmp_path):
    uri = f"sqlite:///{tmp_path / 'iris.sqlite3'}"
    result = check(make_app(SQLALCHEMY_DATABASE_URI=uri, SQLALCHEMY_ENGINE_OPTIONS={}))
    assert result.exit_code == 0, result.output
    assert "sqlite answered (not PostgreSQL: development only)" in outcome(result, "database (pooled)")
    assert "database role      not checked, sqlite has no roles (development only)" in result.output
    assert result.output.endswith("\nOK: all 2 checks passed\n")


# ---- the database role DATABASE_URL connects as (docs/deployment.md, "Two database roles")


@pytest.fixture
def runtime_role(admin_engine) -> Iterator[str]:
    with login_role(admin_engine) as name:
        yield name


def check_as(make_app, role: str, **overrides) -> Result:
    """``flask iris check`` with DATABASE_URL connecting as ``role``, IRIS_DB_RUNTIME_ROLE naming it."""
    settings = {"SQLALCHEMY_DATABASE_URI": url_as(role), "IRIS_DB_RUNTIME_ROLE": role, **overrides}
    return check(make_app(**settings))


def test_the_runtime_role_passes_when_it_may_only_append_to_audit_events(make_app, runtime_role):
    migrate(make_app(IRIS_DB_RUNTIME_ROLE=runtime_role))  # as the owner
    result = check_as(make_app, runtime_role)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        rf"  OK +\d+ ms  {runtime_role}: neither superuser nor owner; audit_events: INSERT and SELECT only",
        role_line(result),
    )
    assert result.output.endswith("\nOK: all 3 checks passed\n")


def test_a_member_of_the_runtime_role_passes_and_another_role_is_warned_about(
    make_app, runtime_role, admin_engine
):
    migrate(make_app(IRIS_DB_RUNTIME_ROLE=runtime_role))
    with login_role(admin_engine, "iris_login") as member:
        with admin_engine.begin() as connection:
            connection.execute(sa.text(f'GRANT "{runtime_role}" TO "{member}"'))
        result = check_as(make_app, member, IRIS_DB_RUNTIME_ROLE=runtime_role)
        assert "  OK " in role_line(result) and f"{member} (member of {runtime_role}): neither" in role_line(
            result
        )
    result = check_as(make_app, runtime_role, IRIS_DB_RUNTIME_ROLE="iris_app_elsewhere")
    assert result.exit_code == 0
    assert "  WARN" in role_line(result)
    assert f"{runtime_role} is not iris_app_elsewhere (IRIS_DB_RUNTIME_ROLE) nor a member of it" in role_line(
        result
    )
    assert result.output.endswith("\nOK: all 3 checks passed, 1 with a warning\n")


def test_the_owner_of_audit_events_is_warned_about(make_app, admin_engine, schema):
    # As on Neon before this change: the app connects as the (non-superuser) role that ran the migrations.
    with login_role(admin_engine, "iris_owner") as owner:
        with admin_engine.begin() as connection:
            connection.execute(sa.text(f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{owner}"'))
        migrate(make_app(SQLALCHEMY_DATABASE_URI=url_as(owner)))
        result = check_as(make_app, owner, IRIS_DB_RUNTIME_ROLE="iris_app")
    assert result.exit_code == 0, result.output
    assert "  WARN" in role_line(result)
    assert f"{owner} has the privileges of {owner}, the owner of audit_events: it could switch" in role_line(
        result
    )


def test_a_role_that_may_also_update_and_delete_is_warned_about(make_app, runtime_role, admin_engine):
    # What a role made in Neon's Console gets through neon_superuser.
    migrate(make_app(IRIS_DB_RUNTIME_ROLE=runtime_role))
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'GRANT pg_write_all_data TO "{runtime_role}"'))
    result = check_as(make_app, runtime_role)
    assert result.exit_code == 0, result.output
    assert "  WARN" in role_line(result)
    assert f"{runtime_role} may also UPDATE, DELETE audit_events (as members of neon_superuser" in role_line(
        result
    )


def test_a_role_created_after_the_migration_ran_fails_for_want_of_insert(
    make_app, runtime_role, admin_engine, schema
):
    migrate(make_app())  # IRIS_DB_RUNTIME_ROLE is iris_app, which does not exist: nothing granted
    with admin_engine.begin() as connection:  # what PUBLIC has on Neon's public schema
        connection.execute(sa.text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{runtime_role}"'))
    result = check_as(make_app, runtime_role)
    assert result.exit_code == 1
    assert "  FAIL" in role_line(result)
    assert f"{runtime_role} may not SELECT, INSERT audit_events, so the app cannot record" in role_line(
        result
    )
    assert result.output.endswith("\nFAILED: 1 of 3 checks failed\n")


def test_before_the_first_migration_the_role_is_not_checked(make_app, runtime_role):
    result = check_as(make_app, runtime_role)
    assert result.exit_code == 0, result.output
    assert "  WARN" in role_line(result) and "no audit_events table in reach" in role_line(result)


# ---- PostgreSQL with SSL on


@pytest.fixture(scope="module")
def ssl_cluster() -> Iterator[SSLCluster]:
    """A private cluster with SSL on for this module; stopped and removed afterwards, whatever happened."""
    with SSLCluster() as cluster:
        yield cluster


def test_sslmode_require_and_verify_full_pass_and_report_ssl_in_use(make_app, ssl_cluster):
    app = make_app(
        SQLALCHEMY_DATABASE_URI=with_password(ssl_cluster.dsn(sslmode="require")),
        DATABASE_URL_DIRECT=with_password(
            ssl_cluster.dsn(sslmode="verify-full", sslrootcert=ssl_cluster.certificate_path)
        ),
    )
    result = check(app)
    assert result.exit_code == 0, result.output
    assert outcome(result, "database (pooled)").endswith(", SSL in use (sslmode=require)")
    assert outcome(result, "database (direct)").endswith(", SSL in use (sslmode=verify-full)")
    assert result.output.endswith("\nOK: all 4 checks passed, 1 with a warning\n")
    assert DB_PASSWORD not in result.output


def test_verify_full_fails_against_a_certificate_from_another_ca(make_app, ssl_cluster, tmp_path):
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(self_signed_certificate()[0])
    url = ssl_cluster.dsn(sslmode="verify-full", sslrootcert=str(other_ca))
    result = check(make_app(SQLALCHEMY_DATABASE_URI=url))
    assert result.exit_code == 1
    assert "  FAIL" in outcome(result, "database (pooled)") and "certificate verify failed" in result.output


def test_sslmode_require_fails_clearly_when_the_server_has_ssl_off(make_app, ssl_cluster):
    ssl_cluster.set_ssl(False)
    try:
        url = with_password(ssl_cluster.dsn(sslmode="require"))
        result = check(make_app(SQLALCHEMY_DATABASE_URI=url))
    finally:
        ssl_cluster.set_ssl(True)
    assert result.exit_code == 1
    assert "  FAIL" in outcome(result, "database (pooled)")
    assert "server does not support SSL, but SSL was required" in outcome(result, "database (pooled)")
    assert result.output.endswith("\nFAILED: 1 of 2 checks failed\n")
    assert DB_PASSWORD not in result.output


@pytest.mark.parametrize(("ci", "expected"), [("true", pytest.fail.Exception), (None, pytest.skip.Exception)])
def test_without_initdb_the_ssl_tests_fail_in_ci_and_skip_elsewhere(monkeypatch, ci, expected):
    monkeypatch.setattr(drill_support.shutil, "which", lambda name: None)
    monkeypatch.setattr(drill_support.glob, "glob", lambda pattern: [])
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    with pytest.raises(expected, match="initdb not found"):
        SSLCluster()
