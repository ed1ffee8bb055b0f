"""Email verification: proving that an account's email address belongs to the person who registered it.

Clerk marks every address made through its Backend API as verified; with IRIS_EMAIL_VERIFICATION=required
Iris takes that back and asks the owner. Guarantees:

- **Unverified until proven.** Registration marks the Clerk address unverified before the account completes
  (``unverify_at_clerk``); if that fails, the registration is undone (see ``iris.registration``).
- **The link proves the mailbox.** A link is ``IRIS_PUBLIC_URL/verify-email/<token>``: the account id and its
  current email, signed with the secret key and this module's salt (itsdangerous), valid ``LINK_LIFETIME``.
  A token is never stored or logged; a changed email or a tampered token is refused.
- **A visit changes nothing.** Opening the link shows two choices; only a POST (CSRF-checked) acts, so a link
  scanner's GET is harmless.
- **Confirm.** The Clerk address is marked verified first, then ``email_verified_at`` is set. If Clerk fails
  nothing changes here (503); confirming again is safe, the PATCH is idempotent.
- **Remove ("I did not sign up").** The Clerk user is deleted first, then the row soft-deleted, which frees
  the email at once. When the delete's answer is lost, the user is looked up: gone, the row is soft-deleted;
  still there (or Clerk unreachable), nothing changes here and the answer is 503. A late delete can then leave
  a live unconfirmed row without a Clerk user; trying again, or the expiry below, settles it (a delete of a
  user already gone counts as done).
- **No squatting.** An account unconfirmed after IRIS_UNVERIFIED_TTL_HOURS is removed by ``flask iris
  reconcile`` the same way. A registration of an address held by an unconfirmed account mails its owner the
  two choices again.
- **Resending is bounded.** At most one mail per address per ``RESEND_INTERVAL``, decided from the outbox
  (the views add a per-IP limit); only a live, complete, unconfirmed account gets one, and the answer never
  says which case it was.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any, Literal

import email_validator
import sqlalchemy as sa
from flask import current_app, render_template
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from iris import clerk, mail
from iris.errors import DATABASE_UNREACHABLE, AuthProviderError, IrisError, database_failure
from iris.extensions import db
from iris.models import User, normalise_email

log = logging.getLogger(__name__)

SALT = "iris.verify-email"
LINK_LIFETIME = timedelta(hours=48)
RESEND_INTERVAL = timedelta(minutes=5)
# Outbox kinds: the mail after registering or asking again, and the one to the owner of an address someone
# tried to register again.
VERIFY = "verify_email"
VERIFY_AGAIN = "verify_email_taken"

State = Literal["open", "confirmed", "removed", "expired", "invalid"]


def required() -> bool:
    return current_app.config["IRIS_EMAIL_VERIFICATION"] == "required"


def make_token(user_id: uuid.UUID | str, email: str, secret_key: str | None = None) -> str:
    """The signed token for account ``user_id`` with ``email`` (timestamped: it expires after
    ``LINK_LIFETIME``)."""
    key = secret_key or current_app.config["SECRET_KEY"]
    return URLSafeTimedSerializer(key, salt=SALT).dumps({"user": str(user_id), "email": email})


def link_for(user: User) -> str:
    """The verification link for ``user``, on IRIS_PUBLIC_URL (never the request's Host)."""
    return f"{current_app.config['IRIS_PUBLIC_URL']}/verify-email/{make_token(user.id, user.email)}"


def look_up(token: str) -> tuple[State, User | None]:
    """What ``token`` leads to: ``open`` (an unconfirmed account to confirm or remove), ``confirmed``,
    ``removed`` (no live account with that id and email), ``expired`` or ``invalid`` (tampered, or not
    ours). Reads only."""
    serializer = URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=SALT)
    try:
        payload = serializer.loads(token, max_age=int(LINK_LIFETIME.total_seconds()))
        user_id, email = uuid.UUID(payload["user"]), payload["email"]
    except SignatureExpired:
        return "expired", None
    except (BadSignature, ValueError, KeyError, TypeError):
        return "invalid", None
    user = db.session.execute(
        sa.select(User).where(User.id == user_id, User.email == email, User.clerk_user_id.is_not(None))
    ).scalar_one_or_none()
    db.session.rollback()
    if user is None:
        return "removed", None
    return ("confirmed" if user.email_verified_at is not None else "open"), user


def confirm(token: str) -> State:
    """Confirm the account ``token`` names: the Clerk address marked verified, then ``email_verified_at``
    set. Returns the state afterwards (``confirmed``, or why nothing was done). Raises ``IrisError``
    (Clerk unreachable or refusing: nothing changed here)."""
    state, user = look_up(token)
    if state != "open" or user is None:
        return state
    clerk_user = clerk.get_user(user.clerk_user_id or "")
    if clerk_user is None:
        return "removed"  # deleted at Clerk meanwhile; reconcile soft-deletes the row
    clerk.set_email_verified(_primary_address_id(clerk_user), True)
    db.session.execute(
        sa.update(User)
        .where(User.id == user.id, User.email_verified_at.is_(None), User.deleted_at.is_(None))
        .values(email_verified_at=datetime.now(UTC))
    )
    db.session.commit()
    log.info("account %s: email address confirmed", user.id)
    return "confirmed"


