"""Email verification: proving that an account's email address belongs to the person who registered it, and
that the person confirming it is the one who chose its password.

Clerk marks every address made through its Backend API as verified; with IRIS_EMAIL_VERIFICATION=required
Iris takes that back and asks the owner. Guarantees:

- **Unverified until proven.** Registration marks the Clerk address unverified before the account completes
  (``unverify_at_clerk``); if that fails, the registration is undone (see ``iris.registration``).
- **Links reveal nothing.** A link is ``IRIS_PUBLIC_URL/verify-email/<token>``, the token 32 random bytes
  (``secrets.token_urlsafe``) made when the mail is built, so it exists only in the mail. The database keeps
  its SHA-256 (``EmailVerificationLink``), never the token: a dump of the database cannot rebuild a link,
  and the token decodes to nothing about the account. It works for ``LINK_LIFETIME`` and only while the
  account has the address it was made for: the row holds an HMAC of that address keyed with the secret key
  rather than a second copy of it (an address is personal data, and a plain SHA-256 of a guessable address
  could be reversed by guessing). A changed address, or a rotated secret key, invalidates open links; a new
  one is a request away. A link that confirmed or removed its account is used, and does nothing again.
- **A visit changes nothing.** Opening the link shows two choices; only a POST (CSRF-checked) acts, so a link
  scanner's GET is harmless.
- **Confirming proves the password.** The mail proves the mailbox, not who chose the password: someone can
  register another person's address with a password of their own and wait for the owner to press "yes"
  (pre-hijacking). So ``confirm`` takes the account's password and asks Clerk (``clerk.verify_password``);
  a wrong or empty one confirms nothing. Each account allows ``WRONG_PASSWORD_LIMIT`` password checks per
  ``WRONG_PASSWORD_WINDOW``, counted in the database (``VerificationAttempt``) before Clerk is asked, so a
  link cannot be used to try passwords quickly from many addresses (the page adds a per-IP limit). The
  password is passed to Clerk only: never stored, logged or sent back.
- **Confirm.** After the password, the Clerk address is marked verified, then ``email_verified_at`` is set
  and ``email_confirmed`` recorded by the account.
  If Clerk fails nothing changes here (503); confirming again is safe, the PATCH is idempotent.
- **Remove ("this wasn't me").** Needs no password. The Clerk user is deleted first, then the row
  soft-deleted and erased (``iris.personal_data.erase``: no trace of the address is left), which frees the
  email at once; ``removed_not_me`` and ``erased`` are recorded, by the account (the address's owner
  acting through its link). When the delete's answer is lost, the user is looked up:
  gone, the row is soft-deleted; still there (or Clerk unreachable), nothing changes here and the answer is
  503. A late delete can then leave a live unconfirmed row without a Clerk user; trying again, or the expiry
  below, settles it (a delete of a user already gone counts as done).
- **No squatting.** An account unconfirmed after IRIS_UNVERIFIED_TTL_HOURS is removed by ``flask iris
  reconcile`` the same way, erased too (recorded as ``expired_unconfirmed`` by ``maintenance``). A
  registration of an address held by an unconfirmed account mails its owner the two choices again, "this
  wasn't me" first.
- **Mails to one address are bounded, whatever asks.** Every verification mail (the registration's, the note
  to a squatted address's owner, a resend) is queued through ``queue_mail``, which queues at most one per
  address per ``MAIL_INTERVAL`` (decided from the outbox, one decision per address at a time), so register,
  delete, register again cannot flood someone's inbox. A withheld mail is not an error: the registration
  succeeds and the person can ask for a new link later. Only a live, complete, unconfirmed account gets one,
  and the answer to a request never says which case it was (the views add a per-IP limit).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any, Literal

import email_validator
import sqlalchemy as sa
from flask import current_app, render_template

from iris import audit, clerk, mail, personal_data
from iris.errors import (
    DATABASE_UNREACHABLE,
    AuthProviderError,
    IrisError,
    NotFoundAtClerk,
    RateLimited,
    database_errors,
    database_failure,
)
from iris.extensions import db
from iris.models import EmailVerificationLink, User, VerificationAttempt, normalise_email

log = logging.getLogger(__name__)

LINK_LIFETIME = timedelta(hours=48)
# At most one verification mail per address per this long, whatever asks for it (``queue_mail``).
MAIL_INTERVAL = timedelta(minutes=5)
# Password checks per account per window on a link's page (``confirm``).
WRONG_PASSWORD_LIMIT = 5
WRONG_PASSWORD_WINDOW = timedelta(minutes=15)
# Outbox kinds: the mail after registering or asking again, and the one to the owner of an address someone
# tried to register again.
VERIFY = "verify_email"
VERIFY_AGAIN = "verify_email_taken"
KINDS = (VERIFY, VERIFY_AGAIN)
# Keys the HMAC of an address (``_email_hmac``) apart from any other use of the secret key.
EMAIL_HMAC_CONTEXT = b"iris.verify-email.address\0"
# token_urlsafe(32) is 43 characters; anything far from that is not one of ours, and is not even hashed.
TOKEN_LENGTHS = range(32, 65)

# What a link leads to: ``open`` (an unconfirmed account to confirm or remove), ``confirmed``, ``removed``
# (no live account with the link's address), ``expired`` or ``invalid`` (unknown, tampered, not ours).
State = Literal["open", "confirmed", "removed", "expired", "invalid"]
# What pressing confirm did: a state, or ``wrong_password`` (nothing done; the link stays open).
Outcome = State | Literal["wrong_password"]


def required() -> bool:
    return current_app.config["IRIS_EMAIL_VERIFICATION"] == "required"


def new_link(user: User) -> str:
    """A fresh verification link for ``user``, on IRIS_PUBLIC_URL (never the request's Host). Adds its row
    (the token's SHA-256 only) to the session without a round trip; the caller commits."""
    token = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    db.session.add(
        EmailVerificationLink(
            id=uuid.uuid4(),
            user_id=user.id,
            token_sha256=_token_sha256(token),
            email_hmac=_email_hmac(user.email),
            created_at=now,
            expires_at=now + LINK_LIFETIME,
        )
    )
    return f"{current_app.config['IRIS_PUBLIC_URL']}/verify-email/{token}"


def look_up(token: str) -> tuple[State, User | None]:
    """What ``token`` leads to (see ``State``) and its account when live. Reads only."""
    state, user, _ = _find(token)
    return state, user


def confirm(token: str, password: str) -> Outcome:
    """Confirm the account ``token`` leads to, if ``password`` is its password (asked of Clerk): the Clerk
    address marked verified, then ``email_verified_at`` set and the link used. Returns what happened
    (``confirmed``, ``wrong_password``, or the state that stopped it). Raises ``RateLimited`` when the account
    has had ``WRONG_PASSWORD_LIMIT`` checks within ``WRONG_PASSWORD_WINDOW`` (Clerk is not asked),
    ``IrisError`` when Clerk is unreachable or refusing (nothing changed here), ``DatabaseUnavailable``."""
    state, user, link = _find(token)
    if state != "open" or user is None or link is None:
        return state
    if not password:
        return "wrong_password"  # nothing to ask Clerk about
    attempt_id = _count_password_check(user.id)
    try:
        right = clerk.verify_password(user.clerk_user_id or "", password)
    except NotFoundAtClerk:
        return "removed"  # deleted at Clerk meanwhile; reconcile soft-deletes the row
    except IrisError:
        _forget_password_check(attempt_id)  # Clerk did not answer: not a try the person used up
        raise
    if not right:
        log.info("account %s: wrong password on the verification page; nothing confirmed", user.id)
        return "wrong_password"
    clerk_user = clerk.get_user(user.clerk_user_id or "")
    if clerk_user is None:
        return "removed"
    clerk.set_email_verified(_primary_address_id(clerk_user), True)
    now = datetime.now(UTC)
    with database_errors():
        confirmed = db.session.execute(
            sa.update(User)
            .where(User.id == user.id, User.email_verified_at.is_(None), User.deleted_at.is_(None))
            .values(email_verified_at=now)
        ).rowcount
        if confirmed:
            audit.record("email_confirmed", user.id, audit.Actor.user(user.id))
        _use(link.id, now)
        db.session.commit()
    log.info("account %s: email address confirmed", user.id)
    return "confirmed"


def remove(token: str) -> State:
    """Remove the unconfirmed account ``token`` leads to ("this wasn't me"; no password needed). Returns
    ``removed`` when done (or the state that stopped it). Raises ``IrisError`` when Clerk could not be made
    to delete the user: nothing changed here."""
    state, user, link = _find(token)
    if state != "open" or user is None or link is None:
        return state
    remove_account(
        user,
        reason="the owner of the address did not sign up",
        action="removed_not_me",
        actor=audit.Actor.user(user.id),
        link_id=link.id,
    )
    return "removed"


def remove_account(
    user: User, *, reason: str, action: str, actor: audit.Actor, link_id: uuid.UUID | None = None
) -> None:
    """Delete ``user``'s Clerk user, then, in one transaction, soft-delete its row if still live (recording
    ``action`` by ``actor``), erase it (``iris.personal_data.erase``) and mark the link ``link_id`` used.
    Raises ``IrisError`` when the Clerk user may still exist (see the module docstring); the row is then left
    as it is."""
    try:
        clerk.delete_user(user.clerk_user_id or "")
    except IrisError as error:
        if not clerk.answer_was_lost(error):
            raise
        if clerk.get_user(user.clerk_user_id or "") is not None:  # may raise: still unknown
            raise
    now = datetime.now(UTC)
    # Even if it was confirmed meanwhile: once its Clerk user is gone, a live row would point at nothing.
    deleted = db.session.execute(
        sa.update(User).where(User.id == user.id, User.deleted_at.is_(None)).values(deleted_at=now)
    ).rowcount
    if deleted:
        audit.record(action, user.id, actor)
    if link_id is not None:
        _use(link_id, now)
    personal_data.erase(user.id, actor, now)
    db.session.commit()
    log.info("account %s removed: %s", user.id, reason)


def queue_mail(user: User, kind: str) -> uuid.UUID | None:
    """Add a ``kind`` verification mail to ``user`` to the session's transaction, unless one was queued to
    the address within ``MAIL_INTERVAL`` (whatever asked for it, whichever account it was for): the outbox
    row's id, or None when withheld. The one place that bound is decided; every verification mail comes
    through here. On PostgreSQL the decision holds a transaction-scoped advisory lock on the address, so two
    transactions cannot both decide to mail it. The caller commits (or rolls back), then hands the id to
    ``mail.send_later``. Raises what the database raises."""
    if db.session.get_bind().dialect.name == "postgresql":
        key = "iris.verification-mail:" + user.email
        db.session.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtextextended(key, 0))))
    now = datetime.now(UTC)
    newest = mail.last_queued(user.email, kinds=KINDS)
    if newest is not None and now - newest < MAIL_INTERVAL:
        log.info("account %s: %s mail withheld, one went to the address within the interval", user.id, kind)
        return None
    # The account's expired links do nothing any more: dropped here, where a new one is on its way.
    db.session.execute(
        sa.delete(EmailVerificationLink).where(
            EmailVerificationLink.user_id == user.id, EmailVerificationLink.expires_at < now
        )
    )
    return mail.queue(user, kind)


