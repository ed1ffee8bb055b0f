"""Registration: the one function the API and the sign-up page both call.

``register`` keeps the guarantees of design.md ("Registration must never lose a user"):

1. The password is passed to Clerk and to nothing else: not stored, not logged, not in any error.
2. Success leaves exactly one Clerk user and one live ``users`` row pointing at each other
   (``users.clerk_user_id`` -> Clerk user; Clerk ``external_id`` -> ``users.id``).
3. Failure leaves neither. If Clerk created the user and the local write then fails, the Clerk user is
   deleted before the error is raised. One case cannot know whether it failed: the database lost during the
   completing COMMIT itself. Then the Clerk user is kept and the answer is 503; the row is either complete
   already or pending, and ``reconcile`` completes it. Either way the email ends up with one consistent
   account, never a row pointing at a deleted Clerk user.
4. A crash between Clerk's answer and the local commit leaves a *pending* row (``clerk_user_id`` NULL) whose
   id is the Clerk user's ``external_id``. The next registration of that email, once the row is older than
   ``PENDING_TIMEOUT``, undoes it (deletes the Clerk user found by external_id, then the row) and starts
   afresh; ``flask iris reconcile`` completes or undoes every such row.
5. The email is reserved by committing the pending row before Clerk is called. The partial unique index on
   live emails lets exactly one of many concurrent registrations reserve it; the others get ``EmailTaken``
   and never call Clerk, so there is never more than one Clerk user.
6. No database connection is held while Clerk is called: the session's transaction is committed or rolled
   back (returning the connection to the pool) before every Clerk call.

Invariant behind 3 and 4: a pending row is deleted only once Clerk is known to have no user for it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import cast

import email_validator
import sqlalchemy as sa
from flask import current_app

from iris import clerk
from iris.errors import (
    DATABASE_UNREACHABLE,
    AuthProviderError,
    AuthProviderUnavailable,
    DatabaseUnavailable,
    EmailTaken,
    IrisError,
    ValidationFailed,
)
from iris.extensions import db
from iris.models import User, normalise_email

log = logging.getLogger(__name__)

# Longer than any registration can take (five Clerk calls at most, ~70 s with clerk.DEFAULT_TIMEOUT):
# a pending row older than this belongs to a registration that died.
PENDING_TIMEOUT = timedelta(seconds=120)

DEFAULT_ROLE = "restaurant"


def register(email: object, password: object, role: object = DEFAULT_ROLE) -> User:
    """Create an account at Clerk and here, or raise an ``IrisError`` and leave nothing behind.

    Raises ``ValidationFailed`` (every field problem at once, or Clerk's password rule), ``EmailTaken``,
    ``RateLimited``, ``AuthProviderUnavailable``, ``AuthProviderError`` or ``DatabaseUnavailable``.
    Side effects: a Clerk user and a committed ``users`` row, or neither.
    """
    email, role = _validate(email, password, role)
    password = cast(str, password)
    user_id = _reserve(email, role)
    try:
        clerk_user = clerk.create_user(email, password, external_id=str(user_id))
    except IrisError as error:
        if clerk.answer_was_lost(error):
            _undo(user_id)  # Clerk may have created the user: find it by external_id and delete it
        else:
            _delete_pending_row(user_id)  # a definite refusal: Clerk created nothing
        raise
    clerk_user_id = clerk_user.get("id") if isinstance(clerk_user, dict) else None
    if not isinstance(clerk_user_id, str):
        _undo(user_id)
        raise AuthProviderError()
    try:
        return _complete(user_id, clerk_user_id)
    except CompletionUnknown:
        # The COMMIT may have landed: the row may already point at the Clerk user, so deleting that user
        # could leave a complete row with no one behind it. Keep both; reconcile (or the next attempt)
        # completes the row or finds it complete.
        log.warning("registration %s: database lost while completing; left for reconcile", user_id)
        raise
    except Exception:
        db.session.rollback()
        log.warning("registration %s: local write failed after Clerk created the user; undoing", user_id)
        _undo(user_id, clerk_user_id=clerk_user_id)
        raise


def reconcile(now: datetime | None = None) -> dict[str, int]:
    """Finish every stale pending registration: complete it when Clerk has its user, else delete the row.

    Returns counts: ``completed``, ``removed``, ``failed`` (Clerk or the database unreachable; left for the
    next run). Safe to run at any time, and more than once.
    """
    cutoff = (now or datetime.now(UTC)) - PENDING_TIMEOUT
    pending = (
        db.session.execute(sa.select(User.id).where(User.clerk_user_id.is_(None), User.created_at < cutoff))
        .scalars()
        .all()
    )
    db.session.rollback()
    counts = {"completed": 0, "removed": 0, "failed": 0}
    for user_id in pending:
        try:
            matches = clerk.find_users(external_id=str(user_id))
            if matches:
                _complete(user_id, matches[0]["id"])
                counts["completed"] += 1
            else:
                _delete_pending_row(user_id, strict=True)
                counts["removed"] += 1
        except (IrisError, *DATABASE_UNREACHABLE):
            db.session.rollback()
            log.warning("reconcile: pending registration %s left for the next run", user_id)
            counts["failed"] += 1
    return counts


def _validate(email: object, password: object, role: object) -> tuple[str, str]:
    details = []
    normalised = ""
    if not isinstance(email, str) or not email.strip():
        details.append(_detail("email", "required", "Enter your email address."))
    else:
        try:
            checked = email_validator.validate_email(email.strip(), check_deliverability=False)
            normalised = normalise_email(checked.normalized)
        except email_validator.EmailNotValidError:
            details.append(_detail("email", "invalid_email", "Enter a valid email address."))
    if not isinstance(password, str) or password == "":
        details.append(_detail("password", "required", "Enter a password."))
    # Admins are never self-registered, whatever the configuration says.
    allowed = [name for name in current_app.config["IRIS_SIGNUP_ROLES"] if name != "admin"]
    if role not in allowed:
        details.append(_detail("role", "role_not_allowed", "Choose one of: " + ", ".join(allowed) + "."))
    if details:
        raise ValidationFailed(details=details)
    return normalised, str(role)


def _detail(field: str, code: str, message: str) -> dict[str, str]:
    return {"field": field, "code": code, "message": message}


def _reserve(email: str, role: str, *, retry: bool = True) -> uuid.UUID:
    """Commit a pending row for ``email``; raise ``EmailTaken`` when a live or in-flight account has it.

    The insert is tried first (one transaction on the common path); only when the email is taken is the
    holder read, to tell a complete account from one in flight or one that died half-way.
    """
    user_id = uuid.uuid4()
    with _database():
        db.session.add(User(id=user_id, email=email, role=role, clerk_user_id=None))
        try:
            db.session.commit()
            return user_id
        except sa.exc.IntegrityError:
            db.session.rollback()
        holder = db.session.execute(
            sa.select(User.id, User.clerk_user_id, User.created_at).where(User.email == email)
        ).first()
        db.session.rollback()
    if holder is None or holder.clerk_user_id is not None or not retry:
        raise EmailTaken()
    age = datetime.now(UTC) - _aware(holder.created_at)
    if age < PENDING_TIMEOUT:
        retry_after = int((PENDING_TIMEOUT - age).total_seconds()) + 1
        raise EmailTaken(
            "A registration for this email address is already in progress.", retry_after=retry_after
        )
    log.info("registration %s is stale; undoing it before a new attempt", holder.id)
    if not _undo(holder.id):
        raise AuthProviderUnavailable(retry_after=5)
    return _reserve(email, role, retry=False)


def _complete(user_id: uuid.UUID, clerk_user_id: str) -> User:
    """Record Clerk's user id on the pending row and commit; return the complete account.

    One statement (UPDATE ... RETURNING) and one commit: the returned account is detached before the commit,
    so reading it afterwards needs no second round trip.
    """
    with _database():
        user = db.session.execute(
            sa.update(User)
            .where(User.id == user_id, User.clerk_user_id.is_(None), User.deleted_at.is_(None))
            .values(clerk_user_id=clerk_user_id)
            .returning(User)
        ).scalar_one_or_none()
        if user is None:
            db.session.rollback()
            log.error("registration %s: pending row vanished before it was completed", user_id)
            raise IrisError()  # a 500 whose message says nothing internal
        db.session.expunge(user)
    try:
        db.session.commit()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        raise CompletionUnknown(retry_after=5) from error
    return user


class CompletionUnknown(DatabaseUnavailable):
    """The database went away during or after the completing COMMIT, so it may have committed (503)."""


def _undo(user_id: uuid.UUID, clerk_user_id: str | None = None) -> bool:
    """Delete the Clerk user of a pending registration (if any), then its row.

    Returns True when both are gone. When Clerk cannot be asked, or the row cannot be deleted, the row stays
    pending for the next attempt or ``reconcile``: it is never deleted while a Clerk user may still exist.
    """
    try:
        if clerk_user_id is not None:
            clerk.delete_user(clerk_user_id)
        for match in clerk.find_users(external_id=str(user_id)):
            clerk.delete_user(match["id"])
    except IrisError:
        log.warning("registration %s: Clerk unreachable while undoing; left pending", user_id)
        return False
    return _delete_pending_row(user_id)


def _delete_pending_row(user_id: uuid.UUID, *, strict: bool = False) -> bool:
    try:
        db.session.execute(sa.delete(User).where(User.id == user_id, User.clerk_user_id.is_(None)))
        db.session.commit()
    except DATABASE_UNREACHABLE:
        db.session.rollback()
        log.warning("registration %s: database unreachable while undoing; left pending", user_id)
        if strict:
            raise
        return False
    return True


@contextmanager
def _database() -> Iterator[None]:
    """Turn "cannot reach the database" into ``DatabaseUnavailable``, rolling back first."""
    try:
        yield
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        raise DatabaseUnavailable(retry_after=5) from error


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
