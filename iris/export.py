"""What Iris holds about one person, gathered for an access request (``flask iris export EMAIL``), and what is
waiting for erasure (``flask iris export --all-deleted``). Reads only; never changes a row.

Guarantees (tests/test_export.py proves each against real PostgreSQL and the Clerk stand-in over HTTP):

- **Every row of the address.** ``export`` finds every ``users`` row holding the address as registration
  stores it (``normalised_address``): live, pending, unconfirmed, deactivated or deleted but not yet erased.
  Each account carries every column of its row (a column added later is exported without a change here),
  its audit events, its mail outbox entries, its verification links and its password checks on them.
- **Nobody else's address.** An account's row holds only its own address; audit events name actors by id or
  name (never by a joined email); a mail sent to another address of the account says only that it went
  elsewhere; what Clerk holds (``clerk_users``) has every address but the requested one withheld.
- **No secret.** Verification links give their dates, never the token's hash or the address's HMAC; outbox
  rows hold no link or token, and ``last_error`` is an error type or SMTP code.
- **Stable JSON.** Only strings, numbers, booleans, None, lists and dicts; timestamps are ISO 8601 in
  IRIS_TIMEZONE with their offset; lists are in a fixed order (oldest first, then by id). ``to_json`` sorts
  keys, so the same database state prints the same text, and ``json.loads`` of it gives back the dict.
- **Nothing held is "nothing".** An address no row holds gives ``{"accounts": [], ...}``, not an error.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import email_validator
import sqlalchemy as sa

from iris import clerk
from iris.extensions import db
from iris.models import (
    AuditEvent,
    ClerkDeletedUser,
    EmailVerificationLink,
    MailOutbox,
    User,
    VerificationAttempt,
    local_isoformat,
    normalise_email,
)
from iris.personal_data import address_hmac, retention_days

# The audit actions after which a soft-deleted row is a deactivated account (kept for the retention period),
# not a deleted one: an admin's deactivation, and a reactivation whose unban failed, which put the row back
# to its deactivated state with its old ``deleted_at``.
DEACTIVATING_ACTIONS = ("deactivated", "reactivation_undone")
# What Clerk's objects may hold that is an email address (to withhold any but the requested one).
_ADDRESS = re.compile(r"[^\s@\"'<>(),;:]+@[^\s@\"'<>(),;:]+")
WITHHELD = "(another address: withheld)"

JSON = dict[str, Any]


def normalised_address(email: str) -> str:
    """``email`` as registration stores it: checked and normalised by email_validator (which, among other
    things, puts an internationalised domain in one form), then trimmed and lower-cased. Text that is no
    valid address is only trimmed and lower-cased (rows written by Clerk's webhooks may hold such text)."""
    try:
        checked = email_validator.validate_email(email.strip(), check_deliverability=False).normalized
    except email_validator.EmailNotValidError:
        return normalise_email(email)
    return normalise_email(checked)


def _not_erased() -> sa.ColumnElement[bool]:
    """The rows that still hold their address: an erased row (iris.personal_data) has ``erased_at`` set and a
    placeholder instead of the address."""
    return User.erased_at.is_(None)


def export(email: str, timezone: str) -> JSON:
    """Everything Iris holds about the person with ``email``: ``{"email", "accounts", "restaurants",
    "other_mail"}``. ``accounts``: every not-erased row holding the address, oldest first (``account``).
    ``other_mail``: outbox entries addressed to it for an account that holds another address now (kind and
    times only: the account is not theirs to see). ``restaurants``: none yet (a later issue adds them)."""
    address = normalised_address(email)
    users = list(
        db.session.execute(
            sa.select(User)
            .where(User.email.in_(_forms(email)), _not_erased())
            .order_by(User.created_at, User.id)
            .execution_options(include_deleted=True)
        ).scalars()
    )
    ids = [user.id for user in users]
    other_mail = db.session.execute(
        sa.select(MailOutbox)
        .where(MailOutbox.to_hmac.in_([address_hmac(form) for form in _forms(email)]))
        .where(MailOutbox.user_id.not_in(ids))
        .order_by(MailOutbox.created_at, MailOutbox.id)
    ).scalars()
    return {
        "email": address,
        "accounts": [account(user, timezone) for user in users],
        "restaurants": [],
        "other_mail": [_mail(row, timezone, to_this_address=True) for row in other_mail],
    }


def _forms(email: str) -> list[str]:
    """The stored forms ``email`` may have: registration's (``normalised_address``) and the plain trimmed,
    lower-cased text, when the two differ."""
    return sorted({normalised_address(email), normalise_email(email)})


def account(user: User, timezone: str) -> JSON:
    """One account: every column of its row (timestamps in ``timezone``), its ``state``, when it will be
    erased (``erase_after``, deactivated accounts only), and what hangs off it: ``audit_events``, ``mails``,
    ``verification_links``, ``verification_attempts`` (password checks on a link's page, when only) and
    ``clerk_user_deleted_at`` (when Iris learnt that Clerk deleted its user; None if it has not)."""
    events = list(
        db.session.execute(
            sa.select(AuditEvent)
            .where(AuditEvent.target_id == user.id)
            .order_by(AuditEvent.occurred_at, AuditEvent.id)
        ).scalars()
    )
    mails = db.session.execute(
        sa.select(MailOutbox)
        .where(MailOutbox.user_id == user.id)
        .order_by(MailOutbox.created_at, MailOutbox.id)
    ).scalars()
    links = db.session.execute(
        sa.select(EmailVerificationLink)
        .where(EmailVerificationLink.user_id == user.id)
        .order_by(EmailVerificationLink.created_at, EmailVerificationLink.id)
    ).scalars()
    attempts = db.session.execute(
        sa.select(VerificationAttempt.created_at)
        .where(VerificationAttempt.user_id == user.id)
        .order_by(VerificationAttempt.created_at, VerificationAttempt.id)
    ).scalars()
    clerk_deleted_at = (
        db.session.scalar(
            sa.select(ClerkDeletedUser.deleted_at).where(ClerkDeletedUser.clerk_user_id == user.clerk_user_id)
        )
        if user.clerk_user_id
        else None
    )
    last_action = events[-1].action if events else None
    state = _state(user, last_action)
    own_hmac = address_hmac(user.email)  # which of its mails went to the address it has now
    return {
        **{column.key: _value(getattr(user, column.key), timezone) for column in sa.inspect(User).columns},
        "state": state,
        "erase_after": _value(erase_after(user.deleted_at, state), timezone),
        "audit_events": [_event(event, timezone) for event in events],
        "mails": [_mail(row, timezone, to_this_address=row.to_hmac == own_hmac) for row in mails],
        "verification_links": [
            {
                "created_at": _value(link.created_at, timezone),
                "expires_at": _value(link.expires_at, timezone),
                "used_at": _value(link.used_at, timezone),
            }
            for link in links
        ],
        "verification_attempts": [_value(moment, timezone) for moment in attempts],
        "clerk_user_deleted_at": _value(clerk_deleted_at, timezone),
    }


def waiting_for_erasure(timezone: str) -> JSON:
    """Every soft-deleted row that still holds its address, with when it is to be erased, soonest first:
    ``{"retention_days", "accounts": [{"id", "email", "clerk_user_id", "deleted_at", "state",
    "last_action", "erase_after"}]}``.

    ``state`` is ``deactivated`` (the last audit event is a deactivation: kept IRIS_DEACTIVATED_RETENTION_DAYS
    from ``deleted_at`` for an admin to bring back) or ``deleted`` (by its owner, "this wasn't me", Clerk or
    maintenance: nothing retains it, so ``erase_after`` is ``deleted_at`` itself, due at once).
    """
    users = list(
        db.session.execute(
            sa.select(User)
            .where(User.deleted_at.is_not(None), _not_erased())
            .execution_options(include_deleted=True)
        ).scalars()
    )
    last = _last_actions(user.id for user in users)
    waiting = []
    for user in users:
        state = _state(user, last.get(user.id))
        due = erase_after(user.deleted_at, state)
        waiting.append((_aware(due), user.id, user, state))
    waiting.sort(key=lambda entry: (entry[0], entry[1]))
    return {
        "retention_days": retention_days(),
        "accounts": [
            {
                "id": str(user.id),
                "email": user.email,
                "clerk_user_id": user.clerk_user_id,
                "deleted_at": _value(user.deleted_at, timezone),
                "state": state,
                "last_action": last.get(user.id),
                "erase_after": _value(due, timezone),
            }
            for due, _, user, state in waiting
        ],
    }


def erase_after(deleted_at: datetime | None, state: str) -> datetime | None:
    """When a soft-deleted row is due for erasure: ``deleted_at`` plus the retention period for a
    deactivated account, ``deleted_at`` itself for any other deleted row, None for a live one."""
    if deleted_at is None:
        return None
    if state == "deactivated":
        return _aware(deleted_at) + timedelta(days=retention_days())
    return _aware(deleted_at)


def clerk_users(export_json: JSON) -> JSON:
    """Add what Clerk holds to each account of ``export_json`` (in place; returned): ``clerk_user`` is
    Clerk's user object as its Backend API gives it (None when Clerk has no such user, or the row has no
    Clerk user yet), with every email address in it other than the exported one replaced by ``WITHHELD``.

    Raises Clerk's errors (``IrisError``: unreachable, refused, rate-limited) for the caller to report; then
    nothing is half-added that the caller would print."""
    found = {}
    for entry in export_json["accounts"]:
        clerk_user_id = entry["clerk_user_id"]
        found[entry["id"]] = clerk.get_user(clerk_user_id) if clerk_user_id else None
    for entry in export_json["accounts"]:
        entry["clerk_user"] = _withhold_addresses(found[entry["id"]], export_json["email"])
    return export_json


def to_json(data: JSON) -> str:
    """``data`` as the command prints it: sorted keys, two-space indents, non-ASCII kept as is."""
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False)


