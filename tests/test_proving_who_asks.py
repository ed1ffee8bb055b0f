"""Proving who is asking, from the attacker's side, through the API (design: "Proving who is asking" 2-4).

- **A cookie is not consent.** Every state-changing API route that authenticates refuses a request
  authorised by the ``__session`` cookie alone from an origin that is not Iris's own (403 ``csrf_failed``,
  nothing changed). The route list comes from ``app.url_map``, so a new route cannot be forgotten: routes
  that never authenticate are listed with the reason.
- **Destructive acts need a recent sign-in.** ``DELETE /api/v1/users/me`` and every admin write refuse a
  token whose ``fva`` is stale, absent or malformed (403 ``reverification_required`` with Clerk's own
  ``clerk_error`` body), with the row and the Clerk user untouched.
- **Impersonation.** A token with an ``act`` claim cannot delete the account; an admin write under ``act`` is
  audited as the impersonator's.
- **Unconfirmed accounts read, they do not act.** An admin whose address is not confirmed cannot act; any
  unconfirmed account can still read itself, ask for a new link and delete itself.

Tokens are minted by the Clerk stand-in over HTTP: real sessions (``fva: [0, -1]``) or, for the claims a
session does not give, signed by its control API with its current key. Real PostgreSQL.
"""

from __future__ import annotations

import uuid
from types import MappingProxyType
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from iris.extensions import db
from tests.helpers import (
    ME,
    assert_error,
    audit_events,
    bearer,
    claims,
    clerk_user_state,
    clerk_users,
    register,
    run_sql,
    session_token,
    signed_in_admin,
)

EVIL = "https://evil.example"
SIBLING = "https://evil.iris.test"  # a sibling subdomain: SameSite=Lax does not stop it
OWN = "https://iris.test"  # IRIS_PUBLIC_URL in the tests' app
# Clerk's own body for a failed step-up, as clerk-js's useReverification() recognises it.
CLERK_ERROR = MappingProxyType(
    {
        "type": "forbidden",
        "reason": "reverification-error",
        "metadata": {"reverification": {"level": "first_factor", "afterMinutes": 10}},
    }
)
IMPERSONATOR = "user_2impersonatorFromTheDashboard"

# State-changing API routes that never authenticate anyone, so no cookie can authorise them; each with why.
# Every other state-changing /api/ route must refuse a cross-origin cookie request.
NOT_AUTHENTICATED = MappingProxyType(
    {
        ("POST", "/api/v1/auth/register"): "creates an account from the body; no session is read",
        ("POST", "/api/v1/auth/verification-email"): "answers the same whoever asks; no session is read",
        ("POST", "/api/v1/webhooks/clerk"): "Clerk's Svix signature over the body is the credential",
    }
)
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def token(standin, sub: str, **changes: Any) -> str:
    """A session token for ``sub`` signed by the stand-in's current key, with Clerk's v2 claims changed by
    ``changes`` (None removes a claim). ``fva`` is fresh (``[0, -1]``) unless given."""
    return standin.control.sign(claims(sub, **{"fva": [0, -1], **changes}))


def snapshot(app: Flask, standin) -> tuple[list, list, list]:
    """Everything an attack could change: the users table, the audit trail, Clerk's users (ban included)."""
    with app.app_context():
        table = db.session.execute(
            sa.text("SELECT id, email, role, deleted_at, email_verified_at FROM users ORDER BY id")
        ).all()
    at_clerk = sorted((user["id"], user["banned"]) for user in clerk_users(standin))
    return table, audit_events(app), at_clerk


@pytest.fixture
def admin_and_owner(app, client, standin) -> tuple[dict, dict, dict]:
    """A confirmed admin (with a fresh session token's header) and a restaurant owner."""
    admin, headers = signed_in_admin(client, app, standin)
    owner = register(client, "owner@bistro.example")
    return admin, headers, owner


# ---- a cookie is not consent


def state_changing_api_routes(app: Flask) -> list[tuple[str, str]]:
    """(method, rule) of every state-changing route under /api/, from the app's URL map."""
    return sorted(
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/")
        for method in (rule.methods or set()) & STATE_CHANGING
    )


