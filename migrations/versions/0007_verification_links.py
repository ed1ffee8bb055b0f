"""Verification links that reveal nothing, and the per-account count of password checks.

Reviewed by hand. ``email_verification_links`` replaces the signed links (which carried the account id and
the address): a mailed link now carries a random token, and this table holds only its SHA-256
(``token_sha256``), the account, an HMAC of the address the link was made for (``email_hmac``, so a changed
address invalidates it without a second copy of the address), when it expires and when it was used.
``verification_attempts`` counts the password checks made on a link's page, per account, so one link cannot
be used to try passwords quickly from many client addresses; it holds who and when only. Links mailed before
this migration stop working (their page offers a new one). Creating tables needs no table rebuild on SQLite,
so the users table keeps its updated_at trigger.

Revision ID: 0007_verification_links
Revises: 0006_instance_mark
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_verification_links"
down_revision = "0006_instance_mark"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "email_verification_links",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("email_hmac", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_email_verification_links_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_verification_links")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_email_verification_links_token_sha256")),
    )
    op.create_index(
        "ix_email_verification_links_user_id", "email_verification_links", ["user_id"], unique=False
    )
    op.create_table(
        "verification_attempts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_verification_attempts_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verification_attempts")),
    )
    op.create_index(
        "ix_verification_attempts_user_id_created_at",
        "verification_attempts",
        ["user_id", "created_at"],
        unique=False,
    )


def downgrade():
    op.drop_index("ix_verification_attempts_user_id_created_at", table_name="verification_attempts")
    op.drop_table("verification_attempts")
    op.drop_index("ix_email_verification_links_user_id", table_name="email_verification_links")
    op.drop_table("email_verification_links")