def request_mail(email: object, kind: str = VERIFY) -> None:
    """Queue a fresh link to the live, complete, unconfirmed account with ``email`` (within the per-address
    bound, ``queue_mail``) and hand it to the courier, which sends it after this request
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
        outbox_id = queue_mail(user, kind) if user is not None else None
        if outbox_id is None:
            db.session.rollback()
            return
        db.session.commit()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        log.warning("verification mail not queued: database %s", database_failure(error))
        return
    mail.send_later(outbox_id, compose)


def compose(user: User, kind: str) -> EmailMessage | None:
    """The mail of ``kind`` for ``user`` with a fresh link, whose row is added to the session (``mail.send``
    commits it with its claim, before the mail leaves); None when it is no longer needed (confirmed)."""
    if user.email_verified_at is not None or user.clerk_user_id is None:
        return None
    link = new_link(user)
    values: dict[str, Any] = {
        "link": link,
        "again": kind == VERIFY_AGAIN,
        "hours": int(LINK_LIFETIME.total_seconds() // 3600),
        "ttl_hours": current_app.config["IRIS_UNVERIFIED_TTL_HOURS"],
        "public_url": current_app.config["IRIS_PUBLIC_URL"],
    }
    subject = (
        "Someone tried to sign up with your address: remove the account if it is not yours"
        if kind == VERIFY_AGAIN
        else "Is this your Iris account? Confirm your email address"
    )
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
            remove_account(
                user,
                reason="left unconfirmed too long",
                action="expired_unconfirmed",
                actor=audit.Actor.maintenance(),
            )
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


def _find(token: str) -> tuple[State, User | None, EmailVerificationLink | None]:
    """The state ``token`` leads to, with its account (when live) and link row, both detached from the
    session, whose transaction is ended (no connection held once this returns)."""
    if not isinstance(token, str) or len(token) not in TOKEN_LENGTHS:
        return "invalid", None, None
    with database_errors():
        link = db.session.execute(
            sa.select(EmailVerificationLink).where(EmailVerificationLink.token_sha256 == _token_sha256(token))
        ).scalar_one_or_none()
        user = None
        if link is not None:
            user = db.session.execute(
                sa.select(User).where(User.id == link.user_id, User.clerk_user_id.is_not(None))
            ).scalar_one_or_none()  # live rows only
        for row in (link, user):
            if row is not None:
                db.session.expunge(row)  # readable after the rollback without another round trip
        db.session.rollback()
    if link is None:
        return "invalid", None, None
    if link.used_at is not None:  # used: says what became of the account, and does nothing
        return ("confirmed" if user is not None and user.email_verified_at else "removed"), None, link
    if _aware(link.expires_at) <= datetime.now(UTC):
        return "expired", None, link
    if user is None or not hmac.compare_digest(link.email_hmac, _email_hmac(user.email)):
        return "removed", None, link
    return ("confirmed" if user.email_verified_at is not None else "open"), user, link


def _count_password_check(user_id: uuid.UUID) -> uuid.UUID:
    """Record one password check for the account, committed before Clerk is asked, or raise ``RateLimited``
    (with the seconds until the oldest check leaves the window) when it has had ``WRONG_PASSWORD_LIMIT``
    within ``WRONG_PASSWORD_WINDOW``. Checks of one account are counted one at a time (its row is locked),
    so concurrent tries cannot all slip under the bound. Returns the check's id."""
    now = datetime.now(UTC)
    with database_errors():
        db.session.execute(sa.select(User.id).where(User.id == user_id).with_for_update())
        db.session.execute(
            sa.delete(VerificationAttempt).where(
                VerificationAttempt.user_id == user_id,
                VerificationAttempt.created_at <= now - WRONG_PASSWORD_WINDOW,
            )
        )
        recent = (
            db.session.execute(
                sa.select(VerificationAttempt.created_at)
                .where(VerificationAttempt.user_id == user_id)
                .order_by(VerificationAttempt.created_at)
            )
            .scalars()
            .all()
        )
        if len(recent) >= WRONG_PASSWORD_LIMIT:
            db.session.commit()  # the pruning
            wait = _aware(recent[0]) + WRONG_PASSWORD_WINDOW - now
            log.warning("account %s: too many password checks on the verification page", user_id)
            raise RateLimited(retry_after=max(1, int(wait.total_seconds()) + 1))
        attempt_id = uuid.uuid4()
        db.session.add(VerificationAttempt(id=attempt_id, user_id=user_id, created_at=now))
        db.session.commit()
    return attempt_id


def _forget_password_check(attempt_id: uuid.UUID) -> None:
    """Take back a check Clerk never answered. Best effort: left in place, it only counts one try too many."""
    try:
        db.session.execute(sa.delete(VerificationAttempt).where(VerificationAttempt.id == attempt_id))
        db.session.commit()
    except DATABASE_UNREACHABLE:
        db.session.rollback()


def _use(link_id: uuid.UUID, now: datetime) -> None:
    db.session.execute(
        sa.update(EmailVerificationLink)
        .where(EmailVerificationLink.id == link_id, EmailVerificationLink.used_at.is_(None))
        .values(used_at=now)
    )


def _token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _email_hmac(email: str) -> str:
    return personal_data.keyed_hash(email, EMAIL_HMAC_CONTEXT)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite: naive UTC
