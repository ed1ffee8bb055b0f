"""Accounts over their life, end to end through the API and the command line: self-service deletion,
deactivation and reactivation by admins, `flask iris promote`/`demote`, and the append-only audit trail.

Real PostgreSQL, the Clerk stand-in over real HTTP, its faults for every failure path (iris.accounts states
the guarantees proved here).
"""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from iris.extensions import db
from tests.helpers import (
    FAILING_SOFT_DELETE,
    ME,
    PASSWORD,
    REPAIRED_SOFT_DELETE,
    URL,
    assert_error,
    audit_events,
    bearer,
    clerk_user_state,
    clerk_users,
    register,
    rows,
    run_sql,
    session_token,
    signed_in_admin,
    wait_for,
)


def encode_cursor_for(created_at, user_id) -> str:
    """The cursor the API gives for the page after the account (created_at, user_id)."""
    from iris.accounts import encode_cursor
    from iris.models import User

    return encode_cursor(User(id=user_id, created_at=created_at))


def signed_in(client, standin, email: str = "owner@bistro.example") -> tuple[dict, dict]:
    user = register(client, email)
    return user, bearer(session_token(standin, user["clerk_user_id"], 600))


def row(app, user_id: str) -> sa.Row:
    with app.app_context():
        return db.session.execute(
            sa.text("SELECT email, role, deleted_at, email_verified_at FROM users WHERE id = :id"),
            {"id": user_id},
        ).one()


def deactivate(client, headers, user_id: str):
    return client.post(f"/api/v1/users/{user_id}/deactivate", headers=headers)


def reactivate(client, headers, user_id: str):
    return client.post(f"/api/v1/users/{user_id}/reactivate", headers=headers)


# ---- DELETE /api/v1/users/me


def test_deleting_your_account_deletes_the_clerk_user_soft_deletes_the_row_and_frees_the_email(
    app, client, standin
):
    user, headers = signed_in(client, standin)
    response = client.delete(ME, headers=headers)
    assert response.status_code == 204
    assert response.data == b""
    assert clerk_users(standin) == []
    assert row(app, user["id"]).deleted_at is not None
    event, erased = audit_events(app)
    assert (event.action, str(event.target_id), str(event.actor_id)) == (
        "account_deleted",
        user["id"],
        user["id"],
    )
    assert event.actor_name is None
    assert event.request_id == response.headers["X-Request-ID"]
    # Erased in the same transaction, by the same actor (tests/test_personal_data.py: no trace is left).
    assert (erased.action, erased.target_id, erased.actor_id) == ("erased", event.target_id, event.actor_id)
    # The token still verifies (Clerk tokens are checked locally), but the account is gone.
    assert_error(client.get(ME, headers=headers), 403, "forbidden")
    assert_error(client.delete(ME, headers=headers), 403, "forbidden")
    # The email is free again, at Clerk and here.
    again = register(client, "owner@bistro.example")
    assert again["id"] != user["id"]


def test_deleting_needs_a_token(client):
    response = client.delete(ME)
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize(
    "fault",
    [{"status": 503}, {"status": 500}, {"action": "hang", "seconds": 3}, {"action": "drop"}],
    ids=["503", "500", "timeout", "dropped"],
)
def test_clerk_failing_answers_503_and_changes_nothing_then_a_retry_deletes(app, client, standin, fault):
    user, headers = signed_in(client, standin)
    standin.control.add_fault(method="DELETE", path="/v1/users/", times=1, **fault)
    response = client.delete(ME, headers=headers)
    assert_error(response, 503, "auth_provider_unavailable")
    assert "Retry-After" in response.headers
    assert clerk_user_state(standin, user["clerk_user_id"]) is not None
    assert row(app, user["id"]).deleted_at is None
    assert audit_events(app) == []
    assert client.delete(ME, headers=headers).status_code == 204
    assert clerk_users(standin) == []
    assert [event.action for event in audit_events(app)] == ["account_deleted", "erased"]


