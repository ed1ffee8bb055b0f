"""Accounts over their life: the append-only audit_events table, and the index of the admin listing.

Reviewed by hand. ``audit_events`` records every deletion, deactivation, reactivation, promotion and demotion
(iris.accounts): who acted, what, on which account, when, and the request id. It is append-only whoever
writes: a trigger makes every UPDATE and DELETE on it raise (on PostgreSQL TRUNCATE too), on both PostgreSQL
and SQLite. It holds ids only, no email, so it can be kept for ever without keeping personal data.
``ix_users_created_at_id`` serves the admin listing, newest first and cursor-paged on (created_at, id).
Creating a table and an index needs no table rebuild on SQLite, so the users table keeps its updated_at
trigger.

Revision ID: 0005_account_lifecycle
Revises: 0004_clerk_sync
Create Date: 2026-12-15
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_account_lifecycle"
down_revision = "0004_clerk_sync"
branch_labels = None
depends_on = None

ACTIONS = "'account_deleted', 'deactivated', 'reactivated', 'reactivation_undone', 'promoted', 'demoted'"

POSTGRESQL_APPEND_ONLY = """
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$
"""


def upgrade():
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("target_id", sa.Uuid(), nullable=False),
        sa.Column("actor_id", sa.Uuid(), nullable=True),
        sa.Column("actor_name", sa.String(length=100), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.CheckConstraint(f"action IN ({ACTIONS})", name=op.f("ck_audit_events_action_known")),
        sa.CheckConstraint(
            "actor_id IS NOT NULL OR actor_name IS NOT NULL", name=op.f("ck_audit_events_actor_known")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(
        "ix_audit_events_target_id_occurred_at", "audit_events", ["target_id", "occurred_at"], unique=False
    )
    op.create_index("ix_users_created_at_id", "users", ["created_at", "id"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRESQL_APPEND_ONLY)
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()"
        )
    else:
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{operation.lower()} BEFORE {operation} ON audit_events "
                f"BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: {operation} is not allowed'); END"
            )


def downgrade():
    # Dropping the table drops its triggers; the rows go with it (a downgrade is a deliberate act).
    op.drop_index("ix_users_created_at_id", table_name="users")
    op.drop_index("ix_audit_events_target_id_occurred_at", table_name="audit_events")
    op.drop_table("audit_events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
