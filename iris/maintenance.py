"""``flask iris reconcile``: the maintenance pass that brings Iris and Clerk in step and finishes what
requests left behind. Safe to run from cron at any time, repeatedly, concurrently with traffic and with
itself.

In order, each step on its own:

1. Settle pending registrations whose lease has run out (``registration.reconcile``).
2. Walk Clerk's whole user list, newest first, by cursor (``starting_after``, 500 a page), and bring each
   Clerk user's row in step (``iris.clerk_sync.apply_user``: changed addresses, users made outside Iris,
   pending rows whose Clerk user exists). A Clerk user that no live row claims is put right at Clerk
   (``_remove_stray``) only when it is ours: deleted when it carries this database's mark and no row has its
   id (a stray of a registration), banned when its row (found by ``clerk_user_id``, or by its id with our
   mark) was deleted here (deleted Iris accounts cannot sign in), left alone when already banned (a
   deactivated account) or when the row was deleted moments ago (``RECENTLY_DELETED``: a request may still be
   acting). **Iris deletes at Clerk only what it made**: a Clerk user whose external_id is a UUID unknown here
   but that carries another database's mark or none (another Iris database or application on a shared Clerk
   instance, or one of ours made before users were marked) is never deleted or banned; it is reported as
   ``not_ours`` ("Not ours, left alone"), for an operator to look at.
3. Walk the live rows in id order, 100 at a time, and ask Clerk for exactly those users
   (``GET /v1/users?user_id=...``): a row whose Clerk user is gone is soft-deleted.
4. Remove accounts left unconfirmed longer than IRIS_UNVERIFIED_TTL_HOURS (``iris.verification``).
5. Send the mails not sent yet (``iris.mail``).
6. Erase deactivated accounts past IRIS_DEACTIVATED_RETENTION_DAYS (``_erase_past_retention``): every
   deleted, unerased account whose ``deleted_at`` is that long ago gets its Clerk user deleted (a 404 counts
   as done; a lost answer is looked up; Clerk unreachable: tried again next run, counted as failed), then its
   row erased (``iris.personal_data.erase``), unless an admin reactivated it meanwhile.
7. Prune what is kept only for a while: sent (or given-up) mails and processed webhook ids older than
   ``PRUNE_AFTER`` (30 days; longer than Svix's whole retry schedule).

Every change to an account is audited (``iris.audit``) with the actor ``maintenance``.

Memory does not grow with the number of users: each walk holds one page, and the report keeps at most
``MAX_LISTED`` change lines (and counts the rest). Clerk's 429 is waited out for its Retry-After (at most
``MAX_RATE_LIMIT_WAIT`` in all); any other Clerk failure is retried from the same cursor after
IRIS_RECONCILE_RETRY_DELAYS, then the walk stops and the report says where. ``dry_run`` reads everything and
writes nothing: no row, no Clerk user, no mail.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from flask import current_app

from iris import audit, clerk, clerk_sync, mail, personal_data, registration, verification
from iris.config import direct_engine
from iris.errors import (
    AuthProviderError,
    AuthProviderUnavailable,
    ClerkRefused,
    IrisError,
    RateLimited,
)
from iris.extensions import db
from iris.models import ClerkDeletedUser, ClerkWebhookDelivery, MailOutbox, User

log = logging.getLogger(__name__)

T = TypeVar("T")

# The advisory lock key that makes two passes exclusive ("iris" in ASCII).
LOCK_KEY = 0x69726973
# Change lines kept for the summary; beyond this, only counted.
MAX_LISTED = 1000
# The longest reconcile waits out Clerk's rate limit in one pass before giving up.
MAX_RATE_LIMIT_WAIT = 300
# Pauses before retrying a Clerk call that failed otherwise (timeout, 5xx); overridable in app.config.
DEFAULT_RETRY_DELAYS = (1.0, 5.0, 15.0)
# A row deleted less than this long ago is not acted on at Clerk: a request may still be deleting it there.
RECENTLY_DELETED = timedelta(minutes=10)
# How long sent mails and processed webhook ids are kept. Svix retries for about 28 hours; a delivery replayed
# from the dashboard later than this is applied again, which changes nothing (iris.clerk_sync applies only
# newer states).
PRUNE_AFTER = timedelta(days=30)
ROWS_PER_CLERK_CALL = clerk.FILTER_LIMIT

# (label, total) -> a context manager giving a function to call with how many items were done.
Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


@dataclass
class Report:
    """What a pass did (or, in a dry run, would do): change lines, counts by kind, and failures."""

    dry_run: bool = False
    changes: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    # Clerk users that look like strays but that this database did not make: reported, never touched.
    left_alone: list[str] = field(default_factory=list)

    def change(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if len(self.changes) < MAX_LISTED:
            self.changes.append(f"{kind:<22} {text}")

    def leave(self, text: str) -> None:
        """Report a Clerk user no row here claims and that is not ours to delete or ban (``not_ours``)."""
        self.counts["not_ours"] += 1
        if len(self.left_alone) < MAX_LISTED:
            self.left_alone.append(text)

    def fail(self, text: str) -> None:
        self.counts["failed"] += 1
        if len(self.failures) < MAX_LISTED:
            self.failures.append(text)
        log.warning("reconcile: %s", text)

    @property
    def unlisted(self) -> int:
        listed_elsewhere = ("failed", "not_ours")
        return sum(count for kind, count in self.counts.items() if kind not in listed_elsewhere) - len(
            self.changes
        )


@contextmanager
def no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda done: None


def run(*, dry_run: bool = False, progress: Progress = no_progress) -> Report:
    """One whole maintenance pass (the module docstring lists the steps). The caller holds ``exclusive()``.

    Raises ``DatabaseUnavailable`` when the database cannot be reached; Clerk and mail failures are in the
    report instead, and the steps that do not need what failed still run.
    """
    report = Report(dry_run=dry_run)
    with audit.acting(audit.Actor.maintenance()):
        _settle_registrations(report)
        _walk_clerk_users(report, progress)
        _walk_rows(report, progress)
        _expire_unconfirmed(report)
        _send_mails(report)
        _erase_past_retention(report)
        _prune(report)
    return report


@contextmanager
def exclusive() -> Iterator[bool]:
    """Hold the maintenance lock for the block; yields False (and holds nothing) when another pass holds it.

    A PostgreSQL session-level advisory lock on a connection of its own to DATABASE_URL_DIRECT (else
    DATABASE_URL), open for the whole pass and released when it closes, crash included. Through a pooler in
    transaction mode (Neon's -pooler host) a session lock is not held by this client, so set
    DATABASE_URL_DIRECT where a pooler is in front. SQLite (development) has no such lock: always True.
    """
    url = current_app.config.get("DATABASE_URL_DIRECT") or db.engine.url.render_as_string(hide_password=False)
    if not url.startswith("postgres"):
        yield True
        return
    engine = direct_engine(url)
    try:
        with engine.connect() as connection:
            held = connection.execute(
                sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}
            ).scalar()
            connection.commit()
            try:
                yield bool(held)
            finally:
                if held:
                    connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
                    connection.commit()
    finally:
        engine.dispose()


def _settle_registrations(report: Report) -> None:
    if report.dry_run:
        due = db.session.execute(
            sa.select(User.email).where(User.clerk_user_id.is_(None), User.pending_until < datetime.now(UTC))
        ).scalars()
        for email in due:
            report.change("pending_settled", email)
        db.session.rollback()
        return
    counts = registration.reconcile()
    for outcome in ("completed", "removed"):
        for _ in range(counts[outcome]):
            report.change(f"pending_{outcome}", "a registration that died half-way")
    for _ in range(counts["failed"]):
        report.fail("a pending registration could not be settled (Clerk or the database unreachable)")


def _walk_clerk_users(report: Report, progress: Progress) -> None:
    total = _ask_clerk(clerk.count_users, "counting Clerk's users", report)
    if total is None:
        return
    cursor: str | None = None
    # Earlier users of the last page, newest last: if the cursor's own user is deleted meanwhile and Clerk
    # refuses it as a cursor, the walk goes on from the one before (seeing a user twice changes nothing).
    fallbacks: list[str] = []
    with progress("Clerk users", total) as advance:
        while True:
            try:
                page = _ask_clerk(
                    functools.partial(clerk.list_users, starting_after=cursor),
                    "listing Clerk's users",
                    report,
                )
            except ClerkRefused:
                if not fallbacks:
                    raise
                cursor = fallbacks.pop()
                continue
            if page is None:
                report.fail(f"the walk of Clerk's users stopped after {cursor or 'the start'}; run again")
                return
            _sync_page(page, report)
            advance(len(page))
            if len(page) < clerk.PAGE_LIMIT:
                return
            cursor = page[-1]["id"]
            fallbacks = [user["id"] for user in page[-6:-1]]


def _sync_page(page: list[dict[str, Any]], report: Report) -> None:
    """Bring one page of Clerk users in step: read their rows in two queries, then act only on the drift."""
    states = []
    for user in page:
        try:
            states.append((user, clerk_sync.ClerkState.read(user)))
        except IrisError as error:
            report.fail(f"a Clerk user could not be read: {error.message}")
    ids = [state.clerk_user_id for _, state in states]
    rows = {
        row.clerk_user_id: row
        for row in db.session.execute(
            sa.select(User).where(User.clerk_user_id.in_(ids)).execution_options(include_deleted=True)
        ).scalars()
    }
    # The rows our external_ids name, for the Clerk users no row claims by clerk_user_id.
    unclaimed = [state.external_id for _, state in states if state.clerk_user_id not in rows]
    external = [one for one in map(registration.our_id, unclaimed) if one is not None]
    holders = {
        row.id: row
        for row in db.session.execute(
            sa.select(User).where(User.id.in_(external)).execution_options(include_deleted=True)
        ).scalars()
    }
    deleted = set(
        db.session.execute(
            sa.select(ClerkDeletedUser.clerk_user_id).where(ClerkDeletedUser.clerk_user_id.in_(ids))
        ).scalars()
    )
    db.session.rollback()
    mark = str(registration.instance_id())
    in_step: list[dict[str, Any]] = []  # rows whose content matches a newer Clerk state: one UPDATE for all
    for user, state in states:
        if state.clerk_user_id in deleted:
            continue
        row = rows.get(state.clerk_user_id)
        ours = registration.our_id(state.external_id)
        holder = holders.get(ours) if ours is not None else None
        claimed = (
            holder is not None
            and holder.deleted_at is None
            and holder.clerk_user_id in (None, state.clerk_user_id)
        )
        if row is None and ours is not None and not claimed:
            if state.mark == mark:
                _remove_stray(
                    state, holder if holder is not None and holder.deleted_at is not None else None, report
                )
            else:
                # Only a UUID unknown here: another database's or application's user, never ours to touch.
                whose = f"marked by {state.mark}" if state.mark else "no mark"
                report.leave(f"{state.clerk_user_id}  {state.email or ''}  ({whose})")
        elif row is not None and row.deleted_at is not None:
            # Found by its clerk_user_id: this database's account, deleted here.
            _remove_stray(state, row, report)
        elif row is not None and clerk_sync.only_newer(row, state):
            in_step.append({"row_id": row.id, "at": state.updated_at})
        elif row is None or row.clerk_updated_at is None or row.clerk_updated_at < state.updated_at:
            try:
                change = clerk_sync.apply_user(user, dry_run=report.dry_run)
            except IrisError as error:
                report.fail(f"Clerk user {state.clerk_user_id} not brought in step: {error.message}")
                continue
            if change is not None:
                report.change(change.kind, f"{change.clerk_user_id}  {change.detail}".rstrip())
    if in_step and not report.dry_run:
        clerk_sync.record_in_step(in_step)


def _remove_stray(state: clerk_sync.ClerkState, row: User | None, report: Report) -> None:
    """A Clerk user of ours whose account is not live here (the caller has checked it is ours: our mark, or
    a row found by its ``clerk_user_id``). With no row at all (a registration's create that landed after its
    row was settled) it is deleted at Clerk. With a row deleted here it is banned instead: that is
    what a deactivated account's Clerk user is, a ban can be lifted by reactivating, and a deletion could not
    be undone if the row's deletion was itself the mistake. A banned user, or a row deleted moments ago (a
    request may be acting on it at Clerk right now), is left alone."""
    if state.banned:
        return
    if row is not None:
        deleted_at = row.deleted_at if row.deleted_at.tzinfo else row.deleted_at.replace(tzinfo=UTC)
        if datetime.now(UTC) - deleted_at < RECENTLY_DELETED:
            return
    kind, act, call = (
        ("clerk_user_banned", "banning", clerk.ban_user)
        if row is not None
        else ("clerk_user_deleted", "deleting", clerk.delete_user)
    )
    why = "its account was deleted here" if row is not None else "its registration never completed"
    if not report.dry_run:
        try:
            done = _ask_clerk(
                functools.partial(call, state.clerk_user_id), f"{act} {state.clerk_user_id}", report
            )
        except ClerkRefused as error:
            report.fail(f"{act} {state.clerk_user_id}: {error.message}")
            return
        if done is None:
            return
    report.change(kind, f"{state.clerk_user_id}  {state.email or ''}  ({why})")


def _walk_rows(report: Report, progress: Progress) -> None:
    live = sa.and_(User.clerk_user_id.is_not(None), User.deleted_at.is_(None))
    total = db.session.execute(sa.select(sa.func.count()).where(live)).scalar_one()
    db.session.rollback()
    last = None
    with progress("Iris accounts", total) as advance:
        while True:
            query = sa.select(User.id, User.clerk_user_id, User.email).where(live).order_by(User.id)
            if last is not None:
                query = query.where(User.id > last)
            chunk = db.session.execute(query.limit(ROWS_PER_CLERK_CALL)).all()
            db.session.rollback()
            if not chunk:
                return
            ids = [row.clerk_user_id for row in chunk]
            found = _ask_clerk(
                functools.partial(clerk.users_by_id, ids), "looking up accounts' Clerk users", report
            )
            if found is None:
                report.fail(f"the walk of Iris accounts stopped after {last or 'the start'}; run again")
                return
            present = {user.get("id") for user in found}
            for row in chunk:
                if row.clerk_user_id not in present:
                    change = clerk_sync.apply_deleted(row.clerk_user_id, dry_run=report.dry_run)
                    if change is not None:
                        report.change("deleted", f"{row.clerk_user_id}  {row.email}  (gone from Clerk)")
            advance(len(chunk))
            last = chunk[-1].id


def _expire_unconfirmed(report: Report) -> None:
    if report.dry_run:
        for user in verification.unconfirmed_too_long():
            report.change("unconfirmed_removed", user.email)
        db.session.rollback()
        return
    counts = verification.expire_unconfirmed()
    for _ in range(counts["removed"]):
        report.change("unconfirmed_removed", "an account left unconfirmed too long")
    for _ in range(counts["failed"]):
        report.fail("an account unconfirmed too long could not be removed (Clerk unreachable)")


def _send_mails(report: Report) -> None:
    if report.dry_run:
        due = db.session.execute(
            sa.select(sa.func.count()).where(
                MailOutbox.sent_at.is_(None), MailOutbox.attempts < mail.MAX_ATTEMPTS
            )
        ).scalar_one()
        db.session.rollback()
        for _ in range(due):
            report.change("mail_sent", "an unsent mail")
        return
    counts = mail.send_unsent(verification.compose)
    for _ in range(counts["sent"]):
        report.change("mail_sent", "an unsent mail")
    for _ in range(counts["failed"]):
        report.fail("a mail could not be sent (the mail server unreachable or refusing)")


def _erase_past_retention(report: Report) -> None:
    """Step 6 (module docstring): ``retention_erased`` for each account erased, a failure for each one whose
    Clerk user could not be deleted now (its row stays as it is, for the next run)."""
    cutoff = datetime.now(UTC) - timedelta(days=personal_data.retention_days())
    due = db.session.execute(
        sa.select(User.id, User.clerk_user_id)
        .where(
            User.deleted_at < cutoff,
            User.erased_at.is_(None),
            User.clerk_user_id.is_not(None),
        )
        .order_by(User.deleted_at)
        .execution_options(include_deleted=True)
    ).all()
    db.session.rollback()
    for row in due:
        what = f"{row.id}  (deactivated longer than {personal_data.retention_days()} days)"
        if report.dry_run:
            report.change("retention_erased", what)
            continue
        if not _delete_banned_at_clerk(row.clerk_user_id, report):
            continue
        erased = personal_data.erase(row.id, deleted_before=cutoff)  # not if reactivated meanwhile
        db.session.commit()
        if erased:
            log.info("account %s erased: deactivated longer than the retention period", row.id)
            report.change("retention_erased", what)


def _delete_banned_at_clerk(clerk_user_id: str, report: Report) -> bool:
    """Delete a deactivated account's Clerk user; True once Clerk is known to hold no such user (a 404 counts
    as done; a lost answer is looked up), False (and a failure in the report) otherwise."""
    try:
        clerk.delete_user(clerk_user_id)  # False: already gone, which is done too
    except IrisError as error:
        try:
            gone = clerk.answer_was_lost(error) and clerk.get_user(clerk_user_id) is None
        except IrisError:
            gone = False
        if not gone:
            report.fail(f"deleting {clerk_user_id} after the retention period: {error.message}; run again")
            return False
    return True


def _prune(report: Report) -> None:
    """Step 7: delete mails sent (or given up) and webhook ids received more than ``PRUNE_AFTER`` ago,
    counted as ``mails_pruned`` and ``webhook_ids_forgotten``."""
    cutoff = datetime.now(UTC) - PRUNE_AFTER
    done = sa.or_(MailOutbox.sent_at.is_not(None), MailOutbox.attempts >= mail.MAX_ATTEMPTS)
    targets = (
        ("mails_pruned", MailOutbox, sa.and_(MailOutbox.created_at < cutoff, done)),
        ("webhook_ids_forgotten", ClerkWebhookDelivery, ClerkWebhookDelivery.received_at < cutoff),
    )
    for kind, model, old in targets:
        if report.dry_run:
            pruned = db.session.execute(sa.select(sa.func.count()).select_from(model).where(old)).scalar_one()
            db.session.rollback()
        else:
            pruned = db.session.execute(sa.delete(model).where(old)).rowcount
            db.session.commit()
        report.counts[kind] += pruned


def _ask_clerk(call: Callable[[], T], what: str, report: Report) -> T | None:
    """``call()``, waiting out Clerk's rate limit and retrying timeouts and 5xx; None (and a failure in the
    report) when Clerk could not be reached in the end. ``ClerkRefused`` (a 4xx) is raised at once. Only for
    calls that are safe to repeat."""
    delays = list(current_app.config.get("IRIS_RECONCILE_RETRY_DELAYS", DEFAULT_RETRY_DELAYS))
    waited = 0.0
    while True:
        try:
            return call()
        except RateLimited as error:
            pause = float(error.retry_after or 1)
            if waited + pause > MAX_RATE_LIMIT_WAIT:
                report.fail(f"{what}: Clerk kept rate-limiting for {waited:.0f} s")
                return None
            log.info("reconcile: Clerk rate-limited %s; waiting %.0f s as it asks", what, pause)
            waited += pause
            time.sleep(pause)
        except ClerkRefused:
            raise  # a definite refusal: asking again gets the same answer
        except (AuthProviderUnavailable, AuthProviderError) as error:
            if not delays:
                report.fail(f"{what}: {error.message}")
                return None
            pause = delays.pop(0)
            log.info("reconcile: %s failed (%s); retrying in %.1f s", what, error.code, pause)
            time.sleep(pause)
