"""Clerk's webhooks: ``POST /api/v1/webhooks/clerk``, the user events Clerk sends through Svix.

Guarantees:
- Nothing is read before the signature is checked: the Svix signature over the raw body (``svix-id``,
  ``svix-timestamp`` within 5 minutes of now, ``svix-signature`` holding one or more ``v1,<base64>``
  entries, so a rotated secret's two signatures both work) against CLERK_WEBHOOK_SIGNING_SECRET. A missing,
  malformed or wrong signature is 400 ``invalid_signature`` and changes nothing. Unset secret: 404, as if the
  route did not exist.
- Each delivery (``svix-id``, the same across Svix's retries) is applied once: it is recorded after it was
  applied, and a recorded one is acknowledged without being applied again. Applying one twice is harmless
  anyway (``iris.clerk_sync``: only newer states apply), which covers two copies arriving at once.
- 2xx means "applied, or nothing to apply": ``user.created``/``user.updated``/``user.deleted`` go to
  ``iris.clerk_sync``, whose changes are audited as ``clerk-webhook:<svix-id>``; other event types are
  acknowledged and ignored. A change that cannot be applied now (database or Clerk unreachable,
  ``SyncDeferred``) answers 503, and Svix retries it on its schedule.
- Not behind the session-token check, CSRF or the rate limiter (the factory exempts this blueprint): Svix
  signs its requests, and a rate limit would only turn its retries into more retries.

Verification uses ``standardwebhooks``, the Standard Webhooks reference library that Svix's own ``svix``
package wraps for the same job: one small module with no dependencies, where ``svix`` would bring an API
client (httpx, pydantic) Iris does not use.
"""

from __future__ import annotations

import json
import logging

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, request
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from iris import audit, clerk_sync
from iris.errors import DATABASE_UNREACHABLE, DatabaseUnavailable, InvalidEvent, InvalidWebhook
from iris.extensions import db
from iris.models import ClerkWebhookDelivery

log = logging.getLogger(__name__)

bp = Blueprint("webhooks", __name__, url_prefix="/api/v1/webhooks")

USER_EVENTS = ("user.created", "user.updated", "user.deleted")
# The column's width; Svix's ids (msg_ and 27 characters) are far shorter.
MAX_SVIX_ID_LENGTH = 100


@bp.post("/clerk")
def clerk_webhook():
    """Apply one Clerk user event. 200 ``{"outcome": ...}``: ``applied``, ``unchanged`` (nothing to change),
    ``duplicate`` (this delivery was applied before) or ``ignored`` (not a user event)."""
    secret = current_app.config.get("CLERK_WEBHOOK_SIGNING_SECRET")
    if not secret:
        abort(404)
    body = request.get_data(cache=False)
    svix_id = _verify(secret, body)
    event = _event(body)
    event_type = event["type"]
    if _already_applied(svix_id):
        log.info("clerk webhook %s (%s): applied before", svix_id, event_type)
        return {"outcome": "duplicate"}
    if event_type not in USER_EVENTS:
        outcome = "ignored"
    else:
        with audit.acting(audit.Actor.webhook(svix_id)):
            change = _apply(event_type, event["data"])
        outcome = "applied" if change is not None else "unchanged"
    _record(svix_id, event_type)
    log.info("clerk webhook %s (%s): %s", svix_id, event_type, outcome)
    return {"outcome": outcome}


def _verify(secret: str, body: bytes) -> str:
    """The delivery's ``svix-id`` once its signature is good; ``InvalidWebhook`` otherwise."""
    headers = {
        "webhook-id": request.headers.get("svix-id", ""),
        "webhook-timestamp": request.headers.get("svix-timestamp", ""),
        "webhook-signature": request.headers.get("svix-signature", ""),
    }
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except (WebhookVerificationError, ValueError) as error:
        # ValueError: a signature entry without its "v1," part, bad base64, a body that is not UTF-8.
        log.warning("clerk webhook refused: %s", _reason(error))
        raise InvalidWebhook() from None
    if len(headers["webhook-id"]) > MAX_SVIX_ID_LENGTH:
        log.warning("clerk webhook refused: svix-id longer than %s characters", MAX_SVIX_ID_LENGTH)
        raise InvalidWebhook()
    return headers["webhook-id"]


def _reason(error: Exception) -> str:
    if isinstance(error, WebhookVerificationError):
        return str(error)
    return "malformed signature header or body"


def _event(body: bytes) -> dict:
    """The signed body as a Clerk event: an object with a ``type`` and, for user events, a ``data`` object."""
    try:
        event = json.loads(body)
    except ValueError:
        raise InvalidEvent("The webhook body is not JSON.") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise InvalidEvent("The webhook body is not a Clerk event (no type).")
    if event["type"] in USER_EVENTS and not isinstance(event.get("data"), dict):
        raise InvalidEvent("The webhook event has no data object.")
    return event


def _apply(event_type: str, data: dict) -> clerk_sync.Change | None:
    if event_type == "user.deleted":
        clerk_user_id = data.get("id")
        if not isinstance(clerk_user_id, str) or not clerk_user_id:
            raise InvalidEvent("The user.deleted event names no user.")
        return clerk_sync.apply_deleted(clerk_user_id, data.get("external_id"))
    return clerk_sync.apply_user(data)


def _already_applied(svix_id: str) -> bool:
    try:
        found = db.session.get(ClerkWebhookDelivery, svix_id) is not None
        db.session.rollback()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        raise DatabaseUnavailable() from error
    return found


def _record(svix_id: str, event_type: str) -> None:
    """Remember the delivery. If that fails the change stands, and a retry applies it again, harmlessly."""
    try:
        db.session.add(ClerkWebhookDelivery(svix_id=svix_id, event_type=event_type[:100]))
        db.session.commit()
    except sa.exc.IntegrityError:
        db.session.rollback()  # a copy of the same delivery got here first
    except DATABASE_UNREACHABLE:
        db.session.rollback()
        log.warning("clerk webhook %s applied but not recorded; a retry applies it again", svix_id)
