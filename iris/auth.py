"""Who is signed in, and what they may see: the request glue around ``iris.tokens``, and account policy.

A request is signed in when it carries a Clerk session token in ``Authorization: Bearer <t>`` or, failing
that header, in the ``__session`` cookie, and ``iris.tokens.verify_token`` accepts it. Guarantees:

- No token raises ``Unauthorized`` (401 ``unauthorized`` with a ``WWW-Authenticate: Bearer`` header); a bad
  one raises what ``verify_token`` raises (module docstring of ``iris.tokens``). A verified token's claims
  are ``flask.g.token_claims`` for the rest of the request (``token_claims``).
- **A cookie is not consent.** A state-changing request under ``/api/`` (any method but GET, HEAD, OPTIONS)
  authorised by the ``__session`` cookie alone raises ``CsrfFailed`` (403 ``csrf_failed``) before the token is
  even read, unless its ``Origin`` is exactly one of Iris's own (IRIS_PUBLIC_URL, CLERK_AUTHORIZED_PARTIES);
  a missing or ``null`` Origin is foreign. A browser attaches the cookie to requests other sites make it
  send (SameSite=Lax stops other sites' forms, not a sibling subdomain's), but never invents an
  ``Authorization`` header, so Bearer requests are not checked. Pages keep their CSRF-token forms.
- **Destructive acts need a recent sign-in** (``require_recent_sign_in``): the token's ``fva[0]`` (minutes
  since the first factor was verified) must be a whole number with 0 <= fva[0] < IRIS_REVERIFY_MINUTES; no
  ``fva``, a malformed one or -1 raises ``ReverificationRequired``. 0 minutes switches the check off.
- **Impersonation** (an ``act`` claim: someone signed in as this person from Clerk's dashboard) is told by
  ``impersonator``; ``refuse_impersonation`` refuses what only the person may do, ``audit_actor_name`` names
  the impersonator in the audit trail.
- **Unconfirmed accounts read, they do not act** (``require_confirmed``, ``require_confirmed_user``): while
  IRIS_EMAIL_VERIFICATION is ``required``, an account whose address is not confirmed raises
  ``EmailUnverified`` (403) wherever one of them is applied.
- A token's ``sub`` matches only a complete account (``clerk_user_id`` set): a soft-deleted one raises
  ``Forbidden`` (403), none at all raises ``UserNotFound`` (404). A pending registration never matches.
- An account is visible to itself and to admins only (``user_visible_to``); only admins administer
  (``is_admin``).
- No token is ever logged or put in an error message.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from flask import current_app, g, request

from iris import clerk
from iris.errors import (
    CsrfFailed,
    EmailUnverified,
    Forbidden,
    Impersonated,
    PasswordIncorrect,
    ReverificationRequired,
    Unauthorized,
    UserNotFound,
)
from iris.extensions import db
from iris.models import ADMIN, User
from iris.tokens import verify_token

log = logging.getLogger(__name__)

SESSION_COOKIE = "__session"
# Methods that change nothing (RFC 9110 safe methods): a cookie alone may authorise them from anywhere.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The audit trail's actor_name for a change made under impersonation: this prefix and the act claim's sub.
IMPERSONATOR_PREFIX = "impersonator:"

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
    token, from_cookie = credentials_from_request()
    if token is None:
        raise Unauthorized(token_given=False)
    if from_cookie:
        check_cookie_origin()
    claims = verify_token(token)
    g.token_claims = claims
    return user_for_subject(claims["sub"])


def token_from_request() -> str | None:
    """The token from ``Authorization: Bearer <t>`` when that header is given, else the ``__session`` cookie.

    A Bearer header wins even when its token is bad: the cookie is not consulted then. Other schemes
    (``Basic ...``) are not ours and are ignored. Returns None when neither holds a token.
    """
    return credentials_from_request()[0]


def credentials_from_request() -> tuple[str | None, bool]:
    """``(token, from_cookie)``: the token as ``token_from_request`` finds it, and whether it came from the
    ``__session`` cookie (True) rather than an ``Authorization: Bearer`` header (False)."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), False
    cookie = request.cookies.get(SESSION_COOKIE) or None
    return cookie, cookie is not None


def own_origins() -> frozenset[str]:
    """Iris's own origins: IRIS_PUBLIC_URL and every CLERK_AUTHORIZED_PARTIES entry, without a trailing
    slash, lower-cased (scheme and host are case-insensitive; browsers send them lower-case)."""
    config = current_app.config
    configured = [config.get("IRIS_PUBLIC_URL"), *(config.get("CLERK_AUTHORIZED_PARTIES") or [])]
    return frozenset(origin.rstrip("/").lower() for origin in configured if origin)


