"""The JSON API, under /api/v1. Views parse JSON, call the service and shape the answer; no rules here."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, NoReturn

from flask import Blueprint, abort, current_app, g, request, url_for

from iris import accounts, auth, metrics, registration, verification
from iris.errors import InvalidJSON, UnsupportedMediaType, ValidationFailed, field_error
from iris.extensions import limiter, register_limit, verification_email_limit
from iris.models import DEFAULT_ROLE, User

bp = Blueprint("api", __name__, url_prefix="/api/v1")

REGISTER_FIELDS = ("email", "password", "role")


def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or the matching envelope error; never anything that becomes a 500.

    A content type other than JSON is 415 ``unsupported_media_type``. The body must be UTF-8 JSON text
    (RFC 8259; a ``charset`` parameter changes nothing) holding one object, with no ``NaN``/``Infinity``,
    no key given twice in one object and no lone surrogate (``"\\ud800"``) in any string. Anything else,
    nesting too deep for the parser included, is 400 ``invalid_json``.
    """
    if not request.is_json:
        raise UnsupportedMediaType()
    try:
        text = request.get_data().decode("utf-8")
        body = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8, bad syntax and integers too long to convert; RecursionError is deep
        # nesting, which the parser reports by running out of stack rather than as a syntax error.
        raise InvalidJSON() from None
    if not isinstance(body, dict):
        raise InvalidJSON("The request body must be a JSON object.")
    if _has_lone_surrogate(body):
        raise InvalidJSON("The request body holds a \\u escape that is not a Unicode character.")
    return body


def _no_constants(name: str) -> NoReturn:
    raise InvalidJSON(f"{name} is not a JSON number.")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two readers of one body must not disagree about it: a repeated key would be the last one here and
    # possibly the first one elsewhere.
    body = dict(pairs)
    if len(body) != len(pairs):
        raise InvalidJSON("The request body gives a key more than once in one object.")
    return body


# The body was decoded as strict UTF-8 and the parser joins escaped surrogate pairs, so any surrogate left
# came from a lone escape: text that cannot be stored, or sent on to Clerk, as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    pending = [value]
    while pending:  # a loop, not recursion: a body may nest nearly as deep as the stack allows
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and _SURROGATE.search(item):
            return True
    return False


@bp.post("/auth/register")
@limiter.shared_limit(register_limit, scope="register", on_breach=metrics.registration_rate_limited)
def register():
    """Create an account: ``{email, password, role?}`` -> 201 with the user JSON and its Location."""
    body = json_object()
    unknown = sorted(set(body) - set(REGISTER_FIELDS))
    if unknown:
        raise ValidationFailed(
            details=[field_error(name, "unknown_field", "This field is not accepted.") for name in unknown]
        )
    # Only an absent role defaults; an explicit null is a role that is not allowed.
    role = body.get("role", DEFAULT_ROLE)
    user = registration.register(body.get("email"), body.get("password"), role)
    location = url_for("api.get_user", user_id=user.id)
    return user.to_dict(current_app.config["IRIS_TIMEZONE"]), 201, {"Location": location}


# The one answer to a request for a new verification mail, whatever the address.
NEW_LINK_ANSWER = {
    "message": "If an account with this address is waiting for confirmation, a new link is on its way."
}


@bp.post("/auth/verification-email")
@limiter.shared_limit(verification_email_limit, scope="verification_email")
def verification_email():
    """Ask for a new verification mail: ``{email}`` -> 202, the same body whatever the address. Only a live,
    unconfirmed account's address gets a mail, at most one per few minutes (``iris.verification``)."""
    body = json_object()
    unknown = sorted(set(body) - {"email"})
    details = [field_error(name, "unknown_field", "This field is not accepted.") for name in unknown]
    if not isinstance(body.get("email"), str) or not body["email"].strip():
        details.append(field_error("email", "required", "Enter your email address."))
    if details:
        raise ValidationFailed(details=details)
    verification.request_mail(body["email"])
    return NEW_LINK_ANSWER, 202


@bp.get("/users/me")
@auth.require_user
def get_me():
    """The signed-in user (Clerk session token in ``Authorization: Bearer`` or the ``__session`` cookie)."""
    return g.user.to_dict(current_app.config["IRIS_TIMEZONE"])


@bp.get("/users/<uuid:user_id>")
@auth.require_user
def get_user(user_id: uuid.UUID):
    """One user: yourself, or anyone when you are an admin (``auth.user_visible_to``).

    Anything else is 404 ``not_found``, exactly like an id that does not exist, so the answer never tells
    whether an id is taken.
    """
    user = auth.user_visible_to(g.user, user_id)
    if user is None:
        abort(404)
    return user.to_dict(current_app.config["IRIS_TIMEZONE"])


@bp.delete("/users/me")
@auth.require_user
def delete_me():
    """Delete your own account (204): the Clerk user first, then the row (``accounts.delete_own_account``).

    Only the person, recently signed in: an impersonation is 403 ``forbidden``, a sign-in older than
    IRIS_REVERIFY_MINUTES 403 ``reverification_required``; nothing changes then. An unconfirmed account
    may delete itself."""
    auth.refuse_impersonation()
    auth.require_recent_sign_in()
    accounts.delete_own_account(g.user)
    return "", 204


@bp.get("/users")
@auth.require_user
def list_users():
    """Admins only: one page of accounts, newest first, with ``next_cursor`` (``accounts.list_accounts``).
    Anyone else gets 404 ``not_found``, whatever the parameters."""
    if not auth.is_admin(g.user):
        abort(404)
    users, next_cursor = accounts.list_accounts(accounts.parse_list_query(request.args))
    timezone = current_app.config["IRIS_TIMEZONE"]
    return {"users": [accounts.account_json(user, timezone) for user in users], "next_cursor": next_cursor}


@bp.post("/users/<uuid:user_id>/deactivate")
@auth.require_user
def deactivate_user(user_id: uuid.UUID):
    """Admins only: ban at Clerk, then soft-delete here (``accounts.deactivate``); the account after."""
    account = accounts.deactivate(g.user, administered_account(user_id), actor_name=auth.audit_actor_name())
    return accounts.account_json(account, current_app.config["IRIS_TIMEZONE"])


@bp.post("/users/<uuid:user_id>/reactivate")
@auth.require_user
def reactivate_user(user_id: uuid.UUID):
    """Admins only: undelete here, then unban at Clerk (``accounts.reactivate``); the account after."""
    account = accounts.reactivate(g.user, administered_account(user_id), actor_name=auth.audit_actor_name())
    return accounts.account_json(account, current_app.config["IRIS_TIMEZONE"])


def administered_account(user_id: uuid.UUID) -> User:
    """The complete account ``user_id`` (live or deactivated) for an admin about to change it.

    In this order: anyone but an admin gets 404 ``not_found`` (the admin API is not there for them); an admin
    whose address is not confirmed 403 ``email_unverified``; a sign-in older than IRIS_REVERIFY_MINUTES 403
    ``reverification_required``; an unknown id or a pending registration 404. Under impersonation the write
    goes ahead, audited as the impersonator's (``auth.audit_actor_name``)."""
    if not auth.is_admin(g.user):
        abort(404)
    auth.require_confirmed(g.user)
    auth.require_recent_sign_in()
    account = accounts.find_account(user_id)
    if account is None:
        abort(404)
    return account