def test_the_routes_that_never_authenticate_are_exactly_those_listed(app):
    """A route listed as not authenticating must exist; anything else is walked below."""
    routes = state_changing_api_routes(app)
    assert set(NOT_AUTHENTICATED) <= set(routes)
    assert len(set(routes) - set(NOT_AUTHENTICATED)) >= 3  # DELETE /users/me and the admin writes at least


@pytest.mark.parametrize(
    "origin", [EVIL, SIBLING, "null", None], ids=["other-site", "sibling", "null", "none"]
)
@pytest.mark.parametrize("body", ["form", "json"])
def test_a_cross_origin_cookie_request_to_any_state_changing_route_is_refused(
    app, client, standin, admin_and_owner, origin, body
):
    admin, _, owner = admin_and_owner
    client.set_cookie("__session", token(standin, admin["clerk_user_id"]))
    before = snapshot(app, standin)
    walked = []
    for method, rule in state_changing_api_routes(app):
        if (method, rule) in NOT_AUTHENTICATED:
            continue
        path = rule.replace("<uuid:user_id>", owner["id"])
        assert "<" not in path, f"{rule}: give the walk a value for its parameter"
        headers = {"Origin": origin} if origin else {}
        if body == "form":  # what a plain HTML form on another site posts
            response = client.open(path, method=method, data={"confirm": "yes"}, headers=headers)
        else:
            response = client.open(path, method=method, json={"confirm": "yes"}, headers=headers)
        error = assert_error(response, 403, "csrf_failed")
        assert "origin" in error["message"].lower()
        walked.append((method, rule))
    assert walked
    assert snapshot(app, standin) == before


def test_a_same_origin_cookie_request_and_a_bearer_request_still_work(app, client, standin, admin_and_owner):
    admin, headers, owner = admin_and_owner
    client.set_cookie("__session", token(standin, admin["clerk_user_id"]))
    deactivate = f"/api/v1/users/{owner['id']}/deactivate"
    response = client.post(deactivate, headers={"Origin": OWN})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is True
    # A Bearer token is not sent by a browser on its own: no Origin needed, even with a foreign cookie.
    reactivate = f"/api/v1/users/{owner['id']}/reactivate"
    response = client.post(reactivate, headers={**headers, "Origin": EVIL})
    assert response.status_code == 200, response.get_data(as_text=True)
    # Reading with the cookie from anywhere stays as it was (a GET changes nothing).
    assert client.get(ME, headers={"Origin": EVIL}).status_code == 200


def test_an_authorized_party_is_iris_own_origin_too(make_app, standin):
    from tests.helpers import migrate

    app = make_app(CLERK_AUTHORIZED_PARTIES=["https://app.iris.test", "http://localhost:3000"])
    migrate(app)
    client = app.test_client()
    user = register(client)
    sub = user["clerk_user_id"]
    client.set_cookie("__session", token(standin, sub, azp="http://localhost:3000"))
    assert_error(client.delete(ME, headers={"Origin": "http://localhost:3001"}), 403, "csrf_failed")
    assert_error(
        client.delete(ME, headers={"Origin": "https://app.iris.test.evil.example"}), 403, "csrf_failed"
    )
    assert client.delete(ME, headers={"Origin": "http://localhost:3000"}).status_code == 204
    assert clerk_users(standin) == []


# ---- destructive acts need a recent sign-in

STALE = MappingProxyType(
    {
        "seven-days": {"fva": [10080, -1]},
        "just-over": {"fva": [10, -1]},
        "absent": {"fva": None},
        "never": {"fva": [-1, -1]},
        "not-a-list": {"fva": "0"},
        "empty": {"fva": []},
        "boolean": {"fva": [False, -1]},
        "fraction": {"fva": [0.5, -1]},
        "negative": {"fva": [-5, -1]},
    }
)


