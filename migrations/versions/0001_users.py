"""Create users, with the updated_at trigger.

Reviewed by hand: constraint names follow the naming convention in iris/extensions.py, column order puts
the shared base columns first, and updated_at is moved by a trigger so any writer (not only the ORM) keeps it
true. Works on PostgreSQL and on the SQLite development default.

Revision ID: 0001_users
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_users"
down_revision = None
branch_labels = None
depends_on = None

POSTGRESQL_TRIGGER_FUNCTION = """
CREATE FUNCTION set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$
"""


def upgrade():
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("clerk_user_id", sa.String(length=64), nullable=True),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.CheckConstraint("role IN ('restaurant', 'admin')", name=op.f("ck_users_role_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("clerk_user_id", name=op.f("uq_users_clerk_user_id")),
    )
    op.create_index(
        "uq_users_email_live",
        "users",
        ["email"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL"),
        sqlite_where=sa.text("deleted_at IS NULL"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRESQL_TRIGGER_FUNCTION)
        op.execute(
            "CREATE TRIGGER users_set_updated_at BEFORE UPDATE ON users "
            "FOR EACH ROW EXECUTE FUNCTION set_updated_at()"
        )
    else:
        # SQLite has no BEFORE-UPDATE assignment; update the row again unless the writer already moved it.
        op.execute(
            "CREATE TRIGGER users_set_updated_at AFTER UPDATE ON users "
            "FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at BEGIN "
            "UPDATE users SET updated_at = CURRENT_TIMESTAMP WHERE id = NEW.id; END"
        )


def downgrade():
    op.execute(
        "DROP TRIGGER IF EXISTS users_set_updated_at"
        + (" ON users" if op.get_bind().dialect.name == "postgresql" else "")
    )
    op.drop_index("uq_users_email_live", table_name="users")
    op.drop_table("users")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS set_updated_at()")
