"""GET /api/v1/users/me and /api/v1/users/<id>, and `flask iris token`, end to end.

Tokens come from the Clerk stand-in over real HTTP; accounts live in real PostgreSQL.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from zoneinfo import ZoneInfo

import requests
import sqlalchemy as sa

from iris.extensions import db
from tests.helpers import (
    BAPI_HEADERS,
    ME,
    PASSWORD,
    USER_JSON_FIELDS,
    assert_unauthorized,
    bearer,
    register,
    session_token,
)


def execute(app, sql: str, **params) -> None:
    with app.app_context():
        db.session.execute(sa.text(sql), params)
        db.session.commit()


def clerk_user(standin, email: str, external_id: str | None = None) -> dict:
    """A user created at Clerk directly, as another system (or a lost registration) would."""
    body = {"email_address": [email], "password": PASSWORD, "external_id": external_id}
    response = requests.post(standin.api_url + "/users", json=body, headers=BAPI_HEADERS, timeout=5)
    response.raise_for_status()
    return response.json()


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.json["error"]["code"] == code
    return response.json["error"]


# ---- /users/me


def test_me_is_the_signed_in_users_json(client, standin):
    user = register(client)
    response = client.get(ME, headers=bearer(session_token(standin, user["clerk_user_id"])))
    assert response.status_code == 200
    assert set(response.json) == USER_JSON_FIELDS
    assert response.json == user
    # IRIS_TIMEZONE (Europe/Stockholm by default), with the offset in force at the row's own instant.
    created_at = datetime.fromisoformat(response.json["created_at"])
    assert response.json["created_at"] == created_at.astimezone(ZoneInfo("Europe/Stockholm")).isoformat()


def test_me_without_a_token_is_401(client):
    assert_unauthorized(client.get(ME), token_given=False)


def test_a_deleted_account_is_403(app, client, standin):
    user = register(client)
    token = session_token(standin, user["clerk_user_id"])
    execute(app, "UPDATE users SET deleted_at = now()")
    error = assert_error(client.get(ME, headers=bearer(token)), 403, "forbidden")
    assert error["message"] == "This account has been deleted."


def test_a_clerk_user_without_an_iris_account_is_404_user_not_found(client, standin):
    outsider = clerk_user(standin, "outsider@elsewhere.example")
    response = client.get(ME, headers=bearer(session_token(standin, outsider["id"])))
    assert_error(response, 404, "user_not_found")


def test_a_pending_registration_never_matches_a_token(app, client, standin):
    """A row whose registration is still in flight has no clerk_user_id yet: it is nobody's account."""
    row_id = uuid.uuid4()
    execute(
        app,
        "INSERT INTO users (id, email, role, pending_until)"
        " VALUES (:id, 'late@bistro.example', 'restaurant', now())",
        id=row_id,
    )
    pending = clerk_user(standin, "late@bistro.example", external_id=str(row_id))
    response = client.get(ME, headers=bearer(session_token(standin, pending["id"])))
    assert_error(response, 404, "user_not_found")


# ---- /users/<id>


def test_the_location_of_a_registration_is_readable_by_its_user(client, standin):
    response = client.post("/api/v1/auth/register", json={"email": "a@b.example", "password": PASSWORD})
    location = response.headers["Location"]
    assert location == f"/api/v1/users/{response.json['id']}"
    token = session_token(standin, response.json["clerk_user_id"])
    assert client.get(location, headers=bearer(token)).json == response.json


def test_another_users_id_is_404_like_an_id_that_does_not_exist(client, standin):
    alice, bob = register(client, "alice@bistro.example"), register(client, "bob@bistro.example")
    token = session_token(standin, alice["clerk_user_id"])
    other = client.get(f"/api/v1/users/{bob['id']}", headers=bearer(token))
    missing = client.get(f"/api/v1/users/{uuid.uuid4()}", headers=bearer(token))
    assert_error(other, 404, "not_found")
    assert_error(missing, 404, "not_found")
    assert other.json["error"]["message"] == missing.json["error"]["message"]
    assert "bob" not in other.get_data(as_text=True)


def test_an_admin_may_read_any_complete_account(app, client, standin):
    admin, bob = register(client, "admin@iris.example"), register(client, "bob@bistro.example")
    execute(app, "UPDATE users SET role = 'admin' WHERE id = :id", id=admin["id"])
    token = session_token(standin, admin["clerk_user_id"])
    assert client.get(f"/api/v1/users/{bob['id']}", headers=bearer(token)).json == bob
    assert_error(client.get(f"/api/v1/users/{uuid.uuid4()}", headers=bearer(token)), 404, "not_found")
    pending_id = uuid.uuid4()
    execute(
        app,
        "INSERT INTO users (id, email, role, pending_until)"
        " VALUES (:id, 'p@bistro.example', 'restaurant', now())",
        id=pending_id,
    )
    assert_error(client.get(f"/api/v1/users/{pending_id}", headers=bearer(token)), 404, "not_found")
    execute(app, "UPDATE users SET deleted_at = now() WHERE id = :id", id=bob["id"])
    assert_error(client.get(f"/api/v1/users/{bob['id']}", headers=bearer(token)), 404, "not_found")


def test_reading_a_user_without_a_token_is_401_whether_or_not_the_id_exists(client):
    bob = register(client, "bob@bistro.example")
    assert_unauthorized(client.get(f"/api/v1/users/{bob['id']}"), token_given=False)
    assert_unauthorized(client.get(f"/api/v1/users/{uuid.uuid4()}"), token_given=False)


# ---- flask iris token


def test_flask_iris_token_prints_a_token_that_signs_the_user_in(client, runner, standin):
    user = register(client, "owner@bistro.example")
    result = runner.invoke(args=["iris", "token", "Owner@Bistro.example"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    token = result.stdout.strip()
    assert result.stdout == token + "\n"  # the token and nothing else, for TOKEN=$(flask iris token ...)
    assert client.get(ME, headers=bearer(token)).json == user


def test_flask_iris_token_for_an_unknown_email_exits_1_with_a_message(runner, standin):
    result = runner.invoke(args=["iris", "token", "nobody@bistro.example"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "No Clerk user has the email nobody@bistro.example" in result.stderr
    assert standin.control.stats()["requests"].get("POST /v1/sessions", 0) == 0


def test_flask_iris_token_says_why_when_clerk_refuses_sessions(client, runner, standin):
    register(client)
    standin.control.add_fault(
        method="POST",
        path="/v1/sessions",
        times=1,
        status=400,
        code="request_invalid_for_environment",
        message="Request only valid for development instances.",
    )
    result = runner.invoke(args=["iris", "token", "owner@bistro.example"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "Clerk refused to create a session" in result.stderr
    assert "Production instances" in result.stderr


def test_flask_iris_token_with_clerk_down_exits_1(client, runner, standin):
    register(client)
    standin.control.add_fault(method="GET", path="/v1/users", times=2, status=503)
    result = runner.invoke(args=["iris", "token", "owner@bistro.example"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "Clerk could not be asked for a token" in result.stderr