def test_clerk_refusing_with_an_unusable_answer_is_502_and_changes_nothing(app, client, standin):
    user, headers = signed_in(client, standin)
    standin.control.add_fault(
        method="DELETE", path="/v1/users/", times=1, status=401, code="clerk_key_invalid"
    )
    assert_error(client.delete(ME, headers=headers), 502, "auth_provider_error")
    assert clerk_user_state(standin, user["clerk_user_id"]) is not None
    assert row(app, user["id"]).deleted_at is None


def test_a_delete_whose_answer_was_lost_after_it_landed_completes_at_once(app, client, standin):
    """Clerk deleted the user, then the connection dropped: the user is looked up, found gone, and the row
    follows in the same request."""
    user, headers = signed_in(client, standin)
    standin.control.add_fault(method="DELETE", path="/v1/users/", times=1, after_commit=True, action="drop")
    assert client.delete(ME, headers=headers).status_code == 204
    assert clerk_users(standin) == []
    assert row(app, user["id"]).deleted_at is not None


def test_a_lost_answer_that_cannot_be_looked_up_converges_on_retry(app, client, standin):
    user, headers = signed_in(client, standin)
    standin.control.add_fault(method="DELETE", path="/v1/users/", times=1, after_commit=True, action="drop")
    standin.control.add_fault(method="GET", path="/v1/users/", times=1, status=503)
    assert_error(client.delete(ME, headers=headers), 503, "auth_provider_unavailable")
    assert clerk_users(standin) == []  # Clerk did delete it
    assert row(app, user["id"]).deleted_at is None  # but Iris could not know yet
    assert client.delete(ME, headers=headers).status_code == 204  # Clerk answers 404: done
    assert row(app, user["id"]).deleted_at is not None
    assert [event.action for event in audit_events(app)] == ["account_deleted", "erased"]


def test_a_delete_that_lands_after_iris_gave_up_converges_on_retry(app, client, standin):
    """The DELETE reaches Clerk but is carried out only after Iris's read timeout (1.5 s in tests): the
    lookup still finds the user, so nothing changes here; once it has landed, a retry completes."""
    user, headers = signed_in(client, standin)
    standin.control.add_fault(method="DELETE", path="/v1/users/", times=1, latency_ms=2500)
    assert_error(client.delete(ME, headers=headers), 503, "auth_provider_unavailable")
    assert row(app, user["id"]).deleted_at is None
    wait_for(lambda: clerk_user_state(standin, user["clerk_user_id"]) is None)
    assert client.delete(ME, headers=headers).status_code == 204
    assert row(app, user["id"]).deleted_at is not None


def test_the_database_failing_after_clerk_deleted_answers_503_and_a_retry_completes(app, client, standin):
    user, headers = signed_in(client, standin, "fails@b.example")
    run_sql(app, FAILING_SOFT_DELETE)
    response = client.delete(ME, headers=headers)
    assert_error(response, 503, "database_unavailable")
    assert "Retry-After" in response.headers
    assert clerk_users(standin) == []
    assert row(app, user["id"]).deleted_at is None
    assert audit_events(app) == []  # the record goes with the change, or not at all

    run_sql(app, REPAIRED_SOFT_DELETE)
    assert client.delete(ME, headers=headers).status_code == 204
    assert row(app, user["id"]).deleted_at is not None
    assert [event.action for event in audit_events(app)] == ["account_deleted", "erased"]


# ---- deactivate and reactivate


def test_an_admin_deactivates_an_account_ban_first_then_the_row(app, client, standin):
    admin, admin_headers = signed_in_admin(client, app, standin)
    owner, owner_headers = signed_in(client, standin)
    response = deactivate(client, admin_headers, owner["id"])
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.json
    assert body["id"] == owner["id"] and body["deleted_at"] is not None
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is True
    assert row(app, owner["id"]).deleted_at is not None
    assert_error(client.get(ME, headers=owner_headers), 403, "forbidden")
    [event] = audit_events(app)
    assert (event.action, str(event.target_id), str(event.actor_id)) == (
        "deactivated",
        owner["id"],
        admin["id"],
    )
    assert event.request_id == response.headers["X-Request-ID"]
    # The banned Clerk user keeps the email: nobody else can register it while it may be reactivated.
    assert_error(client.post(URL, json={"email": owner["email"], "password": PASSWORD}), 409, "email_taken")

    # Idempotent: again is 200, banned again, nothing more recorded.
    again = deactivate(client, admin_headers, owner["id"])
    assert again.status_code == 200
    assert again.json["deleted_at"] == body["deleted_at"]
    assert len(audit_events(app)) == 1


