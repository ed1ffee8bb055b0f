"""Clerk session-token verification and Clerk's signing-key cache: the one place a token is checked.

No request and no database here: a token goes in, its claims come out or ``Unauthorized`` is raised.
Reading the token from a request and finding its account is ``iris.auth``'s work. Guarantees:

- Only RS256 is accepted (the algorithm is fixed here, never read from the token): ``alg: none``, HS256
  "signed" with the public key, RS384/RS512 and everything else are rejected before any key is looked up.
- ``exp`` is required; ``exp``, ``nbf`` and ``iat`` are checked with ``LEEWAY_SECONDS`` of clock skew.
  ``sub`` and ``sid`` are required non-empty strings. ``azp`` must be present and listed when
  CLERK_AUTHORIZED_PARTIES is non-empty. ``iss`` must equal the Frontend API origin encoded in
  CLERK_PUBLISHABLE_KEY when that is set. A ``cat`` header other than Clerk's session category or its
  "ignore" category (stamped on every token by instances with ``use_ignore_jwt_cat``; clerk/javascript
  ``jwtCategories.ts``) is rejected.
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
- Every bad token raises ``Unauthorized`` (401 ``unauthorized`` with a ``WWW-Authenticate: Bearer``
  header); an expired one ``TokenExpired`` and one not valid yet ``TokenNotYetValid``, both ``Unauthorized``,
  so that pages can refresh them through Clerk's handshake (``iris.handshake``). JWKS unreachable raises
  ``AuthProviderUnavailable`` (503), never 401.
- A handshake payload (``verify_handshake_payload``) is checked as Clerk's JS backend checks it
  (``tokens/handshake.ts``): a session ``cat`` or none, ``typ`` JWT or none, and the instance's signature
  (RS256 only, the same keys as session tokens); it has no expiry, subject or issuer to check.
- No token, key or secret is ever logged or put in an error message. Log lines name only the reason.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from flask import current_app
from jwt.algorithms import RSAAlgorithm

from iris import clerk, metrics
from iris.config import issuer_from_publishable_key, load_jwt_key
from iris.errors import AuthProviderError, AuthProviderUnavailable, IrisError, Unauthorized

log = logging.getLogger(__name__)

SESSION_TOKEN_CATEGORY = "cl_B7d4PD111AAA"  # noqa: S105 (Clerk's public category tag, not a secret)
# Clerk's categories a session token (and a handshake payload) may carry: the session one and "ignore".
SESSION_TOKEN_CATEGORIES = (SESSION_TOKEN_CATEGORY, "cl_I7d4PD111III")
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
# A handshake payload holds a session token and a few cookie directives: bigger, but a cookie all the same.
MAX_PAYLOAD_LENGTH = 16384
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

INVALID = "The session token is invalid."
EXPIRED = "The session token has expired; get a fresh one."
PENDING = (
    "The session is pending: a step the sign-in requires (such as a password reset, setting up two-factor"
    " authentication or choosing an organisation) is not finished. Finish signing in, then get a fresh token."
)


def verify_token(token: str) -> dict[str, Any]:
    """The claims of ``token`` if it is a valid token of an active session of this Clerk instance; else
    ``Unauthorized``.

    Needs an app context (configuration, the key cache). May fetch Clerk's JWKS (module docstring).
    """
    header = _checked_header(token, MAX_TOKEN_LENGTH)
    try:
        claims = _verify_signature_and_claims(token, header, _decode)
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


class TokenExpired(Unauthorized):
    """The token's ``exp`` has passed (beyond the leeway)."""


class TokenNotYetValid(Unauthorized):
    """The token's ``nbf`` or ``iat`` is in the future (beyond the leeway)."""


