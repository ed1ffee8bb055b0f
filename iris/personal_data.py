"""What Iris keeps about a person, and erasing it: the keyed hash that stands in for an address, and the
erasure of a deleted account.

Personal data in Iris's database is the email address (``users.email``). Guarantees:

- **Erased at once, or after the retention period.** An account deleted by its owner, removed through "this
  wasn't me", expired unconfirmed, or deleted at Clerk is erased in the transaction that deletes it
  (``erase``). A deactivated account (an admin's ban) keeps its data for IRIS_DEACTIVATED_RETENTION_DAYS from
  ``deleted_at``, while an admin may bring it back; then ``flask iris reconcile`` deletes its Clerk user and
  erases it (``iris.maintenance``).
- **What erasing leaves.** The row keeps its id, Clerk id, role and dates (``created_at``, ``deleted_at``,
  ``email_verified_at``) and gets ``erased_at``; its email becomes ``erased:<id>``, which is no address. Its
  verification links lose the address's hash and are marked used (opening one says the account was
  removed); its password-check counts are deleted. Mail outbox rows never held the address (only
  ``address_hmac``), webhook delivery records hold ids and event types, audit events hold ids: nothing else
  names the person. ``erased`` is recorded (``iris.audit``) in the same transaction.
- **A keyed hash, never a plain one.** Where a later check must recognise an address (the per-address bound on
  verification mails) Iris stores ``address_hmac``: HMAC-SHA256 of the normalised address under a key derived
  from FLASK_SECRET_KEY, with ``key_id`` (a fingerprint of that key) stored beside it. A plain SHA-256 of an
  address could be confirmed by anyone guessing addresses; this needs the server's secret.
- **Rotation.** A new FLASK_SECRET_KEY gives a new key and key id. Hashes made with the old key no longer
  match anything: the one check that reads them looks back ``iris.verification.MAIL_INTERVAL`` (5 minutes),
  so rotating forgets at most that much, and the old hashes become data nobody can link to an address.
  ``key_id`` tells which rows were hashed under a retired key. (Open verification links, which hold an HMAC
  of the address too, stop working on rotation, as they always did: a new one is a request away.)
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from flask import current_app

from iris import audit
from iris.extensions import db
from iris.models import EmailVerificationLink, User, VerificationAttempt

# Keys the address hash apart from every other use of the secret key.
ADDRESS_CONTEXT = b"iris.personal-data.address\0"
KEY_ID_CONTEXT = b"iris.personal-data.key-id\0"
ERASED_PREFIX = "erased:"


def keyed_hash(value: str, context: bytes) -> str:
    """HMAC-SHA256 (hex) of ``value`` under the app's secret key, kept apart from its other uses by
    ``context``."""
    key = current_app.config["SECRET_KEY"]
    key_bytes = key if isinstance(key, bytes) else str(key).encode()
    return hmac.new(key_bytes, context + value.encode(), hashlib.sha256).hexdigest()


def address_hmac(address: str) -> str:
    """The keyed hash that stands in for ``address`` (already normalised) wherever it must be recognised."""
    return keyed_hash(address, ADDRESS_CONTEXT)


def key_id() -> str:
    """A short fingerprint of the key ``address_hmac`` uses now, stored beside each hash (see Rotation)."""
    return keyed_hash("", KEY_ID_CONTEXT)[:8]


def placeholder(user_id: uuid.UUID) -> str:
    """What an erased account's ``email`` holds: no address, only its own id."""
    return f"{ERASED_PREFIX}{user_id}"


def erase(
    user_id: uuid.UUID,
    actor: audit.Actor | None = None,
    now: datetime | None = None,
    *,
    deleted_before: datetime | None = None,
) -> bool:
    """Erase the deleted account ``user_id`` in the session's transaction (see "What erasing leaves") and
    record ``erased`` by ``actor`` (default: ``audit.current()``); the caller commits. True when this call
    erased it; False when the row is live (never erased), already erased, missing, or (with
    ``deleted_before``) deleted at or after that instant. Raises what the database raises."""
    deleted = User.deleted_at.is_not(None) if deleted_before is None else User.deleted_at < deleted_before
    erased = db.session.execute(
        sa.update(User)
        .where(User.id == user_id, deleted, User.erased_at.is_(None))
        .values(email=placeholder(user_id), erased_at=now or datetime.now(UTC))
        .execution_options(synchronize_session=False)
    ).rowcount
    if not erased:
        return False
    # The links stay, used and holding no hash, so that opening one still says the account was removed.
    db.session.execute(
        sa.update(EmailVerificationLink)
        .where(EmailVerificationLink.user_id == user_id)
        .values(email_hmac="", used_at=sa.func.coalesce(EmailVerificationLink.used_at, sa.func.now()))
    )
    db.session.execute(sa.delete(VerificationAttempt).where(VerificationAttempt.user_id == user_id))
    audit.record("erased", user_id, actor)
    return True


def retention_days() -> int:
    """IRIS_DEACTIVATED_RETENTION_DAYS: how long a deactivated account keeps its data after ``deleted_at``."""
    return int(current_app.config["IRIS_DEACTIVATED_RETENTION_DAYS"])
