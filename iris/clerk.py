"""Clerk Backend API client: the only code in Iris that talks to Clerk over HTTP.

Guarantees:
- Connections are kept alive and reused: one ``requests.Session`` per thread, made lazily in the process that
  uses it (so a gunicorn worker never shares a socket with its parent or a sibling).
- Every call has explicit connect and read timeouts (``CLERK_TIMEOUT``), well under gunicorn's worker timeout.
- Every answer becomes a value or an ``iris.errors`` domain error:
  ``form_identifier_exists`` -> ``EmailTaken``; ``form_password_*`` -> ``ValidationFailed`` on ``password``
  with Clerk's message; 429 -> ``RateLimited`` with Clerk's Retry-After; timeouts, connection errors and
  5xx -> ``AuthProviderUnavailable``; anything else -> ``AuthProviderError``.
- Request bodies (which carry passwords) are never logged or put in an error (registration's "Password only
  to Clerk"). Log lines name the method, the path template, the status, the time taken and Clerk's trace id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import requests
import urllib3
from flask import current_app
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from iris import metrics
from iris.errors import (
    AnswerLost,
    AuthProviderError,
    AuthProviderUnavailable,
    ClerkRefused,
    EmailTaken,
    IrisError,
    NotFoundAtClerk,
    RateLimited,
    ValidationFailed,
    field_error,
)

log = logging.getLogger(__name__)

API_VERSION = "2025-11-10"
# (connect, read) seconds. A registration makes up to five calls (time budget in gunicorn.conf.py); gthread's
# `timeout` does not cut requests off, so graceful_timeout and nginx's proxy_read_timeout must cover them.
DEFAULT_TIMEOUT = (3.05, 8.0)

PASSWORD_CODES = {
    "form_password_length_too_short": "password_too_short",
    "form_password_length_too_long": "password_too_long",
    "form_password_size_in_bytes_exceeded": "password_too_long",
    "form_password_pwned": "password_breached",
    "form_password_not_strong_enough": "password_too_weak",
    "form_password_matches_identifier": "password_matches_email",
}

# One retry, only where it cannot duplicate anything or stretch a slow call: a connection that could not be
# opened, so the request never left. (urllib3 already drops kept-alive sockets the server has closed.)
# respect_retry_after_header off: urllib3 would otherwise treat a 429 or 503 carrying Retry-After as a retry
# with no retries left and raise, hiding Clerk's answer (and its Retry-After) from _error_for.
RETRIES = Retry(total=1, connect=1, read=0, status=0, other=0, respect_retry_after_header=False)

_local = threading.local()


def http_session() -> requests.Session:
    """This thread's keep-alive session, created on first use in the current process.

    Proxy settings (HTTPS_PROXY, NO_PROXY) and REQUESTS_CA_BUNDLE are read when the session is made.
    """
    session = getattr(_local, "session", None)
    if session is None or _local.pid != os.getpid():
        session = requests.Session()
        # Read proxy and CA settings from the environment once, here: with trust_env on, requests re-reads
        # the whole environment on every call, which cost about 1 ms of CPU per Clerk call.
        session.proxies.update(requests.utils.get_environ_proxies(current_app.config["CLERK_API_URL"]))
        session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        session.trust_env = False
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=RETRIES)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _local.session, _local.pid = session, os.getpid()
    return session


def create_user(email: str, password: str, external_id: str, instance: str) -> dict[str, Any]:
    """Create a Clerk user with this email and password, linked to our row by ``external_id`` and marked as
    this Iris database's by ``instance`` (``private_metadata`` ``{"iris_instance": instance}``, which only the
    Backend API can read or write: see ``mark_of``).

    Side effect: a user at Clerk. When this raises ``AuthProviderUnavailable`` or ``AuthProviderError`` the
    user may or may not exist (the answer was lost); find it with ``find_users(external_id=...)``. ``NotSent``
    (a subclass of ``AuthProviderUnavailable``) means the request never left: no user was made.
    """
    return _call(
        "POST",
        "/users",
        json={
            "email_address": [email],
            "password": password,
            "external_id": external_id,
            "private_metadata": {MARK: instance},
        },
    )


# The private_metadata key naming the Iris database that created a Clerk user.
MARK = "iris_instance"


def mark_of(user: Any) -> str | None:
    """The Iris database a Clerk user object says created it (its ``private_metadata.iris_instance``), or None
    for a user with no mark (made by someone else, or by Iris before users were marked)."""
    metadata = user.get("private_metadata") if isinstance(user, dict) else None
    mark = metadata.get(MARK) if isinstance(metadata, dict) else None
    return mark if isinstance(mark, str) and mark else None


def delete_user(clerk_user_id: str) -> bool:
    """Delete a Clerk user. Returns False when Clerk has no such user (already gone)."""
    try:
        _call("DELETE", f"/users/{clerk_user_id}", path_template="/users/{id}")
    except NotFoundAtClerk:
        return False
    return True


def get_user(clerk_user_id: str) -> dict[str, Any] | None:
    """One Clerk user, or None when Clerk has no such user (deleted, or never made)."""
    try:
        return _call("GET", f"/users/{clerk_user_id}", path_template="/users/{id}")
    except NotFoundAtClerk:
        return None


def set_email_verified(email_address_id: str, verified: bool) -> dict[str, Any]:
    """Mark a Clerk email address verified or not (``PATCH /v1/email_addresses/{id}``); the address back.

    Idempotent: repeating it, or a lost call landing late, leaves the same flag. ``NotFoundAtClerk`` when no
    user has the address.
    """
    return _call(
        "PATCH",
        f"/email_addresses/{email_address_id}",
        json={"verified": verified},
        path_template="/email_addresses/{id}",
    )


class IncorrectPasswordAnswer(ClerkRefused):
    """Clerk answered 422 ``incorrect_password``: an expected answer (``verify_password`` returns False), not
    an unusable one, so it is neither logged as an error nor counted as one."""


def verify_password(clerk_user_id: str, password: str) -> bool:
    """Whether ``password`` is the Clerk user's password (``POST /v1/users/{id}/verify_password``): True on
    200 ``{"verified": true}``, False on 422 ``incorrect_password`` (also for a user without a password).

    Changes nothing at Clerk. The password goes in the request body only, which is never logged or put in an
    error (as for ``create_user``). Raises ``NotFoundAtClerk`` when Clerk has no such user, ``RateLimited``,
    ``AuthProviderUnavailable`` and ``AuthProviderError`` like every call.
    """
    try:
        answer = _call(
            "POST",
            f"/users/{clerk_user_id}/verify_password",
            json={"password": password},
            path_template="/users/{id}/verify_password",
        )
    except IncorrectPasswordAnswer:
        return False
    if not isinstance(answer, dict) or answer.get("verified") is not True:
        raise AuthProviderError()
    return True


def ban_user(clerk_user_id: str) -> dict[str, Any]:
    """Ban a Clerk user (``POST /v1/users/{id}/ban``): Clerk ends their sessions and refuses their sign-ins
    from then on. Returns the user, ``banned`` true.

    Idempotent: banning a banned user, or a lost call landing late, leaves the same state. ``NotFoundAtClerk``
    when Clerk has no such user (deleted).
    """
    return _call("POST", f"/users/{clerk_user_id}/ban", path_template="/users/{id}/ban")


def unban_user(clerk_user_id: str) -> dict[str, Any]:
    """Lift a Clerk user's ban (``POST /v1/users/{id}/unban``): they can sign in again. Returns the user,
    ``banned`` false.

    Idempotent, like ``ban_user``. ``NotFoundAtClerk`` when Clerk has no such user (deleted).
    """
    return _call("POST", f"/users/{clerk_user_id}/unban", path_template="/users/{id}/unban")


def find_users(*, email: str | None = None, external_id: str | None = None) -> list[dict[str, Any]]:
    """Clerk users matching an email address or an external_id (at most 10)."""
    params = {}
    if email is not None:
        params["email_address"] = email
    if external_id is not None:
        params["external_id"] = external_id
    users = _call("GET", "/users", params=params)
    if not isinstance(users, list):
        raise AuthProviderError()
    return users


# Clerk's largest page (GET /v1/users ``limit``), and how many values one list filter takes.
PAGE_LIMIT = 500
FILTER_LIMIT = 100


def list_users(*, limit: int = PAGE_LIMIT, starting_after: str | None = None) -> list[dict[str, Any]]:
    """One page of Clerk's users, newest first, after the user ``starting_after`` (cursor paging).

    Walking every page from ``starting_after=None`` until a page is shorter than ``limit`` sees every user
    that existed for the whole walk exactly once; cursor paging stays fast where a large ``offset`` does not.
    """
    params: dict[str, Any] = {"limit": str(limit), "order_by": "-created_at"}
    if starting_after is not None:
        params["starting_after"] = starting_after
    return _user_list(params)


def users_by_id(clerk_user_ids: list[str]) -> list[dict[str, Any]]:
    """The Clerk users among ``clerk_user_ids`` (at most ``FILTER_LIMIT``); ids Clerk does not know are left
    out, so a missing one is a deleted user (Clerk never reuses ids)."""
    if len(clerk_user_ids) > FILTER_LIMIT:
        raise ValueError(f"at most {FILTER_LIMIT} ids per call")
    if not clerk_user_ids:
        return []
    return _user_list({"user_id": clerk_user_ids, "limit": str(FILTER_LIMIT)})


def count_users() -> int:
    """How many users Clerk has (``GET /v1/users/count``)."""
    answer = _call("GET", "/users/count")
    total = answer.get("total_count") if isinstance(answer, dict) else None
    if not isinstance(total, int):
        raise AuthProviderError()
    return total


def _user_list(params: dict[str, Any]) -> list[dict[str, Any]]:
    users = _call("GET", "/users", params=params)
    if not isinstance(users, list) or not all(isinstance(user, dict) for user in users):
        raise AuthProviderError()
    return users


def get_jwks() -> dict[str, Any]:
    """The instance's JSON Web Key Set (session-token signing keys)."""
    return _call("GET", "/jwks")


