"""Recording who changed an account: the one helper every change to a ``users`` row goes through.

Guarantees:

- **Same transaction.** ``record`` adds the event to the session's transaction; the caller commits it with
  the change it describes, so there is no change without its event and no event without its change.
  ``occurred_at`` is the database's ``now()``: the transaction's own timestamp.
- **Every path names its actor.** An ``Actor`` is an Iris account (``actor_id``: the person themselves,
  ``user:<id>``, or an admin, ``admin:<id>``), a name (``actor_name``: ``cli:<os user>``,
  ``clerk-webhook:<svix-id>``, ``maintenance``), or an admin's account used by someone else (``actor_id`` the
  admin, ``actor_name`` ``impersonator:<act.sub>``). Code deep in a shared path (``iris.clerk_sync``,
  ``iris.registration.settle``) does not know who called it: its entry point says so once with
  ``acting(actor)``, and ``record`` without an actor uses that one. With neither, ``record`` raises
  ``RuntimeError`` rather than write an event that names no one.
- **Ids, never addresses.** An event holds the action, the account's id, the actor and the request id. No
  email address is ever an argument here, and ``actor_name`` is built only by the constructors below from ids
  and the operating-system user name.

tests/test_audit_every_path.py walks every path that changes a ``users`` row under a database trigger that
refuses, at commit, any such change without an event from this helper in the same transaction.
"""

from __future__ import annotations

import getpass
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from flask import has_request_context

from iris.extensions import db
from iris.models import AuditEvent
from iris.observability import request_id

# audit_events.actor_name's width.
MAX_ACTOR_NAME = 100
MAINTENANCE = "maintenance"
WEBHOOK_PREFIX = "clerk-webhook:"
CLI_PREFIX = "cli:"


@dataclass(frozen=True)
class Actor:
    """Who made a change: ``id`` (an Iris account) and/or ``name`` (see the module docstring)."""

    id: uuid.UUID | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.id is None and not self.name:
            raise ValueError("an actor needs an account id or a name")

    @classmethod
    def user(cls, user_id: uuid.UUID) -> Actor:
        """The account's own person (``user:<id>``): registering, confirming, deleting their account."""
        return cls(id=user_id)

    @classmethod
    def admin(cls, admin_id: uuid.UUID, impersonator: str | None = None) -> Actor:
        """An admin (``admin:<id>``), with ``impersonator:<sub>`` beside the id under impersonation
        (``iris.auth.audit_actor_name``)."""
        return cls(id=admin_id, name=impersonator)

    @classmethod
    def cli(cls) -> Actor:
        """The operator running a ``flask iris`` command: ``cli:<operating-system user>``."""
        try:
            name = getpass.getuser()
        except (OSError, KeyError):
            name = "unknown"
        return cls(name=(CLI_PREFIX + name)[:MAX_ACTOR_NAME])

    @classmethod
    def webhook(cls, svix_id: str) -> Actor:
        """Clerk, through the webhook delivery ``svix_id``."""
        return cls(name=(WEBHOOK_PREFIX + svix_id)[:MAX_ACTOR_NAME])

    @classmethod
    def maintenance(cls) -> Actor:
        """Iris's own housekeeping: ``flask iris reconcile``, or a request settling a registration that died
        half-way in its way."""
        return cls(name=MAINTENANCE)


_current: ContextVar[Actor | None] = ContextVar("iris_audit_actor", default=None)


@contextmanager
def acting(actor: Actor) -> Iterator[Actor]:
    """Within the block, ``record`` without an actor names ``actor``. Nested blocks override, and the outer
    actor is back when they end."""
    token = _current.set(actor)
    try:
        yield actor
    finally:
        _current.reset(token)


def current() -> Actor:
    """The actor ``acting`` set; ``RuntimeError`` when none is (a path that forgot to say who acts)."""
    actor = _current.get()
    if actor is None:
        raise RuntimeError("no audit actor: the entry point must say who acts (iris.audit.acting)")
    return actor


def record(action: str, target_id: uuid.UUID, actor: Actor | None = None) -> None:
    """Add the audit event ``action`` about account ``target_id`` by ``actor`` (default: ``current()``) to
    the session's transaction; the caller commits it with the change. Raises ``RuntimeError`` when no actor
    is known."""
    who = actor or current()
    db.session.add(
        AuditEvent(
            id=uuid.uuid4(),
            action=action,
            target_id=target_id,
            actor_id=who.id,
            actor_name=who.name,
            request_id=request_id() if has_request_context() else None,
        )
    )
