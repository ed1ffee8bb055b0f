"""Every path that changes a ``users`` row writes its audit event in the same transaction (iris.audit).

How this cannot be forgotten: the test schema gets a PostgreSQL CONSTRAINT TRIGGER on ``users``,
DEFERRABLE INITIALLY DEFERRED, AFTER INSERT, UPDATE or DELETE, FOR EACH ROW. At COMMIT it raises unless
``audit_events`` holds an event about that row (``target_id``) with ``occurred_at = now()``: written by the
same transaction, since ``now()`` is the transaction's start and the event's ``occurred_at`` defaults to it.
The check lives in the database, not in the code under test, so a new path (a new view, command, webhook
handler or maintenance step) that changes a row without ``iris.audit.record`` fails at its COMMIT, whatever
module it is in, as soon as any test here drives it. Lease and sync bookkeeping (``pending_owner``,
``pending_until``, ``clerk_updated_at``, ``updated_at``) is not an account change and is let through; every
other column, and every INSERT and DELETE, is checked.

The walk below drives every path that changes a row today, through its real entry point (the API, the pages,
the command line, signed webhooks, reconcile), against the Clerk stand-in over HTTP and a real SMTP server;
a path without its event fails its step (the COMMIT raises, so the request answers 5xx or the command
fails). Setup writes made by the test itself (moving the clock back) run with
``session_replication_role = replica``, which PostgreSQL does not fire triggers under.

When adding a path that changes an account, add its step here.
"""

from __future__ import annotations

import json
import secrets
import time
from types import MappingProxyType

import requests
import sqlalchemy as sa

from iris.extensions import db
from tests.helpers import (
    BAPI_HEADERS,
    ME,
    PASSWORD,
    URL,
    add_primary_address,
    bapi,
    bearer,
    clerk_user_state,
    create_clerk_user,
    mailed_link,
    migrate,
    register,
    session_token,
    svix_headers,
)

AUDIT_REQUIRED = """
CREATE FUNCTION test_audit_required() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    target uuid := COALESCE(NEW.id, OLD.id);
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.email, NEW.clerk_user_id, NEW.role, NEW.deleted_at, NEW.email_verified_at,
            NEW.erased_at) IS NOT DISTINCT FROM (OLD.email, OLD.clerk_user_id, OLD.role, OLD.deleted_at,
            OLD.email_verified_at, OLD.erased_at) THEN
        RETURN NULL;  -- bookkeeping only (lease, clerk_updated_at)
    END IF;
    IF NOT EXISTS (SELECT 1 FROM audit_events WHERE target_id = target AND occurred_at = now()) THEN
        RAISE EXCEPTION 'users row % changed (%) without an audit event in its transaction', target, TG_OP;
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER test_audit_required AFTER INSERT OR UPDATE OR DELETE ON users
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_audit_required();
"""
WITH_PASSWORD = MappingProxyType({"password": PASSWORD})
HOOK = "/api/v1/webhooks/clerk"


def audited_app(make_app, smtp):
    app = make_app(MAIL_SERVER="127.0.0.1", MAIL_PORT=smtp.port)
    migrate(app)
    with app.app_context():
        db.session.execute(sa.text(AUDIT_REQUIRED))
        db.session.commit()
    return app


def unaudited(app, statement: str, **params) -> None:
    """A setup write of the test's own (moving the clock), which the audit trigger does not check."""
    with app.app_context():
        db.session.execute(sa.text("SET LOCAL session_replication_role = replica"))
        db.session.execute(sa.text(statement), params)
        db.session.commit()


def reconcile(app) -> str:
    result = app.test_cli_runner().invoke(args=["iris", "reconcile"])
    assert result.exit_code == 0, result.output
    return result.output


def cli(app, *args: str) -> str:
    result = app.test_cli_runner().invoke(args=["iris", *args])
    assert result.exit_code == 0, result.output
    return result.output


