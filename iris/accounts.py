"""Accounts over their life: deletion by their owner, deactivation and reactivation by admins, promotion and
demotion by operators, the audit trail of each, and the admin listing. The API, the pages and the command line
all call these functions; views only find the account and shape the answer.

Guarantees (tests/test_account_lifecycle.py proves each end to end, against the Clerk stand-in over HTTP):

- **Clerk first, then the row.** Deleting deletes the Clerk user, then soft-deletes the row; deactivating
  bans the Clerk user, then soft-deletes the row. So a Clerk user never outlives its row, and when the
  database write fails after Clerk acted (503), a retry finds Clerk already done (a delete answers 404, a ban
  is idempotent) and completes. Clerk failing (timeout, 5xx, no connection) is 503 with nothing changed here.
- **A lost answer is looked up.** When Clerk's answer to a delete, ban or unban is lost, the Clerk user is
  read once: if it shows the change, the operation goes on; if not (or Clerk cannot be read), 503 and nothing
  changed here. A delete that lands after that leaves a live row whose Clerk user is gone until the owner
  retries (Clerk answers 404: done) or Clerk's ``user.deleted`` webhook or reconcile soft-delete it.
- **Reactivation commits first, then unbans.** One transaction checks that no live row has the email (else
  409 ``email_taken``, nothing changed) and undeletes the row; then the Clerk user is unbanned. When the unban
  fails, the row is soft-deleted again with its old ``deleted_at`` (recorded as ``reactivation_undone``) and
  the answer is 503, or 409 ``clerk_user_deleted`` when the Clerk user no longer exists (checked before the
  undelete too, so that case usually changes nothing at all).
- **Idempotent.** Deactivating a deactivated account bans again (harmless) and answers 200; reactivating a
  live one unbans again and answers 200; neither records anything when the row did not change. Promoting an
  admin or demoting a restaurant account changes nothing and says so.
- **Audited in the same transaction.** Every change to a row is recorded in ``audit_events`` (append-only)
  by the transaction that makes it (``iris.audit.record``): no change without its record, no record without
  its change.
- **Deleting erases.** Self-service deletion erases the account's personal data in the transaction that
  soft-deletes it (``iris.personal_data.erase``). A deactivated account keeps its data while it may be
  reactivated (IRIS_DEACTIVATED_RETENTION_DAYS); an erased account is never reactivated (409
  ``account_erased``, nothing changed), and neither is one its owner deleted (``can_reactivate``).
- **Impersonation is named.** An admin write made under impersonation (a session token with an ``act``
  claim: someone in Clerk's dashboard signed in as the admin) is recorded with both actors: ``actor_id`` is
  the admin whose account and role were used, and ``actor_name`` is ``impersonator:<act.sub>``, the Clerk
  dashboard user who really pressed the button (``iris.auth.audit_actor_name``). Keeping the admin's id means
  "everything done with this admin's authority" is still one query; ``actor_name`` says it was not them.
- **No connection held while Clerk works**: each function ends its transaction before calling Clerk.
- An admin cannot deactivate their own account (409 ``cannot_deactivate_self``). Roles change only from the
  command line, so no admin can demote themselves or promote anyone through the API or the pages.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from werkzeug.datastructures import MultiDict

from iris import clerk, personal_data
from iris.audit import Actor
from iris.audit import record as _audit
from iris.errors import (
    AccountErased,
    CannotDeactivateSelf,
    ClerkUserDeleted,
    DatabaseUnavailable,
    EmailTaken,
    IrisError,
    NotFoundAtClerk,
    RoleChangeRefused,
    ValidationFailed,
    field_error,
)
from iris.extensions import db
from iris.models import ADMIN, ROLES, AuditEvent, User, local_isoformat, normalise_email

log = logging.getLogger(__name__)

# The admin listing's page size: the default, and the most one page may ask for.
DEFAULT_LIMIT = 50
MAX_LIMIT = 100
LIST_PARAMETERS = ("q", "role", "verified", "include_deleted", "limit", "cursor")
MAX_QUERY_LENGTH = 320
MAX_CURSOR_LENGTH = 200
# The most digits a limit can have and still be read as a number (MAX_LIMIT has 3; leading zeros allowed).
MAX_LIMIT_DIGITS = 9
# The earliest year a cursor may name: four digits, as every created_at Iris gives out has.
MIN_CURSOR_YEAR = 1000
_CURSOR = re.compile(r"[A-Za-z0-9_-]+")
BOOLEANS = {"true": True, "false": False}
EMAIL_TAKEN_NOW = (
    "Another live account has this email address now, so this one cannot be reactivated. Nothing was changed."
)


# ---- reading


def find_account(user_id: uuid.UUID) -> User | None:
    """The complete account ``user_id``, live or deleted; None for an unknown id or a pending registration."""
    return db.session.execute(
        sa.select(User)
        .where(User.id == user_id, User.clerk_user_id.is_not(None))
        .execution_options(include_deleted=True)
    ).scalar_one_or_none()


def account_json(user: User, timezone: str) -> dict[str, Any]:
    """The user JSON plus ``deleted_at`` (null while live) and ``erased_at`` (null until its personal data
    was erased; ``email`` is null then): what admins see of an account."""
    deleted_at = local_isoformat(user.deleted_at, timezone) if user.deleted_at is not None else None
    erased_at = local_isoformat(user.erased_at, timezone) if user.erased_at is not None else None
    return {**user.to_dict(timezone), "deleted_at": deleted_at, "erased_at": erased_at}


# The audit actions that soft-delete an account, and those among them an admin may undo by reactivating.
DELETIONS = (
    "account_deleted",
    "deactivated",
    "reactivation_undone",
    "removed_not_me",
    "expired_unconfirmed",
    "deleted_at_clerk",
)
REACTIVATABLE = ("deactivated", "reactivation_undone")


def can_reactivate(user: User) -> bool:
    """True when an admin may try to reactivate ``user``: it is deleted, not erased, and the newest deletion
    recorded for it is a deactivation. An account its owner deleted (or that was removed, expired or deleted
    at Clerk) can never come back; such accounts are erased at once, and one deleted before erasure existed
    is told by its audit trail. Reads only."""
    if user.deleted_at is None or user.erased_at is not None:
        return False
    newest = db.session.execute(
        sa.select(AuditEvent.action)
        .where(AuditEvent.target_id == user.id, AuditEvent.action.in_(DELETIONS))
        .order_by(AuditEvent.occurred_at.desc())
        .limit(1)
    ).scalar_one_or_none()
    return newest is None or newest in REACTIVATABLE


@dataclass(frozen=True)
class ListQuery:
    """What the admin listing shows: filters, page size, and where the page starts (after ``after``)."""

    q: str | None = None
    role: str | None = None
    verified: bool | None = None
    include_deleted: bool = False
    limit: int = DEFAULT_LIMIT
    after: tuple[datetime, uuid.UUID] | None = None
    cursor: str | None = None


def parse_list_query(args: MultiDict[str, str]) -> ListQuery:
    """The listing's query parameters, checked: raises ``ValidationFailed`` listing every problem at once
    (``unknown_parameter``, ``repeated_parameter``, ``invalid_value``, ``out_of_range``, ``invalid_cursor``).

    An empty value counts as absent, as an HTML form sends an empty search box.
    """
    details = [
        field_error(name, "unknown_parameter", f"Unknown parameter; use {', '.join(LIST_PARAMETERS)}.")
        for name in sorted(set(args) - set(LIST_PARAMETERS))
    ]
    values: dict[str, str] = {}
    for name in LIST_PARAMETERS:
        given = args.getlist(name)
        if len(given) > 1:
            details.append(field_error(name, "repeated_parameter", "Give this parameter once."))
        elif given and given[0].strip():
            values[name] = given[0].strip()
    query: dict[str, Any] = {}
    if "q" in values:
        if "\x00" in values["q"] or len(values["q"]) > MAX_QUERY_LENGTH:
            details.append(field_error("q", "invalid_value", "Search for up to 320 characters of an email."))
        else:
            query["q"] = normalise_email(values["q"])
    if "role" in values:
        if values["role"] in ROLES:
            query["role"] = values["role"]
        else:
            details.append(field_error("role", "invalid_value", f"Use one of: {', '.join(ROLES)}."))
    for name in ("verified", "include_deleted"):
        if name in values:
            if values[name] in BOOLEANS:
                query[name] = BOOLEANS[values[name]]
            else:
                details.append(field_error(name, "invalid_value", "Use true or false."))
    if "limit" in values:
        given = values["limit"]
        # Short before int(): Python refuses to convert more than 4,300 digits (a ValueError, not a 422).
        limit = int(given) if given.isascii() and given.isdigit() and len(given) <= MAX_LIMIT_DIGITS else 0
        if 1 <= limit <= MAX_LIMIT:
            query["limit"] = limit
        else:
            details.append(field_error("limit", "out_of_range", f"Use a whole number from 1 to {MAX_LIMIT}."))
    if "cursor" in values:
        after = decode_cursor(values["cursor"])
        if after is None:
            message = "This cursor is not one Iris gave out; start again from the first page."
            details.append(field_error("cursor", "invalid_cursor", message))
        else:
            query["after"], query["cursor"] = after, values["cursor"]
    if details:
        raise ValidationFailed(details=details)
    return ListQuery(**query)


def list_accounts(query: ListQuery) -> tuple[list[User], str | None]:
    """One page of complete accounts (never a pending registration), newest first, and the cursor of the
    next page (None on the last one).

    Cursor paging on (created_at, id), served by ``ix_users_created_at_id``: a page reads the index backwards
    from its cursor and stops after ``limit`` + 1 matching rows, however deep it is. Stable under concurrent
    inserts: walking from the first page to the last sees every account that existed for the whole walk
    exactly once (new accounts sort before the walk's start); an account created during the walk may or may
    not appear. ``q`` is a case-insensitive substring of the email. Reads only.
    """
    statement = (
        sa.select(User)
        .where(User.clerk_user_id.is_not(None))
        .order_by(User.created_at.desc(), User.id.desc())
        .limit(query.limit + 1)
    )
    if query.include_deleted:
        statement = statement.execution_options(include_deleted=True)
    if query.q:
        statement = statement.where(User.email.contains(query.q, autoescape=True))
    if query.role:
        statement = statement.where(User.role == query.role)
    if query.verified is not None:
        verified = User.email_verified_at.is_not(None)
        statement = statement.where(verified if query.verified else sa.not_(verified))
    if query.after is not None:
        created_at, user_id = query.after
        statement = statement.where(
            sa.tuple_(User.created_at, User.id) < sa.tuple_(_stored_instant(created_at), sa.literal(user_id))
        )
    users = list(db.session.execute(statement).scalars())
    next_cursor = encode_cursor(users[query.limit - 1]) if len(users) > query.limit else None
    return users[: query.limit], next_cursor


def encode_cursor(user: User) -> str:
    """The opaque cursor of the page after ``user``: base64url of ``[created_at in UTC, id]``."""
    created_at = user.created_at if user.created_at.tzinfo else user.created_at.replace(tzinfo=UTC)
    text = json.dumps([created_at.astimezone(UTC).isoformat(), str(user.id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID] | None:
    """The (created_at, id) a cursor names, or None for anything ``encode_cursor`` did not make.

    ``encode_cursor`` writes an instant in UTC (offset +00:00) with a four-digit year, so anything else is
    refused here: another offset near the ends of datetime's range overflows when converted to UTC
    (OverflowError, a 500), and on SQLite, which compares ``created_at`` as text, a year before 1000 would
    compare wrongly against four-digit ones.
    """
    if len(cursor) > MAX_CURSOR_LENGTH or not _CURSOR.fullmatch(cursor):
        return None
    try:
        created_at, user_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        instant = datetime.fromisoformat(created_at)
        if instant.utcoffset() != timedelta(0) or instant.year < MIN_CURSOR_YEAR:
            return None
        return instant, uuid.UUID(user_id)
    except (binascii.Error, ValueError, TypeError, AttributeError):
        return None


def _stored_instant(moment: datetime) -> Any:
    """``moment`` as the cursor comparison binds it. SQLite (development) stores ``created_at`` as the text
    CURRENT_TIMESTAMP made, in UTC, so it is compared as that text; PostgreSQL compares instants."""
    if db.engine.dialect.name != "sqlite":
        return sa.literal(moment, sa.DateTime(timezone=True))
    utc = moment.astimezone(UTC)
    text = utc.strftime("%Y-%m-%d %H:%M:%S") + (f".{utc.microsecond:06d}" if utc.microsecond else "")
    return sa.literal(text, sa.String)


def audit_trail(user_id: uuid.UUID) -> list[tuple[AuditEvent, str | None]]:
    """Every audit event about account ``user_id``, newest first, each with the acting account's current
    email (None from the command line, which ``actor_name`` names). Reads only."""
    actor = sa.orm.aliased(User)
    rows = db.session.execute(
        sa.select(AuditEvent, actor.email)
        .outerjoin(actor, actor.id == AuditEvent.actor_id)
        .where(AuditEvent.target_id == user_id)
        .order_by(AuditEvent.occurred_at.desc(), AuditEvent.id)
        .execution_options(include_deleted=True)
    ).all()
    return [(event, email) for event, email in rows]


# ---- changing


def delete_own_account(user: User) -> None:
    """The owner deletes their account: the Clerk user is deleted, then, in one transaction, the row
    soft-deleted (which frees the email) and erased, ``account_deleted`` and ``erased`` recorded.

    Raises ``AuthProviderUnavailable``/``AuthProviderError`` when Clerk could not be made to delete the user
    (nothing changed here), and ``DatabaseUnavailable`` when the row could not be written after Clerk deleted
    the user; a retry then completes (Clerk answers 404: already deleted).
    """
    user_id, clerk_user_id = user.id, user.clerk_user_id or ""
    db.session.rollback()  # no connection held while Clerk works
    _delete_at_clerk(clerk_user_id)
    _soft_delete(user_id, "account_deleted", Actor.user(user_id), erase=True)
    log.info("account %s deleted by its owner", user_id)


def deactivate(admin: User, account: User, *, actor_name: str | None = None) -> User:
    """An admin deactivates ``account``: the Clerk user is banned (its sessions end, it cannot sign in), then
    the row soft-deleted and ``deactivated`` recorded (with ``actor_name`` beside the admin's id when given:
    ``impersonator:<sub>``). Returns the account as it is now.

    Raises ``CannotDeactivateSelf`` for the admin's own account, the Clerk errors when the ban could not be
    made (nothing changed here), ``DatabaseUnavailable`` when the row could not be written after the ban (a
    retry completes). A Clerk user that no longer exists counts as banned. Already deactivated: banned again,
    nothing recorded.
    """
    if account.id == admin.id:
        raise CannotDeactivateSelf()
    admin_id, account_id, clerk_user_id = admin.id, account.id, account.clerk_user_id or ""
    db.session.rollback()
    with contextlib.suppress(NotFoundAtClerk):  # the Clerk user is gone: it cannot sign in either way
        _change_at_clerk(clerk.ban_user, clerk_user_id, banned=True)
    if _soft_delete(account_id, "deactivated", Actor.admin(admin_id, actor_name)):
        log.info("account %s deactivated by admin %s%s", account_id, admin_id, _as(actor_name))
    return _reload(account_id)


def reactivate(admin: User, account: User, *, actor_name: str | None = None) -> User:
    """An admin reactivates ``account``: one transaction checks that no live row has its email and undeletes
    it, recording ``reactivated`` (with ``actor_name`` beside the admin's id when given, as ``deactivate``);
    then the Clerk user is unbanned. Returns the account as it is now.

    Raises ``AccountErased`` (its personal data was erased: it can never come back; nothing changed),
    ``EmailTaken`` (another live row has the email; nothing changed), ``ClerkUserDeleted`` (the Clerk
    user no longer exists; the account stays deactivated), or the Clerk error when the unban failed: then the
    row has been soft-deleted again (``reactivation_undone``). ``DatabaseUnavailable`` when that undoing could
    not be written: the row is live while Clerk still bans it, and a retry completes the reactivation.
    Already live: unbanned again, nothing recorded.
    """
    if account.erased_at is not None:
        raise AccountErased()
    admin_id, account_id, clerk_user_id = admin.id, account.id, account.clerk_user_id or ""
    email, deleted_at = account.email, account.deleted_at
    actor = Actor.admin(admin_id, actor_name)
    db.session.rollback()
    undeleted = False
    if deleted_at is not None:
        if clerk.get_user(clerk_user_id) is None:
            raise ClerkUserDeleted()
        undeleted = _undelete(account_id, email, actor)
    try:
        _change_at_clerk(clerk.unban_user, clerk_user_id, banned=False)
    except IrisError as error:
        gone = isinstance(error, NotFoundAtClerk)
        if undeleted or gone:  # a live row must not point at a Clerk user that is gone or still banned
            undone = "reactivation_undone"
            _soft_delete(account_id, undone, actor, deleted_at=deleted_at)
            log.warning("account %s: reactivation undone, the unban failed (%s)", account_id, error.code)
        raise (ClerkUserDeleted() if gone else error) from None
    if undeleted:
        log.info("account %s reactivated by admin %s%s", account_id, admin_id, _as(actor_name))
    return _reload(account_id)


def change_role(email: str, role: str, actor_name: str) -> tuple[User, bool]:
    """Give the live account with ``email`` the role ``role`` (``flask iris promote``/``demote``), recording
    ``promoted`` or ``demoted`` with ``actor_name`` in the same transaction. Returns the account and whether
    it changed (False: it had the role already).

    Only a complete account whose owner confirmed the email address can become an admin. Raises
    ``RoleChangeRefused`` (no such live account, a registration not settled, an address not confirmed).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    address = normalise_email(email)
    user = db.session.execute(
        sa.select(User).where(User.email == address).with_for_update()
    ).scalar_one_or_none()
    if user is None:
        refusal: str | None = f"No live account has the email address {address}."
    elif role == ADMIN and user.clerk_user_id is None:
        refusal = f"The account {address} is a registration still in progress; it cannot be promoted yet."
    elif role == ADMIN and user.email_verified_at is None:
        refusal = (
            f"The account {address} has not confirmed its email address; only a confirmed account can be"
            " promoted."
        )
    else:
        refusal = None
    if user is None or refusal is not None:
        db.session.rollback()
        raise RoleChangeRefused(refusal)
    if user.role == role:
        db.session.rollback()
        return user, False
    previous, user.role = user.role, role
    action = "promoted" if role == ADMIN else "demoted"
    _audit(action, user.id, Actor(name=actor_name))
    db.session.commit()
    log.info("account %s %s (%s -> %s) by %s", user.id, action, previous, role, actor_name)
    return user, True


# ---- the steps


def _delete_at_clerk(clerk_user_id: str) -> None:
    """Delete the Clerk user; return once Clerk is known to have no such user (404 counts as done)."""
    try:
        clerk.delete_user(clerk_user_id)
    except IrisError as error:
        if not clerk.answer_was_lost(error) or clerk.get_user(clerk_user_id) is not None:
            raise


def _change_at_clerk(call: Any, clerk_user_id: str, *, banned: bool) -> None:
    """Ban or unban. A lost answer is looked up once: the user showing ``banned`` as wanted means done; gone
    raises ``NotFoundAtClerk``; anything else raises the original error."""
    try:
        call(clerk_user_id)
    except IrisError as error:
        if not clerk.answer_was_lost(error):
            raise
        found = clerk.get_user(clerk_user_id)
        if found is None:
            raise NotFoundAtClerk(404) from None
        if found.get("banned") is not banned:
            raise


def _as(actor_name: str | None) -> str:
    """`` (impersonator:...)`` for a log line when someone else acted in the admin's name, else nothing."""
    return f" ({actor_name})" if actor_name else ""


def _soft_delete(
    account_id: uuid.UUID,
    action: str,
    actor: Actor,
    *,
    deleted_at: datetime | None = None,
    erase: bool = False,
) -> bool:
    """Soft-delete the row if live (at ``deleted_at``, default now) and record ``action`` by ``actor``, and
    with ``erase`` erase it too (``iris.personal_data.erase``: a live row deleted now, or one deleted
    earlier and not erased yet), in one transaction; True when the row changed. Any database failure becomes
    ``DatabaseUnavailable`` (503): it comes after Clerk acted, so the caller's retry is what settles it."""
    try:
        changed = db.session.execute(
            sa.update(User)
            .where(User.id == account_id, User.deleted_at.is_(None))
            .values(deleted_at=deleted_at or datetime.now(UTC))
        ).rowcount
        if changed:
            _audit(action, account_id, actor)
        if erase:
            changed = personal_data.erase(account_id, actor) or changed
        db.session.commit()
    except SQLAlchemyError as error:
        db.session.rollback()
        log.error(
            "account %s: Clerk has acted but the row could not be written (%s: %s); a retry completes it",
            account_id,
            action,
            type(error).__name__,
        )
        raise DatabaseUnavailable() from error
    return bool(changed)


def _undelete(account_id: uuid.UUID, email: str, actor: Actor) -> bool:
    """In one transaction: refuse when a live row (a pending registration included) has ``email``, else
    undelete the row unless it was erased meanwhile (``AccountErased``) and record ``reactivated``. True when
    this call undeleted it."""
    try:
        taken = db.session.scalar(sa.select(User.id).where(User.email == email, User.id != account_id))
        if taken is not None:
            db.session.rollback()
            raise EmailTaken(EMAIL_TAKEN_NOW)
        changed = db.session.execute(
            sa.update(User)
            .where(User.id == account_id, User.deleted_at.is_not(None), User.erased_at.is_(None))
            .values(deleted_at=None)
        ).rowcount
        if changed:
            _audit("reactivated", account_id, actor)
        elif db.session.scalar(
            sa.select(User.erased_at).where(User.id == account_id).execution_options(include_deleted=True)
        ):
            db.session.rollback()
            raise AccountErased()
        db.session.commit()
    except IntegrityError:  # the email was taken between the check and the update (uq_users_email_live)
        db.session.rollback()
        raise EmailTaken(EMAIL_TAKEN_NOW) from None
    return bool(changed)


def _reload(account_id: uuid.UUID) -> User:
    db.session.expire_all()
    user = find_account(account_id)
    if user is None:  # complete accounts are never hard-deleted
        raise RuntimeError(f"account {account_id} vanished")
    return user
