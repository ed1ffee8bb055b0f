"""Leases on pending registrations: pending_owner and pending_until.

Reviewed by hand. A pending row (clerk_user_id NULL) now says who may act on it and until when, so that two
settlers (the next attempt, reconcile, the original request) never act on the same row at once, and a row
whose Clerk create answer was lost is kept until that create can no longer land. Rows already pending get
the lease the old code implied: 120 seconds from their creation. The check constraint is PostgreSQL-only:
on SQLite adding one means rebuilding the table, which would drop its updated_at trigger, and the
development database needs no guard against concurrent settlers.

Revision ID: 0002_pending_lease
Revises: 0001_users
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_pending_lease"
down_revision = "0001_users"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("users", sa.Column("pending_owner", sa.Uuid(), nullable=True))
    op.add_column("users", sa.Column("pending_until", sa.DateTime(timezone=True), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE users SET pending_until = created_at + interval '120 seconds' WHERE clerk_user_id IS NULL"
        )
        op.create_check_constraint(
            op.f("ck_users_pending_has_lease"),
            "users",
            "clerk_user_id IS NOT NULL OR pending_until IS NOT NULL",
        )
    else:
        op.execute(
            "UPDATE users SET pending_until = datetime(created_at, '+120 seconds')"
            " WHERE clerk_user_id IS NULL"
        )


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(op.f("ck_users_pending_has_lease"), "users", type_="check")
    with op.batch_alter_table("users", recreate="never") as batch:
        batch.drop_column("pending_until")
        batch.drop_column("pending_owner")