def webhook(client, kind: str, data: dict) -> dict:
    body = json.dumps({"type": kind, "data": data, "object": "event"})
    headers = svix_headers(body, svix_id="msg_" + secrets.token_hex(13))
    response = client.post(HOOK, data=body, headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def events(app) -> list[tuple[str, str, str | None]]:
    """(action, target_id, actor) of every event; the actor as ``iris.audit`` names it."""
    with app.app_context():
        found = db.session.execute(
            sa.text("SELECT action, target_id, actor_id, actor_name FROM audit_events ORDER BY occurred_at")
        ).all()
    return [(e.action, str(e.target_id), e.actor_name or f"account:{e.actor_id}") for e in found]


def user_id(app, email: str) -> str:
    with app.app_context():
        return str(
            db.session.execute(
                sa.text("SELECT id FROM users WHERE email = :e AND deleted_at IS NULL"), {"e": email}
            ).scalar_one()
        )


def confirm_at_clerk(standin, clerk_user_id: str) -> None:
    user = clerk_user_state(standin, clerk_user_id)
    bapi(standin, "PATCH", f"/email_addresses/{user['primary_email_address_id']}", verified=True)


def test_registration_paths_are_audited(make_app, smtp, standin):
    app = audited_app(make_app, smtp)
    client = app.test_client()
    # The API and the sign-up page: reserve, then complete.
    owner = register(client, "owner@bistro.example")
    page = client.post("/signup", data={"email": "page@bistro.example", "password": PASSWORD})
    assert page.status_code in (200, 302, 303), page.get_data(as_text=True)
    # Clerk refuses the password: the reservation is undone.
    assert client.post(URL, json={"email": "short@bistro.example", "password": "x"}).status_code == 422
    # Two registrations whose create answer is lost: pending rows, settled later.
    for email in ("settled.by.reconcile@bistro.example", "settled.by.next@bistro.example"):
        standin.control.add_fault(method="POST", path="/v1/users", action="hang", seconds=2, times=1)
        assert client.post(URL, json={"email": email, "password": PASSWORD}).status_code == 503
    time.sleep(2.2)  # the hung creates have landed at the stand-in
    unaudited(app, "UPDATE users SET pending_until = now() - interval '1 second' WHERE clerk_user_id IS NULL")
    # The next registration of one address settles (undoes) the dead one in its way, then registers.
    assert (
        client.post(URL, json={"email": "settled.by.next@bistro.example", "password": PASSWORD}).status_code
        == 201
    )
    # Reconcile settles the other (completed if the hung create landed, else removed).
    output = reconcile(app)
    assert "pending_completed 1" in output or "pending_removed 1" in output, output
    actions = {(action, actor.split(":")[0]) for action, _, actor in events(app)}
    assert {
        ("registration_started", "account"),
        ("registered", "account"),
        ("registration_undone", "account"),
        ("registration_undone", "maintenance"),
    } <= actions
    assert (
        "registered",
        owner["id"],
        f"account:{owner['id']}",
    ) in events(app)


def test_verification_paths_are_audited(make_app, smtp, standin):
    app = audited_app(make_app, smtp)
    client = app.test_client()
    confirmed = register(client, "confirmed@bistro.example")
    link = mailed_link(smtp, "confirmed@bistro.example")
    assert client.post(link, data={"password": PASSWORD}).status_code in (200, 303)
    removed = register(client, "removed@bistro.example")
    assert client.post(mailed_link(smtp, "removed@bistro.example"), data={"remove": "1"}).status_code == 200
    expired = register(client, "expired@bistro.example")
    unaudited(
        app, "UPDATE users SET created_at = now() - interval '200 hours' WHERE id = :id", id=expired["id"]
    )
    unaudited(app, "UPDATE users SET created_at = now() WHERE id = :id", id=confirmed["id"])
    assert "unconfirmed_removed 1" in reconcile(app)
    found = events(app)
    assert ("email_confirmed", confirmed["id"], f"account:{confirmed['id']}") in found
    assert ("removed_not_me", removed["id"], f"account:{removed['id']}") in found
    assert ("erased", removed["id"], f"account:{removed['id']}") in found
    assert ("expired_unconfirmed", expired["id"], "maintenance") in found
    assert ("erased", expired["id"], "maintenance") in found


def test_clerk_sync_paths_are_audited_by_webhook_and_by_reconcile(make_app, smtp, standin):
    app = audited_app(make_app, smtp)
    client = app.test_client()
    # Webhooks: a user made in Clerk's dashboard, its address changed and verified, unverified, deleted.
    walkin = create_clerk_user(standin, "walkin@bistro.example")
    assert webhook(client, "user.created", walkin)["outcome"] == "applied"
    add_primary_address(standin, walkin["id"], "moved@bistro.example")
    assert webhook(client, "user.updated", clerk_user_state(standin, walkin["id"]))["outcome"] == "applied"
    address = clerk_user_state(standin, walkin["id"])["primary_email_address_id"]
    bapi(standin, "PATCH", f"/email_addresses/{address}", verified=False)
    assert webhook(client, "user.updated", clerk_user_state(standin, walkin["id"]))["outcome"] == "applied"
    requests.delete(f"{standin.api_url}/users/{walkin['id']}", headers=BAPI_HEADERS, timeout=5)
    gone = {"object": "user", "id": walkin["id"], "deleted": True}
    assert webhook(client, "user.deleted", gone)["outcome"] == "applied"
    walkin_id = None
    with app.app_context():
        walkin_id = str(
            db.session.execute(
                sa.text("SELECT id FROM users WHERE clerk_user_id = :c"), {"c": walkin["id"]}
            ).scalar_one()
        )
    # Reconcile: the same kinds of drift, found by walking Clerk's users and Iris's rows.
    other = create_clerk_user(standin, "other@bistro.example")
    owner = register(client, "owner@bistro.example")
    add_primary_address(standin, owner["clerk_user_id"], "owner.moved@bistro.example")
    gone_owner = register(client, "gone@bistro.example")
    requests.delete(f"{standin.api_url}/users/{gone_owner['clerk_user_id']}", headers=BAPI_HEADERS, timeout=5)
    output = reconcile(app)
    assert "created 1" in output and "email_changed 1" in output and "deleted 1" in output, output
    found = {(action, target, actor.split(":")[0]) for action, target, actor in events(app)}
    for action in ("created_from_clerk", "email_changed", "email_unconfirmed", "deleted_at_clerk", "erased"):
        assert (action, walkin_id, "clerk-webhook") in found, action
    assert ("created_from_clerk", user_id(app, "other@bistro.example"), "maintenance") in found
    assert ("email_changed", owner["id"], "maintenance") in found
    assert ("email_confirmed", owner["id"], "maintenance") in found  # Clerk verified the new address
    assert ("deleted_at_clerk", gone_owner["id"], "maintenance") in found
    assert other["id"]


def test_lifecycle_paths_are_audited_from_the_api_the_pages_and_the_command_line(make_app, smtp, standin):
    app = audited_app(make_app, smtp)
    client = app.test_client()
    admin = register(client, "admin@iris.example")
    link = mailed_link(smtp, "admin@iris.example")
    assert client.post(link, data={"password": PASSWORD}).status_code in (200, 303)
    cli(app, "promote", "admin@iris.example")
    admin_headers = bearer(session_token(standin, admin["clerk_user_id"], 600))
    # The API: deactivate, a reactivation whose unban fails (undone), reactivate, self-deletion.
    owner = register(client, "owner@bistro.example")
    assert client.post(f"/api/v1/users/{owner['id']}/deactivate", headers=admin_headers).status_code == 200
    standin.control.add_fault(
        method="POST", path=f"/v1/users/{owner['clerk_user_id']}/unban", status=503, times=1
    )
    assert client.post(f"/api/v1/users/{owner['id']}/reactivate", headers=admin_headers).status_code == 503
    assert client.post(f"/api/v1/users/{owner['id']}/reactivate", headers=admin_headers).status_code == 200
    owner_headers = bearer(session_token(standin, owner["clerk_user_id"], 600))
    assert client.delete(ME, headers=owner_headers).status_code == 204
    # The pages: deactivate and reactivate after the confirmation step, delete your own account.
    pages = app.test_client()
    paged = register(pages, "paged@bistro.example")
    pages.set_cookie("__session", session_token(standin, admin["clerk_user_id"], 600))
    for action in ("deactivate", "reactivate"):
        response = pages.post(f"/admin/users/{paged['id']}/{action}", data=WITH_PASSWORD)
        assert response.status_code == 303, response.get_data(as_text=True)
    pages.set_cookie("__session", session_token(standin, paged["clerk_user_id"], 600))
    assert pages.post("/account/delete", data=WITH_PASSWORD).status_code == 303
    # The command line: demote and promote again.
    cli(app, "demote", "admin@iris.example")
    cli(app, "promote", "admin@iris.example")
    # Maintenance: a deactivated account past the retention period is erased.
    kept = register(client, "kept@bistro.example")
    assert client.post(f"/api/v1/users/{kept['id']}/deactivate", headers=admin_headers).status_code == 200
    unaudited(app, "UPDATE users SET deleted_at = now() - interval '91 days' WHERE id = :id", id=kept["id"])
    assert "retention_erased 1" in reconcile(app)
    found = {(action, target, actor.split(":")[0]) for action, target, actor in events(app)}
    for action in ("deactivated", "reactivation_undone", "reactivated"):
        assert (action, owner["id"], "account") in found, action
    assert ("account_deleted", owner["id"], "account") in found
    assert ("erased", owner["id"], "account") in found
    assert {("deactivated", paged["id"], "account"), ("reactivated", paged["id"], "account")} <= found
    assert ("account_deleted", paged["id"], "account") in found
    assert {("promoted", admin["id"], "cli"), ("demoted", admin["id"], "cli")} <= found
    assert ("erased", kept["id"], "maintenance") in found


def test_the_trigger_refuses_a_change_without_its_event(make_app, smtp, standin):
    """The check itself: a write to ``users`` with no event in its transaction cannot commit."""
    app = audited_app(make_app, smtp)
    owner = register(app.test_client(), "owner@bistro.example")
    with app.app_context():
        db.session.execute(sa.text("UPDATE users SET role = 'admin' WHERE id = :id"), {"id": owner["id"]})
        try:
            db.session.commit()
        except sa.exc.DBAPIError as error:
            assert "without an audit event" in str(error)
            db.session.rollback()
        else:
            raise AssertionError("a change without its audit event committed")