def test_an_admin_reactivates_an_account_row_first_then_the_unban(app, client, standin):
    admin, admin_headers = signed_in_admin(client, app, standin)
    owner, _ = signed_in(client, standin)
    deactivate(client, admin_headers, owner["id"])
    response = reactivate(client, admin_headers, owner["id"])
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["deleted_at"] is None
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is False
    assert row(app, owner["id"]).deleted_at is None
    fresh = bearer(session_token(standin, owner["clerk_user_id"]))
    assert client.get(ME, headers=fresh).status_code == 200
    assert [(event.action, str(event.actor_id)) for event in audit_events(app)] == [
        ("deactivated", admin["id"]),
        ("reactivated", admin["id"]),
    ]
    # Idempotent: a live account is unbanned again, nothing recorded.
    assert reactivate(client, admin_headers, owner["id"]).status_code == 200
    assert len(audit_events(app)) == 2


def test_an_admin_cannot_deactivate_themselves(app, client, standin):
    admin, admin_headers = signed_in_admin(client, app, standin)
    error = assert_error(deactivate(client, admin_headers, admin["id"]), 409, "cannot_deactivate_self")
    assert "another admin" in error["message"].lower()
    assert clerk_user_state(standin, admin["clerk_user_id"])["banned"] is False
    assert row(app, admin["id"]).deleted_at is None
    assert audit_events(app) == []


@pytest.mark.parametrize("fault", [{"status": 503}, {"action": "hang", "seconds": 3}], ids=["503", "timeout"])
def test_deactivating_while_clerk_fails_changes_nothing(app, client, standin, fault):
    _, admin_headers = signed_in_admin(client, app, standin)
    owner, _ = signed_in(client, standin)
    standin.control.add_fault(method="POST", path=f"/v1/users/{owner['clerk_user_id']}/ban", times=1, **fault)
    assert_error(deactivate(client, admin_headers, owner["id"]), 503, "auth_provider_unavailable")
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is False
    assert row(app, owner["id"]).deleted_at is None
    assert audit_events(app) == []


def test_a_ban_whose_answer_was_lost_after_it_landed_completes(app, client, standin):
    _, admin_headers = signed_in_admin(client, app, standin)
    owner, _ = signed_in(client, standin)
    path = f"/v1/users/{owner['clerk_user_id']}/ban"
    standin.control.add_fault(method="POST", path=path, times=1, after_commit=True, action="drop")
    assert deactivate(client, admin_headers, owner["id"]).status_code == 200
    assert row(app, owner["id"]).deleted_at is not None


def test_the_database_failing_after_the_ban_answers_503_and_a_retry_completes(app, client, standin):
    _, admin_headers = signed_in_admin(client, app, standin)
    owner, _ = signed_in(client, standin, "fails@b.example")
    run_sql(app, FAILING_SOFT_DELETE)
    assert_error(deactivate(client, admin_headers, owner["id"]), 503, "database_unavailable")
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is True  # cannot sign in meanwhile
    assert row(app, owner["id"]).deleted_at is None
    run_sql(app, REPAIRED_SOFT_DELETE)
    assert deactivate(client, admin_headers, owner["id"]).status_code == 200
    assert [event.action for event in audit_events(app)] == ["deactivated"]