def remove(token: str) -> State:
    """Remove the unconfirmed account ``token`` names ("I did not sign up"). Returns ``removed`` when done
    (or the state that stopped it). Raises ``IrisError`` when Clerk could not be made to delete the user:
    nothing changed here."""
    state, user = look_up(token)
    if state != "open" or user is None:
        return state
    remove_account(user, reason="the owner of the address did not sign up")
    return "removed"


def remove_account(user: User, *, reason: str) -> None:
    """Delete ``user``'s Clerk user, then soft-delete its row if still unconfirmed. Raises ``IrisError``
    when the Clerk user may still exist (see the module docstring); the row is then left as it is."""
    try:
        clerk.delete_user(user.clerk_user_id or "")
    except IrisError as error:
        if not clerk.answer_was_lost(error):
            raise
        if clerk.get_user(user.clerk_user_id or "") is not None:  # may raise: still unknown
            raise
    # Even if it was confirmed meanwhile: once its Clerk user is gone, a live row would point at nothing.
    db.session.execute(
        sa.update(User)
        .where(User.id == user.id, User.deleted_at.is_(None))
        .values(deleted_at=datetime.now(UTC))
    )
    db.session.commit()
    log.info("account %s removed: %s", user.id, reason)


def request_mail(email: object, kind: str = VERIFY) -> None:
    """Queue a fresh link to the live, complete, unconfirmed account with ``email``, unless one was queued for
    the address within ``RESEND_INTERVAL``, and hand it to the courier, which sends it after this request
    (``mail.send_later``). Does nothing for any other address, and never says which case it was. Never raises
    for a database or mail failure (logged; a queued mail waits for reconcile)."""
    if not required() or not isinstance(email, str) or not email.strip():
        return
    try:
        # As registration stores it; an address that is not valid (NUL, lone surrogates, ...) has no account.
        checked = email_validator.validate_email(email.strip(), check_deliverability=False)
    except email_validator.EmailNotValidError:
        return
    address = normalise_email(checked.normalized)
    try:
        user = db.session.execute(
            sa.select(User)
            .where(User.email == address, User.clerk_user_id.is_not(None), User.email_verified_at.is_(None))
            .with_for_update()  # one resend decision per account at a time
        ).scalar_one_or_none()
        newest = mail.last_queued(address) if user is not None else None
        if user is None or (newest is not None and datetime.now(UTC) - newest < RESEND_INTERVAL):
            db.session.rollback()
            return
        outbox_id = mail.queue(user, kind)
        db.session.commit()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        log.warning("verification mail not queued: database %s", database_failure(error))
        return
    mail.send_later(outbox_id, compose)


def compose(user: User, kind: str) -> EmailMessage | None:
    """The mail of ``kind`` for ``user`` with a fresh link; None when it is no longer needed (confirmed)."""
    if user.email_verified_at is not None or user.clerk_user_id is None:
        return None
    values: dict[str, Any] = {
        "link": link_for(user),
        "again": kind == VERIFY_AGAIN,
        "hours": int(LINK_LIFETIME.total_seconds() // 3600),
        "ttl_hours": current_app.config["IRIS_UNVERIFIED_TTL_HOURS"],
        "public_url": current_app.config["IRIS_PUBLIC_URL"],
    }
    subject = "Is this your Iris account? Confirm your email address"
    text = render_template("mail/verify_email.txt", **values)
    html = render_template("mail/verify_email.html", **values)
    return mail.message(user.email, subject, text, html)


def unverify_at_clerk(clerk_user: dict[str, Any]) -> None:
    """Mark a just-created Clerk user's primary address unverified (nothing when verification is off).
    Raises ``IrisError``; idempotent, so a lost answer landing late changes nothing."""
    if required():
        clerk.set_email_verified(_primary_address_id(clerk_user), False)


def expire_unconfirmed(now: datetime | None = None) -> dict[str, int]:
    """Remove every complete account still unconfirmed IRIS_UNVERIFIED_TTL_HOURS after it was created:
    ``{"removed": n, "failed": n}`` (failed: Clerk unreachable; tried again next run). Nothing when
    verification is off."""
    counts = {"removed": 0, "failed": 0}
    users = unconfirmed_too_long(now)
    db.session.rollback()
    for user in users:
        try:
            remove_account(user, reason="left unconfirmed too long")
            counts["removed"] += 1
        except IrisError:
            log.warning("account %s: unconfirmed too long, but Clerk could not remove it now", user.id)
            counts["failed"] += 1
    return counts


def unconfirmed_too_long(now: datetime | None = None) -> list[User]:
    """The complete accounts still unconfirmed IRIS_UNVERIFIED_TTL_HOURS after they were created (none when
    verification is off). Reads only; the caller ends the transaction."""
    if not required():
        return []
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=current_app.config["IRIS_UNVERIFIED_TTL_HOURS"])
    query = sa.select(User).where(
        User.clerk_user_id.is_not(None), User.email_verified_at.is_(None), User.created_at < cutoff
    )
    return list(db.session.execute(query).scalars())


def _primary_address_id(clerk_user: dict[str, Any]) -> str:
    address_id = clerk_user.get("primary_email_address_id") if isinstance(clerk_user, dict) else None
    if not isinstance(address_id, str):
        raise AuthProviderError()  # a user without its address: as unusable as an unreadable answer
    return address_id
