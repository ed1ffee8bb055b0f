"""Clerk's handshake as the stand-in's Frontend API (FAPI) serves it: cookies, directives, nonces and faults.

A server-rendered app never gets ``__session`` from Clerk's Account Portal: it gets ``__client_uat`` (set by
FAPI on the registrable domain) and sends the browser to FAPI's ``GET /v1/client/handshake``. FAPI reads its
own ``__client`` cookie, mints a fresh session token when the client has an active session, and sends the
browser back with a signed list of ``Set-Cookie`` directives for the app to emit (clerk/javascript
``packages/backend/src/tokens/handshake.ts`` and ``request.ts``; Clerk's docs, "How Clerk works", The
Handshake; FAPI spec ``handshakeClient``). This module holds what that needs that is not the app's state:

- the cookie names and attributes (``__client``, ``__client_uat``, ``__clerk_handshake``,
  ``__clerk_handshake_nonce``) and the directive strings;
- ``NonceStore``: ``format=nonce`` payloads, each redeemable once through the Backend API within its TTL;
- ``HandshakeFaults``: the faults a test can put on the next handshakes;
- ``publishable_key``: the ``pk_test_`` key naming an issuer's host, as Clerk builds it
  (clerk/javascript ``packages/shared/src/keys.ts``).

Guarantees: a nonce is handed out once (``NonceStore.take`` removes it whether or not it is still fresh); a
client token is never stored, only its SHA-256 (``client_token_digest``); directives are built only from
values the stand-in made (a token it signed, integers), never from request input.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

from flask import Response

CLIENT_COOKIE = "__client"
CLIENT_UAT_COOKIE = "__client_uat"
SESSION_COOKIE = "__session"
HANDSHAKE_COOKIE = "__clerk_handshake"
HANDSHAKE_NONCE_COOKIE = "__clerk_handshake_nonce"
# __client_uat lives ten years (Clerk's docs, SDK terminology, and the handshake payload example).
UAT_MAX_AGE = 315_360_000
# clerk-js writes __session with an expiry a year ahead; the 60 s token inside is what expires.
SESSION_COOKIE_DAYS = 365
EPOCH = "Thu, 01 Jan 1970 00:00:00 GMT"
# How long the handshake cookie (or nonce cookie) lives on the way back to the app: one redirect.
HANDSHAKE_COOKIE_MAX_AGE = 60
NONCE_TTL = 60.0
# Production sends the payload in a cookie, development in the redirect's query (Clerk's docs).
STYLES = ("production", "development")
FORMATS = ("token", "nonce")
FAULT_KINDS = ("bad_signature", "no_session", "stale_nonce", "expired_token", "iat_before_uat")


def publishable_key(issuer: str) -> str:
    """``pk_test_`` + base64(``<issuer host>$``) without padding: the key that names the stand-in as an
    instance's Frontend API host (clerk/javascript ``buildPublishableKey``, with the test prefix)."""
    host = urlsplit(issuer).hostname or issuer
    return "pk_test_" + base64.b64encode(f"{host}$".encode()).decode().rstrip("=")


def client_token_digest(token: str) -> str:
    """What the stand-in keeps of a ``__client`` token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_client_token() -> str:
    """An opaque, unguessable ``__client`` token (256 random bits)."""
    return secrets.token_urlsafe(32)


# --------------------------------------------------------------------------- cookies the stand-in sets


def set_client_cookie(response: Response, token: str, max_age: int, *, secure: bool) -> None:
    """``__client``: host-only, ``HttpOnly``, ``Path=/``, ``SameSite=Lax`` (Clerk's docs, "How Clerk works",
    Client token); ``Secure`` when the page was https."""
    response.set_cookie(
        CLIENT_COOKIE, token, max_age=max_age, path="/", samesite="Lax", httponly=True, secure=secure
    )


def set_client_uat_cookie(response: Response, uat: int, *, secure: bool) -> None:
    """``__client_uat=<unix s>`` (``0`` when signed out): ``Path=/``, ``Max-Age=315360000``, ``SameSite=Lax``,
    readable by scripts, no ``Domain`` (on 127.0.0.1 a host cookie reaches every port, as production's
    registrable-domain cookie reaches the app)."""
    response.set_cookie(
        CLIENT_UAT_COOKIE, str(uat), max_age=UAT_MAX_AGE, path="/", samesite="Lax", secure=secure
    )


def set_transport_cookie(response: Response, name: str, value: str, *, secure: bool) -> None:
    """The handshake payload (or nonce) as production's FAPI sends it: a short-lived cookie the app's
    backend reads once and then clears with the payload's own directive."""
    response.set_cookie(
        name,
        value,
        max_age=HANDSHAKE_COOKIE_MAX_AGE,
        path="/",
        samesite="Lax",
        httponly=True,
        secure=secure,
    )


