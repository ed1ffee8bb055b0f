"""The database models: a shared base (UUID id, timestamps, soft delete) and ``User``.

Soft delete: setting ``deleted_at`` hides a row from every ORM query made through ``db.session`` (the
``do_orm_execute`` hook below adds ``deleted_at IS NULL``). A query that must see deleted rows asks for them
with ``.execution_options(include_deleted=True)``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from flask_sqlalchemy.session import Session as FlaskSession
from sqlalchemy import event, orm
from sqlalchemy.orm import Mapped, mapped_column

from iris.extensions import db

# Every role an account can have, and the ones a person may pick when signing up: admins are never
# self-registered. The column's check constraint and every role check in the code are built from these.
RESTAURANT = "restaurant"
ADMIN = "admin"
ROLES = (RESTAURANT, ADMIN)
SIGNUP_ROLES = (RESTAURANT,)
DEFAULT_ROLE = RESTAURANT


class BaseModel(db.Model):
    """Columns every Iris table has.

    ``id`` is made by the app (uuid4), so a row's id is known before it is written; registration hands it to
    Clerk as ``external_id``. ``created_at`` and ``updated_at`` are set by the database: on insert by their
    server default, on update by the ``set_updated_at`` trigger that the migrations install, so any writer,
    not only the ORM, moves ``updated_at``.
    """

    __abstract__ = True

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now(), server_onupdate=sa.FetchedValue()
    )
    deleted_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))

    def soft_delete(self) -> None:
        """Mark the row deleted; the caller commits. The row keeps its data but leaves every query."""
        self.deleted_at = datetime.now(UTC)


class User(BaseModel):
    """An Iris account. The password lives at Clerk only; no column here can hold one.

    ``clerk_user_id`` is NULL only while a registration is in flight or unsettled (between reserving the email
    and recording Clerk's answer, see ``iris.registration``); a row with it set is a complete account.
    """

    __tablename__ = "users"
    __table_args__ = (
        # The email is unique among live rows only: soft-deleting an account frees its email.
        sa.Index(
            "uq_users_email_live",
            "email",
            unique=True,
            postgresql_where=sa.text("deleted_at IS NULL"),
            sqlite_where=sa.text("deleted_at IS NULL"),
        ),
        # The same text as the migration's constraint: "role IN ('restaurant', 'admin')".
        sa.CheckConstraint("role IN (" + ", ".join(f"'{role}'" for role in ROLES) + ")", name="role_known"),
        # A pending row always says until when its current owner may act on it.
        sa.CheckConstraint(
            "clerk_user_id IS NOT NULL OR pending_until IS NOT NULL", name="pending_has_lease"
        ),
        # The admin listing (iris.accounts.list_accounts): newest first, cursor-paged on (created_at, id). A
        # page reads this index backwards from its cursor and stops after ``limit`` rows, however deep it is.
        sa.Index("ix_users_created_at_id", "created_at", "id"),
        # Only a deleted account is ever erased (iris.personal_data.erase).
        sa.CheckConstraint("erased_at IS NULL OR deleted_at IS NOT NULL", name="erased_is_deleted"),
    )

    email: Mapped[str] = mapped_column(sa.String(320))
    clerk_user_id: Mapped[str | None] = mapped_column(sa.String(64), unique=True)
    role: Mapped[str] = mapped_column(sa.String(20), default=DEFAULT_ROLE)
    # The lease on a pending row (see iris.registration): who may act on it, and until when. Until then only
    # ``pending_owner`` writes to it; after that its Clerk calls can no longer land, and anyone may claim it
    # to settle it. Both are NULL on a complete account.
    pending_owner: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)
    pending_until: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    # When the owner proved the email is theirs (iris.verification); NULL: not confirmed yet. With
    # IRIS_EMAIL_VERIFICATION=off it is set when the registration completes.
    email_verified_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    # Clerk's ``updated_at`` (Unix ms) of the Clerk user state this row reflects (iris.clerk_sync): a webhook
    # or reconcile applies a Clerk user only when it is newer. NULL: not synced from Clerk yet.
    clerk_updated_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    # When the account's personal data was erased (iris.personal_data.erase): ``email`` then holds a
    # placeholder that is no address (``erased:<id>``), and nothing else in the database names the person.
    # Only a deleted account is erased, and an erased one can never be reactivated. NULL: not erased.
    erased_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))

    @orm.validates("email")
    def _normalise_email(self, key: str, value: str) -> str:
        return normalise_email(value)

    def to_dict(self, timezone: str) -> dict:
        """The user JSON of the API contract, timestamps rendered in ``timezone``."""
        return {
            "id": str(self.id),
            "email": None if self.erased_at is not None else self.email,
            "clerk_user_id": self.clerk_user_id,
            "role": self.role,
            "email_verified": self.email_verified_at is not None,
            "created_at": local_isoformat(self.created_at, timezone),
            "updated_at": local_isoformat(self.updated_at, timezone),
        }


class MailOutbox(db.Model):
    """A mail Iris owes someone (iris.mail): written in the transaction that makes it due, sent after the
    commit, retried by ``flask iris reconcile`` until sent or ``attempts`` reaches its bound.

    Holds who and what only: no link, no token, no password, and not the address either. The mail is sent to
    the account's current address (``user_id``); ``to_hmac`` is a keyed hash of the address it was queued
    for (``iris.personal_data.address_hmac``, key ``hmac_key_id``), which is all the per-address bound on
    verification mails needs (``iris.mail.last_queued``). The link is made when the mail is sent.
    """

    __tablename__ = "mail_outbox"
    __table_args__ = (sa.Index("ix_mail_outbox_to_hmac_created_at", "to_hmac", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, sa.ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(sa.String(40))
    to_hmac: Mapped[str | None] = mapped_column(sa.String(64))
    hmac_key_id: Mapped[str | None] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    sent_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(sa.String(200))


class ClerkWebhookDelivery(db.Model):
    """A Clerk webhook delivery already applied, by its ``svix-id`` (the same across Svix's retries).

    Lets a retried or replayed delivery be acknowledged without applying it again. Pruned by
    ``flask iris reconcile`` once older than Svix's whole retry schedule; applying an event twice is harmless
    anyway (iris.clerk_sync applies only newer states), so the table saves work, it does not keep correctness.
    """

    __tablename__ = "clerk_webhook_deliveries"
    __table_args__ = (sa.Index("ix_clerk_webhook_deliveries_received_at", "received_at"),)

    svix_id: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    event_type: Mapped[str] = mapped_column(sa.String(100))
    received_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())


class ClerkDeletedUser(db.Model):
    """A Clerk user known to be deleted. Clerk never reuses a user id, so this is for ever: no later event
    about the user (a late ``user.updated``, a ``user.created`` delivered after the ``user.deleted``) makes or
    revives an account for it."""

    __tablename__ = "clerk_deleted_users"

    clerk_user_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())


class IrisInstance(db.Model):
    """The one row naming this Iris database (made by its migration, never changed). Every Clerk user Iris
    creates carries the id in ``private_metadata.iris_instance``: maintenance and registration delete or ban
    at Clerk only users with this mark (or matched to a row of ours by ``clerk_user_id``), never another
    database's or application's on a shared Clerk instance. Read through ``iris.registration.instance_id``."""

    __tablename__ = "iris_instance"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())


def normalise_email(value: str) -> str:
    """The stored form of an email address: trimmed and lower-cased."""
    return value.strip().lower()


def local_isoformat(moment: datetime, timezone: str) -> str:
    """ISO 8601 for ``moment`` in ``timezone`` with its UTC offset, DST included.

    A naive value (SQLite returns those) is taken to be UTC, which is what the database stored.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(timezone)).isoformat()


@event.listens_for(FlaskSession, "do_orm_execute")
def _hide_soft_deleted(execute_state: orm.ORMExecuteState) -> None:
    if (
        execute_state.is_select
        and not execute_state.is_column_load
        and not execute_state.is_relationship_load
        and not execute_state.execution_options.get("include_deleted", False)
    ):
        execute_state.statement = execute_state.statement.options(
            orm.with_loader_criteria(BaseModel, lambda cls: cls.deleted_at.is_(None), include_aliases=True)
        )


# What ``audit_events.action`` may say (iris.audit.record writes them; the check constraint is built from
# these, and migration 0008 has the same list).
AUDIT_ACTIONS = (
    "account_deleted",  # the owner deleted their own account (API or /account)
    "deactivated",  # an admin banned it at Clerk and soft-deleted it here
    "reactivated",  # an admin undeleted it here and unbanned it at Clerk
    "reactivation_undone",  # the unban failed after the undelete committed: soft-deleted again
    "promoted",  # an operator made it an admin (flask iris promote)
    "demoted",  # an operator made it a restaurant again (flask iris demote)
    "registration_started",  # a registration reserved the address (a pending row)
    "registered",  # the registration completed with its Clerk user
    "registration_undone",  # the registration failed or died half-way: its pending row deleted
    "created_from_clerk",  # a Clerk user made outside Iris (Clerk's dashboard) got its account
    "email_changed",  # the primary address changed at Clerk, and the row followed
    "email_confirmed",  # the owner proved the address (the link, or Clerk verified it)
    "email_unconfirmed",  # Clerk says the address is not verified any more
    "removed_not_me",  # "this wasn't me": the address's owner removed an account they never made
    "expired_unconfirmed",  # left unconfirmed past IRIS_UNVERIFIED_TTL_HOURS: removed by maintenance
    "deleted_at_clerk",  # the Clerk user was deleted (webhook user.deleted, or maintenance found it gone)
    "erased",  # the account's personal data was erased (iris.personal_data.erase)
)


class AuditEvent(db.Model):
    """One change to an account's life, recorded in the transaction that makes the change.

    Append-only: the migration installs triggers that make UPDATE and DELETE (and, on PostgreSQL, TRUNCATE)
    on this table raise, whoever writes. It holds ids, never an email or anything else about the person, so
    the trail can be kept for ever without keeping personal data; pages join ``users`` to show emails.

    ``actor_id`` is the Iris account that acted (the account itself for a self-service deletion); from the
    command line it is NULL and ``actor_name`` says who: ``cli:<operating-system user>``. ``request_id`` is
    the HTTP request's id (``X-Request-ID``), NULL from the command line.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        sa.Index("ix_audit_events_target_id_occurred_at", "target_id", "occurred_at"),
        sa.CheckConstraint(
            "action IN (" + ", ".join(f"'{action}'" for action in AUDIT_ACTIONS) + ")", name="action_known"
        ),
        sa.CheckConstraint("actor_id IS NOT NULL OR actor_name IS NOT NULL", name="actor_known"),
    )

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    action: Mapped[str] = mapped_column(sa.String(40))
    target_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid)
    actor_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)
    actor_name: Mapped[str | None] = mapped_column(sa.String(100))
    request_id: Mapped[str | None] = mapped_column(sa.String(128))


class EmailVerificationLink(db.Model):
    """A verification link Iris mailed (iris.verification): the link carries a random token; this row holds
    only its SHA-256, so neither the database nor a dump of it can rebuild a working link.

    ``email_hmac`` binds the link to the address the account had when the link was made, without a second
    copy of the address: an HMAC (keyed with the app's secret key) of it, compared with the account's current
    address when the link is used. A changed address, or a rotated secret key, makes the link invalid.
    ``used_at`` is set when the link confirmed or removed the account: from then on it does nothing.
    """

    __tablename__ = "email_verification_links"
    __table_args__ = (sa.Index("ix_email_verification_links_user_id", "user_id"),)

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"))
    token_sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    email_hmac: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    expires_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))


class VerificationAttempt(db.Model):
    """One password check made on a verification link's page (iris.verification.confirm), counted per account
    so that a link cannot be used to try passwords quickly, from however many addresses. Holds who and when
    only, never what was typed; rows older than the counting window are deleted as new ones are written."""

    __tablename__ = "verification_attempts"
    __table_args__ = (sa.Index("ix_verification_attempts_user_id_created_at", "user_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
