"""Two database roles: the app's runtime role may only append to audit_events; the owner migrates.

Real PostgreSQL: each test makes a runtime role of its own (roles are cluster-wide and tests run side by
side) and migrates its schema as ``postgres``, which grants that role privileges on this schema only
(migrations/versions/0009_runtime_role.py). The role is dropped afterwards with every grant it received.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import flask_migrate
import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask

from iris.config import ConfigError, from_environment
from iris.extensions import db
from tests.helpers import (
    ME,
    audit_events,
    bearer,
    login_role,
    migrate,
    register,
    session_token,
    signed_in_admin,
    url_as,
)


@pytest.fixture
def runtime_role(admin_engine: sa.Engine) -> Iterator[str]:
    with login_role(admin_engine) as name:
        yield name


@pytest.fixture
def owner_app(runtime_role: str, make_app: Callable[..., Flask]) -> Flask:
    """The schema migrated as the owner (``postgres``), naming this test's runtime role."""
    app = make_app(IRIS_DB_RUNTIME_ROLE=runtime_role)
    migrate(app)
    return app


@pytest.fixture
def runtime_app(runtime_role: str, owner_app: Flask, make_app: Callable[..., Flask]) -> Flask:
    """The app as production runs it: DATABASE_URL connects as the runtime role."""
    return make_app(SQLALCHEMY_DATABASE_URI=url_as(runtime_role), IRIS_DB_RUNTIME_ROLE=runtime_role)


@pytest.fixture
def as_runtime_role(runtime_role: str, owner_app: Flask, schema: str) -> Iterator[sa.Engine]:
    """A plain engine on this test's schema, connecting as the runtime role."""
    engine = sa.create_engine(
        url_as(runtime_role),
        poolclass=sa.pool.NullPool,
        connect_args={"options": f"-csearch_path={schema}"},
    )
    yield engine
    engine.dispose()


INSERT_EVENT = (
    "INSERT INTO audit_events (id, action, target_id, actor_name)"
    " VALUES (gen_random_uuid(), 'deactivated', gen_random_uuid(), 'test')"
)


def refused(engine: sa.Engine, statement: str) -> str:
    """The message with which PostgreSQL refused ``statement`` for lack of privilege (its transaction is
    rolled back); the test fails if it ran."""
    with pytest.raises(sa.exc.ProgrammingError) as raised, engine.begin() as connection:
        connection.execute(sa.text(statement))
    assert isinstance(raised.value.orig, psycopg.errors.InsufficientPrivilege), raised.value
    return str(raised.value.orig).splitlines()[0]


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        # Refused by the privilege system itself, before the append-only trigger could say anything.
        ("UPDATE audit_events SET action = 'promoted'", "permission denied for table audit_events"),
        ("DELETE FROM audit_events", "permission denied for table audit_events"),
        ("TRUNCATE audit_events", "permission denied for table audit_events"),
        (
            "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
            "must be owner of table audit_events",
        ),
        ("ALTER TABLE audit_events DISABLE TRIGGER ALL", "must be owner of table audit_events"),
        ("DROP TRIGGER audit_events_no_truncate ON audit_events", "must be owner of relation audit_events"),
        ("DROP TABLE audit_events", "must be owner of table audit_events"),
        (
            "CREATE TRIGGER t AFTER INSERT ON audit_events EXECUTE FUNCTION audit_events_append_only()",
            "permission denied for table audit_events",
        ),
    ],
)
def test_the_runtime_role_can_append_and_read_audit_events_and_nothing_else(
    as_runtime_role, admin_engine, schema, statement, message
):
    with as_runtime_role.begin() as connection:
        connection.execute(sa.text(INSERT_EVENT))
        assert connection.execute(sa.text("SELECT count(*) FROM audit_events")).scalar_one() == 1
    assert refused(as_runtime_role, statement) == message
    # Nothing changed: the event is there and both triggers are enabled.
    with admin_engine.connect() as connection:
        count = sa.text(f'SELECT count(*) FROM "{schema}".audit_events')  # noqa: S608 (our own schema)
        assert connection.execute(count).scalar_one() == 1
        enabled = connection.execute(
            sa.text(
                "SELECT tgname, tgenabled FROM pg_trigger"
                " WHERE tgrelid = CAST(:table AS regclass) AND NOT tgisinternal ORDER BY tgname"
            ),
            {"table": f'"{schema}".audit_events'},
        ).all()
    assert enabled == [("audit_events_append_only", "O"), ("audit_events_no_truncate", "O")]


def test_the_runtime_role_cannot_change_the_instance_mark_or_the_migration_state(as_runtime_role):
    with as_runtime_role.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM iris_instance")).scalar_one() == 1
    assert refused(as_runtime_role, "UPDATE iris_instance SET id = gen_random_uuid()") == (
        "permission denied for table iris_instance"
    )
    assert refused(as_runtime_role, "SELECT * FROM alembic_version") == (
        "permission denied for table alembic_version"
    )