def check_cookie_origin() -> None:
    """Raise ``CsrfFailed`` for a state-changing ``/api/`` request whose ``Origin`` is not one of
    ``own_origins`` (exact match; none, ``null`` or anything else is foreign). Called only when the cookie
    is the request's credential; other requests (pages, safe methods) pass unchecked."""
    if request.method in SAFE_METHODS or not request.path.startswith("/api/"):
        return
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/").lower() in own_origins():
        return
    shown = "none" if origin is None else origin[:100]  # an origin names a site, not a person
    log.warning("cookie-authorised %s %s refused: Origin %s is not ours", request.method, request.path, shown)
    raise CsrfFailed()


def token_claims() -> Mapping[str, Any]:
    """The verified claims of the request's session token (``authenticate`` set them); empty when the
    request has not been authenticated."""
    return g.get("token_claims") or {}


def impersonator(claims: Mapping[str, Any] | None = None) -> str | None:
    """Who is impersonating the signed-in person, or None when nobody is: the ``act`` claim's ``sub`` (the
    Clerk dashboard user who signed in as them). An ``act`` claim without a usable ``sub`` still means
    impersonation: ``"unknown"``. ``claims`` default to ``token_claims()``."""
    act = (token_claims() if claims is None else claims).get("act")
    if act is None:
        return None
    actor = act.get("sub") if isinstance(act, Mapping) else None
    return actor if isinstance(actor, str) and actor else "unknown"


def refuse_impersonation() -> None:
    """Raise ``Impersonated`` (403 ``forbidden``) when the request's session is an impersonation: for what
    only the person themselves may do (deleting their account)."""
    if impersonator() is not None:
        raise Impersonated()


def audit_actor_name() -> str | None:
    """The audit trail's ``actor_name`` for a change the request makes: ``impersonator:<act.sub>`` under
    impersonation (at most 100 characters, the column's width), else None (the account in ``actor_id``
    acted itself)."""
    actor = impersonator()
    return None if actor is None else (IMPERSONATOR_PREFIX + actor)[:100]


def first_factor_age(claims: Mapping[str, Any]) -> int | None:
    """Minutes since the session's first factor was verified (``fva[0]``), or None when the token does not
    say: no ``fva``, not a list of two whole numbers, or -1 (never). Booleans are not numbers here."""
    fva = claims.get("fva")
    if not isinstance(fva, list) or len(fva) != 2 or not all(type(age) is int for age in fva):
        return None
    return fva[0] if fva[0] >= 0 else None


def require_recent_sign_in(claims: Mapping[str, Any] | None = None) -> None:
    """Raise ``ReverificationRequired`` unless the first factor was verified less than IRIS_REVERIFY_MINUTES
    ago (``first_factor_age``; unknown counts as too old). IRIS_REVERIFY_MINUTES 0 switches the check off.
    ``claims`` default to ``token_claims()``."""
    window = current_app.config["IRIS_REVERIFY_MINUTES"]
    if window == 0:
        return
    age = first_factor_age(token_claims() if claims is None else claims)
    if age is None or age >= window:
        raise ReverificationRequired(after_minutes=window)


def require_confirmed(user: User) -> None:
    """Raise ``EmailUnverified`` (403 ``email_unverified``) when email verification is required and ``user``
    has not confirmed their address. Apply it to anything that acts for the account (admin writes now;
    restaurants and invitations later), never to reading itself, asking for a new link or deleting itself.
    """
    if current_app.config["IRIS_EMAIL_VERIFICATION"] == "required" and user.email_verified_at is None:
        raise EmailUnverified()


def require_confirmed_user(view: Callable[P, R]) -> Callable[P, R]:
    """``require_user``, then ``require_confirmed``: the view runs only for a signed-in, confirmed account
    (``flask.g.user``)."""

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        g.user = authenticate()
        require_confirmed(g.user)
        return view(*args, **kwargs)

    return wrapper


def confirm_password(user: User, password: str | None) -> None:
    """The step-up of the pages, which have no clerk-js to reverify: raise ``PasswordIncorrect`` (422, on
    field ``password``) unless Clerk accepts ``password`` for ``user`` (``clerk.verify_password``). An empty
    password is refused without asking Clerk. Raises Clerk's errors (429, 502, 503) as they come. The
    password goes to Clerk only: never logged or kept."""
    if not password:
        raise PasswordIncorrect(missing=True)
    if not clerk.verify_password(user.clerk_user_id or "", password):
        raise PasswordIncorrect()


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
