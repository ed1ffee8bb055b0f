"""Clerk's handshake: keeping a person signed in on Iris's server-rendered pages, as Clerk's own backends do.

After a sign-in on Clerk's Account Portal the browser holds ``__client`` on Clerk's Frontend API host and
``__client_uat`` (Unix seconds; ``0`` when signed out) on the parent domain, but no ``__session``: that cookie
is host-only on Iris's origin, and its token lives 60 seconds. Pages load no clerk-js, so Iris asks Clerk for
a fresh one the way Clerk's JS backend (``@clerk/backend``, ``tokens/request.ts`` and ``handshake.ts``) and
Ruby SDK (``lib/clerk/authenticate_request.rb``) do: a 307 to the Frontend API's ``/v1/client/handshake``,
which reads ``__client`` and sends the browser back with a signed list of ``Set-Cookie`` directives.

When (``reason``, the JS backend's decision table; only for an eligible request, ``eligible``):

- a handshake payload came back (``__clerk_handshake`` JWT or ``__clerk_handshake_nonce``): resolve it;
- no ``__client_uat`` (> 0) and no ``__session``: signed out, no redirect;
- ``__session`` but ``__client_uat`` absent or 0, or ``__client_uat`` > 0 but no ``__session``, or the token's
  ``iat`` older than ``__client_uat``, or an expired (or not yet valid) token: handshake;
- anything else: the token is checked as on any request (``iris.auth``).

Guarantees:

- **Only page GETs.** A request is eligible when it is a GET to a page blueprint whose URL carries no
  secret (never ``/verify-email/<token>``: ``redirect_url`` would give the token to Clerk), carries no
  ``Authorization`` header, and its ``Sec-Fetch-Dest`` is ``document``/``iframe`` (or absent with ``Accept:
  text/html``). The API, forms (POST) and fetches never redirect; a form posted with a token that needs
  refreshing is sent back to its page instead (``SubmitAgain``, see ``iris.web``).
- **The redirect** is a 307 with ``Cache-Control: no-store`` (browsers cache inactive tabs) to
  ``{Frontend API}/v1/client/handshake`` with ``redirect_url`` built from IRIS_PUBLIC_URL and the request's
  path and query, never from its Host.
- **A payload is trusted only when Clerk made it for this browser.** A payload JWT must verify with the
  instance's keys (``iris.tokens.verify_handshake_payload``: RS256, a session ``cat`` or none, signature); a
  nonce is swapped for the directives at the Backend API with the secret key. Every directive must set one
  of Clerk's own cookies (``CLERK_COOKIE``) and be a well-formed header value: otherwise the whole payload
  is refused, and so is a ``__session`` directive with a ``Domain``. The payload must come back to the
  browser that asked for it: the redirect carries a random state in ``redirect_url`` and a host-only cookie
  named after it (``__Host-`` over https, so a sibling subdomain cannot set it); a payload without its
  cookie is ignored, and so are two payloads at once. That stops a payload sent in a link or planted as a
  cookie outside a handshake; a sibling subdomain that plants one during the victim's own handshake is met
  by the two-payload rule only when Clerk's cookie is there too (docs/authentication.md).
- **Applied, then a clean URL.** The directives are sent as ``Set-Cookie`` verbatim with a redirect to the
  same URL without the handshake's parameters; the page that follows reads the fresh ``__session`` like any
  other request. A payload without a ``__session`` directive signs the person out (Clerk wipes the cookies).
- **No loops.** ``__clerk_redirect_count`` (HttpOnly, Max-Age 2) counts handshakes; at 3 the page is shown
  signed out and the reason logged, as Clerk's JS backend does.
- No token, payload or nonce is ever logged; log lines give the reason only.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import jwt
from flask import Flask, Response, current_app, flash, g, redirect, request

from iris import clerk
from iris.auth import SESSION_COOKIE
from iris.config import issuer_from_publishable_key
from iris.errors import IrisError
from iris.observability import url_carries_secret
from iris.tokens import TokenExpired, TokenNotYetValid, verify_handshake_payload, verify_token

log = logging.getLogger(__name__)

CLIENT_UAT_COOKIE = "__client_uat"
HANDSHAKE = "__clerk_handshake"
HANDSHAKE_NONCE = "__clerk_handshake_nonce"
REDIRECT_COUNT_COOKIE = "__clerk_redirect_count"
# Clerk's cookies, suffixed (``__session_<8 characters>``) or not: the only names a payload may set.
CLERK_COOKIE = re.compile(
    r"(__session|__client_uat|__refresh|__clerk_db_jwt|__clerk_handshake|__clerk_handshake_nonce)"
    r"(_[A-Za-z0-9_-]{8})?"
)
# A Set-Cookie header value: printable ASCII only, so a directive can never split the response's headers.
DIRECTIVE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,8191}")
DOMAIN_ATTRIBUTE = re.compile(r";\s*domain\s*=", re.IGNORECASE)
# Query parameters of a handshake's way back, removed from the URL once resolved (Clerk's, and our state).
STATE_PARAMETER = "__iris_handshake"
# A state as _redirect_to_handshake makes it (secrets.token_urlsafe(16)).
STATE = re.compile(r"[A-Za-z0-9_-]{22}")
HANDSHAKE_PARAMETERS = (HANDSHAKE, HANDSHAKE_NONCE, "__clerk_help", "__clerk_db_jwt", STATE_PARAMETER)
# At this many handshakes within REDIRECT_COUNT_SECONDS, give up and show the page signed out.
MAX_REDIRECTS = 3
REDIRECT_COUNT_SECONDS = 2
# How long the browser keeps the state of a handshake under way.
STATE_SECONDS = 300
PAGE_BLUEPRINTS = ("web", "admin")
GAVE_UP = "iris_handshake_gave_up"


class SubmitAgain(IrisError):
    """A form came with a session token that a handshake would have to refresh: its page is asked for again
    (303), which refreshes it, and the person submits once more. Never a silent sign-out."""

    status_code = 303
    code = "session_refreshed"
    message = "Your sign-in needed refreshing, so nothing was done yet. Please submit again."


def frontend_api() -> str | None:
    """The Frontend API origin: CLERK_FRONTEND_API_URL, else the host the publishable key encodes. None when
    no handshake is possible here (neither set, or no IRIS_PUBLIC_URL to come back to): then an expired
    ``__session`` simply reads as signed out."""
    return frontend_api_of(current_app.config)


def frontend_api_of(config: Mapping[str, Any]) -> str | None:
    """``frontend_api`` for an app's configuration (no app context needed)."""
    if not config.get("IRIS_PUBLIC_URL"):
        return None
    if config.get("CLERK_FRONTEND_API_URL"):
        return config["CLERK_FRONTEND_API_URL"]
    if config.get("CLERK_PUBLISHABLE_KEY"):
        return issuer_from_publishable_key(config["CLERK_PUBLISHABLE_KEY"])
    return None


