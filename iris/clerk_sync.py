"""Keeping Iris's rows in step with Clerk's users: what a Clerk webhook and ``flask iris reconcile`` apply.

Clerk is the source of truth for identity; a row follows its Clerk user. Both entry points come here, so a
webhook and a reconcile pass make the same decision about the same Clerk user. Guarantees:

- **Newest wins.** A Clerk user's state (the full ``User`` object a ``user.created``/``user.updated`` event or
  ``GET /v1/users`` carries) is applied only when its ``updated_at`` is newer than the one the row reflects
  (``users.clerk_updated_at``), by a conditional UPDATE. A late, repeated or out-of-order state changes
  nothing, so any order of the same events ends in the same rows.
- **Deleted is for ever.** ``user.deleted`` records the Clerk user in ``clerk_deleted_users`` and soft-deletes
  and erases its row (``iris.personal_data.erase``; a row deactivated here is erased too: its Clerk user is
  gone, so it can never come back). Clerk never reuses an id, so no later event about that user makes or
  revives a row, even one that arrives before any row existed. A row Iris itself deleted (the owner closed the
  account, an admin deactivated it, maintenance removed it) is never revived by an event either.
- **Pending rows are their registration's.** A state that names a pending row (our ``external_id`` on a
  Clerk user whose registration has not completed) completes it only through ``registration.settle``, once
  the row's lease has run out; before that the registration in flight completes it itself.
- **One row per Clerk user, one live row per email.** A new Clerk user (made in Clerk's dashboard, say) gets
  a row with role restaurant; concurrent writers of the same user meet on the unique ``clerk_user_id``. When
  the email is held by another account whose own change has not arrived yet, that account's current state is
  read from Clerk and applied first; if that cannot settle it, ``SyncDeferred`` is raised (a webhook answers
  503 and is retried).
- **Email ownership.** A row keeps ``email_verified_at`` only while Clerk says its primary address is
  verified. A row made here from a Clerk user counts as confirmed when Clerk's address is verified. An address
  change to a verified address keeps a confirmed row confirmed and confirms an unconfirmed one (Clerk made
  the person prove the new address). The state a registration's own ``user.created`` carries (verified:
  Clerk marks every address it is given verified, before registration marks it unverified) never confirms a
  row: the address did not change.

- **Audited.** Every change to a row is recorded (``iris.audit.record``) in its transaction, by the actor
  the entry point names: ``clerk-webhook:<svix-id>`` for a webhook, ``maintenance`` for reconcile.

Every function writes in its own short transaction and holds no connection while Clerk is called.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from iris import audit, clerk, personal_data, registration
from iris.errors import InvalidEvent, SyncDeferred, database_errors
from iris.extensions import db
from iris.models import DEFAULT_ROLE, ClerkDeletedUser, User, normalise_email

log = logging.getLogger(__name__)

# How many accounts standing in each other's way one change may move out of the way (reading each one's
# current state from Clerk) before it is deferred. Two accounts that swapped addresses need more than Clerk's
# current states can give in any order; they stay deferred until one of them changes again.
MAX_CONFLICT_DEPTH = 3


@dataclass(frozen=True)
class ClerkState:
    """What Iris keeps of one Clerk user: its id, ``updated_at`` (Unix ms), primary email and whether Clerk
    says that address is verified, ``external_id``, ``banned``, and ``mark``: the Iris database that made it
    (``clerk.mark_of``), None when it carries none."""

    clerk_user_id: str
    updated_at: int
    email: str | None
    verified: bool
    external_id: str | None
    banned: bool
    mark: str | None = None

    @classmethod
    def read(cls, user: Any) -> ClerkState:
        """The state of a Clerk ``User`` object; ``InvalidEvent`` when it is not one."""
        if not isinstance(user, dict):
            raise InvalidEvent("The event's data is not a Clerk user object.")
        clerk_user_id, updated_at = user.get("id"), user.get("updated_at")
        if not isinstance(clerk_user_id, str) or not clerk_user_id:
            raise InvalidEvent("The Clerk user has no id.")
        if not isinstance(updated_at, int) or isinstance(updated_at, bool):
            raise InvalidEvent("The Clerk user has no updated_at.")
        email, verified = None, False
        primary = user.get("primary_email_address_id")
        addresses = user.get("email_addresses")
        for address in addresses if isinstance(addresses, list) else []:
            if isinstance(address, dict) and address.get("id") == primary:
                text = address.get("email_address")
                email = normalise_email(text) if isinstance(text, str) and text.strip() else None
                verification = address.get("verification")
                verified = isinstance(verification, dict) and verification.get("status") == "verified"
        external_id = user.get("external_id")
        return cls(
            clerk_user_id=clerk_user_id,
            updated_at=updated_at,
            email=email,
            verified=verified,
            external_id=external_id if isinstance(external_id, str) else None,
            banned=user.get("banned") is True,
            mark=clerk.mark_of(user),
        )


@dataclass(frozen=True)
class Change:
    """One change made (or, in a dry run, that would be made) to bring a row in step with Clerk."""

    kind: str  # created, email_changed, confirmed, unconfirmed, completed, deleted, ...
    clerk_user_id: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind:<14} {self.clerk_user_id}" + (f"  {self.detail}" if self.detail else "")


def apply_user(user: Any, *, dry_run: bool = False) -> Change | None:
    """Bring Iris in step with one Clerk user's state (a ``user.created``/``user.updated`` event's data, or a
    user from Clerk's list). Returns what changed, or None when nothing did (stale, already in step, deleted,
    or not Iris's to change).

    Raises ``InvalidEvent`` (not a Clerk user), ``SyncDeferred`` (the email is held by an account that cannot
    be moved out of the way now), ``DatabaseUnavailable``, and the Clerk client's errors when a conflicting
    account's state had to be read from Clerk. With ``dry_run`` nothing is written and no pending row is
    settled; the answer says what would change.
    """
    return _apply(ClerkState.read(user), dry_run=dry_run, depth=0)


def apply_deleted(clerk_user_id: str, external_id: object = None, *, dry_run: bool = False) -> Change | None:
    """A Clerk user was deleted: remember it for ever, soft-delete its row and erase it (a row deleted here
    earlier, a deactivated one, is erased too). Returns the change, or None when the row was already deleted
    (or there is none: the tombstone still stops any later event making one).

    A pending row named by ``external_id`` (its registration's Clerk user was deleted before the row
    completed) is settled by ``registration.settle`` once its lease has run out: it finds no Clerk user and
    removes the row. Raises ``DatabaseUnavailable``.
    """
    pending = registration.our_id(external_id)
    if pending is not None and not dry_run:
        registration.settle(pending, adopt=True)  # "busy" or "failed": left to its owner or to reconcile
    with database_errors():
        row = _row_by_clerk_id(clerk_user_id)
        if dry_run:
            db.session.rollback()
            return Change("deleted", clerk_user_id, row.email) if row and row.deleted_at is None else None
        _remember_deleted(clerk_user_id)
        # Locked, so that the address read here is the one erased, and two deliveries erase once.
        found = db.session.execute(
            sa.select(User.id, User.email, User.deleted_at)
            .where(User.clerk_user_id == clerk_user_id, User.erased_at.is_(None))
            .with_for_update()
        ).first()
        deleted = None
        if found is not None:
            if found.deleted_at is None:
                db.session.execute(
                    sa.update(User).where(User.id == found.id).values(deleted_at=datetime.now(UTC))
                )
                audit.record("deleted_at_clerk", found.id)
                deleted = found.email
            personal_data.erase(found.id)
        db.session.commit()
    if found is not None:
        log.info("account of Clerk user %s erased: deleted at Clerk", clerk_user_id)
    if deleted is None:
        return None
    return Change("deleted", clerk_user_id, deleted)


def only_newer(row: User, state: ClerkState) -> bool:
    """True when ``state`` is newer than what the live ``row`` reflects but would change nothing in it but
    ``clerk_updated_at`` (same address, same confirmation): ``record_in_step`` can take many such at once."""
    if row.deleted_at is not None or (
        row.clerk_updated_at is not None and row.clerk_updated_at >= state.updated_at
    ):
        return False
    email = state.email or row.email
    return email == row.email and _verified_at(row.email_verified_at, state, email_changed=False) == (
        row.email_verified_at
    )


def record_in_step(rows: list[dict[str, Any]]) -> None:
    """Record, for many rows in one statement, the newer Clerk state each already matches (``row_id``, ``at``:
    Clerk's ``updated_at``), so a later, older event cannot apply over it. Conditional like every write here:
    a row that has meanwhile taken a newer state keeps it."""
    table = User.__table__
    statement = (
        sa.update(table)
        .where(
            table.c.id == sa.bindparam("row_id"),
            table.c.deleted_at.is_(None),
            sa.or_(table.c.clerk_updated_at.is_(None), table.c.clerk_updated_at < sa.bindparam("at")),
        )
        .values(clerk_updated_at=sa.bindparam("at"))
    )
    with database_errors():
        db.session.execute(statement, rows)
        db.session.commit()


def is_deleted_at_clerk(clerk_user_id: str) -> bool:
    """True when Clerk is known to have deleted this user (a tombstone exists)."""
    return db.session.get(ClerkDeletedUser, clerk_user_id) is not None


def _apply(state: ClerkState, *, dry_run: bool, depth: int) -> Change | None:
    with database_errors():
        if is_deleted_at_clerk(state.clerk_user_id):
            db.session.rollback()
            return None
        row = _row_by_clerk_id(state.clerk_user_id)
        holder = None
        if row is None and registration.our_id(state.external_id) is not None:
            holder = db.session.execute(
                sa.select(User)
                .where(User.id == registration.our_id(state.external_id))
                .execution_options(include_deleted=True)
            ).scalar_one_or_none()
        db.session.rollback()
    if row is not None:
        return _update(row, state, dry_run=dry_run, depth=depth)
    if holder is not None:
        return _adopt(holder, state, dry_run=dry_run, depth=depth)
    if registration.our_id(state.external_id) is not None:
        # Carries one of our ids, but no row has it: a stray (a create that landed after its registration was
        # settled). Not an account; reconcile deletes it at Clerk.
        return None
    if state.email is None:
        log.info("Clerk user %s has no primary email address; no account made for it", state.clerk_user_id)
        return None
    return _create(state, dry_run=dry_run, depth=depth)


def _update(row: User, state: ClerkState, *, dry_run: bool, depth: int) -> Change | None:
    """Apply ``state`` to ``row`` if it is newer than what the row reflects."""
    if row.deleted_at is not None:
        return None  # deleted here (closed, deactivated, removed): an event never revives it
    if row.clerk_updated_at is not None and row.clerk_updated_at >= state.updated_at:
        return None
    email = state.email or row.email
    changed = email != row.email
    verified_at = _verified_at(row.email_verified_at, state, email_changed=changed)
    change = _describe(row, email, verified_at, state.clerk_user_id)
    if dry_run:
        return change
    values = {"email": email, "email_verified_at": verified_at, "clerk_updated_at": state.updated_at}
    actions = _audit_actions(row, email, verified_at)  # before the UPDATE, which refreshes ``row``
    try:
        with database_errors():
            updated = db.session.execute(
                sa.update(User)
                .where(
                    User.id == row.id,
                    User.deleted_at.is_(None),
                    sa.or_(User.clerk_updated_at.is_(None), User.clerk_updated_at < state.updated_at),
                )
                .values(**values)
            ).rowcount
            for action in actions if updated else []:
                audit.record(action, row.id)
            db.session.commit()
    except sa.exc.IntegrityError:
        db.session.rollback()
        _free_email(email, state, depth=depth)
        return _apply(state, dry_run=False, depth=depth + 1)
    if not updated:
        return None  # a newer state was applied meanwhile, or the row was deleted
    if change is not None:
        log.info("account %s follows Clerk user %s: %s", row.id, state.clerk_user_id, change.kind)
    return change


def _adopt(holder: User, state: ClerkState, *, dry_run: bool, depth: int) -> Change | None:
    """A Clerk user carrying ``holder``'s id that no row claims yet: complete ``holder`` if it is pending."""
    if holder.deleted_at is not None or holder.clerk_user_id is not None:
        # Deleted here, or already complete with another Clerk user: not ours to join. Reconcile deals with
        # the Clerk user (a stray).
        return None
    if dry_run:
        return Change("completed", state.clerk_user_id, holder.email)
    outcome = registration.settle(holder.id, adopt=True)
    if outcome == "completed":
        _apply(state, dry_run=False, depth=depth + 1)  # now a complete row: bring it to this state
        return Change("completed", state.clerk_user_id, holder.email)
    if outcome == "failed":
        raise SyncDeferred()
    return None  # busy: the registration in flight completes it itself; removed: no longer ours


def _create(state: ClerkState, *, dry_run: bool, depth: int) -> Change | None:
    """A Clerk user Iris did not create: make its row (role restaurant)."""
    assert state.email is not None
    change = Change("created", state.clerk_user_id, state.email)
    if dry_run:
        return change
    try:
        with database_errors():
            user_id = uuid.uuid4()
            db.session.add(
                User(
                    id=user_id,
                    email=state.email,
                    clerk_user_id=state.clerk_user_id,
                    role=DEFAULT_ROLE,
                    clerk_updated_at=state.updated_at,
                    email_verified_at=datetime.now(UTC) if state.verified else None,
                )
            )
            audit.record("created_from_clerk", user_id)
            db.session.commit()
    except sa.exc.IntegrityError:
        db.session.rollback()
        with database_errors():
            made_meanwhile = _row_by_clerk_id(state.clerk_user_id) is not None
            db.session.rollback()
        if not made_meanwhile:
            _free_email(state.email, state, depth=depth)
        return _apply(state, dry_run=False, depth=depth + 1)
    log.info("account made for Clerk user %s, created outside Iris", state.clerk_user_id)
    return change


def _free_email(email: str, state: ClerkState, *, depth: int) -> None:
    """Move the live account holding ``email`` out of the way of ``state``, by applying its own current
    Clerk state (or soft-deleting it when Clerk no longer has its user). Raises ``SyncDeferred`` when that
    cannot be done: the holder is a registration in flight, or the chain of such moves is too long."""
    with database_errors():
        holder = db.session.execute(sa.select(User).where(User.email == email)).scalar_one_or_none()
        db.session.rollback()
    if holder is None:
        return  # gone meanwhile: try again
    if holder.clerk_user_id is None or depth >= MAX_CONFLICT_DEPTH:
        log.warning("Clerk user %s: its address is held by another account; deferred", state.clerk_user_id)
        raise SyncDeferred()
    current = clerk.get_user(holder.clerk_user_id)
    if current is None:
        apply_deleted(holder.clerk_user_id)
        return
    holder_state = ClerkState.read(current)
    if holder_state.email == email:
        # Clerk gives the address to the holder now: the state being applied is older than that. Its own
        # later change (or reconcile) brings the account in step.
        raise SyncDeferred()
    _apply(holder_state, dry_run=False, depth=depth + 1)


def _verified_at(current: datetime | None, state: ClerkState, *, email_changed: bool) -> datetime | None:
    if not state.verified:
        return None
    if current is None and email_changed:
        return datetime.now(UTC)
    return current


def _describe(row: User, email: str, verified_at: datetime | None, clerk_user_id: str) -> Change | None:
    if email != row.email:
        return Change("email_changed", clerk_user_id, f"{row.email} -> {email}")
    if row.email_verified_at is not None and verified_at is None:
        return Change("unconfirmed", clerk_user_id, f"{email}: Clerk says the address is not verified")
    if row.email_verified_at is None and verified_at is not None:
        return Change("confirmed", clerk_user_id, email)
    return None


def _audit_actions(row: User, email: str, verified_at: datetime | None) -> list[str]:
    """The audit actions of applying ``email`` and ``verified_at`` to ``row`` (none for bookkeeping alone)."""
    actions = ["email_changed"] if email != row.email else []
    if row.email_verified_at is None and verified_at is not None:
        actions.append("email_confirmed")
    elif row.email_verified_at is not None and verified_at is None:
        actions.append("email_unconfirmed")
    return actions


def _row_by_clerk_id(clerk_user_id: str) -> User | None:
    return db.session.execute(
        sa.select(User).where(User.clerk_user_id == clerk_user_id).execution_options(include_deleted=True)
    ).scalar_one_or_none()


def _remember_deleted(clerk_user_id: str) -> None:
    """Add the tombstone in the caller's transaction; a second one for the same user changes nothing."""
    if db.session.get(ClerkDeletedUser, clerk_user_id) is not None:
        return
    try:
        with db.session.begin_nested():
            db.session.add(ClerkDeletedUser(clerk_user_id=clerk_user_id))
    except sa.exc.IntegrityError:
        pass  # a concurrent writer added it
