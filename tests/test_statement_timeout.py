"""Every transaction is bounded by IRIS_DB_STATEMENT_TIMEOUT_MS (issue #10): a statement stuck behind a lock
another session holds, or one that simply runs too long, is cancelled by PostgreSQL and answered with 503
``database_unavailable`` and Retry-After, directly and through PgBouncer in transaction mode.

The lock is held by a separate connection in an open transaction, like a migration holding ``users``. It is
released only after the request has answered, so an answer proves the request did not wait for it. Should
the bound not work, the locking session ends itself after LOCKER_GIVES_UP_AFTER (PostgreSQL's
idle_in_transaction_session_timeout), the request goes through, and the test fails instead of hanging.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import flask_migrate
import psycopg
import pytest
import sqlalchemy as sa
from flask import Blueprint, Flask

from iris import registration as registration_module
from iris.config import STATEMENT_TIMEOUT_OPTION
from iris.extensions import db
from tests.drill_support import PgBouncer, libpq_url, scratch_database, wait_until
from tests.helpers import ME, PASSWORD, TEST_DATABASE_URL, bearer, dispose, migrate, session_token

TIMEOUT_MS = 300
LOCKER_GIVES_UP_AFTER = "20s"
REGISTER = "/api/v1/auth/register"
SLEEP = "/api/probe/sleep"
BOUND_SETTINGS = (
    "SELECT name, setting, reset_val FROM pg_settings WHERE name IN ('statement_timeout', 'lock_timeout')"
)

probe = Blueprint("timeout_probe", __name__)


@probe.get(SLEEP)
def sleep():
    """A statement far longer than TIMEOUT_MS and needing no lock: only statement_timeout can end it early."""
    db.session.execute(sa.text("SELECT pg_sleep(10)"))
    return {"slept": True}


def bounded_app(make_app: Callable[..., Flask], **overrides) -> Flask:
    app = make_app(IRIS_DB_STATEMENT_TIMEOUT_MS=TIMEOUT_MS, **overrides)
    app.register_blueprint(probe)
    return app


@contextmanager
def users_locked(url: sa.URL | str, schema: str | None = None) -> Iterator[psycopg.Connection]:
    """Another session holding ``LOCK TABLE users IN ACCESS EXCLUSIVE MODE`` in an open transaction until the
    block ends (then it rolls back)."""
    if isinstance(url, str):
        url = sa.make_url(url)
    with psycopg.connect(libpq_url(url)) as locker:
        locker.execute(f"SET idle_in_transaction_session_timeout = '{LOCKER_GIVES_UP_AFTER}'")
        if schema is not None:
            locker.execute(f'SET search_path TO "{schema}"')
        locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        yield locker
        locker.rollback()


def assert_still_locked(locker: psycopg.Connection) -> None:
    """The lock was never released: the locking transaction is still open and still holds it."""
    held = locker.execute(
        "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND mode = 'AccessExclusiveLock'"
        " AND granted AND relation = 'users'::regclass"
    ).fetchone()
    assert held == (1,)


def assert_database_unavailable(response) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert response.json["error"]["code"] == "database_unavailable"
    assert response.json["error"]["request_id"] == response.headers["X-Request-ID"]
    assert int(response.headers["Retry-After"]) > 0


def assert_one_timeout_log_line(caplog) -> None:
    """Exactly one WARNING-or-worse record, saying the statement timed out, without a traceback."""
    records = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.getMessage() for record in records] == [
        "database statement timed out: QueryCanceled (canceling statement due to statement timeout)"
    ]
    assert records[0].exc_info is None


def user_rows(app: Flask) -> int:
    with app.app_context():
        count = db.session.scalar(sa.text("SELECT count(*) FROM users"))
        db.session.rollback()
        return count


def clerk_creates(standin) -> int:
    return standin.control.stats()["requests"].get("POST /v1/users", 0)


# ---- directly against PostgreSQL


def test_a_registration_blocked_by_a_lock_answers_503_and_leaves_nothing(make_app, schema, standin, caplog):
    app = bounded_app(make_app)
    migrate(app)
    client = app.test_client()
    caplog.set_level(logging.WARNING)
    with users_locked(TEST_DATABASE_URL, schema) as locker:
        response = client.post(REGISTER, json={"email": "blocked@bistro.example", "password": PASSWORD})
        assert_still_locked(locker)
    assert_database_unavailable(response)
    assert_one_timeout_log_line(caplog)
    assert user_rows(app) == 0
    assert clerk_creates(standin) == 0  # the reservation failed first: Clerk was never asked
    # Nothing held the email: once the lock is gone the same registration goes through.
    again = client.post(REGISTER, json={"email": "blocked@bistro.example", "password": PASSWORD})
    assert again.status_code == 201, again.get_data(as_text=True)


def test_a_registration_whose_completion_is_blocked_answers_503_and_is_settled(
    make_app, schema, standin, caplog
):
    """The lock arrives while Clerk is creating the user (the app holds no connection then), so the completing
    UPDATE is the statement cancelled. 503, and once settled neither a row nor a Clerk user is left."""
    app = bounded_app(make_app)
    migrate(app)
    standin.control.add_fault(method="POST", path="/v1/users", latency_ms=1000, times=1)
    answers = []

    def register() -> None:
        body = {"email": "late@bistro.example", "password": PASSWORD}
        answers.append(app.test_client().post(REGISTER, json=body))

    caplog.set_level(logging.WARNING)
    registration = threading.Thread(target=register)
    registration.start()
    wait_until(lambda: user_rows(app) == 1, 10, "the reservation to commit")
    with users_locked(TEST_DATABASE_URL, schema) as locker:
        registration.join(timeout=30)
        assert not registration.is_alive()
        assert_still_locked(locker)
    assert clerk_creates(standin) == 1  # reserved before the lock came: Clerk was asked once
    assert_database_unavailable(answers[0])
    assert "database statement timed out: QueryCanceled" in caplog.text
    with app.app_context():
        registration_module.reconcile(now=datetime.now(UTC) + timedelta(hours=1))
    assert user_rows(app) == 0
    assert standin.app.users == {}


def test_a_signed_in_read_blocked_by_a_lock_answers_503(make_app, schema, standin, caplog):
    app = bounded_app(make_app)
    migrate(app)
    client = app.test_client()
    created = client.post(REGISTER, json={"email": "reader@bistro.example", "password": PASSWORD})
    assert created.status_code == 201, created.get_data(as_text=True)
    token = session_token(standin, created.json["clerk_user_id"])
    caplog.set_level(logging.WARNING)
    with users_locked(TEST_DATABASE_URL, schema) as locker:
        response = client.get(ME, headers=bearer(token))
        assert_still_locked(locker)
    assert_database_unavailable(response)
    assert_one_timeout_log_line(caplog)
    assert client.get(ME, headers=bearer(token)).status_code == 200


def test_a_slow_statement_is_cancelled_and_answers_503(make_app, caplog):
    app = bounded_app(make_app)
    caplog.set_level(logging.WARNING)
    response = app.test_client().get(SLEEP)
    assert_database_unavailable(response)
    assert_one_timeout_log_line(caplog)
    # Below the view it is psycopg's QueryCanceled (SQLSTATE 57014) wrapped as SQLAlchemy's OperationalError.
    with app.app_context():
        with pytest.raises(sa.exc.OperationalError) as raised:
            db.session.execute(sa.text("SELECT pg_sleep(10)"))
        db.session.rollback()
    assert isinstance(raised.value.orig, psycopg.errors.QueryCanceled)
    assert raised.value.orig.sqlstate == "57014"


def test_the_bound_is_set_local_in_one_statement_and_ends_with_the_transaction(make_app):
    app = bounded_app(make_app)
    statements: list[str] = []
    with app.app_context(), db.engine.connect() as connection:
        sa.event.listen(connection, "before_cursor_execute", lambda *args: statements.append(args[2]))
        inside = {row.name: row.setting for row in connection.execute(sa.text(BOUND_SETTINGS))}
        connection.commit()
        # The same pooled connection, read past SQLAlchemy (whose next transaction would set it again).
        raw = connection.connection.driver_connection
        assert isinstance(raw, psycopg.Connection)
        after = {name: (setting, reset) for name, setting, reset in raw.execute(BOUND_SETTINGS)}
        raw.rollback()
    assert inside == {"statement_timeout": str(TIMEOUT_MS), "lock_timeout": str(TIMEOUT_MS)}
    # After the transaction each is back to the session's own value (the server default).
    assert set(after) == {"statement_timeout", "lock_timeout"}
    assert all(setting == reset for setting, reset in after.values()), after
    assert str(TIMEOUT_MS) not in {setting for setting, _ in after.values()}
    # One extra statement per transaction, before the transaction's own.
    assert len(statements) == 2
    assert statements[0].startswith("SELECT set_config('statement_timeout'")
    assert "set_config('lock_timeout'" in statements[0]


def test_sqlite_gets_no_bound(make_app, tmp_path):
    """Development's SQLite has no set_config: its transactions are left alone."""
    app = make_app(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/dev.db", SQLALCHEMY_ENGINE_OPTIONS={})
    with app.app_context():
        assert STATEMENT_TIMEOUT_OPTION not in db.engine.get_execution_options()
        assert db.session.scalar(sa.text("SELECT 1")) == 1
        db.session.rollback()
        db.engine.dispose()


def test_migrations_are_not_bounded(make_app, schema):
    """A migration waiting for a lock far longer than the bound still completes once it gets the lock."""
    app = bounded_app(make_app)
    migrate(app)
    failures: list[BaseException] = []

    def downgrade() -> None:  # every revision's downgrade alters or drops users, so it needs the lock
        try:
            with app.app_context():
                flask_migrate.downgrade(revision="base")
        except BaseException as error:
            failures.append(error)

    with users_locked(TEST_DATABASE_URL, schema) as locker:
        locker_pid = locker.info.backend_pid
        migration = threading.Thread(target=downgrade)
        migration.start()
        with psycopg.connect(libpq_url(sa.make_url(TEST_DATABASE_URL)), autocommit=True) as observer:

            def waited_well_past_the_bound() -> bool:
                blocked = observer.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
                    " AND clock_timestamp() - query_start > %s * interval '1 millisecond'",
                    (locker_pid, 5 * TIMEOUT_MS),
                ).fetchone()
                return not migration.is_alive() or blocked == (1,)

            wait_until(waited_well_past_the_bound, 15, "the migration to wait on the lock")
        assert migration.is_alive(), f"the migration ended while the lock was held: {failures}"
        assert_still_locked(locker)
    migration.join(timeout=30)
    assert not migration.is_alive()
    assert failures == []
    with app.app_context():
        assert db.session.scalar(sa.text("SELECT to_regclass('users')")) is None
        db.session.rollback()


