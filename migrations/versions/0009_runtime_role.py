"""Two database roles: the app's runtime role may only append to audit_events; migrations run as the owner.

Reviewed by hand. Until now the app connected as the role that owns the tables, and an owner can switch off
``audit_events``'s append-only triggers (``ALTER TABLE ... DISABLE TRIGGER``), drop them, or drop the table.
From this revision the app connects as a role of its own, IRIS_DB_RUNTIME_ROLE (default ``iris_app``), which
owns nothing; ``flask db upgrade`` keeps running as the owner over DATABASE_URL_DIRECT (migrations/env.py).
On PostgreSQL this migration, running as the owner:

- revokes every privilege on ``audit_events`` from PUBLIC (none by default: this states it);
- when the runtime role exists (``pg_roles``), grants it USAGE on the current schema, INSERT and SELECT on
  ``audit_events`` (nothing else: no UPDATE, DELETE, TRUNCATE or TRIGGER, and not being the owner it cannot
  alter, disable or drop the triggers), SELECT on ``iris_instance`` (made once by its migration, never
  changed by the app), SELECT, INSERT, UPDATE and DELETE on every other table, nothing on
  ``alembic_version``, and USAGE and SELECT on sequences. Each table's grants to the role are first revoked,
  so running it again, or after someone granted more by hand, leaves exactly these;
- makes SELECT, INSERT, UPDATE and DELETE the default privileges of the runtime role on tables (USAGE and
  SELECT on sequences) that the owner creates later in this schema (``ALTER DEFAULT PRIVILEGES``), so a later
  migration's new table works for the app without a grant of its own. **A later migration that creates
  another append-only table must REVOKE UPDATE, DELETE on it from the runtime role itself.**

When the runtime role does not exist nothing is granted and nothing fails: the test suite migrates as the
superuser ``postgres`` in a schema per test, and a deployment that has not created the role keeps working as
before, its app still connecting as the owner (``flask iris check`` warns about that). A role created after
this migration ran gets its grants from the one-time SQL in docs/deployment.md ("Two database roles").
IRIS_DB_RUNTIME_ROLE naming the migrating role itself or a superuser stops the upgrade: revoking from the
owner would take its own privileges away, and a superuser bypasses every grant.

SQLite (development, ``make run``) has no roles: nothing happens there.

The downgrade changes no privilege: during a rollback the previous release runs as the same runtime role and
needs the same grants, which give it nothing beyond what that code does. To take them away, run
``DROP OWNED BY iris_app`` as the owner (it revokes every grant to the role in this database).

Revision ID: 0009_runtime_role
Revises: 0008_personal_data
Create Date: 2026-12-08
"""

import logging

import sqlalchemy as sa
from alembic import op
from flask import current_app

revision = "0009_runtime_role"
down_revision = "0008_personal_data"
branch_labels = None
depends_on = None

logger = logging.getLogger("alembic.runtime.migration")

# What the runtime role may do, per table; every table not named here gets ``READ_WRITE``.
APPEND_ONLY = "SELECT, INSERT"
READ_WRITE = "SELECT, INSERT, UPDATE, DELETE"
TABLE_PRIVILEGES = {"audit_events": APPEND_ONLY, "iris_instance": "SELECT", "alembic_version": None}


def upgrade():
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("REVOKE ALL ON audit_events FROM PUBLIC")
    name = current_app.config.get("IRIS_DB_RUNTIME_ROLE") or "iris_app"
    found = bind.execute(
        sa.text(
            "SELECT rolsuper, pg_has_role(rolname, current_user, 'USAGE') AS acts_as_migrator"
            " FROM pg_roles WHERE rolname = :name"
        ),
        {"name": name},
    ).one_or_none()
    if found is None:
        logger.info("Runtime role %s does not exist: no privileges granted (docs/deployment.md)", name)
        return
    if found.rolsuper or found.acts_as_migrator:
        raise RuntimeError(
            f"IRIS_DB_RUNTIME_ROLE is {name}, which is a superuser or has the privileges of the role running"
            " this migration: it must be a role of its own (docs/deployment.md, 'Two database roles')."
        )
    quote = bind.dialect.identifier_preparer.quote
    role, schema = quote(name), quote(bind.execute(sa.text("SELECT current_schema()")).scalar_one())
    op.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    tables = bind.execute(
        sa.text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename")
    ).scalars()
    for table in tables:
        privileges = TABLE_PRIVILEGES.get(table, READ_WRITE)
        op.execute(f"REVOKE ALL ON {quote(table)} FROM {role}")
        if privileges:
            op.execute(f"GRANT {privileges} ON {quote(table)} TO {role}")
    op.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT {READ_WRITE} ON TABLES TO {role}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO {role}")


def downgrade():
    # Nothing: see the module docstring (the previous release runs as the same role).
    pass
