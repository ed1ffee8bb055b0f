"""Events late, twice or out of order end in the same rows as in order: a property-based test.

A scenario really happens at the Clerk stand-in (users made, addresses changed and handed on to another
user, a user deleted), and the user objects Clerk would send are read from its Backend API after each step.
Hypothesis then delivers those events, shuffled, some repeated (with the same svix-id, as a Svix retry, or a
new one, as a second event with the same content), to the webhook endpoint, retrying the ones answered 503 the
way Svix does, and compares the live accounts with the in-order result and with Clerk's own final state.
"""

from __future__ import annotations

import json
import secrets
import time

import requests
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iris.extensions import db
from tests.helpers import BAPI_HEADERS, add_primary_address, bapi, create_clerk_user, register, svix_headers

HOOK = "/api/v1/webhooks/clerk"
# Svix retries a failed delivery several times; more than enough for any order of this scenario.
RETRY_ROUNDS = 4


def state(standin, clerk_user_id: str) -> dict:
    return bapi(standin, "GET", f"/users/{clerk_user_id}")


def move_to(standin, clerk_user_id: str, email: str) -> None:
    """The user adds ``email`` (verified, as Clerk's own flow leaves it), makes it primary and removes the old
    primary address, freeing it for someone else."""
    old = state(standin, clerk_user_id)["primary_email_address_id"]
    add_primary_address(standin, clerk_user_id, email)
    bapi(standin, "DELETE", f"/email_addresses/{old}")


def as_created(user: dict) -> dict:
    """A registration's user as its user.created showed it: the address still verified, a moment earlier."""
    user = json.loads(json.dumps(user))
    for address in user["email_addresses"]:
        address["verification"] = {
            "object": "verification_admin",
            "status": "verified",
            "strategy": "admin",
            "attempts": None,
            "expire_at": None,
        }
    user["updated_at"] -= 1
    return user


def scenario(client, standin) -> list[tuple[str, dict]]:
    """Make it happen at Clerk; return the events Clerk sends for it, in the order it sends them."""
    events: list[tuple[str, dict]] = []
    owner = register(client, "owner@a.example")  # through Iris: its row exists before any event
    registered = state(standin, owner["clerk_user_id"])
    events += [("user.created", as_created(registered)), ("user.updated", registered)]
    move_to(standin, owner["clerk_user_id"], "owner2@a.example")
    events.append(("user.updated", state(standin, owner["clerk_user_id"])))

    walkin = create_clerk_user(standin, "walkin@b.example")  # made in Clerk's dashboard
    events.append(("user.created", walkin))
    move_to(standin, walkin["id"], "walkin2@b.example")
    events.append(("user.updated", state(standin, walkin["id"])))
    heir = create_clerk_user(standin, "walkin@b.example")  # the address walkin gave up
    events.append(("user.created", heir))

    gone = create_clerk_user(standin, "gone@d.example")
    events.append(("user.created", gone))
    bapi(standin, "DELETE", f"/users/{gone['id']}")
    events.append(("user.deleted", {"object": "user", "id": gone["id"], "deleted": True}))
    return events


def post(client, kind: str, data: dict, svix_id: str):
    body = json.dumps({"data": data, "object": "event", "type": kind, "timestamp": int(time.time() * 1000)})
    headers = svix_headers(body, svix_id=svix_id)
    return client.post(HOOK, data=body, headers={**headers, "Content-Type": "application/json"})


def deliver_all(client, deliveries: list[tuple[str, dict, str]]) -> None:
    """Deliver each; the ones answered 503 go again after the rest, as Svix retries them."""
    waiting = deliveries
    for _ in range(RETRY_ROUNDS):
        failed = []
        for kind, data, svix_id in waiting:
            response = post(client, kind, data, svix_id)
            assert response.status_code in (200, 503), response.get_data(as_text=True)
            if response.status_code == 503:
                failed.append((kind, data, svix_id))
        if not failed:
            return
        waiting = failed
    raise AssertionError(f"still refused after {RETRY_ROUNDS} rounds: {[kind for kind, _, _ in waiting]}")


def live_accounts(app: Flask) -> set[tuple]:
    with app.app_context():
        found = db.session.execute(
            sa.text(
                "SELECT clerk_user_id, email, role, email_verified_at IS NOT NULL FROM users"
                " WHERE deleted_at IS NULL"
            )
        ).all()
        db.session.rollback()
    return {tuple(row) for row in found}


def snapshot(app: Flask) -> list[dict]:
    with app.app_context():
        found = db.session.execute(sa.text("SELECT * FROM users")).mappings().all()
        db.session.rollback()
    return [dict(row) for row in found]


def restore(app: Flask, rows: list[dict]) -> None:
    """Back to the rows as they were before any event: the registered account only."""
    with app.app_context():
        for table in ("mail_outbox", "clerk_webhook_deliveries", "clerk_deleted_users", "users"):
            db.session.execute(sa.text(f"DELETE FROM {table}"))  # noqa: S608 (fixed names)
        for row in rows:
            columns = ", ".join(row)
            db.session.execute(
                sa.text(f"INSERT INTO users ({columns}) VALUES ({', '.join(':' + c for c in row)})"),  # noqa: S608
                row,
            )
        db.session.commit()


def test_events_in_any_order_repeated_or_late_end_in_the_same_accounts(app, client, standin):
    events = scenario(client, standin)
    before = snapshot(app)
    truth = {
        (user["id"], address["email_address"], "restaurant", True)
        for user in requests.get(
            standin.api_url + "/users", params={"limit": 500}, headers=BAPI_HEADERS, timeout=5
        ).json()
        for address in user["email_addresses"]
        if address["id"] == user["primary_email_address_id"]
    }

    restore(app, before)
    deliver_all(client, [(kind, data, f"msg_{n}") for n, (kind, data) in enumerate(events)])
    in_order = live_accounts(app)
    assert in_order == truth  # in order, the accounts are exactly Clerk's users, confirmed

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.data())
    def any_order(data):
        deliveries = [(kind, payload, f"msg_{n}") for n, (kind, payload) in enumerate(events)]
        repeats = data.draw(
            st.lists(st.tuples(st.integers(0, len(events) - 1), st.booleans()), max_size=len(events)),
            label="repeats (event, same svix-id)",
        )
        for index, same_id in repeats:
            kind, payload, svix_id = deliveries[index]
            deliveries.append((kind, payload, svix_id if same_id else f"msg_{secrets.token_hex(6)}"))
        order = data.draw(st.permutations(deliveries), label="delivery order")
        restore(app, before)
        deliver_all(client, list(order))
        assert live_accounts(app) == in_order

    any_order()