def verify_handshake_payload(token: str) -> list[str]:
    """The ``Set-Cookie`` directives of a handshake payload JWT that this Clerk instance signed; else
    ``Unauthorized`` (``AuthProviderUnavailable`` when the keys cannot be had). Module docstring."""
    header = _checked_header(token, MAX_PAYLOAD_LENGTH)
    if header.get("typ", "JWT") != "JWT":
        raise _rejected("handshake payload: typ not JWT")
    try:
        claims = _verify_signature_and_claims(token, header, _decode_signature_only)
    except _SignatureFailed:
        raise _rejected("handshake payload: bad signature") from None
    directives = claims.get("handshake")
    if not isinstance(directives, list) or not all(isinstance(item, str) for item in directives):
        raise _rejected("handshake payload: no list of directives")
    return directives


def session_id_for_sign_out(token: str) -> str | None:
    """The ``sid`` of a session token this instance signed, expired or not; None for anything else. Only for
    ending that session: a token that is no longer valid still proves which session the browser had."""
    try:
        header = _checked_header(token, MAX_TOKEN_LENGTH)
        claims = _verify_signature_and_claims(token, header, _decode_signature_only)
    except (Unauthorized, _SignatureFailed):
        return None
    sid = claims.get("sid")
    return sid if isinstance(sid, str) and sid else None


class _SignatureFailed(Exception):
    pass


def _checked_header(token: str, max_length: int) -> dict[str, Any]:
    """The header of a token of the right shape, RS256 and of a session category (or none); else raise."""
    if len(token) > max_length or not TOKEN_SHAPE.fullmatch(token):
        raise _rejected("malformed")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _rejected("malformed header") from None
    if header.get("alg") != ALGORITHM:
        raise _rejected("algorithm not RS256")
    if header.get("cat", SESSION_TOKEN_CATEGORY) not in SESSION_TOKEN_CATEGORIES:
        raise _rejected("not a session token (cat)")
    return header


Decoder = Callable[[str, RSAPublicKey], dict[str, Any]]


def _verify_signature_and_claims(token: str, header: dict[str, Any], decode: Decoder) -> dict[str, Any]:
    pem = current_app.config.get("CLERK_JWT_KEY")
    if pem:
        return decode(token, load_jwt_key(pem))  # the one key: the kid does not matter
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _rejected("no kid")
    key = _jwks_key(kid)
    if key is None:
        raise _rejected("unknown kid")
    try:
        return decode(token, key)
    except _SignatureFailed:
        # Clerk keeps the kid when it rotates its key: the cached key may be the previous one.
        fresh = _jwks_key(kid, rejected=key)
        if fresh is None:
            raise
        return decode(token, fresh)


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
        raise _rejected("expired", EXPIRED, TokenExpired) from None
    except jwt.ImmatureSignatureError:
        raise _rejected("not valid yet", INVALID, TokenNotYetValid) from None
    except jwt.PyJWTError as error:
        raise _rejected(type(error).__name__) from None


def _decode_signature_only(token: str, key: RSAPublicKey) -> dict[str, Any]:
    """The claims once the signature verifies, with no time, issuer or audience checked: a handshake payload
    has none of them, and a session being signed out needs none."""
    options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False}
    try:
        return jwt.decode(token, key, algorithms=[ALGORITHM], options=options)
    except jwt.InvalidSignatureError:
        raise _SignatureFailed() from None
    except jwt.PyJWTError as error:
        raise _rejected(type(error).__name__) from None


def _rejected(reason: str, message: str = INVALID, kind: type[Unauthorized] = Unauthorized) -> Unauthorized:
    log.info("session token rejected: %s", reason)
    return kind(message)


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
    cache = extensions.get("iris.tokens")
    if cache is None or cache.pid != os.getpid():
        with _cache_lock:
            cache = extensions.get("iris.tokens")
            if cache is None or cache.pid != os.getpid():
                cache = extensions["iris.tokens"] = _KeyCache()
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
            metrics.jwks_fetch("error")
            cache.failed_at = time.monotonic()
            raise
        metrics.jwks_fetch("ok")
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
