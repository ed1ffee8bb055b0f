"""The whole loop over real HTTP: the Clerk stand-in sends its Svix-signed webhooks, as Clerk does, to Iris
served on a real threaded server, while a test changes users at the stand-in; some deliveries delayed,
repeated, reordered or dropped; `flask iris reconcile` repairs what a lost delivery left behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from werkzeug.serving import make_server

from iris.extensions import db
from tests.helpers import (
    PASSWORD,
    URL,
    WEBHOOK_SECRET,
    add_primary_address,
    bapi,
    create_clerk_user,
    wait_for,
)


@pytest.fixture
def webhooks(app: Flask, standin) -> Iterator[str]:
    """Iris on a real server, and the stand-in sending it webhooks; yields Iris's base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_port}"
    standin.control.set_webhooks(base_url + "/api/v1/webhooks/clerk", WEBHOOK_SECRET)
    yield base_url
    standin.control.disable_webhooks()
    server.shutdown()


def settled(standin) -> list[dict]:
    """Wait until the stand-in has nothing queued or in flight; its delivery log."""
    standin.control.wait_for_webhooks(timeout=15)
    return standin.control.webhook_deliveries()


def account(app: Flask, clerk_user_id: str) -> tuple | None:
    with app.app_context():
        found = db.session.execute(
            sa.text(
                "SELECT email, email_verified_at IS NOT NULL, deleted_at IS NOT NULL FROM users"
                " WHERE clerk_user_id = :id"
            ),
            {"id": clerk_user_id},
        ).first()
        db.session.rollback()
    return tuple(found) if found else None


def test_changes_at_clerk_reach_the_account_through_signed_webhooks(app, standin, webhooks):
    registered = requests.post(
        webhooks + URL, json={"email": "owner@bistro.example", "password": PASSWORD}, timeout=10
    )
    assert registered.status_code == 201, registered.text
    clerk_user_id = registered.json()["clerk_user_id"]
    settled(standin)
    # user.created (the address verified, as made) and user.updated (registration unverified it): unconfirmed.
    assert account(app, clerk_user_id) == ("owner@bistro.example", False, False)

    add_primary_address(standin, clerk_user_id, "Chef@Bistro.example")
    settled(standin)
    assert account(app, clerk_user_id) == ("chef@bistro.example", True, False)

    bapi(standin, "DELETE", f"/users/{clerk_user_id}")
    deliveries = settled(standin)
    email, *rest = account(app, clerk_user_id)  # deleted at Clerk: erased (iris.personal_data)
    assert email.startswith("erased:") and rest == [True, True]
    assert [d["type"] for d in deliveries if d["outcome"] == "delivered"] == [
        "user.created",
        "user.updated",
        "user.updated",
        "user.deleted",
    ]
    assert {d["status"] for d in deliveries} == {200}


def test_reordered_repeated_and_late_deliveries_end_in_the_same_account(app, standin, webhooks):
    walkin = create_clerk_user(standin, "walkin@bistro.example")
    settled(standin)
    standin.control.add_webhook_fault(action="reorder", count=3)  # the next three, newest first
    add_primary_address(standin, walkin["id"], "second@bistro.example")
    add_primary_address(standin, walkin["id"], "third@bistro.example")
    add_primary_address(standin, walkin["id"], "fourth@bistro.example")
    settled(standin)
    assert account(app, walkin["id"]) == ("fourth@bistro.example", True, False)
    standin.control.clear_webhook_faults()
    standin.control.add_webhook_fault(action="repeat", count=2, type="user.updated")  # sent three times
    add_primary_address(standin, walkin["id"], "fifth@bistro.example")
    deliveries = settled(standin)
    assert account(app, walkin["id"]) == ("fifth@bistro.example", True, False)
    delivered = [d["svix_id"] for d in deliveries if d["outcome"] == "delivered"]
    assert len(delivered) == 1 + 3 + 3 and len(set(delivered)) == 5  # the copies kept their svix-id


def test_a_late_older_update_after_the_delete_changes_nothing(app, standin, webhooks):
    walkin = create_clerk_user(standin, "walkin@bistro.example")
    settled(standin)
    standin.control.add_webhook_fault(action="delay", seconds=1, type="user.updated", times=1)
    add_primary_address(standin, walkin["id"], "later@bistro.example")
    bapi(standin, "DELETE", f"/users/{walkin['id']}")
    deliveries = settled(standin)
    assert [d["type"] for d in deliveries if d["outcome"] == "delivered"][-2:] == [
        "user.deleted",
        "user.updated",
    ]
    email, *rest = account(app, walkin["id"])  # deleted at Clerk: erased (iris.personal_data)
    assert email.startswith("erased:") and rest == [True, True]


def test_a_dropped_delivery_is_repaired_by_reconcile(app, standin, webhooks):
    walkin = create_clerk_user(standin, "walkin@bistro.example")
    settled(standin)
    standin.control.add_webhook_fault(action="drop", type="user.deleted")
    bapi(standin, "DELETE", f"/users/{walkin['id']}")
    deliveries = settled(standin)
    # The webhook never came:
    assert account(app, walkin["id"]) == ("walkin@bistro.example", True, False), deliveries

    result = app.test_cli_runner().invoke(args=["iris", "reconcile"])
    assert result.exit_code == 0, result.output
    email, *rest = account(app, walkin["id"])  # deleted at Clerk: erased (iris.personal_data)
    assert email.startswith("erased:") and rest == [True, True]


def test_a_delivery_iris_refused_is_retried_until_applied(app, standin, webhooks):
    """Svix retries a non-2xx answer; the stand-in on a short schedule. Iris answers 503 while the address is
    held by a registration in flight, then applies it."""
    with app.app_context():
        db.session.execute(
            sa.text(
                "INSERT INTO users (id, email, role, pending_owner, pending_until) VALUES (gen_random_uuid(),"
                " 'busy@bistro.example', 'restaurant', gen_random_uuid(), now() + interval '1 hour')"
            )
        )
        db.session.commit()
    walkin = create_clerk_user(standin, "busy@bistro.example")
    wait_for(lambda: any(d["status"] == 503 for d in standin.control.webhook_deliveries()))
    with app.app_context():
        db.session.execute(
            sa.text("DELETE FROM users WHERE clerk_user_id IS NULL")
        )  # the registration gave up
        db.session.commit()
    deliveries = settled(standin)
    assert account(app, walkin["id"]) == ("busy@bistro.example", True, False)
    assert [d["outcome"] for d in deliveries][-1] == "delivered"