# ---- the pieces


def _state(user: User, last_action: str | None) -> str:
    """``pending`` (a registration not settled), ``active``, ``unconfirmed``, ``deactivated`` (soft-deleted,
    last by an admin's deactivation) or ``deleted`` (any other soft delete)."""
    if user.deleted_at is not None:
        return "deactivated" if last_action in DEACTIVATING_ACTIONS else "deleted"
    if user.clerk_user_id is None:
        return "pending"
    return "active" if user.email_verified_at is not None else "unconfirmed"


def _last_actions(user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The latest audit action about each of ``user_ids`` (absent: none recorded). Plain SQL that SQLite
    runs too (development), so no ``DISTINCT ON``: the events come oldest first and the last one wins."""
    ids = list(user_ids)
    if not ids:
        return {}
    rows = db.session.execute(
        sa.select(AuditEvent.target_id, AuditEvent.action)
        .where(AuditEvent.target_id.in_(ids))
        .order_by(AuditEvent.occurred_at, AuditEvent.id)
    )
    return {target_id: action for target_id, action in rows}


def _event(event: AuditEvent, timezone: str) -> JSON:
    """An audit event as the person may see it. ``actor``: ``user:<id>`` when the account acted on itself,
    ``admin:<id>`` when another account did, then the recorded ``actor_name`` (``cli:<user>``,
    ``impersonator:<clerk id>``, ...), comma-separated; ids and names, never another account's address."""
    actors = []
    if event.actor_id is not None:
        actors.append(f"{'user' if event.actor_id == event.target_id else 'admin'}:{event.actor_id}")
    if event.actor_name:
        actors.append(event.actor_name)
    return {
        "action": event.action,
        "actor": ", ".join(actors),
        "occurred_at": _value(event.occurred_at, timezone),
        "request_id": event.request_id,
    }


def _mail(row: MailOutbox, timezone: str, *, to_this_address: bool) -> JSON:
    """An outbox entry: its kind, when it was queued and sent, how often it was tried and why it last failed;
    ``to_this_address`` False when it went to another address the account had then (not shown)."""
    return {
        "kind": row.kind,
        "queued_at": _value(row.created_at, timezone),
        "sent_at": _value(row.sent_at, timezone),
        "attempts": row.attempts,
        "last_error": row.last_error,
        "to_this_address": to_this_address,
    }


def _withhold_addresses(value: Any, address: str) -> Any:
    """``value`` (Clerk's JSON) with every string holding an email address other than ``address`` replaced
    by ``WITHHELD``, at any depth."""
    if isinstance(value, dict):
        return {key: _withhold_addresses(item, address) for key, item in value.items()}
    if isinstance(value, list):
        return [_withhold_addresses(item, address) for item in value]
    if isinstance(value, str) and any(normalise_email(found) != address for found in _ADDRESS.findall(value)):
        return WITHHELD
    return value


def _value(value: Any, timezone: str) -> Any:
    """A column's value as JSON: instants in ``timezone`` with their offset, UUIDs as text."""
    if isinstance(value, datetime):
        return local_isoformat(value, timezone)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _aware(moment: datetime) -> datetime:
    """``moment`` with a time zone; a naive one (SQLite returns those) is UTC, as stored."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
