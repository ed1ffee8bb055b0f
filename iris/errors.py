"""Domain errors, and how every error becomes a response.

Code below the views raises ``IrisError`` subclasses and never builds HTTP responses. The handlers registered
by ``init_app`` turn them, Werkzeug's HTTP errors (routing 404/405 included) and unexpected exceptions into:

- under ``/api/`` (and on /healthz, /readyz): the API's error envelope,
  ``{"error": {code, message, details?, request_id}}``;
- everywhere else: an HTML page in the site layout (``templates/error.html``).

Every error that carries an HTTP status is defined here, so the whole list of statuses the app can answer
with is in one file. The request id in the envelope is ``iris.observability.request_id``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy.exc
from flask import Flask, Response, current_app, jsonify, render_template, request
from flask_limiter.errors import RateLimitExceeded
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from iris.extensions import db, limiter
from iris.observability import loggable_path, request_id

log = logging.getLogger(__name__)


class IrisError(Exception):
    """An error with a status, a stable machine-readable ``code`` and a message safe to show anyone.

    ``details`` lists field problems (each made by ``field_error``); ``retry_after`` (seconds) becomes a
    ``Retry-After`` header, and a class that always wants one sets its default at class level, so callers
    just raise it; ``headers`` are added to the response as they are. ``body_extra`` holds top-level keys
    the JSON answer carries beside ``"error"`` (another party's format that its own client code reads, such
    as Clerk's ``clerk_error``); it never replaces ``"error"`` and is left out of HTML pages. Messages must
    never contain a password, token or key.
    """

    status_code = 500
    code = "internal_error"
    message = "Something went wrong on our side. Please try again."
    retry_after: int | None = None
    body_extra: Mapping[str, Any] = MappingProxyType({})

    def __init__(
        self,
        message: str | None = None,
        *,
        details: list[dict[str, str]] | None = None,
        retry_after: int | None = None,
    ) -> None:
        if message is not None:
            self.message = message
        if retry_after is not None:
            self.retry_after = retry_after
        self.details = details or []
        self.headers: dict[str, str] = {}
        super().__init__(self.message)


def field_error(field: str, code: str, message: str) -> dict[str, str]:
    """One entry of ``IrisError.details``: which field, a stable code, and a message for the person."""
    return {"field": field, "code": code, "message": message}


class InvalidJSON(IrisError):
    status_code = 400
    code = "invalid_json"
    message = "The request body is not valid JSON."


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


class Impersonated(Forbidden):
    """A token with an ``act`` claim (someone in Clerk's dashboard signed in as this person) asked for
    something only the person themselves may do, such as deleting the account: refused (403 ``forbidden``),
    nothing changed."""

    message = (
        "This session is an impersonation (someone signed in as this account from Clerk's dashboard), and an"
        " impersonation cannot delete the account. Only the account's owner, signed in themselves, can."
    )


class CsrfFailed(IrisError):
    """A state-changing API request authorised by the ``__session`` cookie alone, from an origin that is not
    Iris's own (IRIS_PUBLIC_URL or one of CLERK_AUTHORIZED_PARTIES), or with no ``Origin`` at all: a
    browser sends the cookie whichever site made it send the request, so the cookie alone is not consent
    (403; nothing done)."""

    status_code = 403
    code = "csrf_failed"
    message = (
        "This request was not accepted: it carries only the session cookie, and it did not come from an"
        " origin of this site (the Origin header is missing or foreign). Send the session token as"
        " 'Authorization: Bearer <token>', or make the request from this site's own pages."
    )


class EmailUnverified(IrisError):
    """The account has not confirmed its email address yet (IRIS_EMAIL_VERIFICATION=required), and what it
    asked for acts for it: refused (403), nothing done. Reading itself, asking for a new link and deleting
    itself stay allowed."""

    status_code = 403
    code = "email_unverified"
    message = (
        "Confirm your email address first: follow the link in the mail we sent you (or ask for a new one)."
        " Until then this account can be read and deleted, but it cannot act."
    )


def clerk_reverification_error(after_minutes: int) -> dict[str, Any]:
    """Clerk's own answer to a step-up check that failed, as clerk-js's ``useReverification()`` recognises it,
    naming exactly what Iris checks: the first factor, within ``after_minutes``. Clerk's ``"strict"`` preset
    would say "second factor, 10 minutes", and clerk-js would then re-check only the second factor of a person
    with two, leaving ``fva[0]``, which Iris reads, as old as before: a 403 for ever."""
    return {
        "type": "forbidden",
        "reason": "reverification-error",
        "metadata": {"reverification": {"level": "first_factor", "afterMinutes": after_minutes}},
    }


class ReverificationRequired(IrisError):
    """A destructive act (deleting an account, any admin write) with a sign-in older than
    IRIS_REVERIFY_MINUTES, or a token that does not say when its first factor was verified (``fva``): refused
    (403), nothing done. The JSON answer also carries Clerk's own ``clerk_error`` beside the envelope, so
    clerk-js's ``useReverification()`` asks the person for their password and retries."""

    status_code = 403
    code = "reverification_required"
    message = (
        "This needs a recent sign-in: confirm it is you (enter your password again, or sign in again),"
        " then retry."
    )

    def __init__(self, after_minutes: int = 10) -> None:
        super().__init__()
        self.body_extra = MappingProxyType({"clerk_error": clerk_reverification_error(after_minutes)})


class UserNotFound(IrisError):
    """A valid token whose Clerk user has no account here (never registered through Iris, or pending)."""

    status_code = 404
    code = "user_not_found"
    message = "There is no Iris account for this Clerk user."


class EmailTaken(IrisError):
    status_code = 409
    code = "email_taken"
    message = "An account with this email address already exists."


class RegistrationInProgress(EmailTaken):
    """Another registration of the email is unsettled: 409 ``email_taken`` with a Retry-After."""

    message = "A registration for this email address is already in progress."
    retry_after = 5


class LeaseLost(RegistrationInProgress):
    """Someone else claimed the pending row: its registration is theirs to settle now (409, retry later)."""


class InvalidWebhook(IrisError):
    """A Clerk webhook whose Svix signature is missing, wrong or too old or new: nothing is applied (400)."""

    status_code = 400
    code = "invalid_signature"
    message = "The webhook signature is missing or does not verify."


class InvalidEvent(IrisError):
    """A signed webhook whose event is not a Clerk user event Iris can read (400; nothing applied)."""

    status_code = 400
    code = "invalid_event"
    message = "The webhook event is not in the form Clerk sends."


class SyncDeferred(IrisError):
    """A Clerk change that cannot be applied yet (its email is held by a registration in flight, or by an
    account whose own change has not arrived): 503, and the sender retries it later."""

    status_code = 503
    code = "sync_deferred"
    message = "This change cannot be applied yet; send it again later."
    retry_after = 60


class CannotDeactivateSelf(IrisError):
    """An admin asked to deactivate their own account: refused (409), nothing changed. Another admin can."""

    status_code = 409
    code = "cannot_deactivate_self"
    message = "You cannot deactivate your own account. Another admin can do it."


class ClerkUserDeleted(IrisError):
    """The account's Clerk user no longer exists, so it can never sign in again: reactivating it is refused
    (409), and the account stays deactivated."""

    status_code = 409
    code = "clerk_user_deleted"
    message = (
        "This account's sign-in user no longer exists at Clerk, so the account cannot be reactivated."
        " Nothing was changed; the person can sign up again."
    )


class AccountErased(IrisError):
    """The account's personal data has been erased (its owner deleted it, or it was deactivated longer than
    IRIS_DEACTIVATED_RETENTION_DAYS): it can never be reactivated (409), and nothing changes."""

    status_code = 409
    code = "account_erased"
    message = (
        "This account's data has been erased, so it cannot be reactivated. Nothing was changed;"
        " the person can sign up again."
    )


class RoleChangeRefused(IrisError):
    """``flask iris promote``/``demote`` refused: no such live account, or not one that may be promoted (a
    registration not settled, or an email address not confirmed). Nothing changed."""

    status_code = 409
    code = "role_change_refused"


class UnsupportedMediaType(IrisError):
    status_code = 415
    code = "unsupported_media_type"
    message = "Send the body as JSON with Content-Type: application/json."


class ValidationFailed(IrisError):
    status_code = 422
    code = "validation_error"
    message = "One or more fields are invalid."


class PasswordIncorrect(ValidationFailed):
    """The password a page asked for, to confirm it is really the account's owner acting, is missing or
    Clerk did not accept it: 422 on field ``password``, nothing done. The password is never quoted."""

    WRONG = "That is not the password of this account. Nothing was done; try again."
    MISSING = "Enter your password to confirm it is you."

    def __init__(self, *, missing: bool = False) -> None:
        code, text = ("required", self.MISSING) if missing else ("incorrect_password", self.WRONG)
        super().__init__(details=[field_error("password", code, text)])


class RateLimited(IrisError):
    """Too many requests, ours or Clerk's; without a known reset time, retry after the class default."""

    status_code = 429
    code = "rate_limited"
    message = "Too many attempts. Please wait before trying again."
    retry_after = 5


class AuthProviderError(IrisError):
    status_code = 502
    code = "auth_provider_error"
    message = "The sign-in service gave an unexpected answer. Please try again later."


class ClerkRefused(AuthProviderError):
    """Clerk answered a 4xx we cannot use (bad key, unexpected code). Clerk changed nothing.

    ``status`` is Clerk's HTTP status (401: the secret key is invalid).
    """

    def __init__(self, status: int | None = None) -> None:
        super().__init__()
        self.status = status


class NotFoundAtClerk(ClerkRefused):
    """Clerk answered 404 ``resource_not_found``; unhandled, it is an unusable answer (502)."""


class AuthProviderUnavailable(IrisError):
    status_code = 503
    code = "auth_provider_unavailable"
    message = "The sign-in service is unavailable right now. Please try again shortly."
    retry_after = 5


class AnswerLost(AuthProviderUnavailable):
    """No answer came from Clerk's application: a timeout, a dropped connection, or a 5xx from something in
    front of it (no Clerk error envelope). The request may still be carried out later (503)."""


class DatabaseUnavailable(IrisError):
    status_code = 503
    code = "database_unavailable"
    message = "The service is temporarily unavailable. Please try again shortly."
    retry_after = 5


class CompletionUnknown(DatabaseUnavailable):
    """The database went away during or after the completing COMMIT, so it may have committed (503)."""


# Codes for Werkzeug's HTTP errors; anything unlisted uses its status phrase in snake case.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}

# Messages for Werkzeug's HTTP errors; their own descriptions are long and written for HTML.
HTTP_MESSAGES = {
    400: "The request could not be understood.",
    404: "Nothing is here.",
    405: "This method is not allowed here.",
    413: "The request body is too large.",
    415: "Unsupported content type.",
}

# Database errors that mean "cannot reach the database", not "the query is wrong". A statement PostgreSQL
# cancelled because IRIS_DB_STATEMENT_TIMEOUT_MS ran out is an OperationalError too: the same 503.
DATABASE_UNREACHABLE = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError)

# SQLSTATEs of a statement PostgreSQL cancelled: query_canceled (statement_timeout) and lock_not_available
# (lock_timeout).
STATEMENT_CANCELLED = ("57014", "55P03")


@contextmanager
def database_errors() -> Iterator[None]:
    """Turn "cannot reach the database" (``DATABASE_UNREACHABLE``) raised in the block into
    ``DatabaseUnavailable`` (503), rolling the session back first."""
    try:
        yield
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        raise DatabaseUnavailable() from error


def database_failure(error: BaseException | None) -> str:
    """Why the database failed, for the log: ``statement timed out: <type> (<PostgreSQL's message>)`` when
    PostgreSQL cancelled the statement, else ``unreachable: <type>``.

    Only type names and PostgreSQL's fixed message for a cancelled statement: a connection error's own text
    can name hosts and users.
    """
    if error is None:
        return "unavailable"
    original: Any = getattr(error, "orig", None)
    if getattr(original, "sqlstate", None) in STATEMENT_CANCELLED:
        return f"statement timed out: {type(original).__name__} ({original.diag.message_primary})"
    return f"unreachable: {type(error).__name__}"


def wants_json() -> bool:
    """API paths and the operational endpoints answer in JSON; pages answer in HTML."""
    return request.path.startswith("/api/") or request.path in ("/api", "/healthz", "/readyz")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, str]] | None = None,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    """The error as a JSON envelope under /api/ or as an HTML page elsewhere. ``extra`` adds top-level keys
    beside ``"error"`` in the JSON (``IrisError.body_extra``); an ``"error"`` key in it is ignored."""
    if wants_json():
        body: dict[str, Any] = {"code": code, "message": message}
        if details:
            body["details"] = details
        body["request_id"] = request_id()
        response = jsonify({**(extra or {}), "error": body})  # "error" last: extra never replaces it
    else:
        response = Response(
            render_template("error.html", status=status, code=code, message=message, retry_after=retry_after),
            mimetype="text/html",
        )
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    response.headers.update(headers or {})
    return response