# ---- through PgBouncer in transaction mode


def test_the_bound_works_through_pgbouncer_in_transaction_mode(admin_engine, make_app, standin, caplog):
    """Through a real PgBouncer (one server connection, so every client shares it): a startup ``options``
    parameter is refused, the per-transaction bound cancels a blocked registration and a slow statement, and
    it does not outlive its transaction on the shared server connection (where a session SET would)."""
    with scratch_database(admin_engine) as direct:
        bouncer = PgBouncer(direct, direct.database, pool_size=1)  # skips/fails here without pgbouncer
        # Migrations go straight to PostgreSQL, as they go over Neon's direct URL. No per-test search_path
        # (SQLALCHEMY_ENGINE_OPTIONS is replaced): the scratch database's public schema, as in production.
        migrator = make_app(
            SQLALCHEMY_DATABASE_URI=direct.render_as_string(hide_password=False),
            SQLALCHEMY_ENGINE_OPTIONS={},
        )
        migrate(migrator)
        dispose(migrator)
        with bouncer:
            pooled = bouncer.url(direct)

            # Control: the startup parameter that would bound a whole session is refused by the pooler.
            with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter"):
                psycopg.connect(libpq_url(pooled), options=f"-c statement_timeout={TIMEOUT_MS}").close()

            app = bounded_app(
                make_app,
                SQLALCHEMY_DATABASE_URI=pooled.render_as_string(hide_password=False),
                SQLALCHEMY_ENGINE_OPTIONS={},
            )
            client = app.test_client()
            caplog.set_level(logging.WARNING)
            with users_locked(direct) as locker:
                response = client.post(
                    REGISTER, json={"email": "pooled@bistro.example", "password": PASSWORD}
                )
                assert_still_locked(locker)
            assert_database_unavailable(response)
            assert_one_timeout_log_line(caplog)
            assert user_rows(app) == 0
            assert clerk_creates(standin) == 0

            assert_database_unavailable(client.get(SLEEP))
            # With the lock gone the email is free; this registration commits on the pooler's one
            # server connection, so a bound set for the session rather than the transaction would stay there.
            again = client.post(REGISTER, json={"email": "pooled@bistro.example", "password": PASSWORD})
            assert again.status_code == 201, again.get_data(as_text=True)

            with app.app_context():
                app_backend = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
                db.session.rollback()
            with psycopg.connect(libpq_url(pooled), autocommit=True) as other:
                assert other.execute("SELECT pg_backend_pid()").fetchone() == (app_backend,)
                after = {name: (setting, reset) for name, setting, reset in other.execute(BOUND_SETTINGS)}
                assert set(after) == {"statement_timeout", "lock_timeout"}
                assert all(setting == reset for setting, reset in after.values()), after

                # Control: a session SET does reach the next client of the same server connection, so the
                # check above would have seen one.
                with psycopg.connect(libpq_url(pooled), autocommit=True) as leaker:
                    leaker.execute("SET statement_timeout = '1234ms'")
                assert other.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
                other.execute("RESET statement_timeout")
            dispose(app)
