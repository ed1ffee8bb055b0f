"""Email verification: users.email_verified_at and the mail_outbox table.

Reviewed by hand. ``email_verified_at`` records when the owner proved the address is theirs; accounts made
before verification existed count as confirmed (set to their ``created_at``), so that maintenance, which
removes accounts left unconfirmed too long, never removes them. ``mail_outbox`` holds the mails Iris owes:
who and what only (no link, no token, no password), written in the transaction that makes a mail due and
retried until sent. Both work on PostgreSQL and SQLite: adding a nullable column and creating a table need
no table rebuild, so the users table keeps its updated_at trigger.

Revision ID: 0003_email_verification
Revises: 0002_pending_lease
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_email_verification"
down_revision = "0002_pending_lease"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("users", sa.Column("email_verified_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE users SET email_verified_at = created_at WHERE clerk_user_id IS NOT NULL")
    op.create_table(
        "mail_outbox",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("to_address", sa.String(length=320), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_mail_outbox_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mail_outbox")),
    )
    op.create_index(
        "ix_mail_outbox_to_address_created_at", "mail_outbox", ["to_address", "created_at"], unique=False
    )


def downgrade():
    op.drop_index("ix_mail_outbox_to_address_created_at", table_name="mail_outbox")
    op.drop_table("mail_outbox")
    with op.batch_alter_table("users", recreate="never") as batch:
        batch.drop_column("email_verified_at")
