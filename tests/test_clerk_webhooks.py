"""POST /api/v1/webhooks/clerk: the signature gate, and what each Clerk user event does to the rows.

Deliveries are signed here exactly as Svix signs them (standardwebhooks, the library Svix's own package
wraps), and posted to the app; the user objects in them are real ones from the Clerk stand-in's Backend API.
Where the app must ask Clerk (an address held by another account), it asks the stand-in over HTTP.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from iris.extensions import db
from tests.helpers import (
    BAPI_HEADERS,
    PASSWORD,
    URL,
    assert_error,
    create_clerk_user,
    expire_leases,
    migrate,
    register,
    svix_headers,
)

HOOK = "/api/v1/webhooks/clerk"


def event(kind: str, data: dict) -> dict:
    return {
        "data": data,
        "object": "event",
        "type": kind,
        "timestamp": int(time.time() * 1000),
        "instance_id": "ins_standin",
        "event_attributes": {"http_request": {"client_ip": "", "user_agent": ""}},
    }


def deliver(client, payload: dict, *, svix_id: str | None = None, **signing):
    body = json.dumps(payload)
    headers = svix_headers(body, svix_id=svix_id or "msg_" + secrets.token_hex(13), **signing)
    return client.post(HOOK, data=body, headers={**headers, "Content-Type": "application/json"})


def changed(
    user: dict, *, email: str | None = None, verified: bool | None = None, later_ms: int = 1000
) -> dict:
    """``user`` as Clerk would show it after a change: its primary address moved to ``email`` and/or marked
    (un)verified, ``updated_at`` ``later_ms`` later."""
    user = copy.deepcopy(user)
    [address] = [a for a in user["email_addresses"] if a["id"] == user["primary_email_address_id"]]
    if email is not None:
        address["email_address"] = email
    if verified is not None:
        address["verification"] = (
            {
                "object": "verification_admin",
                "status": "verified",
                "strategy": "admin",
                "attempts": None,
                "expire_at": None,
            }
            if verified
            else {
                "object": "verification_otp",
                "status": "unverified",
                "strategy": "email_code",
                "attempts": None,
                "expire_at": None,
            }
        )
    user["updated_at"] += later_ms
    return user


def account(app: Flask, clerk_user_id: str) -> sa.Row | None:
    """The row for a Clerk user, deleted or not: email, role, verified, deleted."""
    with app.app_context():
        found = db.session.execute(
            sa.text(
                "SELECT email, role, email_verified_at IS NOT NULL AS verified,"
                " deleted_at IS NOT NULL AS deleted FROM users WHERE clerk_user_id = :id"
            ),
            {"id": clerk_user_id},
        ).first()
        db.session.rollback()
        return found


def count(app: Flask, table: str) -> int:
    with app.app_context():
        return db.session.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()  # noqa: S608


# --- The signature gate -------------------------------------------------------------------------------------


def test_a_user_made_in_clerks_dashboard_gets_an_account(app, client, standin):
    user = create_clerk_user(standin, "Walkin@Bistro.example")
    response = deliver(client, event("user.created", user))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json == {"outcome": "applied"}
    assert account(app, user["id"]) == ("walkin@bistro.example", "restaurant", True, False)


def test_a_bad_signature_is_400_and_changes_nothing(app, client, standin):
    user = create_clerk_user(standin, "walkin@bistro.example")
    body = json.dumps(event("user.created", user))
    good = svix_headers(body, svix_id="msg_1")
    other_secret = "whsec_" + "b3RoZXItc2VjcmV0LW90aGVyLXNlY3JldC0zMmJ5dGVz"
    cases = {
        "no headers": {},
        "no signature": {k: v for k, v in good.items() if k != "svix-signature"},
        "wrong secret": svix_headers(body, svix_id="msg_1", secret=other_secret),
        "another svix-id than signed": {**good, "svix-id": "msg_2"},
        "too old (301 s)": svix_headers(body, svix_id="msg_1", timestamp=int(time.time()) - 301),
        "too new (301 s)": svix_headers(body, svix_id="msg_1", timestamp=int(time.time()) + 301),
        "timestamp not a number": {**good, "svix-timestamp": "yesterday"},
        "entry without a version": {**good, "svix-signature": good["svix-signature"].split(",", 1)[1]},
        "not base64": {**good, "svix-signature": "v1,***"},
        "only another version": {**good, "svix-signature": "v2," + good["svix-signature"].split(",", 1)[1]},
    }
    for name, headers in cases.items():
        response = client.post(HOOK, data=body, headers={**headers, "Content-Type": "application/json"})
        assert response.status_code == 400, name
        assert_error(response, 400, "invalid_signature")
    tampered = body.replace("walkin@", "mallory@")
    response = client.post(HOOK, data=tampered, headers={**good, "Content-Type": "application/json"})
    assert_error(response, 400, "invalid_signature")
    assert account(app, user["id"]) is None
    assert count(app, "clerk_webhook_deliveries") == 0


def test_any_one_good_signature_of_several_verifies_as_during_secret_rotation(app, client, standin):
    user = create_clerk_user(standin, "walkin@bistro.example")
    body = json.dumps(event("user.created", user))
    old_secret = "whsec_" + "b2xkLXNlY3JldC1vbGQtc2VjcmV0LW9sZC0zMmJ5dGVz"
    old = svix_headers(body, svix_id="msg_rot", secret=old_secret)["svix-signature"]
    current = svix_headers(body, svix_id="msg_rot")
    header = {**current, "svix-signature": f"v1a,AAAA {old} {current['svix-signature']}"}
    response = client.post(HOOK, data=body, headers={**header, "Content-Type": "application/json"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert account(app, user["id"]) is not None


def test_without_a_signing_secret_the_endpoint_does_not_exist(make_app, standin):
    from tests.helpers import migrate

    app = make_app(CLERK_WEBHOOK_SIGNING_SECRET=None)
    migrate(app)
    user = create_clerk_user(standin, "walkin@bistro.example")
    assert_error(deliver(app.test_client(), event("user.created", user)), 404, "not_found")


def test_the_endpoint_needs_no_csrf_token_session_or_rate_allowance(make_app, standin):
    from tests.helpers import migrate

    app = make_app(WTF_CSRF_ENABLED=True, RATELIMIT_ENABLED=True, RATELIMIT_DEFAULT="2 per minute")
    migrate(app)
    client = app.test_client()
    for n in range(5):
        user = create_clerk_user(standin, f"walkin{n}@bistro.example")
        response = deliver(client, event("user.created", user))
        assert response.status_code == 200, response.get_data(as_text=True)
    assert count(app, "users") == 5


def test_a_signed_body_that_is_not_a_clerk_event_is_400(app, client):
    for payload in (
        {"type": "user.created"},
        {"data": {}},
        {"type": "user.updated", "data": {"id": "user_x"}},
    ):
        assert_error(deliver(client, payload), 400, "invalid_event")
    assert_error(deliver(client, {"type": "user.deleted", "data": {"deleted": True}}), 400, "invalid_event")


def test_other_event_types_are_acknowledged_and_ignored(app, client):
    response = deliver(client, event("session.created", {"id": "sess_1", "user_id": "user_1"}))
    assert response.status_code == 200
    assert response.json == {"outcome": "ignored"}


def test_a_delivery_is_applied_once_by_its_svix_id(app, client, standin):
    user = create_clerk_user(standin, "walkin@bistro.example")
    assert deliver(client, event("user.created", user), svix_id="msg_once").json == {"outcome": "applied"}
    # Svix's retry of the same message: acknowledged, not applied again (even if it differed).
    moved = changed(user, email="moved@bistro.example")
    again = deliver(client, event("user.updated", moved), svix_id="msg_once")
    assert again.status_code == 200 and again.json == {"outcome": "duplicate"}
    assert account(app, user["id"]).email == "walkin@bistro.example"


# --- What each event does -----------------------------------------------------------------------------------


def test_user_updated_moves_the_account_to_the_new_primary_address(app, client, standin):
    user = create_clerk_user(standin, "walkin@bistro.example")
    deliver(client, event("user.created", user))
    moved = changed(user, email="New@Bistro.example", verified=True)
    assert deliver(client, event("user.updated", moved)).json == {"outcome": "applied"}
    assert account(app, user["id"]) == ("new@bistro.example", "restaurant", True, False)


def test_an_address_clerk_says_is_unverified_unconfirms_the_account(app, client, standin):
    user = create_clerk_user(standin, "walkin@bistro.example")
    deliver(client, event("user.created", user))
    assert account(app, user["id"]).verified
    deliver(client, event("user.updated", changed(user, email="new@bistro.example", verified=False)))
    assert account(app, user["id"])[:3] == ("new@bistro.example", "restaurant", False)


def test_a_registrations_own_created_event_never_confirms_its_account(app, client, standin):
    """Clerk marks every address made through its Backend API verified; registration then marks it
    unverified. The created event carries the first state and must not confirm the row."""
    registered = register(client, "owner@bistro.example")
    [user] = requests.get(
        standin.api_url + "/users",
        params={"user_id": registered["clerk_user_id"]},
        headers=BAPI_HEADERS,
        timeout=5,
    ).json()
    as_created = changed(user, verified=True, later_ms=-1)  # the state before registration unverified it
    deliver(client, event("user.created", as_created))
    deliver(client, event("user.updated", user))
    assert account(app, user["id"]) == ("owner@bistro.example", "restaurant", False, False)


def test_an_older_state_than_the_row_reflects_changes_nothing(app, client, standin):
    user = create_clerk_user(standin, "walkin@bistro.example")
    deliver(client, event("user.created", user))
    newer, older = (
        changed(user, email="second@bistro.example", later_ms=2000),
        changed(user, email="first@bistro.example", later_ms=1000),
    )
    assert deliver(client, event("user.updated", newer)).json == {"outcome": "applied"}
    assert deliver(client, event("user.updated", older)).json == {"outcome": "unchanged"}
    assert account(app, user["id"]).email == "second@bistro.example"


def test_user_deleted_soft_deletes_and_no_late_event_brings_the_account_back(app, client, standin):
    user = create_clerk_user(standin, "walkin@bistro.example")
    deliver(client, event("user.created", user))
    requests.delete(
        f"{standin.api_url}/users/{user['id']}", headers=BAPI_HEADERS, timeout=5
    ).raise_for_status()
    gone = {"object": "user", "id": user["id"], "deleted": True}
    assert deliver(client, event("user.deleted", gone)).json == {"outcome": "applied"}
    assert account(app, user["id"]).deleted
    late = changed(user, email="late@bistro.example", later_ms=5000)
    assert deliver(client, event("user.updated", late)).json == {"outcome": "unchanged"}
    assert deliver(client, event("user.created", user)).json == {"outcome": "unchanged"}
    email, *rest = account(app, user["id"])  # deleted at Clerk: erased (iris.personal_data)
    assert email.startswith("erased:") and rest == ["restaurant", True, True]
    # The email is free again for a new account.
    assert client.post(URL, json={"email": "walkin@bistro.example", "password": PASSWORD}).status_code == 201


def test_a_deleted_event_before_any_other_keeps_the_user_from_ever_getting_an_account(app, client, standin):
    user = create_clerk_user(standin, "walkin@bistro.example")
    deliver(client, event("user.deleted", {"object": "user", "id": user["id"], "deleted": True}))
    assert deliver(client, event("user.created", user)).json == {"outcome": "unchanged"}
    assert account(app, user["id"]) is None


def test_user_deleted_finds_the_account_by_clerk_id_for_a_registered_user(app, client, standin):
    registered = register(client, "owner@bistro.example")
    gone = {
        "object": "user",
        "id": registered["clerk_user_id"],
        "deleted": True,
        "external_id": registered["id"],
    }
    deliver(client, event("user.deleted", gone))
    assert account(app, registered["clerk_user_id"]).deleted


def test_user_created_with_our_id_completes_a_pending_row_once_its_lease_ran_out(
    app, client, standin, schema
):
    with app.app_context():
        row_id = db.session.execute(
            sa.text(
                "INSERT INTO users (id, email, role, pending_owner, pending_until) VALUES (gen_random_uuid(),"
                " 'half@bistro.example', 'restaurant', gen_random_uuid(), now() + interval '1 hour')"
                " RETURNING id"
            )
        ).scalar_one()
        db.session.commit()
    user = create_clerk_user(standin, "half@bistro.example", external_id=str(row_id))
    # The registration in flight still holds the row: it completes it itself.
    assert deliver(client, event("user.created", user)).json == {"outcome": "unchanged"}
    assert account(app, user["id"]) is None
    expire_leases(app)  # it died: the event completes the row
    assert deliver(client, event("user.created", user)).json == {"outcome": "applied"}
    found = account(app, user["id"])
    assert found.email == "half@bistro.example" and not found.deleted


def test_a_user_carrying_our_id_with_no_row_is_not_made_an_account(app, client, standin):
    """A stray (a create that landed after its registration was settled): reconcile deletes it at Clerk."""
    user = create_clerk_user(
        standin, "stray@bistro.example", external_id="4b8b5a1e-0d0c-4c43-9f59-3f0b7c5f0d11"
    )
    assert deliver(client, event("user.created", user)).json == {"outcome": "unchanged"}
    assert count(app, "users") == 0


def test_an_address_held_by_an_account_whose_clerk_user_is_gone_is_freed(app, client, standin):
    first = create_clerk_user(standin, "shared@bistro.example")
    deliver(client, event("user.created", first))
    requests.delete(
        f"{standin.api_url}/users/{first['id']}", headers=BAPI_HEADERS, timeout=5
    ).raise_for_status()
    second = create_clerk_user(standin, "shared@bistro.example")  # the user.deleted has not arrived yet
    assert deliver(client, event("user.created", second)).json == {"outcome": "applied"}
    assert account(app, first["id"]).deleted
    assert account(app, second["id"]) == ("shared@bistro.example", "restaurant", True, False)


def test_an_address_held_by_a_registration_in_flight_is_deferred_with_503(app, client, standin):
    with app.app_context():
        db.session.execute(
            sa.text(
                "INSERT INTO users (id, email, role, pending_owner, pending_until) VALUES (gen_random_uuid(),"
                " 'busy@bistro.example', 'restaurant', gen_random_uuid(), now() + interval '1 hour')"
            )
        )
        db.session.commit()
    user = create_clerk_user(standin, "busy@bistro.example")
    response = deliver(client, event("user.created", user))
    assert_error(response, 503, "sync_deferred")
    assert response.headers["Retry-After"]
    assert count(app, "clerk_webhook_deliveries") == 0  # not recorded: Svix's retry applies it


def test_when_clerk_cannot_be_asked_about_a_conflict_the_answer_is_503(app, client, standin):
    first = create_clerk_user(standin, "shared@bistro.example")
    deliver(client, event("user.created", first))
    requests.delete(
        f"{standin.api_url}/users/{first['id']}", headers=BAPI_HEADERS, timeout=5
    ).raise_for_status()
    second = create_clerk_user(standin, "shared@bistro.example")
    standin.control.add_fault(method="GET", path="/v1/users/", action="status", status=503)
    response = deliver(client, event("user.created", second))
    assert response.status_code == 503
    assert account(app, second["id"]) is None
    standin.control.clear_faults()
    assert deliver(client, event("user.created", second)).status_code == 200  # Svix's retry
    assert account(app, second["id"]) is not None


@pytest.mark.parametrize("kind", ["user.created", "user.updated"])
def test_a_user_without_a_primary_address_gets_no_account(app, client, standin, kind):
    user = create_clerk_user(standin, "walkin@bistro.example")
    user["primary_email_address_id"] = None
    assert deliver(client, event(kind, user)).json == {"outcome": "unchanged"}
    assert count(app, "users") == 0


def test_on_sqlite_a_user_created_arriving_mid_registration_is_answered_not_a_500(
    make_app, standin, tmp_path
):
    """Development runs on SQLite, where Clerk's user.created usually arrives while the registration is still
    marking the address unverified. The event names the registration's pending row, which is still leased:
    it is acknowledged (the registration completes the row itself), never a 500 from comparing an aware
    timestamp with SQLite's offset-less one (the TypeError every `make run` registration logged)."""
    app = make_app(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/iris.sqlite3", SQLALCHEMY_ENGINE_OPTIONS={})
    migrate(app)
    held = standin.control.add_fault(method="PATCH", path="/v1/email_addresses/", action="hold", times=1)
    registering = ThreadPoolExecutor(max_workers=1)
    answer = registering.submit(
        app.test_client().post, URL, json={"email": "dev@bistro.example", "password": PASSWORD}
    )
    try:
        standin.control.wait_until_held(held["id"])  # Clerk has the user; the registration is not done
        [user] = requests.get(
            standin.api_url + "/users", params={"email_address": "dev@bistro.example"}, headers=BAPI_HEADERS,
            timeout=5,
        ).json()  # fmt: skip
        delivered = deliver(app.test_client(), event("user.created", user))
        assert delivered.status_code == 200, delivered.get_data(as_text=True)
        assert delivered.json == {"outcome": "unchanged"}
    finally:
        standin.control.release(held["id"])
        registered = answer.result(timeout=30)
        registering.shutdown()
    assert registered.status_code == 201, registered.get_data(as_text=True)
    assert registered.json["clerk_user_id"] == user["id"]