def create_session(clerk_user_id: str) -> dict[str, Any]:
    """A session for a user (Clerk allows this on development instances only; for testing)."""
    return _call("POST", "/sessions", json={"user_id": clerk_user_id})


def create_session_token(session_id: str) -> str:
    """A fresh session token (JWT) for a session."""
    token = _call("POST", f"/sessions/{session_id}/tokens", path_template="/sessions/{id}/tokens")
    return token["jwt"]


def revoke_session(session_id: str) -> dict[str, Any]:
    """End a session (``POST /v1/sessions/{id}/revoke``): Clerk mints no more tokens for it, and its next
    handshake signs the browser out. Idempotent; ``NotFoundAtClerk`` when Clerk has no such session."""
    return _call("POST", f"/sessions/{session_id}/revoke", path_template="/sessions/{id}/revoke")


def handshake_payload(nonce: str) -> list[str]:
    """The Set-Cookie directives a handshake left under ``nonce`` (``GET /v1/clients/handshake_payload``,
    which clerk/javascript's ``ClientApi.getHandshakePayload`` calls; Clerk's spec lists the path without a
    schema). Raises ``AuthProviderError`` for an answer without a list of strings, and the usual errors."""
    answer = _call("GET", "/clients/handshake_payload", params={"nonce": nonce})
    directives = answer.get("directives") if isinstance(answer, dict) else None
    if not isinstance(directives, list) or not all(isinstance(item, str) for item in directives):
        raise AuthProviderError()
    return directives