def test_reactivating_an_email_taken_meanwhile_is_409_and_changes_nothing(app, client, standin):
    _, admin_headers = signed_in_admin(client, app, standin)
    owner, _ = signed_in(client, standin)
    deactivate(client, admin_headers, owner["id"])
    before = row(app, owner["id"])
    run_sql(
        app,
        "INSERT INTO users (id, email, role, pending_until) VALUES (:id, :email, 'restaurant', now())",
        id=uuid.uuid4(),
        email=owner["email"],
    )
    error = assert_error(reactivate(client, admin_headers, owner["id"]), 409, "email_taken")
    assert "Nothing was changed" in error["message"]
    assert row(app, owner["id"]) == before
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is True
    assert [event.action for event in audit_events(app)] == ["deactivated"]


@pytest.mark.parametrize("fault", [{"status": 503}, {"action": "hang", "seconds": 3}], ids=["503", "timeout"])
def test_an_unban_that_fails_soft_deletes_the_row_again_and_a_retry_completes(app, client, standin, fault):
    _, admin_headers = signed_in_admin(client, app, standin)
    owner, _ = signed_in(client, standin)
    deactivate(client, admin_headers, owner["id"])
    before = row(app, owner["id"])
    standin.control.add_fault(
        method="POST", path=f"/v1/users/{owner['clerk_user_id']}/unban", times=1, **fault
    )
    assert_error(reactivate(client, admin_headers, owner["id"]), 503, "auth_provider_unavailable")
    assert row(app, owner["id"]) == before  # deleted again, at the same instant as before
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is True
    assert [event.action for event in audit_events(app)] == [
        "deactivated",
        "reactivated",
        "reactivation_undone",
    ]
    assert reactivate(client, admin_headers, owner["id"]).status_code == 200
    assert row(app, owner["id"]).deleted_at is None
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is False


def test_reactivating_an_account_its_owner_deleted_is_409_erased_and_changes_nothing(app, client, standin):
    _, admin_headers = signed_in_admin(client, app, standin)
    owner, owner_headers = signed_in(client, standin)
    assert client.delete(ME, headers=owner_headers).status_code == 204  # the owner deleted it themselves
    before = row(app, owner["id"])
    error = assert_error(reactivate(client, admin_headers, owner["id"]), 409, "account_erased")
    assert "cannot be reactivated" in error["message"]
    assert row(app, owner["id"]) == before
    assert [event.action for event in audit_events(app)] == ["account_deleted", "erased"]


def test_a_clerk_user_gone_between_the_check_and_the_unban_is_undone_and_409(app, client, standin):
    _, admin_headers = signed_in_admin(client, app, standin)
    owner, _ = signed_in(client, standin)
    deactivate(client, admin_headers, owner["id"])
    before = row(app, owner["id"])
    standin.control.add_fault(
        method="POST",
        path=f"/v1/users/{owner['clerk_user_id']}/unban",
        times=1,
        status=404,
        code="resource_not_found",
    )
    assert_error(reactivate(client, admin_headers, owner["id"]), 409, "clerk_user_deleted")
    assert row(app, owner["id"]) == before
    assert [event.action for event in audit_events(app)][-1] == "reactivation_undone"


def test_the_admin_api_is_404_for_everyone_but_admins_and_401_without_a_token(app, client, standin):
    owner, owner_headers = signed_in(client, standin)
    other, _ = signed_in(client, standin, "other@bistro.example")
    for response in (
        client.get("/api/v1/users", headers=owner_headers),
        client.get("/api/v1/users?limit=0&bogus=1", headers=owner_headers),
        deactivate(client, owner_headers, other["id"]),
        reactivate(client, owner_headers, other["id"]),
        deactivate(client, owner_headers, owner["id"]),
    ):
        assert_error(response, 404, "not_found")
    assert_error(client.get("/api/v1/users"), 401, "unauthorized")
    assert_error(client.post(f"/api/v1/users/{other['id']}/deactivate"), 401, "unauthorized")
    assert clerk_user_state(standin, other["clerk_user_id"])["banned"] is False
    assert audit_events(app) == []


