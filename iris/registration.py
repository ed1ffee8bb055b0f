"""Registration: the one function the API and the sign-up page both call.

``register`` keeps these guarantees, which the rest of the code and the tests cite by name:

- **Password only to Clerk.** The password is passed to Clerk and to nothing else: not stored, not logged,
  not in any error.
- **One account.** Success leaves exactly one Clerk user and one live ``users`` row pointing at each other
  (``users.clerk_user_id`` -> Clerk user; Clerk ``external_id`` -> ``users.id``).
- **Nothing on failure.** Failure leaves neither, once settled. If Clerk created the user and the local write
  then fails, the Clerk user is deleted before the error is raised. One case cannot know whether it failed:
  the database lost during the completing COMMIT itself. Then the Clerk user is kept and the answer is 503;
  the row is either complete already or pending, and ``reconcile`` completes it.
- **Unverified until proven** (IRIS_EMAIL_VERIFICATION=required). Before the account completes, its Clerk
  address is marked unverified (``iris.verification``); a refusal or a lost answer there is a failure after
  the create, undone like any other ("Nothing on failure"). The completing transaction also commits the
  verification mail's outbox row (unless one went to the address minutes ago: ``verification.queue_mail``),
  and the mail is sent after that commit (``iris.mail``: not lost). With
  verification off the account completes as confirmed (``email_verified_at`` set) and no mail is sent.
- **No stuck email.** A crash between Clerk's answer and the local commit leaves a *pending* row
  (``clerk_user_id`` NULL) whose id is the Clerk user's ``external_id``. Once its lease has run out, the
  next registration of that email undoes it (deletes the Clerk user found by external_id, then the row)
  and starts afresh; ``flask iris reconcile`` completes or undoes every such row.
- **One winner.** The email is reserved by committing the pending row before Clerk is called. The partial
  unique index on live emails lets exactly one of many concurrent registrations reserve it; the others get
  ``EmailTaken`` and never call Clerk, so there is never more than one Clerk user.
- **No connection held.** No database connection is held while Clerk is called: the session's transaction
  is committed or rolled back (returning the connection to the pool) before every Clerk call.
- **A lost answer is not a no.** When Clerk's answer to the create is lost (timeout, dropped connection),
  Clerk may still store the user after Iris stopped waiting. The row is looked up at Clerk once: found, the
  registration completes; not found, the row stays pending until the create can no longer land
  (``IRIS_PENDING_TIMEOUT_SECONDS``), the answer is 503 with that Retry-After, and the next attempt or
  ``reconcile`` settles it then. A Clerk user that carries one of our ids as ``external_id`` but that no
  live row claims (a create that landed after its row was settled) is ours to remove: it never refuses the
  email for ever.

How settlers never race: a pending row carries a lease, ``pending_owner`` and ``pending_until``. Only the
owner writes to the row, and every write is conditional on still owning it (``WHERE pending_owner =
:mine``), so of two settlers that read the same row only one acts. The registration that reserved the row
owns it first. Once ``pending_until`` has passed, every Clerk call the owner made has answered or can no
longer land, and anyone may claim the row (a conditional UPDATE that takes the lease) to settle it.
Whoever learns that a Clerk write of theirs may still land extends their lease before giving up.

Invariant behind all of it: a pending row is deleted only by its owner, once Clerk is known to hold no user
for it and no Clerk write of the owner's can still land.

Audited (``iris.audit``): reserving (``registration_started``), completing (``registered``) and undoing
(``registration_undone``) each record their event in their own transaction, by the person registering
(``user:<new id>``) on their own request, and by whoever settles otherwise (``maintenance``,
``clerk-webhook:<svix-id>``). Lease bookkeeping (``pending_owner``, ``pending_until``) is not an account
change and records nothing.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import email_validator
import sqlalchemy as sa
from flask import current_app

from iris import audit, clerk, mail, metrics, verification
from iris.errors import (
    DATABASE_UNREACHABLE,
    AuthProviderError,
    AuthProviderUnavailable,
    CompletionUnknown,
    DatabaseUnavailable,
    EmailTaken,
    IrisError,
    LeaseLost,
    RegistrationInProgress,
    ValidationFailed,
    database_errors,
    database_failure,
    field_error,
)
from iris.extensions import db
from iris.models import ADMIN, DEFAULT_ROLE, IrisInstance, User, normalise_email

log = logging.getLogger(__name__)

Outcome = Literal["completed", "removed", "busy", "failed"]


@dataclass(frozen=True)
class Lease:
    """The right to act on pending row ``user_id``, held as ``owner`` (see the module docstring)."""

    user_id: uuid.UUID
    owner: uuid.UUID


def register(email: object, password: object, role: object = DEFAULT_ROLE) -> User:
    """Create an account at Clerk and here, or raise an ``IrisError`` and leave nothing behind.

    Raises ``ValidationFailed`` (every field problem at once, or Clerk's password rule), ``EmailTaken``
    (with Retry-After while another registration of the email is unsettled), ``RateLimited``,
    ``AuthProviderUnavailable`` (with Retry-After; after a lost answer the email stays reserved until then),
    ``AuthProviderError`` or ``DatabaseUnavailable``.
    Side effects: a Clerk user and a committed ``users`` row, or neither (a lost answer leaves a pending row
    that the next attempt or ``reconcile`` settles). Counted in ``iris_registrations_total`` by outcome.
    """
    try:
        user = _register(email, password, role)
    except IrisError as error:
        metrics.registration(error.code)
        raise
    except Exception:
        metrics.registration("error")
        raise
    metrics.registration("created")
    return user


def _register(email: object, password: object, role: object) -> User:
    email, role = _validate(email, password, role)
    instance = instance_id()  # cached after the first registration; read before anything is reserved
    try:
        lease = _reserve(email, role)
    except RegistrationInProgress:
        raise
    except EmailTaken:
        verification.request_mail(email, verification.VERIFY_AGAIN)  # only if held by an unconfirmed account
        raise
    with audit.acting(audit.Actor.user(lease.user_id)):  # the person registering: user:<their new id>
        return _create_and_complete(lease, email, cast(str, password), instance)


def _create_and_complete(lease: Lease, email: str, password: str, instance: uuid.UUID) -> User:
    """The rest of ``_register`` once the address is reserved: create the Clerk user, then complete."""
    clerk_user = _create_at_clerk(lease, email, password, instance)
    clerk_user_id = clerk_user["id"]
    try:
        verification.unverify_at_clerk(clerk_user)
    except IrisError:
        log.warning("registration %s: Clerk's address could not be marked unverified; undoing", lease.user_id)
        _undo(lease, [clerk_user_id])
        raise
    try:
        user, outbox_id = _complete(lease, clerk_user_id)
    except (CompletionUnknown, LeaseLost):
        # CompletionUnknown (the one case "Nothing on failure" cannot know): the COMMIT may have landed, so
        # the row may already point at the Clerk user, and deleting that user could leave a complete row with
        # no one behind it. LeaseLost: the row is someone
        # else's to settle now, and they may be completing it with this very user. Either way keep the user.
        log.warning(
            "registration %s: not completed here; left for reconcile or the next attempt", lease.user_id
        )
        raise
    except Exception:
        db.session.rollback()
        log.warning(
            "registration %s: local write failed after Clerk created the user; undoing", lease.user_id
        )
        _undo(lease, [clerk_user_id])
        raise
    if outbox_id is not None:
        # After the commit: the courier sends it after this request; one it cannot send waits for reconcile.
        mail.send_later(outbox_id, verification.compose)
    return user


def reconcile(now: datetime | None = None) -> dict[str, int]:
    """Settle every pending registration whose lease has run out: complete it when Clerk has its user, else
    delete the row.

    Returns counts: ``completed``, ``removed``, ``failed`` (Clerk or the database unreachable; left for the
    next run). Audited as ``maintenance``. A row another settler holds at that moment is skipped and not
    counted. Safe to run at any time, more than once, and concurrently with registrations and with itself.
    """
    now = now or datetime.now(UTC)
    with database_errors():
        expired = (
            db.session.execute(
                sa.select(User.id)
                .where(User.clerk_user_id.is_(None), User.pending_until < now)
                .order_by(User.created_at)
            )
            .scalars()
            .all()
        )
        db.session.rollback()
    counts = {"completed": 0, "removed": 0, "failed": 0}
    for user_id in expired:
        try:
            with audit.acting(audit.Actor.maintenance()):
                outcome = settle(user_id, adopt=True, now=now)
        except DatabaseUnavailable:
            outcome = "failed"
        if outcome == "failed":
            log.warning("reconcile: pending registration %s left for the next run", user_id)
        if outcome in counts:
            counts[outcome] += 1
    return counts


def settle(user_id: uuid.UUID, *, adopt: bool, now: datetime | None = None) -> Outcome:
    """Claim pending row ``user_id`` if its lease has run out, and settle it.

    With ``adopt``, a Clerk user carrying the row's id completes the row (``completed``); without, it is
    deleted at Clerk and the row with it (``removed``), as when no Clerk user exists. ``busy``: the row is
    not claimable (someone holds it, or it is complete or gone). ``failed``: Clerk could not be asked or the
    row could not be written; it stays pending for later. A Clerk user carrying the row's id but another
    database's mark is neither adopted nor deleted: it is not this row's.
    """
    lease = _claim(user_id, now or datetime.now(UTC))
    if lease is None:
        return "busy"
    try:
        matches = [match for match in clerk.find_users(external_id=str(user_id)) if not _foreign(match)]
    except IrisError:
        _expire(lease)  # nothing was written to Clerk: let the next settler try at once
        return "failed"
    if adopt and matches:
        try:
            verification.unverify_at_clerk(matches[0])
        except IrisError:
            _expire(lease)  # the PATCH is idempotent: a late one changes nothing
            return "failed"
        try:
            _complete(lease, matches[0]["id"])  # its mail is sent by reconcile's outbox pass
        except IrisError:
            return "failed"
        log.info("registration %s completed with the Clerk user that carries its id", user_id)
        return "completed"
    return "removed" if _undo(lease, [match["id"] for match in matches]) else "failed"


def _foreign(clerk_user: Any) -> bool:
    """True when a Clerk user carries another database's mark. A pending row's own external_id lookup is
    what proves a user ours, so an unmarked one (made before users were marked) still settles its row; one
    marked by another database (which has a row with the same id: a copy of this one) is never ours to
    complete with or to delete."""
    mark = clerk.mark_of(clerk_user)
    return mark is not None and mark != str(instance_id())


def _validate(email: object, password: object, role: object) -> tuple[str, str]:
    details = []
    normalised = ""
    if not isinstance(email, str) or not email.strip():
        details.append(field_error("email", "required", "Enter your email address."))
    else:
        try:
            checked = email_validator.validate_email(email.strip(), check_deliverability=False)
            normalised = normalise_email(checked.normalized)
        except email_validator.EmailNotValidError:
            details.append(field_error("email", "invalid_email", "Enter a valid email address."))
    if not isinstance(password, str) or password == "":
        details.append(field_error("password", "required", "Enter a password."))
    # Admins are never self-registered, whatever the configuration says.
    allowed = [name for name in current_app.config["IRIS_SIGNUP_ROLES"] if name != ADMIN]
    if role not in allowed:
        details.append(field_error("role", "role_not_allowed", "Choose one of: " + ", ".join(allowed) + "."))
    if details:
        raise ValidationFailed(details=details)
    return normalised, str(role)


def _pending_timeout() -> timedelta:
    """How long a registration's Clerk write may still land: the lease a reservation or lost answer takes."""
    return timedelta(seconds=current_app.config["IRIS_PENDING_TIMEOUT_SECONDS"])


def _reserve(email: str, role: str, *, retry: bool = True) -> Lease:
    """Commit a pending row for ``email``, leased to this registration; raise ``EmailTaken`` when a live or
    unsettled account has the email.

    The committed row is what lets exactly one registration of an email through ("One winner"), and the
    session holds no connection once this returns ("No connection held"). The insert is tried first (one
    transaction on the common path); only when the email is taken is the holder read, to tell a complete
    account from one in flight or one whose lease has run out, which is settled (undone) here before one
    more try.
    """
    lease = Lease(uuid.uuid4(), uuid.uuid4())
    now = datetime.now(UTC)
    with database_errors():
        db.session.add(
            User(
                id=lease.user_id,
                email=email,
                role=role,
                clerk_user_id=None,
                pending_owner=lease.owner,
                pending_until=now + _pending_timeout(),
            )
        )
        audit.record("registration_started", lease.user_id, audit.Actor.user(lease.user_id))
        try:
            db.session.commit()
            return lease
        except sa.exc.IntegrityError:
            db.session.rollback()
        holder = db.session.execute(
            sa.select(User.id, User.clerk_user_id, User.pending_until).where(User.email == email)
        ).first()
        db.session.rollback()
    if holder is None or holder.clerk_user_id is not None or not retry:
        raise EmailTaken()
    until = _aware(holder.pending_until)
    if until > now:
        raise RegistrationInProgress(retry_after=_seconds_until(until, now))
    log.info("registration %s is unsettled and its lease ran out; undoing it before a new attempt", holder.id)
    with audit.acting(audit.Actor.maintenance()):  # housekeeping, not the person now registering
        outcome = settle(holder.id, adopt=False, now=now)
    if outcome == "failed":
        raise AuthProviderUnavailable()
    if outcome == "busy":
        raise RegistrationInProgress()
    return _reserve(email, role, retry=False)


def _create_at_clerk(lease: Lease, email: str, password: str, instance: uuid.UUID) -> dict[str, Any]:
    """Create the Clerk user for ``lease``'s row, marked as ``instance``'s, and return it, or settle what can
    be settled and raise.

    Side effects on failure: a definite refusal, or a request that never left (``clerk.NotSent``: no
    connection could be opened), deletes the pending row at once, freeing the email; a lost answer keeps it
    (leased until the create can no longer land) unless a lookup finds the user, which is then returned as if
    created ("A lost answer is not a no").
    """
    removed_strays = False
    while True:
        try:
            clerk_user = clerk.create_user(
                email, password, external_id=str(lease.user_id), instance=str(instance)
            )
            clerk_user_id = clerk_user.get("id") if isinstance(clerk_user, dict) else None
            if not isinstance(clerk_user_id, str):
                raise AuthProviderError()  # a 2xx without a user: as unusable as an unreadable body
        except EmailTaken:
            # Clerk has the email. If only strays of ours hold it (creates that landed after their rows were
            # settled), remove them and try once more; anyone else's user makes it a real 409.
            if not removed_strays and _remove_strays(email):
                removed_strays = True
                continue
            _release(lease)
            raise
        except IrisError as error:
            if not clerk.answer_was_lost(error):
                _release(lease)  # a definite refusal, or never sent: Clerk created nothing
                raise
            matches = _find_at_clerk(lease.user_id)
            if matches:
                log.info(
                    "registration %s: Clerk's answer was lost, but it had created the user", lease.user_id
                )
                return matches[0]
            if matches is None or clerk.may_still_land(error):
                error.retry_after = _hold(lease)
                log.warning(
                    "registration %s: Clerk's answer was lost; the row is kept until the create can no longer"
                    " land",
                    lease.user_id,
                )
            else:
                _release(lease)  # Clerk's handling is over and it holds no user for the row
            raise
        return cast(dict[str, Any], clerk_user)


def _find_at_clerk(user_id: uuid.UUID) -> list[dict[str, Any]] | None:
    """Clerk users carrying ``user_id`` as external_id, or None when Clerk could not be asked."""
    try:
        return clerk.find_users(external_id=str(user_id))
    except IrisError:
        return None


def _remove_strays(email: str) -> bool:
    """Delete the Clerk users holding ``email`` if every one of them is a stray of ours; True if done.

    A stray carries this database's mark (``clerk.mark_of``) and one of our ids as external_id, no row here
    has that id, and it is not banned (a banned user is kept deliberately). Only a create that landed after
    its row was settled makes one. Anyone else's user leaves everything as it is: one with no external_id, one
    whose external_id is not a UUID, and one whose UUID is unknown here but that carries another database's
    mark or none (another Iris database or application on a shared Clerk instance; or one of ours made before
    users were marked, which ``flask iris reconcile`` reports as not ours for an operator to look at).
    """
    try:
        holders = clerk.find_users(email=email)
    except IrisError:
        return False
    ids = [our_id(holder.get("external_id")) for holder in holders]
    if not holders or None in ids or any(holder.get("banned") for holder in holders):
        return False
    if any(not is_ours(holder) for holder in holders):
        log.warning("registration: the address is held at Clerk by a user this database did not make")
        return False
    with database_errors():
        claimed = db.session.execute(sa.select(sa.func.count()).where(User.id.in_(ids))).scalar_one()
        db.session.rollback()
    if claimed:
        return False
    for holder in holders:
        try:
            clerk.delete_user(holder["id"])
        except IrisError:
            return False
        log.warning(
            "removed Clerk user %s: a stray of registration %s", holder["id"], holder.get("external_id")
        )
    return True


def our_id(external_id: object) -> uuid.UUID | None:
    """The row id an ``external_id`` names if it is shaped like one of ours (a UUID), else None. A UUID alone
    does not make a Clerk user ours (another database's rows have UUIDs too): see ``is_ours``."""
    if not isinstance(external_id, str):
        return None
    try:
        return uuid.UUID(external_id)
    except ValueError:
        return None


# app.extensions key of the cached instance id: one per app, since tests make many apps on many databases.
INSTANCE_KEY = "iris.instance"


def instance_id() -> uuid.UUID:
    """This database's id (the one row of ``iris_instance``, made by its migration), read once per app and
    cached in ``app.extensions``. Read on a connection of its own, returned to the pool at once: the caller's
    session and transaction are untouched, and no connection is held across the Clerk call that follows.
    Raises ``DatabaseUnavailable`` when the database cannot be read, and RuntimeError when the row is missing
    (the database was not migrated)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    cached = app.extensions.get(INSTANCE_KEY)
    if cached is not None:
        return cast(uuid.UUID, cached)
    with database_errors(), db.engine.connect() as connection:
        found = connection.execute(sa.select(IrisInstance.id)).scalars().all()
    if len(found) != 1:
        raise RuntimeError(
            f"iris_instance must hold exactly one row, not {len(found)}: run `flask db upgrade`"
        )
    app.extensions[INSTANCE_KEY] = found[0]
    return found[0]


def is_ours(clerk_user: Any) -> bool:
    """True when a Clerk user object carries this database's mark (``clerk.mark_of``): Iris made it here, so
    registration and maintenance may delete it as a stray."""
    return clerk.mark_of(clerk_user) == str(instance_id())


def _complete(lease: Lease, clerk_user_id: str) -> tuple[User, uuid.UUID | None]:
    """Record Clerk's user id on the leased pending row and commit; return the complete account and the id
    of its verification mail's outbox row (None with verification off: the account is confirmed instead; or
    when the per-address bound withholds the mail, ``verification.queue_mail``).

    One UPDATE ... RETURNING (and the outbox row) in one commit: the returned account is detached before
    the commit, so reading it afterwards needs no second round trip. Raises ``LeaseLost`` when the row is no
    longer this lease's (claimed by a settler, or gone), ``CompletionUnknown`` when the COMMIT's fate is
    unknown.
    """
    confirmed = {} if verification.required() else {"email_verified_at": datetime.now(UTC)}
    with database_errors():
        user = db.session.execute(
            sa.update(User)
            .where(
                User.id == lease.user_id,
                User.pending_owner == lease.owner,
                User.clerk_user_id.is_(None),
                User.deleted_at.is_(None),
            )
            .values(clerk_user_id=clerk_user_id, pending_owner=None, pending_until=None, **confirmed)
            .returning(User)
        ).scalar_one_or_none()
        if user is None:
            db.session.rollback()
            log.warning("registration %s: the pending row is no longer ours to complete", lease.user_id)
            raise LeaseLost()
        audit.record("registered", lease.user_id)
        # Within the per-address bound (None: one went to the address minutes ago; the person can ask again).
        outbox_id = verification.queue_mail(user, verification.VERIFY) if verification.required() else None
        db.session.flush()
        db.session.expunge(user)
    try:
        db.session.commit()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        raise CompletionUnknown() from error
    return user, outbox_id


def _undo(lease: Lease, clerk_user_ids: list[str]) -> bool:
    """Delete the given Clerk users of a leased pending registration, then its row.

    Returns True when all are gone. When Clerk cannot be asked, or the row cannot be deleted, the row stays
    pending for the next attempt or ``reconcile``: it is never deleted while a Clerk user may still exist. A
    delete whose answer was lost may still land, so the lease is extended before giving up.
    """
    try:
        for clerk_user_id in clerk_user_ids:
            clerk.delete_user(clerk_user_id)
    except IrisError as error:
        if clerk.may_still_land(error):
            _hold(lease)
        log.warning("registration %s: Clerk unreachable while undoing; left pending", lease.user_id)
        return False
    return _release(lease)


def _release(lease: Lease) -> bool:
    """Delete the leased pending row; True when this lease deleted it.

    Only for a row Clerk holds no user for. If the database cannot be reached the row stays pending, and the
    next settler finds no Clerk user and deletes it.
    """
    try:
        deleted = db.session.execute(
            sa.delete(User).where(
                User.id == lease.user_id, User.pending_owner == lease.owner, User.clerk_user_id.is_(None)
            )
        ).rowcount
        if deleted:
            audit.record("registration_undone", lease.user_id)
        db.session.commit()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        log.warning(
            "registration %s: database %s while undoing; left pending", lease.user_id, database_failure(error)
        )
        return False
    if not deleted:
        log.warning("registration %s: the pending row was no longer ours to delete", lease.user_id)
    return bool(deleted)


def _hold(lease: Lease) -> int:
    """Extend the lease to a full pending timeout from now (a Clerk write of ours may still land); return it
    in seconds, for Retry-After. If the database cannot be told, the lease taken earlier stands."""
    timeout = _pending_timeout()
    try:
        db.session.execute(
            sa.update(User)
            .where(User.id == lease.user_id, User.pending_owner == lease.owner, User.clerk_user_id.is_(None))
            .values(pending_until=datetime.now(UTC) + timeout)
        )
        db.session.commit()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        log.warning(
            "registration %s: database %s while extending its lease", lease.user_id, database_failure(error)
        )
    return int(timeout.total_seconds()) + 1


def _expire(lease: Lease) -> None:
    """Give the lease up at once (nothing of ours is in flight at Clerk), so another settler may claim it."""
    try:
        db.session.execute(
            sa.update(User)
            .where(User.id == lease.user_id, User.pending_owner == lease.owner, User.clerk_user_id.is_(None))
            .values(pending_until=datetime.now(UTC))
        )
        db.session.commit()
    except DATABASE_UNREACHABLE:
        db.session.rollback()


def _claim(user_id: uuid.UUID, now: datetime) -> Lease | None:
    """Take the lease on pending row ``user_id`` if it has run out; None if it has not, or the row is complete
    or gone. One conditional UPDATE, so of several settlers exactly one gets it.

    The database alone decides which row matches: the ORM is told not to evaluate the condition against
    accounts loaded in this session (``synchronize_session=False``). Evaluating it in Python compared stale
    copies, and on SQLite (development), whose timestamps load without an offset, raised TypeError when a
    webhook that had loaded the row settled it mid-registration."""
    lease = Lease(user_id, uuid.uuid4())
    with database_errors():
        claimed = db.session.execute(
            sa.update(User)
            .where(User.id == user_id, User.clerk_user_id.is_(None), User.pending_until < now)
            .values(pending_owner=lease.owner, pending_until=now + _pending_timeout()),
            execution_options={"synchronize_session": False},
        ).rowcount
        db.session.commit()
    return lease if claimed else None


def _seconds_until(moment: datetime, now: datetime) -> int:
    return max(1, int((moment - now).total_seconds()) + 1)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