class NotSent(AuthProviderUnavailable):
    """The request never left: no connection to Clerk could be opened (refused, unreachable, the name not
    resolved, the connect timing out), after ``RETRIES``' one retry. Clerk did nothing, so nothing can land
    later (503, like any unavailability)."""


def answer_was_lost(error: IrisError) -> bool:
    """True when Clerk may have carried out the request although the call raised ``error``.

    Timeouts, dropped connections, 5xx and unreadable 2xx bodies leave the outcome unknown; every 4xx
    (validation, taken, rate limit, bad key) is a definite refusal, and so is ``NotSent`` (nothing reached
    Clerk).
    """
    if isinstance(error, NotSent):
        return False
    if isinstance(error, AuthProviderUnavailable):
        return True
    return isinstance(error, AuthProviderError) and not isinstance(error, ClerkRefused)


def may_still_land(error: IrisError) -> bool:
    """True when the request may be carried out *later* than the call that raised ``error``.

    Only when Clerk's application never answered (``AnswerLost``). An answer it did send, a 5xx in its own
    error envelope or a 2xx whose body was unreadable, means its handling of the request is over: whatever
    it stored is already there to be found.
    """
    return isinstance(error, AnswerLost)


def _call(
    method: str,
    path: str,
    *,
    json: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    path_template: str | None = None,
) -> Any:
    config = current_app.config
    url = config["CLERK_API_URL"] + "/v1" + path
    headers = {
        "Authorization": f"Bearer {config['CLERK_SECRET_KEY']}",
        "Clerk-API-Version": API_VERSION,
        "Accept": "application/json",
    }
    timeout = config.get("CLERK_TIMEOUT", DEFAULT_TIMEOUT)
    template = path_template or path
    label = f"{method} {template}"
    started = time.perf_counter()
    try:
        response = http_session().request(
            method, url, json=json, params=params, headers=headers, timeout=timeout
        )
    except requests.RequestException as error:
        if _never_sent(error):
            kind = "timeout" if isinstance(error, requests.Timeout) else "connection"
            metrics.clerk_call(method, template, time.perf_counter() - started, kind)
            log.warning("clerk %s not sent: no connection (%s)", label, type(error).__name__)
            raise NotSent() from None
        if isinstance(error, requests.Timeout):
            metrics.clerk_call(method, template, time.perf_counter() - started, "timeout")
            log.warning("clerk %s timed out after %.0f ms", label, _ms(started))
            raise AnswerLost() from None
        metrics.clerk_call(method, template, time.perf_counter() - started, "connection")
        log.warning("clerk %s failed: %s", label, type(error).__name__)
        raise AnswerLost() from None
    elapsed = time.perf_counter() - started

    body = _json_or_none(response)
    trace_id = body.get("clerk_trace_id") if isinstance(body, dict) else None
    log.info("clerk %s -> %s in %.0f ms (trace %s)", label, response.status_code, elapsed * 1000, trace_id)
    if response.ok:
        metrics.clerk_call(method, template, elapsed, "unreadable" if body is None else None)
        if body is None:
            raise AuthProviderError()
        return body
    error = _error_for(response.status_code, body, response.headers.get("Retry-After"))
    metrics.clerk_call(method, template, elapsed, _error_kind(response.status_code, error))
    raise error