def destructive_requests(admin: dict, owner: dict) -> dict[str, tuple[str, str, dict]]:
    """name -> (method, path, whose token: the owner's own or the admin's)."""
    return {
        "delete-me": ("DELETE", ME, owner),
        "deactivate": ("POST", f"/api/v1/users/{owner['id']}/deactivate", admin),
        "reactivate": ("POST", f"/api/v1/users/{owner['id']}/reactivate", admin),
    }


@pytest.mark.parametrize("route", ["delete-me", "deactivate", "reactivate"])
@pytest.mark.parametrize("stale", STALE.values(), ids=STALE.keys())
def test_a_stale_or_absent_first_factor_age_is_403_reverification_required(
    app, client, standin, admin_and_owner, route, stale
):
    admin, _, owner = admin_and_owner
    if route == "reactivate":
        run_sql(app, "UPDATE users SET deleted_at = now() WHERE id = :id", id=owner["id"])
    method, path, whose = destructive_requests(admin, owner)[route]
    before = snapshot(app, standin)
    response = client.open(
        path, method=method, headers=bearer(token(standin, whose["clerk_user_id"], **stale))
    )
    error = assert_error(response, 403, "reverification_required")
    assert "sign in again" in error["message"].lower() or "password" in error["message"].lower()
    assert response.json["clerk_error"] == CLERK_ERROR
    assert set(response.json) == {"error", "clerk_error"}
    assert snapshot(app, standin) == before
    assert clerk_user_state(standin, owner["clerk_user_id"]) is not None


@pytest.mark.parametrize("route", ["delete-me", "deactivate", "reactivate"])
def test_a_sign_in_within_the_window_acts(app, client, standin, admin_and_owner, route):
    admin, _, owner = admin_and_owner
    method, path, whose = destructive_requests(admin, owner)[route]
    fresh = token(standin, whose["clerk_user_id"], fva=[9, -1])
    response = client.open(path, method=method, headers=bearer(fresh))
    assert response.status_code in (200, 204), response.get_data(as_text=True)


def test_iris_reverify_minutes_sets_the_window_and_0_switches_the_check_off(make_app, standin):
    from tests.helpers import migrate

    for minutes, age, allowed in ((60, 59, True), (60, 60, False), (0, 10080, True), (0, None, True)):
        app = make_app(IRIS_REVERIFY_MINUTES=minutes)
        migrate(app)
        client = app.test_client()
        user = register(client, f"m{minutes}-{age}@bistro.example")
        fva = None if age is None else [age, -1]
        response = client.delete(ME, headers=bearer(token(standin, user["clerk_user_id"], fva=fva)))
        if allowed:
            assert response.status_code == 204, (minutes, age, response.get_data(as_text=True))
        else:
            assert_error(response, 403, "reverification_required")
            # What clerk-js is asked to re-check is what Iris reads: the first factor, within the window.
            hint = response.json["clerk_error"]["metadata"]["reverification"]
            assert hint == {"level": "first_factor", "afterMinutes": minutes}


@pytest.mark.parametrize(
    ("text", "value"), [(None, 10), ("0", 0), ("1", 1), ("1440", 1440), (" 30 ", 30)], ids=str
)
def test_iris_reverify_minutes_is_read_from_the_environment(tmp_path, text, value):
    from iris import config

    environ = {} if text is None else {"IRIS_REVERIFY_MINUTES": text}
    settings = config.from_environment(environ, development=True, instance_path=str(tmp_path))
    assert settings["IRIS_REVERIFY_MINUTES"] == value


@pytest.mark.parametrize("text", ["-1", "ten", "1.5"])
def test_a_bad_iris_reverify_minutes_stops_start_up(tmp_path, text):
    from iris import config

    with pytest.raises(config.ConfigError, match="IRIS_REVERIFY_MINUTES"):
        config.from_environment(
            {"IRIS_REVERIFY_MINUTES": text}, development=True, instance_path=str(tmp_path)
        )


# ---- impersonation