def handle_iris_error(error: IrisError) -> Response:
    if isinstance(error, DatabaseUnavailable):
        db.session.rollback()
    return error_response(
        error.status_code,
        error.code,
        error.message,
        details=error.details,
        retry_after=error.retry_after,
        headers=error.headers,
        extra=error.body_extra,
    )


def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    if status == 500:
        return handle_unexpected(error)
    if isinstance(error, RateLimitExceeded):
        return handle_iris_error(RateLimited(retry_after=seconds_until_limit_resets()))
    if isinstance(error, CSRFError):
        return handle_csrf_error(error)
    code = HTTP_CODES.get(status) or (error.name or "error").lower().replace(" ", "_")
    message = HTTP_MESSAGES.get(status) or error.name or "Error"
    headers = {}
    if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
    return error_response(status, code, message, headers=headers)


# Flask-WTF's reasons for refusing a form (``CSRFError.description``), each with what the person can do about
# it and what the operator should check. The person never sees the technical reason.
RELOAD = "Reload the page and try again."
CSRF_REASONS: dict[str, tuple[str, str]] = {
    "The CSRF token is missing.": (
        "This form did not come from this site, so nothing was done. Open the page here and try again.",
        "the form had no CSRF token: posted from another site, by a script, or from a page not rendered here",
    ),
    "The CSRF session token is missing.": (
        "Your browser did not send back this site's cookie. Allow cookies for this site, then reload the "
        "page and try again.",
        "the session cookie did not come back: cookies blocked by the browser, or the session ended",
    ),
    "The CSRF token has expired.": (
        f"This form has expired. {RELOAD}",
        "the form's CSRF token expired: the page was open longer than WTF_CSRF_TIME_LIMIT",
    ),
    "The CSRF token is invalid.": (
        f"This form could not be checked. {RELOAD}",
        "the form's CSRF token has a bad signature: altered, or signed with another FLASK_SECRET_KEY (every "
        "instance must share one)",
    ),
    "The CSRF tokens do not match.": (
        f"This form belongs to an earlier visit. {RELOAD}",
        "the form's CSRF token belongs to another session: the session cookie changed since the page loaded",
    ),
    "The referrer header is missing.": (
        "Your browser did not say which page sent this form, so it was not accepted. If a privacy setting or "
        "extension hides the referring page, allow it for this site, then reload the page and try again.",
        "an https form POST came without a Referer: the browser, an extension or a proxy removed it (Iris "
        "sends Referrer-Policy: same-origin)",
    ),
    "The referrer does not match the host.": (
        "This form was sent from another site, so nothing was done. Open the page here and try again.",
        "the Referer's origin is not https://<Host>/: another site posted the form, or the proxy does not "
        "pass on the Host as the browser sent it, port included (nginx: proxy_set_header Host $http_host)",
    ),
}
# The session cookie is Secure outside development: browsers keep it only over https, so a site served over
# plain http can never have a form accepted. Say so instead of blaming the person's cookies.
OVER_PLAIN_HTTP = (
    "This site only works over a secure connection. Open the page with https:// and try again.",
    "the session cookie did not come back because the request came over plain http and the cookie is Secure: "
    "serve the site over https only; behind a proxy, send X-Forwarded-Proto and set IRIS_PROXY_HOPS",
)


