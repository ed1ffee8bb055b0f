"""Recognising the signed-in user: Clerk session-token verification, the one place it happens.

A request is signed in when it carries a Clerk session token (an RS256 JWT) in ``Authorization: Bearer <t>``
or, failing that header, in the ``__session`` cookie, and the token passes every rule below. Guarantees:

- Only RS256 is accepted (the algorithm is fixed here, never read from the token): ``alg: none``, HS256
  "signed" with the public key, RS384/RS512 and everything else are rejected before any key is looked up.
- ``exp`` is required; ``exp``, ``nbf`` and ``iat`` are checked with ``LEEWAY_SECONDS`` of clock skew.
  ``sub`` and ``sid`` are required non-empty strings. ``azp`` must be present and listed when
  CLERK_AUTHORIZED_PARTIES is non-empty. ``iss`` must equal the Frontend API origin encoded in
  CLERK_PUBLISHABLE_KEY when that is set. A ``cat`` header other than the session category is rejected.
- Only an active session signs in. ``sts: "pending"`` (the session exists, but a step Clerk requires, such
  as a forced password reset, setting up MFA or choosing an organisation, is not done) is refused with a
  message saying so, as Clerk's front-end SDKs treat it as signed out. A token without ``sts`` counts as
  active, as Clerk's SDKs count it: version 1 tokens carry no such claim. Any other value (a status this
  module does not know, ``null``, a number) is refused.
- Keys: CLERK_JWT_KEY (a PEM public key) when set, with no network call at all and the ``kid`` ignored;
  otherwise Clerk's JWKS (``iris.clerk.get_jwks``), cached per process for ``JWKS_TTL`` seconds. A miss (an
  unknown ``kid``, or a signature that fails with the cached key for its ``kid``: Clerk keeps the kid across
  a rotation) refetches at most once per ``REFETCH_INTERVAL`` seconds, so forged tokens cannot turn into a
  stream of JWKS requests. After a failed fetch, requests that need keys answer 503 at once for
  ``FETCH_FAILURE_BACKOFF`` seconds instead of each waiting on Clerk.
- Every bad or missing token raises ``Unauthorized`` (401 ``unauthorized`` with a ``WWW-Authenticate: Bearer``
  header). JWKS unreachable raises ``AuthProviderUnavailable`` (503), never 401.
- A token's ``sub`` matches only a complete account (``clerk_user_id`` set): a soft-deleted one raises
  ``Forbidden`` (403), none at all raises ``UserNotFound`` (404). A pending registration never matches.
- No token, key or secret is ever logged or put in an error message. Log lines name only the reason.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flask import current_app, g, request
from jwt.algorithms import RSAAlgorithm

from iris import clerk
from iris.config import ConfigError
from iris.errors import AuthProviderError, AuthProviderUnavailable, IrisError
from iris.extensions import db
from iris.models import User

log = logging.getLogger(__name__)

SESSION_TOKEN_CATEGORY = "cl_B7d4PD111AAA"  # noqa: S105 (Clerk's public category tag, not a secret)
SESSION_COOKIE = "__session"
ALGORITHM = "RS256"
LEEWAY_SECONDS = 5
# Signing keys fetched from Clerk are trusted this long before they are fetched again (Clerk's SDKs: 5 min).
JWKS_TTL = 300.0
# At most one refetch per this many seconds for keys the cache does not have (unknown kid, failed signature).
REFETCH_INTERVAL = 10.0
# After a failed JWKS fetch, answer 503 at once for this long rather than queueing every request on Clerk.
FETCH_FAILURE_BACKOFF = 5.0
# Clerk session tokens are about 1 KB; anything far bigger is not one, and is refused before parsing.
MAX_TOKEN_LENGTH = 8192
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
FRONTEND_API_HOST = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+(:[0-9]{1,5})?")

P = ParamSpec("P")
R = TypeVar("R")


class Unauthorized(IrisError):
    """No usable session token: missing, malformed, expired or unverifiable. The message never quotes it.

    ``headers`` holds the RFC 6750 challenge: ``Bearer`` when no token came, ``Bearer error="invalid_token"``
    when one came and failed.
    """

    status_code = 401
    code = "unauthorized"
    message = "Sign in first: send a Clerk session token as 'Authorization: Bearer <token>'."

    def __init__(self, message: str | None = None, *, token_given: bool = True) -> None:
        super().__init__(message)
        challenge = 'Bearer error="invalid_token"' if token_given else "Bearer"
        self.headers["WWW-Authenticate"] = challenge


class Forbidden(IrisError):
    """A valid token for an account that may not be used (soft-deleted)."""

    status_code = 403
    code = "forbidden"
    message = "This account has been deleted."


class UserNotFound(IrisError):
    """A valid token whose Clerk user has no account here (never registered through Iris, or pending)."""

    status_code = 404
    code = "user_not_found"
    message = "There is no Iris account for this Clerk user."


INVALID = "The session token is invalid."
EXPIRED = "The session token has expired; get a fresh one."
PENDING = (
    "The session is pending: a step the sign-in requires (such as a password reset, setting up two-factor"
    " authentication or choosing an organisation) is not finished. Finish signing in, then get a fresh token."
)


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
    fetch (see module docstring), then one database read, after Clerk is done.
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


def verify_token(token: str) -> dict[str, Any]:
    """The claims of ``token`` if it is a valid token of an active session of this Clerk instance; else
    ``Unauthorized``.

    Needs an app context (configuration, the key cache). May fetch Clerk's JWKS (module docstring).
    """
    if len(token) > MAX_TOKEN_LENGTH or not TOKEN_SHAPE.fullmatch(token):
        raise _rejected("malformed")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _rejected("malformed header") from None
    if header.get("alg") != ALGORITHM:
        raise _rejected("algorithm not RS256")
    if header.get("cat", SESSION_TOKEN_CATEGORY) != SESSION_TOKEN_CATEGORY:
        raise _rejected("not a session token (cat)")

    try:
        claims = _verify_signature_and_claims(token, header)
    except _SignatureFailed:
        raise _rejected("bad signature") from None

    for name in ("sub", "sid"):
        if not isinstance(claims.get(name), str) or not claims[name]:
            raise _rejected(f"no {name}")
    # Version 1 tokens carry no sts; a status added later is not assumed to be a sign-in.
    status = claims.get("sts", "active")
    if status == "pending":
        raise _rejected("session pending (sts)", PENDING)
    if status != "active":
        raise _rejected("unknown session status (sts)")
    parties = current_app.config.get("CLERK_AUTHORIZED_PARTIES") or []
    if parties and claims.get("azp") not in parties:
        raise _rejected("azp not authorized")
    return claims


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


def user_visible_to(viewer: User, user_id: uuid.UUID) -> User | None:
    """The account ``user_id`` if ``viewer`` may read it, else None (whether or not it exists).

    Everyone may read their own account; an admin may read any complete, live account. Pending
    registrations and soft-deleted accounts are never returned.
    """
    if viewer.id == user_id:
        return viewer
    if viewer.role != "admin":
        return None
    return db.session.scalar(sa.select(User).where(User.id == user_id, User.clerk_user_id.is_not(None)))


@functools.lru_cache(maxsize=8)
def issuer_from_publishable_key(publishable_key: str) -> str:
    """``https://`` + the Frontend API host that a publishable key encodes; ``ConfigError`` when malformed.

    The key is ``pk_test_``/``pk_live_`` + base64(host + "$") with the padding stripped.
    """
    prefix, encoded = publishable_key[:8], publishable_key[8:]
    host = ""
    if prefix in ("pk_test_", "pk_live_"):
        try:
            decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        if decoded.endswith("$") and FRONTEND_API_HOST.fullmatch(decoded[:-1]):
            host = decoded[:-1]
    if not host:
        raise ConfigError(
            "CLERK_PUBLISHABLE_KEY is not a Clerk publishable key: expected pk_test_ or pk_live_ followed by"
            " the base64 of the Frontend API host and '$'. Copy it from the Clerk Dashboard (API keys)."
        )
    return "https://" + host


@functools.lru_cache(maxsize=8)
def load_jwt_key(pem: str) -> RSAPublicKey:
    """CLERK_JWT_KEY as an RSA public key; ``ConfigError`` when it is not one.

    Accepts the PEM as the Clerk Dashboard shows it, on one line, or with literal ``\\n`` (as .env files often
    hold it).
    """
    text = pem.strip().replace("\\n", "\n")
    try:
        key = load_pem_public_key(text.encode())
    except ValueError:
        key = None
    if not isinstance(key, RSAPublicKey):
        raise ConfigError(
            "CLERK_JWT_KEY is not an RSA public key in PEM form (-----BEGIN PUBLIC KEY-----...). Copy it from"
            " the Clerk Dashboard (API keys, JWT public key), or unset it to fetch keys from Clerk."
        )
    return key


class _SignatureFailed(Exception):
    pass


def _verify_signature_and_claims(token: str, header: dict[str, Any]) -> dict[str, Any]:
    pem = current_app.config.get("CLERK_JWT_KEY")
    if pem:
        return _decode(token, load_jwt_key(pem))  # the one key: the kid does not matter
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _rejected("no kid")
    key = _jwks_key(kid)
    if key is None:
        raise _rejected("unknown kid")
    try:
        return _decode(token, key)
    except _SignatureFailed:
        # Clerk keeps the kid when it rotates its key: the cached key may be the previous one.
        fresh = _jwks_key(kid, rejected=key)
        if fresh is None:
            raise
        return _decode(token, fresh)


def _decode(token: str, key: RSAPublicKey) -> dict[str, Any]:
    issuer = None
    publishable_key = current_app.config.get("CLERK_PUBLISHABLE_KEY")
    if publishable_key:
        issuer = issuer_from_publishable_key(publishable_key)
    try:
        return jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            leeway=LEEWAY_SECONDS,
            issuer=issuer,
            # Session tokens carry no aud; a custom claim of that name must not make PyJWT refuse them.
            options={"require": ["exp", "sub", "sid"], "verify_aud": False},
        )
    except jwt.InvalidSignatureError:
        raise _SignatureFailed() from None
    except jwt.ExpiredSignatureError:
        raise _rejected("expired", EXPIRED) from None
    except jwt.PyJWTError as error:
        raise _rejected(type(error).__name__) from None


def _rejected(reason: str, message: str = INVALID) -> Unauthorized:
    log.info("session token rejected: %s", reason)
    return Unauthorized(message)


@dataclass
class _KeyCache:
    """Clerk's signing keys for one app in one process, shared by its threads."""

    pid: int = field(default_factory=os.getpid)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (monotonic time of the fetch, kid -> key), replaced as a whole so readers need no lock.
    keys: tuple[float, dict[str, RSAPublicKey]] = (float("-inf"), {})
    refetched_at: float = float("-inf")
    failed_at: float = float("-inf")


