"""POST /api/v1/auth/register: every row of the status table that can happen here, end to end.

Clerk is the stand-in over real HTTP; the database is real PostgreSQL. After every failure the tests check
that nothing was left behind: no row here and no user at Clerk.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import requests
import sqlalchemy as sa

from clerk_standin import DEFAULT_SECRET_KEY
from iris.extensions import db
from tests.helpers import (
    PASSWORD,
    URL,
    assert_error,
    assert_nothing_left,
    clerk_posts,
    clerk_users,
    expire_leases,
    migrate,
    password_works,
    rows,
)


def test_register_creates_the_clerk_user_and_the_row_pointing_at_each_other(app, client, standin):
    response = client.post(URL, json={"email": "owner@bistro.example", "password": PASSWORD})

    assert response.status_code == 201
    body = response.json
    assert set(body) == {"id", "email", "clerk_user_id", "role", "email_verified", "created_at", "updated_at"}
    assert body["email_verified"] is False
    assert body["email"] == "owner@bistro.example"
    assert body["role"] == "restaurant"
    assert response.headers["Location"] == f"/api/v1/users/{body['id']}"
    # Stockholm time, with the offset in force at the row's own instant (winter or summer time).
    created_at = datetime.fromisoformat(body["created_at"])
    assert body["created_at"] == created_at.astimezone(ZoneInfo("Europe/Stockholm")).isoformat()

    [row] = rows(app)
    assert str(row.id) == body["id"]
    assert row.clerk_user_id == body["clerk_user_id"]
    [clerk_user] = clerk_users(standin)
    assert clerk_user["id"] == body["clerk_user_id"]
    assert clerk_user["external_id"] == body["id"]
    assert clerk_user["email_addresses"][0]["email_address"] == "owner@bistro.example"
    assert clerk_user["password_enabled"] is True


def test_email_is_normalised_before_it_reaches_clerk_or_the_database(app, client, standin):
    response = client.post(URL, json={"email": "  Owner@Bistro.EXAMPLE ", "password": PASSWORD})
    assert response.status_code == 201
    assert response.json["email"] == "owner@bistro.example"
    assert rows(app)[0].email == "owner@bistro.example"
    assert clerk_users(standin)[0]["email_addresses"][0]["email_address"] == "owner@bistro.example"


def test_role_restaurant_may_be_given(client):
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD, "role": "restaurant"})
    assert response.status_code == 201
    assert response.json["role"] == "restaurant"


@pytest.mark.parametrize("role", ["admin", "owner", 7, None])
def test_roles_outside_iris_signup_roles_are_refused(app, client, standin, role):
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD, "role": role})
    error = assert_error(response, 422, "validation_error")
    assert error["details"] == [
        {"field": "role", "code": "role_not_allowed", "message": "Choose one of: restaurant."}
    ]
    assert clerk_posts(standin) == 0
    assert_nothing_left(app, standin)


def test_invalid_json_is_400(client):
    response = client.post(URL, data='{"email": ', content_type="application/json")
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("body", ["[]", '"text"', "null"])
def test_json_that_is_not_an_object_is_400(client, body):
    response = client.post(URL, data=body, content_type="application/json")
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_is_415(client, content_type):
    response = client.post(
        URL, data='{"email": "a@b.example"}', headers={"Content-Type": content_type} if content_type else {}
    )
    assert_error(response, 415, "unsupported_media_type")


def test_an_oversized_body_is_413(client, standin):
    response = client.post(
        URL, json={"email": "a@b.example", "password": "x" * 70_000}, content_type="application/json"
    )
    assert_error(response, 413, "payload_too_large")
    assert clerk_posts(standin) == 0


def test_missing_fields_are_all_reported_at_once(client, standin):
    error = assert_error(client.post(URL, json={}), 422, "validation_error")
    assert error["details"] == [
        {"field": "email", "code": "required", "message": "Enter your email address."},
        {"field": "password", "code": "required", "message": "Enter a password."},
    ]
    assert clerk_posts(standin) == 0


@pytest.mark.parametrize("email", ["not-an-email", "a@", "@b.example", "a b@c.example", 42, "a@b..example"])
def test_bad_email_is_422_and_never_reaches_clerk(client, standin, email):
    error = assert_error(
        client.post(URL, json={"email": email, "password": PASSWORD}), 422, "validation_error"
    )
    assert error["details"][0]["field"] == "email"
    assert error["details"][0]["code"] == "invalid_email" if isinstance(email, str) else "required"
    assert clerk_posts(standin) == 0


def test_email_validation_makes_no_dns_lookup(client, monkeypatch):
    import dns.resolver

    def no_dns(*args, **kwargs):
        raise AssertionError("DNS lookup attempted")

    monkeypatch.setattr(dns.resolver.Resolver, "resolve", no_dns)
    response = client.post(URL, json={"email": "owner@nxdomain-iris-7f3a.com", "password": PASSWORD})
    assert response.status_code == 201


def test_unknown_fields_are_rejected(client, standin):
    error = assert_error(
        client.post(URL, json={"email": "a@b.example", "password": PASSWORD, "is_admin": True}),
        422,
        "validation_error",
    )
    assert error["details"] == [
        {"field": "is_admin", "code": "unknown_field", "message": "This field is not accepted."}
    ]
    assert clerk_posts(standin) == 0


@pytest.mark.parametrize(
    ("password", "code", "message"),
    [
        ("short", "password_too_short", "Passwords must be 8 characters or more."),
        (
            "password123",
            "password_breached",
            "Password has been found in an online data breach. For account safety, please use a "
            "different password.",
        ),
    ],
)
def test_clerk_password_rules_come_back_on_the_password_field(app, client, standin, password, code, message):
    error = assert_error(
        client.post(URL, json={"email": "a@b.example", "password": password}), 422, "validation_error"
    )
    assert error["details"] == [{"field": "password", "code": code, "message": message}]
    assert clerk_posts(standin) == 1
    assert_nothing_left(app, standin)


def test_email_taken_locally_is_409_without_calling_clerk(app, client, standin):
    assert client.post(URL, json={"email": "a@b.example", "password": PASSWORD}).status_code == 201
    response = client.post(URL, json={"email": "A@B.example", "password": PASSWORD + "!"})
    assert_error(response, 409, "email_taken")
    assert clerk_posts(standin) == 1
    assert len(rows(app)) == 1


def test_email_taken_only_at_clerk_is_409_and_leaves_no_row(app, client, standin):
    requests.post(
        standin.api_url + "/users",
        json={"email_address": ["a@b.example"], "password": PASSWORD},
        headers={"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"},
        timeout=5,
    ).raise_for_status()
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert_error(response, 409, "email_taken")
    assert rows(app) == []
    assert len(clerk_users(standin)) == 1  # the other system's user is not ours to touch


def test_a_soft_deleted_account_frees_its_email(app, client, standin):
    first = client.post(URL, json={"email": "a@b.example", "password": PASSWORD}).json
    with app.app_context():
        db.session.execute(sa.text("UPDATE users SET deleted_at = now()"))
        db.session.commit()
    requests.delete(
        f"{standin.api_url}/users/{first['clerk_user_id']}",
        headers={"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"},
        timeout=5,
    ).raise_for_status()
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert response.status_code == 201
    assert response.json["id"] != first["id"]


def test_clerk_429_is_429_with_clerks_retry_after(app, client, standin):
    standin.control.add_fault(method="POST", path="/v1/users", status=429, retry_after=17, times=1)
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert_error(response, 429, "rate_limited")
    assert response.headers["Retry-After"] == "17"
    assert_nothing_left(app, standin)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_clerk_5xx_is_503_and_leaves_nothing(app, client, standin, status):
    """A 5xx in Clerk's own error envelope: Clerk's handling is over, and a lookup shows it stored nothing."""
    standin.control.add_fault(method="POST", path="/v1/users", status=status, times=1)
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert_error(response, 503, "auth_provider_unavailable")
    assert response.headers["Retry-After"]
    assert_nothing_left(app, standin)


@pytest.mark.parametrize(
    "fault", [{"action": "hang", "seconds": 3}, {"action": "drop"}], ids=["timeout", "dropped-connection"]
)
def test_a_lost_create_answer_keeps_the_email_until_the_create_can_no_longer_land(
    app, client, standin, fault
):
    """A timeout or a dropped connection is not a "no": Clerk may still store the user. The row stays pending
    (its lease as long as IRIS_PENDING_TIMEOUT_SECONDS) and the answer says when to come back."""
    standin.control.add_fault(method="POST", path="/v1/users", times=1, **fault)
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert_error(response, 503, "auth_provider_unavailable")
    timeout = app.config["IRIS_PENDING_TIMEOUT_SECONDS"]
    assert int(response.headers["Retry-After"]) == timeout + 1
    assert [row.clerk_user_id for row in rows(app)] == [None]
    assert clerk_users(standin) == []

    # Asking again before then: the email is held, and the answer says for how long.
    again = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    error = assert_error(again, 409, "email_taken")
    assert "in progress" in error["message"]
    assert 0 < int(again.headers["Retry-After"]) <= timeout + 1
    assert clerk_posts(standin) == 1

    # Once the create can no longer land, the next attempt settles the old one and succeeds.
    expire_leases(app)
    created = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert created.status_code == 201, created.json
    [clerk_user] = clerk_users(standin)
    assert [(str(row.id), row.clerk_user_id) for row in rows(app)] == [(created.json["id"], clerk_user["id"])]


def test_a_gateway_5xx_in_front_of_clerk_is_a_lost_answer(app, client, standin):
    """A 502 page from a proxy in front of Clerk (no Clerk error envelope): Clerk may still be working on the
    create, so the email stays reserved as after a timeout."""
    standin.control.add_fault(method="POST", path="/v1/users", action="garbage", status=502, times=1)
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert_error(response, 503, "auth_provider_unavailable")
    assert int(response.headers["Retry-After"]) == app.config["IRIS_PENDING_TIMEOUT_SECONDS"] + 1
    assert [row.clerk_user_id for row in rows(app)] == [None]


def test_clerk_answering_garbage_is_502_and_leaves_nothing(app, client, standin):
    """A 2xx with an unreadable body: Clerk's handling is over, and a lookup shows it stored nothing."""
    standin.control.add_fault(method="POST", path="/v1/users", action="garbage", times=1)
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert_error(response, 502, "auth_provider_error")
    assert_nothing_left(app, standin)


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500},
        {"action": "drop"},
        {"action": "garbage"},
        {"action": "hang", "seconds": 3},
    ],
)
def test_clerk_creating_the_user_and_losing_the_answer_completes_the_registration(
    app, client, standin, fault
):
    """Clerk stored the user but its answer was lost: the lookup by external_id finds it, and the
    registration completes with it. The password given is the one that works."""
    standin.control.add_fault(method="POST", path="/v1/users", after_commit=True, times=1, **fault)
    response = client.post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert response.status_code == 201, response.json
    [clerk_user] = clerk_users(standin)
    assert clerk_user["external_id"] == response.json["id"]
    assert response.json["clerk_user_id"] == clerk_user["id"]
    assert [row.clerk_user_id for row in rows(app)] == [clerk_user["id"]]
    assert password_works(standin, clerk_user["id"], PASSWORD)
    assert "DELETE /v1/users/<user_id>" not in standin.control.stats()["requests"]


def test_wrong_clerk_secret_key_is_502(make_app, standin):
    app = make_app(CLERK_SECRET_KEY="sk_test_wrong")
    migrate(app)
    response = app.test_client().post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert_error(response, 502, "auth_provider_error")
    assert_nothing_left(app, standin)


def test_clerk_unreachable_is_503(make_app):
    app = make_app(CLERK_API_URL="http://127.0.0.1:1")
    migrate(app)
    response = app.test_client().post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert_error(response, 503, "auth_provider_unavailable")
    # The connection was refused: nothing reached Clerk, so the reservation is released at once.
    assert rows(app) == []


def test_database_down_is_503_and_clerk_is_never_called(make_app, standin):
    app = make_app(SQLALCHEMY_DATABASE_URI="postgresql+psycopg://postgres@127.0.0.1:1/x")
    response = app.test_client().post(URL, json={"email": "a@b.example", "password": PASSWORD})
    error = assert_error(response, 503, "database_unavailable")
    assert response.headers["Retry-After"] == "5"
    assert "127.0.0.1" not in error["message"]
    assert clerk_posts(standin) == 0