def csrf_explanation(reason: str) -> tuple[str, str]:
    """(message for the person, log line for the operator) for a Flask-WTF refusal reason. A reason this table
    does not know (a newer Flask-WTF) gets a general message, and the reason itself goes to the log."""
    cookie_kept_from_http = not current_app.config["SESSION_COOKIE_SECURE"]
    if reason == "The CSRF session token is missing." and not request.is_secure and not cookie_kept_from_http:
        return OVER_PLAIN_HTTP
    message, problem = CSRF_REASONS.get(reason, (f"This form could not be accepted. {RELOAD}", reason))
    if request.referrer and reason == "The referrer does not match the host.":
        referrer = urlsplit(request.referrer)  # its origin only: a path or query may carry a token
        problem += f"; Referer origin {referrer.scheme}://{referrer.netloc}, Host {request.host}"
    return message, problem


def handle_csrf_error(error: CSRFError) -> Response:
    """A refused form: an HTML 400 ``csrf_failed`` saying what the person can do, and one warning log line
    saying what the operator should check. Nothing the form carried is logged."""
    message, problem = csrf_explanation(error.description or "")
    log.warning("form refused on %s %s: %s", request.method, loggable_path(), problem)
    return error_response(400, "csrf_failed", message)


def seconds_until_limit_resets() -> int:
    current = limiter.current_limit
    return max(1, math.ceil(current.reset_at - time.time())) if current is not None else 60


