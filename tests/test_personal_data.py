"""What Iris keeps, and for how long (iris.personal_data), proved against a ``pg_dump`` of the test's whole
schema: definitions and every row, as an operator's backup would hold them.

After each of the four deletion paths (the owner, "this wasn't me", unconfirmed expiry, deletion at Clerk by
webhook or found by reconcile) the address appears nowhere in the dump, nor its plain SHA-256 (which anyone
could confirm by guessing). A deactivated account keeps its address until IRIS_DEACTIVATED_RETENTION_DAYS
have passed since ``deleted_at`` (the clock is moved in the database, not slept), then reconcile deletes its
Clerk user at the stand-in and erases it; it can never be reactivated afterwards. Sent mails and webhook ids
are pruned after 30 days. Real PostgreSQL, the Clerk stand-in over HTTP, a real SMTP server.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import time

import requests
import sqlalchemy as sa

from iris.extensions import db
from tests.helpers import (
    BAPI_HEADERS,
    ME,
    PASSWORD,
    TEST_DATABASE_URL,
    URL,
    assert_error,
    audit_events,
    bapi,
    bearer,
    clerk_user_state,
    mailed_link,
    migrate,
    register,
    run_sql,
    session_token,
    signed_in_admin,
    svix_headers,
)

EMAIL = "Private.Person@bistro.example"
ADDRESS = EMAIL.lower()
OTHER = "someone.else@bistro.example"
HOOK = "/api/v1/webhooks/clerk"


def dump(schema: str) -> str:
    """The whole schema as ``pg_dump`` writes it (definitions and data, rows as INSERTs), lower-cased."""
    url = sa.make_url(TEST_DATABASE_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    return subprocess.run(
        ["pg_dump", "--inserts", f"--schema={schema}", url], check=True, capture_output=True, text=True
    ).stdout.lower()


def assert_no_trace(schema: str, address: str = ADDRESS, kept: str = OTHER) -> str:
    """The dump names ``kept`` (so it really holds the data) and holds neither ``address`` nor its plain
    SHA-256; returns the dump."""
    text = dump(schema)
    assert kept in text
    assert address not in text
    assert address.split("@")[0] not in text  # not even the local part
    assert hashlib.sha256(address.encode()).hexdigest() not in text
    return text


def mailing_app(make_app, smtp, **overrides):
    app = make_app(MAIL_SERVER="127.0.0.1", MAIL_PORT=smtp.port, **overrides)
    migrate(app)
    return app


def reconcile(app):
    return app.test_cli_runner().invoke(args=["iris", "reconcile"])


def account(app, user_id: str) -> sa.RowMapping:
    with app.app_context():
        return (
            db.session.execute(sa.text("SELECT * FROM users WHERE id = :id"), {"id": user_id})
            .mappings()
            .one()
        )


def assert_erased(app, user: dict) -> None:
    """The row keeps its id, Clerk id and dates, and holds a placeholder that is no address."""
    row = account(app, user["id"])
    assert row["erased_at"] is not None and row["deleted_at"] is not None
    assert row["clerk_user_id"] == user["clerk_user_id"] and row["created_at"] is not None
    assert row["email"] == f"erased:{user['id']}" and "@" not in row["email"]


def webhook(client, payload: dict):
    body = json.dumps(payload)
    headers = svix_headers(body, svix_id="msg_" + secrets.token_hex(13))
    return client.post(HOOK, data=body, headers={**headers, "Content-Type": "application/json"})


# ---- the four deletion paths: no trace of the address


def test_an_account_its_owner_deleted_leaves_no_trace_of_its_address(make_app, smtp, standin, schema):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    register(client, OTHER)
    user = register(client, EMAIL)
    smtp.wait_for(2)  # both mails sent: their outbox rows exist
    assert ADDRESS in dump(schema)  # before: the account holds it
    headers = bearer(session_token(standin, user["clerk_user_id"], 600))
    assert client.delete(ME, headers=headers).status_code == 204
    assert_no_trace(schema)
    assert_erased(app, user)


def test_this_wasnt_me_leaves_no_trace_of_the_address(make_app, smtp, standin, schema):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    register(client, OTHER)
    user = register(client, EMAIL)
    path = mailed_link(smtp, ADDRESS)
    assert client.post(path, data={"remove": "1"}).status_code == 200
    assert_no_trace(schema)
    assert_erased(app, user)
    assert client.get(path).status_code == 200  # the old link still says the account was removed
    assert [event.action for event in audit_events(app)] == ["erased", "removed_not_me"]  # one transaction


def test_an_account_expired_unconfirmed_leaves_no_trace_of_its_address(make_app, smtp, standin, schema):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    other = register(client, OTHER)
    user = register(client, EMAIL)
    smtp.wait_for(2)
    run_sql(app, "UPDATE users SET email_verified_at = now() WHERE id = :id", id=other["id"])
    run_sql(app, "UPDATE users SET created_at = now() - interval '200 hours' WHERE id = :id", id=user["id"])
    result = reconcile(app)
    assert "unconfirmed_removed 1" in result.output, result.output
    assert_no_trace(schema)
    assert_erased(app, user)
    # Its own events only: the walk also brings the other account's Clerk address (confirmed here by SQL
    # alone, unverified at Clerk) in step, which maintenance records too.
    assert [(e.action, e.actor_name) for e in audit_events(app) if str(e.target_id) == user["id"]] == [
        ("erased", "maintenance"),
        ("expired_unconfirmed", "maintenance"),
    ]


def test_an_account_deleted_at_clerk_leaves_no_trace_by_webhook_or_by_reconcile(
    make_app, smtp, standin, schema
):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    register(client, OTHER)
    by_webhook = register(client, EMAIL)
    by_reconcile = register(client, "second.private@bistro.example")
    smtp.wait_for(3)
    # Deleted in Clerk's dashboard: one Clerk tells us about, one whose webhook never came.
    for user in (by_webhook, by_reconcile):
        requests.delete(
            f"{standin.api_url}/users/{user['clerk_user_id']}", headers=BAPI_HEADERS, timeout=5
        ).raise_for_status()
    gone = {"object": "user", "id": by_webhook["clerk_user_id"], "deleted": True}
    response = webhook(client, {"type": "user.deleted", "data": gone, "object": "event"})
    assert response.json == {"outcome": "applied"}
    assert_no_trace(schema)
    assert_erased(app, by_webhook)
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert_no_trace(schema, "second.private@bistro.example")
    assert_erased(app, by_reconcile)
    actors = {(e.action, (e.actor_name or "").split(":")[0]) for e in audit_events(app)}
    assert actors == {
        ("deleted_at_clerk", "clerk-webhook"),
        ("erased", "clerk-webhook"),
        ("deleted_at_clerk", "maintenance"),
        ("erased", "maintenance"),
    }


# ---- a deactivated account: kept, then erased after the retention period


def deactivated(app, client, standin) -> tuple[dict, dict, dict]:
    """A confirmed admin (confirmed at Clerk too, so reconcile keeps it so) and an account it deactivated."""
    admin, admin_headers = signed_in_admin(client, app, standin)
    clerk_admin = clerk_user_state(standin, admin["clerk_user_id"])
    bapi(standin, "PATCH", f"/email_addresses/{clerk_admin['primary_email_address_id']}", verified=True)
    user = register(client, EMAIL)
    response = client.post(f"/api/v1/users/{user['id']}/deactivate", headers=admin_headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return admin, admin_headers, user


def test_a_deactivated_account_keeps_its_data_until_the_retention_period_has_passed(
    app, client, standin, schema
):
    _, admin_headers, user = deactivated(app, client, standin)
    # 89 days after the deactivation (default retention: 90): kept, the Clerk user banned, reactivatable.
    run_sql(app, "UPDATE users SET deleted_at = now() - interval '89 days' WHERE id = :id", id=user["id"])
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert "retention_erased 0" in result.output
    assert ADDRESS in dump(schema)
    assert clerk_user_state(standin, user["clerk_user_id"])["banned"] is True
    page = client.get(f"/admin/users/{user['id']}", headers=admin_headers).get_data(as_text=True)
    assert f"/admin/users/{user['id']}/reactivate" in page

    # 91 days: reconcile deletes the Clerk user and erases the row.
    run_sql(app, "UPDATE users SET deleted_at = now() - interval '91 days' WHERE id = :id", id=user["id"])
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert "retention_erased 1" in result.output
    assert clerk_user_state(standin, user["clerk_user_id"]) is None
    assert_no_trace(schema, kept="admin@iris.example")
    assert_erased(app, user)
    assert [(e.action, e.actor_name) for e in audit_events(app)][-1] == ("erased", "maintenance")

    # It can never come back: the API says why, and the admin page offers no reactivation.
    error = assert_error(
        client.post(f"/api/v1/users/{user['id']}/reactivate", headers=admin_headers), 409, "account_erased"
    )
    assert "erased" in error["message"]
    page = client.get(f"/admin/users/{user['id']}", headers=admin_headers).get_data(as_text=True)
    assert "Erased account" in page and "/reactivate" not in page and ADDRESS not in page.lower()
    # And a second pass finds nothing more to do.
    assert "retention_erased 0" in reconcile(app).output


def test_the_retention_period_is_configurable(make_app, standin, schema):
    app = make_app(IRIS_DEACTIVATED_RETENTION_DAYS=7)
    migrate(app)
    client = app.test_client()
    _, _, user = deactivated(app, client, standin)
    run_sql(app, "UPDATE users SET deleted_at = now() - interval '8 days' WHERE id = :id", id=user["id"])
    assert "retention_erased 1" in reconcile(app).output
    assert_erased(app, user)


def test_clerk_unreachable_leaves_the_account_for_the_next_run_counted_as_failed(app, client, standin):
    _, _, user = deactivated(app, client, standin)
    run_sql(app, "UPDATE users SET deleted_at = now() - interval '91 days' WHERE id = :id", id=user["id"])
    standin.control.add_fault(method="DELETE", path="/v1/users/", status=503)
    result = reconcile(app)
    assert result.exit_code == 1
    assert "retention_erased 0" in result.output and "after the retention period" in result.output
    assert account(app, user["id"])["erased_at"] is None
    assert clerk_user_state(standin, user["clerk_user_id"]) is not None
    standin.control.clear_faults()
    result = reconcile(app)
    assert "retention_erased 1" in result.output, result.output
    assert clerk_user_state(standin, user["clerk_user_id"]) is None


def test_a_lost_answer_to_the_delete_is_looked_up(app, client, standin):
    _, _, user = deactivated(app, client, standin)
    run_sql(app, "UPDATE users SET deleted_at = now() - interval '91 days' WHERE id = :id", id=user["id"])
    standin.control.add_fault(method="DELETE", path="/v1/users/", times=1, after_commit=True, action="drop")
    result = reconcile(app)
    assert "retention_erased 1" in result.output, result.output
    assert clerk_user_state(standin, user["clerk_user_id"]) is None
    assert_erased(app, user)


# ---- pruning


def test_sent_mails_and_webhook_ids_are_pruned_after_30_days(app):
    with app.app_context():
        user_id = db.session.execute(
            sa.text(
                "INSERT INTO users (id, email, role, clerk_user_id) VALUES"
                " (gen_random_uuid(), 'kept@bistro.example', 'restaurant', 'user_kept') RETURNING id"
            )
        ).scalar_one()
        db.session.execute(
            sa.text(
                "INSERT INTO mail_outbox (id, user_id, kind, created_at, sent_at, attempts) VALUES"
                " (gen_random_uuid(), :u, 'old_sent', now() - interval '31 days', now(), 1),"
                " (gen_random_uuid(), :u, 'old_given_up', now() - interval '31 days', NULL, 5),"
                " (gen_random_uuid(), :u, 'new_sent', now() - interval '29 days', now(), 1)"
            ),
            {"u": user_id},
        )
        db.session.execute(
            sa.text(
                "INSERT INTO clerk_webhook_deliveries (svix_id, event_type, received_at) VALUES"
                " ('msg_old', 'user.updated', now() - interval '31 days'),"
                " ('msg_new', 'user.updated', now() - interval '29 days')"
            )
        )
        db.session.commit()
    result = reconcile(app)
    assert "mails_pruned 2" in result.output and "webhook_ids_forgotten 1" in result.output, result.output
    with app.app_context():
        kinds = db.session.execute(sa.text("SELECT kind FROM mail_outbox")).scalars().all()
        ids = db.session.execute(sa.text("SELECT svix_id FROM clerk_webhook_deliveries")).scalars().all()
    assert (kinds, ids) == (["new_sent"], ["msg_new"])


# ---- the keyed hash still bounds mails to an erased address


def test_the_mail_bound_outlives_the_erasure_through_the_keyed_hash(make_app, smtp, standin, schema):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    register(client, OTHER)
    user = register(client, EMAIL)
    assert client.post(mailed_link(smtp, ADDRESS), data={"remove": "1"}).status_code == 200
    assert client.post(URL, json={"email": EMAIL, "password": PASSWORD}).status_code == 201
    time.sleep(0.3)
    assert len(smtp.wait_for(1, to=ADDRESS)) == 1  # withheld: one went to the address minutes ago
    with app.app_context():
        hashes = db.session.execute(sa.text("SELECT DISTINCT hmac_key_id FROM mail_outbox")).scalars().all()
    assert len(hashes) == 1 and hashes[0]
    assert user["id"]