def refresh_needed() -> bool:
    """Whether a handshake is possible here and this request's cookies need one (``reason``)."""
    return frontend_api() is not None and reason() is not None


def eligible() -> bool:
    """Whether this request may be redirected through a handshake (module docstring). Never a page whose
    URL carries a secret (``/verify-email/<token>``): ``redirect_url`` would hand it to Clerk's logs."""
    if request.method != "GET" or request.blueprint not in PAGE_BLUEPRINTS or url_carries_secret():
        return False
    if request.headers.get("Authorization"):
        return False
    destination = request.headers.get("Sec-Fetch-Dest")
    if destination is not None:
        return destination in ("document", "iframe")
    return request.headers.get("Accept", "").startswith("text/html")


def client_uat() -> int:
    """``__client_uat`` as Clerk's backend reads it: whole seconds, 0 when absent or unreadable."""
    value = request.cookies.get(CLIENT_UAT_COOKIE, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 12 else 0


def reason() -> str | None:
    """Why this request's cookies need a handshake (Clerk's ``__clerk_hs_reason``), or None: signed out, or
    a token to check as on any request. Verifies the ``__session`` token when one is there; Clerk's keys
    unreachable counts as None (the page then says what it can)."""
    token = request.cookies.get(SESSION_COOKIE) or None
    uat = client_uat()
    if token is None:
        return "client-uat-but-no-session-token" if uat > 0 else None
    if uat <= 0:
        return "session-token-but-no-client-uat"
    try:
        issued_at = jwt.decode(token, options={"verify_signature": False}).get("iat")
    except jwt.PyJWTError:
        return None  # not a token at all: verification signs it out
    if isinstance(issued_at, int) and issued_at < uat:
        return "session-token-iat-before-client-uat"
    try:
        verify_token(token)
    except TokenExpired:
        return "session-token-expired"
    except TokenNotYetValid:
        return "session-token-nbf"
    except IrisError:  # any other refusal signs out; Clerk's keys unreachable: the page says what it can
        return None
    return None


def gave_up() -> bool:
    """True when this request's handshakes looped and the page must show the person signed out."""
    return bool(g.get(GAVE_UP))


def before_page_request() -> Response | None:
    """Resolve a handshake that came back, or start one; None lets the page render as it would."""
    if not eligible():
        return None
    api = frontend_api()
    if api is None:
        return None
    payload = _returned_payload()
    if payload is not None:
        directives = _directives(*payload)
        if directives is not None:
            return _apply(directives)
    why = reason()
    if why is None:
        return None
    count = _redirect_count()
    if count >= MAX_REDIRECTS:
        log.warning(
            "handshake loop (%s): gave up after %d redirects and showed the page signed out; check that"
            " CLERK_PUBLISHABLE_KEY, CLERK_SECRET_KEY and the JWT key belong to one Clerk instance",
            why,
            count,
        )
        setattr(g, GAVE_UP, True)
        return None
    return _redirect_to_handshake(api, why, count)


def _redirect_to_handshake(api: str, why: str, count: int) -> Response:
    state = secrets.token_urlsafe(16)
    back = _public_url(extra={STATE_PARAMETER: state})
    query = urlencode(
        {
            "redirect_url": back,
            "__clerk_api_version": clerk.API_VERSION,
            "suffixed_cookies": "false",
            "__clerk_hs_reason": why,
            "format": "token",
        }
    )
    response = redirect(f"{api}/v1/client/handshake?{query}", 307)
    response.headers["Cache-Control"] = "no-store"
    response.set_cookie(
        REDIRECT_COUNT_COOKIE, str(count + 1), max_age=REDIRECT_COUNT_SECONDS, httponly=True, samesite="Lax"
    )
    response.set_cookie(
        _state_cookie(state),
        "1",
        max_age=STATE_SECONDS,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=_https(),
    )
    log.info("handshake started: %s", why)
    return response


def _returned_payload() -> tuple[str, str] | None:
    """``("nonce" | "token", value)`` when a handshake came back to this browser, else None (module
    docstring: the state in the URL must name a state cookie this browser holds; one payload only)."""
    nonces = request.args.getlist(HANDSHAKE_NONCE) + request.cookies.getlist(HANDSHAKE_NONCE)
    tokens = request.args.getlist(HANDSHAKE) + request.cookies.getlist(HANDSHAKE)
    if not nonces and not tokens:
        return None
    state = request.args.get(STATE_PARAMETER, "")
    if not STATE.fullmatch(state) or request.cookies.get(_state_cookie(state)) != "1":
        log.warning("handshake payload ignored: it did not come back to the browser that asked for it")
        return None
    if len(nonces) + len(tokens) > 1:
        # Clerk sends one. Another one beside it was planted (a sibling subdomain can set a cookie on the
        # parent domain with a narrower Path, which the browser sends first): trust neither.
        log.warning("handshake payload ignored: more than one came back")
        return None
    return ("nonce", nonces[0]) if nonces else ("token", tokens[0])


def _directives(kind: str, value: str) -> list[str] | None:
    """The payload's Set-Cookie directives, or None when it cannot be trusted or used (logged)."""
    try:
        directives = clerk.handshake_payload(value) if kind == "nonce" else verify_handshake_payload(value)
    except IrisError as error:
        log.warning("handshake payload refused (%s): %s", kind, error.code)
        return None
    for directive in directives:
        name = directive.split(";", 1)[0].split("=", 1)[0].strip()
        if not DIRECTIVE.fullmatch(directive) or not CLERK_COOKIE.fullmatch(name):
            log.warning("handshake payload refused: a directive for a cookie that is not Clerk's")
            return None
        if name.startswith(SESSION_COOKIE) and DOMAIN_ATTRIBUTE.search(directive):
            # Clerk keeps __session host-only; with Domain= every sibling subdomain could read the token.
            log.warning("handshake payload refused: a session cookie for more than this host")
            return None
    return directives


def _apply(directives: list[str]) -> Response:
    """Set the directives' cookies and send the browser to the same page without the handshake's
    parameters (303: the page is to be read, whatever brought the browser here)."""
    response = redirect(_public_url(), 303)
    response.headers["Cache-Control"] = "no-store"
    for directive in directives:
        response.headers.add("Set-Cookie", directive)
    # Clerk's directives clear its own handshake cookie, and our state is spent. The redirect count stays: it
    # runs out by itself, and a payload whose token needs refreshing again must still count as a loop.
    state = request.args.get(STATE_PARAMETER, "")
    response.delete_cookie(_state_cookie(state), path="/", httponly=True, samesite="Lax", secure=_https())
    token = next((value for name, value in map(_name_and_value, directives) if name == SESSION_COOKIE), "")
    log.info("handshake resolved: %s", "signed in" if token else "signed out")
    return response


def _name_and_value(directive: str) -> tuple[str, str]:
    name, _, value = directive.split(";", 1)[0].partition("=")
    return name.strip(), value.strip()


def _public_url(extra: dict[str, str] | None = None) -> str:
    """IRIS_PUBLIC_URL + this request's path and query, without the handshake's parameters, plus ``extra``."""
    query = [
        (name, value)
        for name, value in parse_qsl(urlsplit(request.full_path).query, keep_blank_values=True)
        if name not in HANDSHAKE_PARAMETERS
    ]
    query += list((extra or {}).items())
    base = current_app.config["IRIS_PUBLIC_URL"] + request.path
    return f"{base}?{urlencode(query)}" if query else base


def _redirect_count() -> int:
    value = request.cookies.get(REDIRECT_COUNT_COOKIE, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 3 else 0


def _https() -> bool:
    return current_app.config["IRIS_PUBLIC_URL"].startswith("https://")


def _state_cookie(state: str) -> str:
    """The cookie that says this browser started the handshake ``state``: one per handshake, so tabs
    restored together each find their own. ``__Host-`` over https: host-only, Secure, Path=/, so no
    sibling subdomain can set it."""
    return ("__Host-iris_hs_" if _https() else "iris_hs_") + state


def submit_again(error: SubmitAgain) -> Response:
    """A form that needs a refreshed sign-in goes back to its page, which refreshes it, with a note why."""
    flash(error.message, "session")
    return redirect(request.path, 303)


def init_app(app: Flask) -> None:
    app.before_request(before_page_request)
    app.register_error_handler(SubmitAgain, submit_again)
