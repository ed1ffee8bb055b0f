"""Migrations are the only way the schema is built, and they match the models."""

import flask_migrate
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from iris import create_app
from iris.extensions import db
from tests.helpers import TEST_DATABASE_URL


def test_models_and_migrations_do_not_drift(app):
    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, db.metadata)
    assert differences == []


def test_upgrade_runs_over_the_direct_url_when_set(make_app, schema, admin_engine):
    # The pooled URL points at a closed port: only the direct URL can have built the table.
    app = make_app(
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
        DATABASE_URL_DIRECT=TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgres://")
        + f"?options=-csearch_path%3D{schema}",
    )
    with app.app_context():
        flask_migrate.upgrade()
    with admin_engine.connect() as connection:
        tables = connection.execute(
            sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
            {"s": schema},
        ).scalars()
        assert {"users", "alembic_version"} <= set(tables)


def test_upgrade_and_downgrade_work_on_the_sqlite_development_default(tmp_path):
    app = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "k",
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/d.db",
        }
    )
    with app.app_context():
        flask_migrate.upgrade()
        db.session.execute(
            sa.text("INSERT INTO users (id, email, role) VALUES ('0' , 'a@b.example', 'restaurant')")
        )
        db.session.execute(sa.text("UPDATE users SET updated_at = '2000-01-01' WHERE 0"))
        db.session.commit()
        assert "users" in sa.inspect(db.engine).get_table_names()
        flask_migrate.downgrade(revision="base")
        assert "users" not in sa.inspect(db.engine).get_table_names()
        db.engine.dispose()