def test_the_app_does_its_work_through_the_runtime_role(runtime_app, owner_app, standin):
    client = runtime_app.test_client()
    _, admin_headers = signed_in_admin(client, runtime_app, standin)
    owner = register(client, "owner@bistro.example")
    leaving = register(client, "leaving@bistro.example")

    assert client.post(f"/api/v1/users/{owner['id']}/deactivate", headers=admin_headers).status_code == 200
    assert client.post(f"/api/v1/users/{owner['id']}/reactivate", headers=admin_headers).status_code == 200
    leaving_headers = bearer(session_token(standin, leaving["clerk_user_id"], 600))
    assert client.get(ME, headers=leaving_headers).status_code == 200
    assert client.delete(ME, headers=leaving_headers).status_code == 204
    page = client.get(f"/admin/users/{owner['id']}", headers=admin_headers)
    assert page.status_code == 200, page.get_data(as_text=True)

    # The maintenance pass (deletes, prunes, sends mail) as the runtime role too.
    result = runtime_app.test_cli_runner().invoke(args=["iris", "reconcile"])
    assert result.exit_code == 0, result.output

    actions = [event.action for event in audit_events(owner_app)]
    assert actions.count("account_deleted") == 1 and {"deactivated", "reactivated"} <= set(actions)


def test_a_table_a_later_migration_creates_is_open_to_the_runtime_role(owner_app, as_runtime_role):
    # What the owner creates in this schema later gets the runtime role's default privileges.
    with owner_app.app_context():
        db.session.execute(sa.text("CREATE TABLE later (id int PRIMARY KEY, note text)"))
        db.session.commit()
    with as_runtime_role.begin() as connection:
        connection.execute(sa.text("INSERT INTO later VALUES (1, 'a')"))
        connection.execute(sa.text("UPDATE later SET note = 'b'"))
        assert connection.execute(sa.text("SELECT note FROM later")).scalar_one() == "b"
        connection.execute(sa.text("DELETE FROM later"))


def test_without_the_runtime_role_the_migration_grants_nothing_and_succeeds(make_app, schema, admin_engine):
    app = make_app(IRIS_DB_RUNTIME_ROLE="iris_app_that_does_not_exist")
    migrate(app)
    with admin_engine.connect() as connection:
        grantees = connection.execute(
            sa.text(
                "SELECT DISTINCT pg_get_userbyid(acl.grantee) FROM pg_class,"
                " aclexplode(relacl) AS acl WHERE relnamespace = CAST(:schema AS regnamespace)"
            ),
            {"schema": schema},
        ).scalars()
        assert set(grantees) == {"postgres"}  # the owner's own entry on audit_events (PUBLIC revoked)


def test_the_migration_refuses_a_runtime_role_that_is_the_owner_and_superuser(
    make_app, schema, admin_engine, caplog
):
    app = make_app(IRIS_DB_RUNTIME_ROLE="postgres")
    with app.app_context(), pytest.raises(SystemExit):  # Flask-Migrate logs the error and exits 1
        flask_migrate.upgrade()
    assert "IRIS_DB_RUNTIME_ROLE is postgres, which is a superuser or has the privileges of" in caplog.text
    with admin_engine.connect() as connection:  # the whole upgrade was one transaction, rolled back
        users = connection.execute(sa.text("SELECT to_regclass(:t)"), {"t": f'"{schema}".users'}).scalar()
        assert users is None


def test_a_non_superuser_owner_migrates_and_grants_as_on_neon(make_app, admin_engine, schema, runtime_role):
    # On Neon the owner (neondb_owner) is no superuser, and owns the schema (public, through
    # pg_database_owner): the whole chain must run, and grant, as such a role.
    with login_role(admin_engine, "iris_owner") as owner:
        with admin_engine.begin() as connection:
            connection.execute(sa.text(f'ALTER SCHEMA "{schema}" OWNER TO "{owner}"'))
        engine = sa.create_engine(
            url_as(runtime_role),
            poolclass=sa.pool.NullPool,
            connect_args={"options": f"-csearch_path={schema}"},
        )
        try:
            migrate(make_app(SQLALCHEMY_DATABASE_URI=url_as(owner), IRIS_DB_RUNTIME_ROLE=runtime_role))
            with engine.begin() as connection:
                connection.execute(sa.text(INSERT_EVENT))
            assert refused(engine, "ALTER TABLE audit_events DISABLE TRIGGER ALL") == (
                "must be owner of table audit_events"
            )
            assert refused(engine, "DELETE FROM audit_events") == "permission denied for table audit_events"
        finally:
            engine.dispose()
            with admin_engine.begin() as connection:  # the schema fixture drops it, not DROP OWNED
                connection.execute(sa.text(f'ALTER SCHEMA "{schema}" OWNER TO postgres'))


@pytest.mark.parametrize("value", ["Iris_App", "1app", "iris-app", "a" * 64])
def test_iris_db_runtime_role_must_be_a_plain_role_name(value, tmp_path):
    environment = {"IRIS_DB_RUNTIME_ROLE": value}
    with pytest.raises(ConfigError, match="IRIS_DB_RUNTIME_ROLE must be a PostgreSQL role name"):
        from_environment(environment, development=True, instance_path=str(tmp_path))
    settings = from_environment({}, development=True, instance_path=str(tmp_path))
    assert settings["IRIS_DB_RUNTIME_ROLE"] == "iris_app"