_cache_lock = threading.Lock()


def _key_cache() -> _KeyCache:
    extensions = current_app.extensions
    cache = extensions.get("iris.auth")
    if cache is None or cache.pid != os.getpid():
        with _cache_lock:
            cache = extensions.get("iris.auth")
            if cache is None or cache.pid != os.getpid():
                cache = extensions["iris.auth"] = _KeyCache()
    return cache


def _jwks_key(kid: str, rejected: RSAPublicKey | None = None) -> RSAPublicKey | None:
    """Clerk's key for ``kid``, or None when Clerk has none (or a refetch is not allowed yet).

    ``rejected`` is a key that just failed a signature: a different one is wanted. Raises
    ``AuthProviderUnavailable``/``AuthProviderError`` when the keys are needed and Clerk cannot give them.
    """
    cache = _key_cache()
    fetched_at, keys = cache.keys
    key = keys.get(kid)
    if key is not None and key is not rejected and time.monotonic() - fetched_at < JWKS_TTL:
        return key
    with cache.lock:  # one fetch at a time; the others wait and then use its result
        now = time.monotonic()
        fetched_at, keys = cache.keys
        key = keys.get(kid)
        if now - fetched_at < JWKS_TTL:
            if key is not None and key is not rejected:
                return key
            if now - cache.refetched_at < REFETCH_INTERVAL:
                return None
            cache.refetched_at = now
        if now - cache.failed_at < FETCH_FAILURE_BACKOFF:
            wait = max(1, round(cache.failed_at + FETCH_FAILURE_BACKOFF - now))
            raise AuthProviderUnavailable(retry_after=wait)
        try:
            keys = _parse_jwks(clerk.get_jwks())
        except IrisError:
            cache.failed_at = time.monotonic()
            raise
        cache.keys = (time.monotonic(), keys)
        return keys.get(kid)


def _parse_jwks(jwks: Any) -> dict[str, RSAPublicKey]:
    """kid -> public key for every RS256 signing key in a JWKS; others are skipped."""
    entries = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(entries, list):
        raise AuthProviderError()
    keys = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA" or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("alg", ALGORITHM) != ALGORITHM or entry.get("use", "sig") != "sig":
            continue
        try:
            # Only the public numbers: a JWK that carried "d" would otherwise load as a private key.
            public = {"kty": "RSA", "n": entry["n"], "e": entry["e"]}
            key = RSAAlgorithm.from_jwk(public)
        except (KeyError, jwt.PyJWTError, ValueError):
            log.warning("JWKS key %s is not a usable RSA key; skipped", entry["kid"])
            continue
        if isinstance(key, RSAPublicKey):
            keys[entry["kid"]] = key
    return keys
