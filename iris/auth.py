"""Who is signed in, and what they may see: the request glue around ``iris.tokens``, and account policy.

A request is signed in when it carries a Clerk session token in ``Authorization: Bearer <t>`` or, failing
that header, in the ``__session`` cookie, and ``iris.tokens.verify_token`` accepts it. Guarantees:

- No token raises ``Unauthorized`` (401 ``unauthorized`` with a ``WWW-Authenticate: Bearer`` header); a bad
  one raises what ``verify_token`` raises (module docstring of ``iris.tokens``).
- A token's ``sub`` matches only a complete account (``clerk_user_id`` set): a soft-deleted one raises
  ``Forbidden`` (403), none at all raises ``UserNotFound`` (404). A pending registration never matches.
- An account is visible to itself and to admins only (``user_visible_to``); only admins administer
  (``is_admin``).
- No token is ever logged or put in an error message.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import sqlalchemy as sa
from flask import g, request

from iris.errors import Forbidden, Unauthorized, UserNotFound
from iris.extensions import db
from iris.models import ADMIN, User
from iris.tokens import verify_token

SESSION_COOKIE = "__session"

P = ParamSpec("P")
R = TypeVar("R")


def require_user(view: Callable[P, R]) -> Callable[P, R]:
    """Decorate a view so it runs only for a signed-in user, found in ``flask.g.user``.

    Raises what ``authenticate`` raises; the view is not called then.
    """

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        g.user = authenticate()
        return view(*args, **kwargs)

    return wrapper


def current_user() -> User | None:
    """The signed-in user for a page, or None when the request is signed out.

    Signed out means no token, or a token that fails verification (a pending session's included): a
    ``__session`` cookie expires every minute unless Clerk's frontend refreshes it, so an expired cookie is
    not an error on a page. Still raises ``Forbidden``, ``UserNotFound`` and the 503s (Clerk or the database
    unreachable): those are not "signed out" but "cannot tell" or "this account may not be used".
    """
    try:
        return authenticate()
    except Unauthorized:
        return None


def authenticate() -> User:
    """The live account of the request's session token, or raise.

    Raises ``Unauthorized`` (no or bad token), ``Forbidden`` (deleted account), ``UserNotFound``,
    ``AuthProviderUnavailable``/``AuthProviderError`` (Clerk's JWKS unusable). Side effects: at most one JWKS
    fetch (see ``iris.tokens``), then one database read, after Clerk is done.
    """
    token = token_from_request()
    if token is None:
        raise Unauthorized(token_given=False)
    claims = verify_token(token)
    return user_for_subject(claims["sub"])


def token_from_request() -> str | None:
    """The token from ``Authorization: Bearer <t>`` when that header is given, else the ``__session`` cookie.

    A Bearer header wins even when its token is bad: the cookie is not consulted then. Other schemes
    (``Basic ...``) are not ours and are ignored. Returns None when neither holds a token.
    """
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(SESSION_COOKIE) or None


def user_for_subject(clerk_user_id: str) -> User:
    """The complete, live account with this ``clerk_user_id``.

    Raises ``Forbidden`` when that account is soft-deleted and ``UserNotFound`` when there is none. A pending
    registration (``clerk_user_id`` NULL) can never match.
    """
    user = db.session.execute(
        sa.select(User).where(User.clerk_user_id == clerk_user_id).execution_options(include_deleted=True)
    ).scalar_one_or_none()
    if user is None:
        raise UserNotFound()
    if user.deleted_at is not None:
        raise Forbidden()
    return user


def is_admin(user: User | None) -> bool:
    """Whether ``user`` (a live account, as ``authenticate`` returns) may use the admin API and pages.
    Everyone else gets 404 there, exactly as for a page or id that does not exist."""
    return user is not None and user.role == ADMIN


def user_visible_to(viewer: User, user_id: uuid.UUID) -> User | None:
    """The account ``user_id`` if ``viewer`` may read it, else None (whether or not it exists).

    Everyone may read their own account; an admin may read any complete, live account. Pending
    registrations and soft-deleted accounts are never returned.
    """
    if viewer.id == user_id:
        return viewer
    if viewer.role != ADMIN:
        return None
    return db.session.scalar(sa.select(User).where(User.id == user_id, User.clerk_user_id.is_not(None)))
