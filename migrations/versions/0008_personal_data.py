"""What Iris keeps: users.erased_at, the outbox without addresses, and an audit action for every path.

Reviewed by hand.

- ``users.erased_at`` (nullable): when a deleted account's personal data was erased (iris.personal_data).
  Adding a nullable column is a plain ALTER TABLE ADD COLUMN on SQLite too, no table rebuild, so the users
  table keeps its updated_at trigger. ``users.email`` stays NOT NULL: an erased account holds a placeholder
  that is no address (``erased:<id>``), which needs no change to the column (making it nullable would
  rebuild the table on SQLite). On PostgreSQL a check says only a deleted account is erased; SQLite
  (development) gets no check, as adding one would rebuild the table and drop that trigger.
- ``mail_outbox.to_address`` is dropped, and every address it held with it: a mail goes to its account's
  current address, and the per-address bound on verification mails reads ``to_hmac``, a keyed hash of the
  address (with ``hmac_key_id``). Rows queued before this migration have no hash: the bound forgets them,
  which can let one extra verification mail through in the first five minutes after the upgrade.
  mail_outbox has no trigger, so rebuilding it on SQLite loses nothing.
- ``audit_events.action`` accepts the actions of every path that changes an account. On SQLite the table is
  rebuilt to change its check constraint, and its append-only triggers (which the rebuild drops) are made
  again.

Accounts deleted before this migration are not erased by it: reconcile erases every deleted, unerased account
once IRIS_DEACTIVATED_RETENTION_DAYS have passed since its deleted_at.

Revision ID: 0008_personal_data
Revises: 0007_verification_links
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_personal_data"
down_revision = "0007_verification_links"
branch_labels = None
depends_on = None

OLD_ACTIONS = ("account_deleted", "deactivated", "reactivated", "reactivation_undone", "promoted", "demoted")
NEW_ACTIONS = (
    "registration_started",
    "registered",
    "registration_undone",
    "created_from_clerk",
    "email_changed",
    "email_confirmed",
    "email_unconfirmed",
    "removed_not_me",
    "expired_unconfirmed",
    "deleted_at_clerk",
    "erased",
)


def _action_check(actions: tuple[str, ...]) -> str:
    return "action IN (" + ", ".join(f"'{action}'" for action in actions) + ")"


def _sqlite_append_only() -> None:
    for operation in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER audit_events_no_{operation.lower()} BEFORE {operation} ON audit_events "
            f"BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: {operation} is not allowed'); END"
        )


def _set_actions(actions: tuple[str, ...]) -> None:
    name = op.f("ck_audit_events_action_known")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(name, "audit_events", type_="check")
        op.create_check_constraint(name, "audit_events", _action_check(actions))
        return
    with op.batch_alter_table("audit_events", recreate="always") as batch:
        batch.drop_constraint(name, type_="check")
        batch.create_check_constraint(name, _action_check(actions))
    _sqlite_append_only()


def upgrade():
    op.add_column("users", sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.create_check_constraint(
            op.f("ck_users_erased_is_deleted"), "users", "erased_at IS NULL OR deleted_at IS NOT NULL"
        )
    op.drop_index("ix_mail_outbox_to_address_created_at", table_name="mail_outbox")
    with op.batch_alter_table("mail_outbox") as batch:
        batch.add_column(sa.Column("to_hmac", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("hmac_key_id", sa.String(length=16), nullable=True))
        batch.drop_column("to_address")
    op.create_index(
        "ix_mail_outbox_to_hmac_created_at", "mail_outbox", ["to_hmac", "created_at"], unique=False
    )
    _set_actions(OLD_ACTIONS + NEW_ACTIONS)


def downgrade():
    # The new audit events cannot be kept under the old check: a downgrade refuses while any exists (the
    # table is append-only), rather than lose them. The addresses dropped from the outbox do not come back.
    _set_actions(OLD_ACTIONS)
    op.drop_index("ix_mail_outbox_to_hmac_created_at", table_name="mail_outbox")
    with op.batch_alter_table("mail_outbox") as batch:
        batch.add_column(sa.Column("to_address", sa.String(length=320), nullable=False, server_default=""))
        batch.drop_column("hmac_key_id")
        batch.drop_column("to_hmac")
    op.create_index(
        "ix_mail_outbox_to_address_created_at", "mail_outbox", ["to_address", "created_at"], unique=False
    )
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(op.f("ck_users_erased_is_deleted"), "users", type_="check")
        op.drop_column("users", "erased_at")
    else:
        # Dropping a column rebuilds the table on SQLite; the users trigger is made again afterwards.
        with op.batch_alter_table("users") as batch:
            batch.drop_column("erased_at")
        op.execute("DROP TRIGGER IF EXISTS users_set_updated_at")
        op.execute(
            "CREATE TRIGGER users_set_updated_at AFTER UPDATE ON users "
            "FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at BEGIN "
            "UPDATE users SET updated_at = CURRENT_TIMESTAMP WHERE id = NEW.id; END"
        )
