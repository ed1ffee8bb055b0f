"""Keeping Iris and Clerk in step: users.clerk_updated_at, processed webhook ids, deleted Clerk users.

Reviewed by hand. ``users.clerk_updated_at`` is Clerk's ``updated_at`` (Unix ms) of the user state the row
reflects; a webhook or a reconcile pass applies a Clerk user only when it is newer, so late and repeated
events change nothing. ``clerk_webhook_deliveries`` holds the ``svix-id`` of every delivery applied, so a
retried delivery is acknowledged without being applied twice (pruned by maintenance). ``clerk_deleted_users``
remembers Clerk users known to be deleted, so that a ``user.created`` or ``user.updated`` arriving after the
``user.deleted`` never brings the account back, even when Iris had no row for it yet. Adding a nullable column
and creating tables need no table rebuild on SQLite, so the users table keeps its updated_at trigger.

Revision ID: 0004_clerk_sync
Revises: 0003_email_verification
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_clerk_sync"
down_revision = "0003_email_verification"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("users", sa.Column("clerk_updated_at", sa.BigInteger(), nullable=True))
    op.create_table(
        "clerk_webhook_deliveries",
        sa.Column("svix_id", sa.String(length=100), nullable=False),
        sa.Column("event_type", sa.String(length=100), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("svix_id", name=op.f("pk_clerk_webhook_deliveries")),
    )
    op.create_index(
        "ix_clerk_webhook_deliveries_received_at", "clerk_webhook_deliveries", ["received_at"], unique=False
    )
    op.create_table(
        "clerk_deleted_users",
        sa.Column("clerk_user_id", sa.String(length=64), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("clerk_user_id", name=op.f("pk_clerk_deleted_users")),
    )


def downgrade():
    op.drop_table("clerk_deleted_users")
    op.drop_index("ix_clerk_webhook_deliveries_received_at", table_name="clerk_webhook_deliveries")
    op.drop_table("clerk_webhook_deliveries")
    with op.batch_alter_table("users", recreate="never") as batch:
        batch.drop_column("clerk_updated_at")