def handle_database_unavailable(error: DatabaseUnavailable) -> Response:
    """503 ``database_unavailable`` with Retry-After, and one log line saying why, without a traceback:
    ``database statement timed out: ...`` or ``database unreachable: ...`` (see ``database_failure``)."""
    log.warning("database %s", database_failure(error.__cause__))
    return handle_iris_error(error)


def handle_database_unreachable(error: Exception) -> Response:
    """A database error no code below the view turned into ``DatabaseUnavailable``: the same answer."""
    unavailable = DatabaseUnavailable()
    unavailable.__cause__ = error
    return handle_database_unavailable(unavailable)


def handle_unexpected(error: Exception) -> Response:
    """A 500 with no internals in the body; the traceback goes to the log with the request id."""
    original = getattr(error, "original_exception", None) or error
    db.session.rollback()
    if isinstance(original, DATABASE_UNREACHABLE):
        return handle_database_unreachable(original)
    log.error(
        "unhandled error in %s %s (request %s)",
        request.method,
        loggable_path(),
        request_id(),
        exc_info=original if isinstance(original, BaseException) else None,
    )
    return error_response(500, IrisError.code, IrisError.message)


def end_database_session(error: BaseException | None) -> None:
    """End the request's database session without letting a lost connection escape as a bare 500.

    Registered after ``db.init_app``, so it runs before Flask-SQLAlchemy's own teardown: when the database
    dropped the connection under an open transaction, the ROLLBACK in ``session.remove()`` raises, and
    nothing would turn that into a response any more (the response may even be a 201 already).
    """
    try:
        db.session.remove()
    except DATABASE_UNREACHABLE as lost:
        log.warning("database connection lost before the end of the request: %s", type(lost).__name__)
        db.session.remove()


def init_app(app: Flask) -> None:
    app.teardown_appcontext(end_database_session)
    app.register_error_handler(IrisError, handle_iris_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(DatabaseUnavailable, handle_database_unavailable)
    for error_class in DATABASE_UNREACHABLE:
        app.register_error_handler(error_class, handle_database_unreachable)
    app.register_error_handler(500, handle_unexpected)