# --------------------------------------------------------------------------- directives


def signed_in_directives(token: str, uat: int, *, secure: bool, clear_handshake: bool) -> list[str]:
    """``__session=<token>`` for a year, ``__client_uat=<uat>``, and (production style) the directive that
    clears the handshake cookie; each ``; Secure`` when the app is https (HS-DRAFT payload example)."""
    expires = formatdate(time.time() + SESSION_COOKIE_DAYS * 86400, usegmt=True)
    session = f"{SESSION_COOKIE}={token}; Path=/; Expires={expires}; SameSite=Lax"
    return _directives(session, uat, secure, clear_handshake)


def signed_out_directives(*, secure: bool, clear_handshake: bool) -> list[str]:
    """``__session`` wiped, ``__client_uat=0``, and (production style) the handshake cookie cleared."""
    session = f"{SESSION_COOKIE}=; Path=/; Expires={EPOCH}; SameSite=Lax"
    return _directives(session, 0, secure, clear_handshake)


def _directives(session: str, uat: int, secure: bool, clear_handshake: bool) -> list[str]:
    directives = [session, f"{CLIENT_UAT_COOKIE}={uat}; Path=/; Max-Age={UAT_MAX_AGE}; SameSite=Lax"]
    if clear_handshake:
        directives.append(f"{HANDSHAKE_COOKIE}=; Path=/; Expires={EPOCH}")
    return [d + "; Secure" if secure else d for d in directives]


def without_session(directives: list[str]) -> list[str]:
    """``directives`` less the ``__session`` one (the ``no_session`` fault)."""
    return [d for d in directives if not d.startswith(SESSION_COOKIE + "=")]


# --------------------------------------------------------------------------- nonces


class NonceStore:
    """``format=nonce`` payloads: directives kept under a random nonce for ``ttl`` seconds, handed out once.

    Thread-safe. Memory only (a nonce outlives no restart, as it outlives no minute)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, list[str]]] = {}

    def put(self, directives: list[str], ttl: float = NONCE_TTL) -> str:
        """Keep ``directives``; returns the new nonce. Expired entries are dropped on the way."""
        nonce = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            self._entries[nonce] = (now + ttl, list(directives))
        return nonce

    def take(self, nonce: str) -> list[str] | None:
        """The directives of ``nonce`` if it is known and fresh, else None. Either way it is gone after."""
        with self._lock:
            entry = self._entries.pop(nonce, None)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# --------------------------------------------------------------------------- faults


@dataclass
class HandshakeFaults:
    """Faults on the next handshakes, each ``kind`` with the handshakes it has left (None: until cleared).

    - ``bad_signature``: the payload is signed by a key that is not in the JWKS (under the current ``kid``);
    - ``no_session``: the payload has no ``__session`` directive;
    - ``stale_nonce``: a ``format=nonce`` handshake's nonce is expired at once, so the Backend API refuses it;
    - ``expired_token``: the ``__session`` directive carries a token that expired a minute ago;
    - ``iat_before_uat``: the ``__client_uat`` directive is a second past the token's ``iat``.

    The last two make an app that follows Clerk's rules handshake again on every page: a loop. Thread-safe.
    """

    _left: dict[str, int | None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, body: Any) -> dict[str, Any]:
        """Add ``{"kind", "times"?}``; ValueError for an unknown kind or a ``times`` that is not >= 1."""
        if not isinstance(body, dict) or set(body) - {"kind", "times"}:
            raise ValueError('body must be {"kind": ..., "times"?: n}')
        kind, times = body.get("kind"), body.get("times")
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}")
        if times is not None and (not isinstance(times, int) or isinstance(times, bool) or times < 1):
            raise ValueError("times must be a positive integer")
        with self._lock:
            self._left[kind] = times
        return {"kind": kind, "times": times}

    def take(self, kind: str) -> bool:
        """True when ``kind`` is in force for this handshake; uses up one of its ``times``."""
        with self._lock:
            if kind not in self._left:
                return False
            left = self._left[kind]
            if left is not None:
                if left <= 1:
                    del self._left[kind]
                else:
                    self._left[kind] = left - 1
            return True

    def as_dicts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"kind": kind, "times": times} for kind, times in self._left.items()]

    def clear(self) -> int:
        with self._lock:
            cleared = len(self._left)
            self._left.clear()
        return cleared
