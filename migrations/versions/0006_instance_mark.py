"""The instance mark: one row naming this Iris database, made once.

Reviewed by hand. Iris marks every Clerk user it creates with this id (``private_metadata.iris_instance``), so
that on a Clerk instance shared with another database (staging and production, another application, another
checkout's stand-in) maintenance and registration delete only the Clerk users this database made. The id is a
uuid4 generated here in Python, so SQLite (development) gets one too; it never changes afterwards (a
database restored from another's dump carries that one's mark: docs/deployment.md says what to do).

Revision ID: 0006_instance_mark
Revises: 0005_account_lifecycle
Create Date: 2026-12-08
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0006_instance_mark"
down_revision = "0005_account_lifecycle"
branch_labels = None
depends_on = None


def upgrade():
    table = op.create_table(
        "iris_instance",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_iris_instance")),
    )
    op.bulk_insert(table, [{"id": uuid.uuid4()}])


def downgrade():
    op.drop_table("iris_instance")