def test_unknown_ids_pending_registrations_and_bad_uuids_are_404_for_admins(app, client, standin):
    _, admin_headers = signed_in_admin(client, app, standin)
    pending = uuid.uuid4()
    run_sql(
        app,
        "INSERT INTO users (id, email, role, pending_until) VALUES (:id, 'p@b.example', 'restaurant', now())",
        id=pending,
    )
    for target in (str(uuid.uuid4()), str(pending), "not-a-uuid", "1"):
        assert_error(deactivate(client, admin_headers, target), 404, "not_found")
        assert_error(reactivate(client, admin_headers, target), 404, "not_found")


# ---- GET /api/v1/users


def listing(client, headers, **params) -> dict:
    response = client.get("/api/v1/users", headers=headers, query_string=params)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def walk(client, headers, **params) -> list[str]:
    """Every page from the first to the last; the emails in order."""
    emails, cursor = [], None
    while True:
        page = listing(client, headers, **params, **({"cursor": cursor} if cursor else {}))
        emails += [user["email"] for user in page["users"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return emails


@pytest.fixture
def population(app, client, standin) -> dict:
    """An admin, seven restaurant accounts (two sharing one created_at instant, one unconfirmed, one
    deleted) and one pending registration, with known creation instants."""
    _, headers = signed_in_admin(client, app, standin, "boss@iris.example")
    emails = [f"r{number}@bistro.example" for number in range(1, 7)] + ["solo@cafe.example"]
    for email in emails:
        register(client, email)
    run_sql(app, "UPDATE users SET email_verified_at = now() WHERE email <> 'r6@bistro.example'")
    for number, email in enumerate(["boss@iris.example", *emails]):
        run_sql(
            app,
            "UPDATE users SET created_at = timestamptz '2026-01-01 12:00+00' + :n * interval '1 hour'"
            " WHERE email = :email",
            n=min(number, 5),  # r5, r6 and solo share one instant: the id breaks the tie
            email=email,
        )
    run_sql(app, "UPDATE users SET deleted_at = now() WHERE email = 'r2@bistro.example'")
    run_sql(
        app,
        "INSERT INTO users (id, email, role, pending_until) VALUES (:id, 'half@bistro.example', 'restaurant',"
        " now())",
        id=uuid.uuid4(),
    )
    return {"headers": headers}


def test_admins_list_live_complete_accounts_newest_first(client, population):
    page = listing(client, population["headers"])
    emails = [user["email"] for user in page["users"]]
    assert emails[-4:] == ["r4@bistro.example", "r3@bistro.example", "r1@bistro.example", "boss@iris.example"]
    assert set(emails[:3]) == {"r5@bistro.example", "r6@bistro.example", "solo@cafe.example"}
    assert page["next_cursor"] is None
    assert all(user["deleted_at"] is None for user in page["users"])
    assert "half@bistro.example" not in emails  # a registration in flight is not an account yet


def test_paging_walks_every_account_once_whatever_the_page_size(client, population):
    everything = walk(client, population["headers"], limit=100)
    assert len(everything) == 7
    for limit in (1, 2, 3):
        assert walk(client, population["headers"], limit=limit) == everything


def test_paging_is_stable_under_concurrent_inserts(app, client, standin, population):
    headers = population["headers"]
    expected = walk(client, headers)
    seen, cursor = [], None
    for round_number in range(10):
        page = listing(client, headers, limit=2, **({"cursor": cursor} if cursor else {}))
        seen += [user["email"] for user in page["users"]]
        register(client, f"new{round_number}@bistro.example")  # arrives between two pages
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected


def test_filters(client, population):
    headers = population["headers"]
    assert walk(client, headers, q="CAFE") == ["solo@cafe.example"]
    assert walk(client, headers, q="%") == []  # a plain substring, not a pattern
    assert walk(client, headers, role="admin") == ["boss@iris.example"]
    assert walk(client, headers, verified="false") == ["r6@bistro.example"]
    assert "r6@bistro.example" not in walk(client, headers, verified="true")
    with_deleted = listing(client, headers, include_deleted="true", q="r2@")["users"]
    assert [(user["email"], user["deleted_at"] is not None) for user in with_deleted] == [
        ("r2@bistro.example", True)
    ]
    assert len(walk(client, headers, include_deleted="true")) == 8
    assert walk(client, headers, q="", role="") == walk(client, headers)  # empty counts as absent


@pytest.mark.parametrize(
    ("query", "problems"),
    [
        ("limit=0", {("limit", "out_of_range")}),
        ("limit=101", {("limit", "out_of_range")}),
        ("limit=ten", {("limit", "out_of_range")}),
        ("limit=%D9%A3", {("limit", "out_of_range")}),  # an Arabic-Indic digit is no limit
        ("cursor=abc", {("cursor", "invalid_cursor")}),
        ("cursor=" + "A" * 300, {("cursor", "invalid_cursor")}),
        ("cursor=WyJ4IiwieSJd", {("cursor", "invalid_cursor")}),  # ["x","y"]
        ("cursor=WyIyMDI2LTAxLTAxVDAwOjAwOjAwIiwiMSJd", {("cursor", "invalid_cursor")}),  # no offset
        ("cursor=%2F%2F", {("cursor", "invalid_cursor")}),
        ("role=owner", {("role", "invalid_value")}),
        ("verified=yes", {("verified", "invalid_value")}),
        ("include_deleted=1", {("include_deleted", "invalid_value")}),
        ("q=a%00b", {("q", "invalid_value")}),
        ("q=" + "a" * 321, {("q", "invalid_value")}),
        ("page=2", {("page", "unknown_parameter")}),
        ("role=admin&role=restaurant", {("role", "repeated_parameter")}),
        (
            "limit=0&role=x&sort=email",
            {("limit", "out_of_range"), ("role", "invalid_value"), ("sort", "unknown_parameter")},
        ),
    ],
)
def test_every_bad_parameter_is_a_422_naming_it(client, population, query, problems):
    response = client.get(f"/api/v1/users?{query}", headers=population["headers"])
    error = assert_error(response, 422, "validation_error")
    assert {(detail["field"], detail["code"]) for detail in error["details"]} == problems


# ---- the audit trail is append-only


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_events SET action = 'promoted'", "DELETE FROM audit_events", "TRUNCATE audit_events"],
)
def test_the_audit_trail_cannot_be_changed_or_removed_in_postgresql(app, client, standin, statement):
    _, headers = signed_in(client, standin)
    client.delete(ME, headers=headers)
    with app.app_context(), pytest.raises(sa.exc.DBAPIError, match="audit_events is append-only"):
        db.session.execute(sa.text(statement))
    assert [event.action for event in audit_events(app)] == ["account_deleted", "erased"]


def test_the_audit_trail_is_append_only_on_sqlite_too(tmp_path):
    import flask_migrate

    from iris import create_app

    app = create_app(
        {"TESTING": True, "SECRET_KEY": "k", "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/d.db"}
    )
    with app.app_context():
        flask_migrate.upgrade()
        db.session.execute(
            sa.text(
                "INSERT INTO audit_events (id, action, target_id, actor_name)"
                " VALUES ('1', 'promoted', '2', 'cli:x')"
            )
        )
        db.session.commit()
        for statement in ("UPDATE audit_events SET action = 'demoted'", "DELETE FROM audit_events"):
            with pytest.raises(sa.exc.DBAPIError, match="audit_events is append-only"):
                db.session.execute(sa.text(statement))
            db.session.rollback()
        assert db.session.execute(sa.text("SELECT action FROM audit_events")).scalars().all() == ["promoted"]
        db.engine.dispose()


# ---- flask iris promote / demote


def iris(app, *args: str):
    return app.test_cli_runner().invoke(args=["iris", *args])


def test_promote_makes_a_confirmed_account_an_admin_and_records_who(app, client, standin, caplog):
    owner, _ = signed_in(client, standin)
    run_sql(app, "UPDATE users SET email_verified_at = now()")
    with caplog.at_level("INFO", logger="iris.accounts"):
        result = iris(app, "promote", "  Owner@Bistro.example ")
    assert result.exit_code == 0, result.output
    assert result.stdout == "owner@bistro.example is an admin now.\n"
    assert row(app, owner["id"]).role == "admin"
    [event] = audit_events(app)
    assert (event.action, str(event.target_id), event.actor_id, event.request_id) == (
        "promoted",
        owner["id"],
        None,
        None,
    )
    assert event.actor_name.startswith("cli:") and len(event.actor_name) > 4
    [line] = [record.getMessage() for record in caplog.records if record.name == "iris.accounts"]
    assert line == f"account {owner['id']} promoted (restaurant -> admin) by {event.actor_name}"
    assert owner["clerk_user_id"] not in caplog.text

    # The new admin can use the admin API at once.
    headers = bearer(session_token(standin, owner["clerk_user_id"]))
    assert client.get("/api/v1/users", headers=headers).status_code == 200

    again = iris(app, "promote", "owner@bistro.example")
    assert (again.exit_code, again.stdout) == (
        0,
        "owner@bistro.example is already an admin; nothing changed.\n",
    )
    assert len(audit_events(app)) == 1


def test_promote_refuses_what_is_not_a_live_confirmed_account(app, client, standin):
    register(client, "unconfirmed@bistro.example")
    gone = register(client, "gone@bistro.example")
    run_sql(
        app, "UPDATE users SET email_verified_at = now(), deleted_at = now() WHERE id = :id", id=gone["id"]
    )
    run_sql(
        app,
        "INSERT INTO users (id, email, role, pending_until)"
        " VALUES (:id, 'half@b.example', 'restaurant', now())",
        id=uuid.uuid4(),
    )
    cases = {
        "nobody@bistro.example": "Error: No live account has the email address nobody@bistro.example.\n",
        "gone@bistro.example": "Error: No live account has the email address gone@bistro.example.\n",
        "half@b.example": "Error: The account half@b.example is a registration still in progress;"
        " it cannot be promoted yet.\n",
        "unconfirmed@bistro.example": "Error: The account unconfirmed@bistro.example has not confirmed"
        " its email address; only a confirmed account can be promoted.\n",
    }
    for email, message in cases.items():
        result = iris(app, "promote", email)
        assert (result.exit_code, result.stdout, result.stderr) == (1, "", message)
    assert {row.role for row in rows(app)} == {"restaurant"}
    assert audit_events(app) == []


def test_demote_makes_an_admin_a_restaurant_account_again(app, client, standin):
    admin, _ = signed_in_admin(client, app, standin)
    result = iris(app, "demote", "admin@iris.example")
    assert (result.exit_code, result.stdout) == (
        0,
        "admin@iris.example is no longer an admin (role restaurant).\n",
    )
    assert row(app, admin["id"]).role == "restaurant"
    assert [event.action for event in audit_events(app)] == ["demoted"]
    again = iris(app, "demote", "admin@iris.example")
    assert (again.exit_code, again.stdout) == (
        0,
        "admin@iris.example is already not an admin; nothing changed.\n",
    )
    missing = iris(app, "demote", "nobody@iris.example")
    assert (missing.exit_code, missing.stderr) == (
        1,
        "Error: No live account has the email address nobody@iris.example.\n",
    )


# ---- the listing on 100,000 rows: its query plan


def plan_nodes(plan: dict) -> list[dict]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first."""
    nodes, pending = [], [plan]
    while pending:
        node = pending.pop()
        nodes.append(node)
        pending.extend(node.get("Plans", []))
    return nodes


@pytest.mark.slow  # writes 100,000 rows
def test_the_listing_reads_its_index_from_the_cursor_on_100000_rows(
    app, client, standin, admin_engine, schema
):
    """The statements the endpoint really runs, explained with ANALYZE on 100,000 accounts (2 % deleted,
    10 % unconfirmed): the first page and a page 90,000 rows deep are each one backward scan of
    ix_users_created_at_id that starts at the cursor and stops after the page, with no sort and no
    sequential scan."""
    _, headers = signed_in_admin(client, app, standin)
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'SET LOCAL search_path = "{schema}"'))
        connection.execute(
            sa.text(
                "INSERT INTO users"
                " (id, email, clerk_user_id, role, created_at, email_verified_at, deleted_at)"
                " SELECT gen_random_uuid(), 'owner' || n || '@bistro' || (n % 997) || '.example',"
                " 'user_bulk_' || n, CASE WHEN n % 5000 = 0 THEN 'admin' ELSE 'restaurant' END,"
                " timestamptz '2020-01-01 00:00+00' + n * interval '1 minute',"
                " CASE WHEN n % 10 = 0 THEN NULL ELSE now() END, CASE WHEN n % 50 = 0 THEN now() END"
                " FROM generate_series(1, 100000) AS n"
            )
        )
        connection.execute(sa.text("ANALYZE users"))
    with app.app_context():
        deep = db.session.execute(
            sa.text("SELECT id, created_at FROM users WHERE clerk_user_id = 'user_bulk_10000'")
        ).one()
        db.session.rollback()
    deep_cursor = encode_cursor_for(deep.created_at, deep.id)

    statements: list[tuple[str, dict]] = []

    def capture(connection, cursor, statement, parameters, context, executemany) -> None:
        if "FROM users" in statement and "ORDER BY users.created_at DESC" in statement:
            statements.append((statement, parameters))

    queries = {
        "first page": {"limit": 50},
        "90,000 rows deep": {"limit": 50, "cursor": deep_cursor},
        "unconfirmed, with deleted": {"limit": 50, "verified": "false", "include_deleted": "true"},
        "rare email (q)": {"limit": 50, "q": "owner77777@"},
        "admins only": {"limit": 50, "role": "admin"},
    }
    plans = {}
    with app.app_context():
        sa.event.listen(db.engine, "before_cursor_execute", capture)
        try:
            for params in queries.values():
                response = client.get("/api/v1/users", headers=headers, query_string=params)
                assert response.status_code == 200, response.get_data(as_text=True)
        finally:
            sa.event.remove(db.engine, "before_cursor_execute", capture)
        assert len(statements) == len(queries)
        with db.engine.connect() as connection:
            for name, (statement, parameters) in zip(queries, statements, strict=True):
                explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement
                [[result]] = connection.exec_driver_sql(explain, parameters).all()
                plans[name] = result[0]
    for name, plan in plans.items():  # shown with `pytest -s`: the numbers behind the assertions below
        nodes = plan_nodes(plan["Plan"])
        scans = [node for node in nodes if "Scan" in node["Node Type"]]
        read = sum(node["Actual Rows"] + node.get("Rows Removed by Filter", 0) for node in scans)
        buffers = plan["Plan"].get("Shared Hit Blocks", 0) + plan["Plan"].get("Shared Read Blocks", 0)
        print(
            f"{name}: {' > '.join(node['Node Type'] for node in nodes)}"
            f" using {[node.get('Index Name') for node in scans]}; rows read {read},"
            f" shared buffers {buffers}, {plan['Execution Time']:.2f} ms"
        )
    for name in ("first page", "90,000 rows deep", "unconfirmed, with deleted"):
        nodes = plan_nodes(plans[name]["Plan"])
        types = [node["Node Type"] for node in nodes]
        assert "Seq Scan" not in types and "Sort" not in types, (name, types)
        [scan] = [node for node in nodes if node["Node Type"] in ("Index Scan", "Index Only Scan")]
        assert (scan["Index Name"], scan["Scan Direction"]) == ("ix_users_created_at_id", "Backward"), name
        read = scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)
        assert read <= 20 * 51, (name, read)  # a page's worth of rows, not the table
    deep_scan = next(node for node in plan_nodes(plans["90,000 rows deep"]["Plan"]) if "Index Name" in node)
    assert "Index Cond" in deep_scan  # the cursor is where the scan starts, not a filter on every row