def _never_sent(error: requests.RequestException) -> bool:
    """True when ``error`` means no connection was ever opened, so the request was not written at all:
    ``ConnectTimeout``, or a ``ConnectionError`` whose cause is urllib3's ``NewConnectionError`` (refused,
    unreachable, name not resolved). A reset or a read timeout on an open connection may follow a request
    Clerk received, and stays a lost answer."""
    if isinstance(error, requests.ConnectTimeout):
        return True
    if not isinstance(error, requests.ConnectionError) or isinstance(error, requests.exceptions.ProxyError):
        return False
    cause = error.args[0] if error.args else None
    return isinstance(getattr(cause, "reason", cause), urllib3.exceptions.NewConnectionError)


def _error_kind(status: int, error: IrisError) -> str | None:
    """The ``iris_clerk_errors_total`` kind of a non-2xx answer; None for an answer the caller expects (not
    found, email taken, a password rule)."""
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    if isinstance(error, ClerkRefused) and not isinstance(error, (NotFoundAtClerk, IncorrectPasswordAnswer)):
        return "refused"
    return None


def _error_for(status: int, body: Any, retry_after: str | None) -> IrisError:
    errors = body.get("errors") if isinstance(body, dict) else None
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    code = first.get("code", "")
    if status == 429:
        return RateLimited(retry_after=_seconds(retry_after))
    if status >= 500:
        if not isinstance(errors, list):  # not Clerk's envelope: a gateway in front of Clerk answered
            return AnswerLost(retry_after=_seconds(retry_after))
        return AuthProviderUnavailable(retry_after=_seconds(retry_after))
    if status == 404 and code == "resource_not_found":
        return NotFoundAtClerk(status)
    if code == "form_identifier_exists" and _param(first) in (None, "email_address"):
        return EmailTaken()
    if code in PASSWORD_CODES or code.startswith("form_password_"):
        message = first.get("long_message") or first.get("message") or "Choose another password."
        return ValidationFailed(
            details=[field_error("password", PASSWORD_CODES.get(code, "password_rejected"), message)]
        )
    if code == "incorrect_password":
        return IncorrectPasswordAnswer(status)
    if code == "form_param_format_invalid" and _param(first) == "email_address":
        return ValidationFailed(
            details=[field_error("email", "invalid_email", "Enter a valid email address.")]
        )
    log.error("clerk answered %s %s; treating it as unusable", status, code or "(no code)")
    return ClerkRefused(status)


def _param(error: dict[str, Any]) -> str | None:
    meta = error.get("meta")
    return meta.get("param_name") if isinstance(meta, dict) else None


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _seconds(value: str | None) -> int | None:
    """Clerk's Retry-After in whole seconds (at least 1); None when absent or unreadable, so the error's own
    default applies."""
    try:
        return max(1, int(value)) if value is not None else None
    except ValueError:
        return None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