def test_an_impersonation_token_cannot_delete_the_account(app, client, standin):
    owner = register(client)
    before = snapshot(app, standin)
    impersonated = token(standin, owner["clerk_user_id"], act={"sub": IMPERSONATOR})
    error = assert_error(client.delete(ME, headers=bearer(impersonated)), 403, "forbidden")
    assert "impersonat" in error["message"].lower()
    assert snapshot(app, standin) == before
    # Reading is fine under impersonation: that is what support staff do.
    assert client.get(ME, headers=bearer(impersonated)).status_code == 200


def test_an_admin_write_under_impersonation_is_audited_as_the_impersonators(
    app, client, standin, admin_and_owner
):
    admin, _, owner = admin_and_owner
    impersonated = bearer(token(standin, admin["clerk_user_id"], act={"sub": IMPERSONATOR}))
    response = client.post(f"/api/v1/users/{owner['id']}/deactivate", headers=impersonated)
    assert response.status_code == 200, response.get_data(as_text=True)
    [event] = audit_events(app)
    assert event.action == "deactivated"
    assert event.actor_name == f"impersonator:{IMPERSONATOR}"
    assert str(event.actor_id) == admin["id"]  # whose authority was used
    assert client.post(f"/api/v1/users/{owner['id']}/reactivate", headers=impersonated).status_code == 200
    assert [e.actor_name for e in audit_events(app)] == [f"impersonator:{IMPERSONATOR}"] * 2
    # Without act, the admin's own act names no one else.
    _, headers, _ = admin_and_owner
    client.post(f"/api/v1/users/{owner['id']}/deactivate", headers=headers)
    assert audit_events(app)[-1].actor_name is None


# ---- unconfirmed accounts read, they do not act


@pytest.mark.parametrize("action", ["deactivate", "reactivate"])
def test_an_admin_whose_address_is_not_confirmed_cannot_act(app, client, standin, admin_and_owner, action):
    admin, headers, owner = admin_and_owner
    run_sql(app, "UPDATE users SET email_verified_at = NULL WHERE id = :id", id=admin["id"])
    if action == "reactivate":
        run_sql(app, "UPDATE users SET deleted_at = now() WHERE id = :id", id=owner["id"])
    before = snapshot(app, standin)
    response = client.post(f"/api/v1/users/{owner['id']}/{action}", headers=headers)
    error = assert_error(response, 403, "email_unverified")
    assert "confirm" in error["message"].lower()
    assert snapshot(app, standin) == before
    # Listing (reading) is still allowed.
    assert client.get("/api/v1/users", headers=headers).status_code == 200


def test_with_verification_off_an_unconfirmed_admin_acts(make_app, standin):
    from tests.helpers import migrate

    app = make_app(IRIS_EMAIL_VERIFICATION="off")
    migrate(app)
    client = app.test_client()
    admin, headers = signed_in_admin(client, app, standin)
    run_sql(app, "UPDATE users SET email_verified_at = NULL WHERE id = :id", id=admin["id"])
    owner = register(client, "owner@bistro.example")
    assert client.post(f"/api/v1/users/{owner['id']}/deactivate", headers=headers).status_code == 200


def test_an_unconfirmed_account_reads_itself_asks_for_a_link_and_deletes_itself(app, client, standin):
    owner = register(client)
    assert owner["email_verified"] is False
    headers = bearer(session_token(standin, owner["clerk_user_id"], 600))
    assert client.get(ME, headers=headers).status_code == 200
    assert client.get(f"/api/v1/users/{owner['id']}", headers=headers).status_code == 200
    asked = client.post("/api/v1/auth/verification-email", json={"email": owner["email"]})
    assert asked.status_code == 202
    assert client.delete(ME, headers=headers).status_code == 204


def test_the_unknown_admin_target_is_still_404_before_any_other_refusal(
    app, client, standin, admin_and_owner
):
    """A restaurant owner probing the admin API learns nothing: 404 whatever their token says."""
    _, _, owner = admin_and_owner
    stale = bearer(token(standin, owner["clerk_user_id"], fva=None))
    response = client.post(f"/api/v1/users/{uuid.uuid4()}/deactivate", headers=stale)
    assert_error(response, 404, "not_found")
