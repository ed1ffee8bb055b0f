"""The JSON API, under /api/v1. Views parse JSON, call the service and shape the answer; no rules here."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, abort, current_app, g, request, url_for

from iris import auth, registration
from iris.errors import IrisError, ValidationFailed
from iris.extensions import limiter, register_limit

bp = Blueprint("api", __name__, url_prefix="/api/v1")

REGISTER_FIELDS = ("email", "password", "role")


class InvalidJSON(IrisError):
    status_code = 400
    code = "invalid_json"
    message = "The request body is not valid JSON."


class UnsupportedMediaType(IrisError):
    status_code = 415
    code = "unsupported_media_type"
    message = "Send the body as JSON with Content-Type: application/json."


def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or the matching envelope error."""
    if not request.is_json:
        raise UnsupportedMediaType()
    body = request.get_json(silent=True)
    if body is None:
        raise InvalidJSON()
    if not isinstance(body, dict):
        raise InvalidJSON("The request body must be a JSON object.")
    return body


@bp.post("/auth/register")
@limiter.shared_limit(register_limit, scope="register")
def register():
    """Create an account: ``{email, password, role?}`` -> 201 with the user JSON and its Location."""
    body = json_object()
    unknown = sorted(set(body) - set(REGISTER_FIELDS))
    if unknown:
        raise ValidationFailed(
            details=[
                {"field": name, "code": "unknown_field", "message": "This field is not accepted."}
                for name in unknown
            ]
        )
    # Only an absent role defaults; an explicit null is a role that is not allowed.
    role = body.get("role", registration.DEFAULT_ROLE)
    user = registration.register(body.get("email"), body.get("password"), role)
    location = url_for("api.get_user", user_id=user.id)
    return user.to_dict(current_app.config["IRIS_TIMEZONE"]), 201, {"Location": location}


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
