"""``flask iris export``: what Iris holds about one address (a GDPR access request), and ``--all-deleted``,
what waits for erasure and when. Accounts are made, deleted and deactivated through the real API against the
Clerk stand-in over HTTP, on real PostgreSQL (iris.export states the guarantees proved here)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import Result
from flask import Flask

from iris import export as iris_export
from iris.extensions import db
from tests.helpers import (
    ME,
    add_primary_address,
    bearer,
    migrate,
    register,
    run_sql,
    session_token,
    signed_in_admin,
)

ADDRESS = "owner@bistro.example"


def export(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["iris", "export", *args])


def printed(result: Result) -> dict:
    """The JSON a successful export printed: exit status 0, nothing on stderr, only JSON on stdout."""
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


def keys_sorted(pairs: list[tuple[str, object]]) -> dict:
    """A ``json.loads`` hook that fails on an object whose keys are not in sorted order."""
    keys = [key for key, _ in pairs]
    assert keys == sorted(keys), keys
    return dict(pairs)


def scalars(app: Flask, statement: str, **params) -> list:
    with app.app_context():
        return list(db.session.execute(sa.text(statement), params).scalars())


def delete_own(client, standin, user: dict) -> None:
    headers = bearer(session_token(standin, user["clerk_user_id"]))
    assert client.delete(ME, headers=headers).status_code == 204


def deactivate(client, headers: dict, user: dict) -> None:
    assert client.post(f"/api/v1/users/{user['id']}/deactivate", headers=headers).status_code == 200


@pytest.fixture
def history(app: Flask, client, standin) -> dict:
    """ADDRESS registered and deleted by its owner (erased at once: iris.personal_data), registered again and
    deactivated by an admin (its Clerk user, banned, still holds the address), then a registration of it in
    flight (a pending row, written as registration reserves the address); another person's account beside
    them. ``rows``: the rows that still hold the address; ``erased``: the owner-deleted one."""
    admin, admin_headers = signed_in_admin(client, app, standin)
    first = register(client, ADDRESS)
    delete_own(client, standin, first)
    second = register(client, ADDRESS)
    deactivate(client, admin_headers, second)
    pending = str(uuid.uuid4())
    run_sql(
        app,
        "INSERT INTO users (id, email, role, pending_owner, pending_until)"
        " VALUES (:id, :email, 'restaurant', gen_random_uuid(), now() + interval '2 minutes')",
        id=pending,
        email=ADDRESS,
    )
    other = register(client, "someone.else@bistro.example")
    return {"admin": admin, "rows": [second["id"], pending], "erased": first["id"], "other": other}


def test_export_gives_every_row_of_the_address_with_its_trail_and_round_trips(app, history):
    result = export(app, "  Owner@BISTRO.example ")
    data = printed(result)
    with app.app_context():
        assert data == iris_export.export(ADDRESS, app.config["IRIS_TIMEZONE"])
    assert result.stdout == export(app, ADDRESS).stdout  # the same state prints the same text
    json.loads(result.stdout, object_pairs_hook=keys_sorted)

    assert data["email"] == ADDRESS
    assert data["restaurants"] == []
    accounts = data["accounts"]
    assert [entry["id"] for entry in accounts] == history["rows"]  # the erased account holds nothing of it
    assert [entry["state"] for entry in accounts] == ["deactivated", "pending"]
    # What Iris still holds of the erased account: the first registration's mail, by the address's keyed
    # hash (the mail bound recognises the address with it), never the address.
    [mail] = data["other_mail"]
    assert set(mail) == {"kind", "queued_at", "sent_at", "attempts", "last_error", "to_this_address"}
    assert (mail["kind"], mail["to_this_address"]) == ("verify_email", True)
    columns = set(
        scalars(
            app,
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'users'",
        )
    )
    for entry in accounts:
        assert columns <= set(entry), "every column of the row is exported"
        assert entry["email"] == ADDRESS
        assert datetime.fromisoformat(entry["created_at"]).utcoffset() in {
            timedelta(hours=1),
            timedelta(hours=2),
        }
    for key, count in (
        ("mails", "SELECT count(*) FROM mail_outbox WHERE user_id = :id"),
        ("verification_links", "SELECT count(*) FROM email_verification_links WHERE user_id = :id"),
    ):
        assert [[len(entry[key])] for entry in accounts] == [
            scalars(app, count, id=row) for row in history["rows"]
        ]
    deactivated, pending = accounts
    assert (deactivated["mails"], deactivated["verification_links"]) == ([], [])  # within the mail bound
    admin_id = history["admin"]["id"]
    assert [(event["action"], event["actor"]) for event in deactivated["audit_events"]] == [
        ("registration_started", f"user:{deactivated['id']}"),
        ("registered", f"user:{deactivated['id']}"),
        ("deactivated", f"admin:{admin_id}"),
    ]
    assert all(event["request_id"] for event in deactivated["audit_events"])
    erase_after = datetime.fromisoformat(deactivated["erase_after"])
    assert erase_after == datetime.fromisoformat(deactivated["deleted_at"]) + timedelta(days=90)
    assert set(pending) >= columns and pending["clerk_user_id"] is None
    assert (pending["audit_events"], pending["mails"], pending["deleted_at"], pending["erase_after"]) == (
        [],
        [],
        None,
        None,
    )
    assert deactivated["clerk_user_deleted_at"] is None  # banned, not deleted, at Clerk


def test_no_other_persons_address_and_no_hash_appears(app, history):
    stdout = export(app, ADDRESS).stdout
    assert "@" in stdout
    for address in (history["admin"]["email"], history["other"]["email"]):
        assert address not in stdout
    hashes = [
        digest
        for query in (
            "SELECT token_sha256 FROM email_verification_links",
            "SELECT email_hmac FROM email_verification_links",
            "SELECT to_hmac FROM mail_outbox",
        )
        for digest in scalars(app, query)
        if digest  # an erased account's links keep no hash at all
    ]
    assert hashes
    assert [digest for digest in hashes if digest in stdout] == []


def test_an_address_nobody_has_is_answered_with_nothing(app, client):
    register(client, "someone.else@bistro.example")
    data = printed(export(app, "nobody@bistro.example"))
    assert data == {"email": "nobody@bistro.example", "accounts": [], "restaurants": [], "other_mail": []}


def test_the_address_is_normalised_as_registration_stores_it(app, client):
    """email_validator puts an internationalised domain into one form (NFC) before it is lower-cased."""
    composed = "owner@caf\u00e9.example"
    register(client, composed)
    data = printed(export(app, "OWNER@CAFE\u0301.EXAMPLE"))  # the decomposed é
    assert data["email"] == composed
    assert [entry["email"] for entry in data["accounts"]] == [composed]


def test_all_deleted_lists_what_waits_for_erasure_and_when(make_app, standin):
    app = make_app(IRIS_DEACTIVATED_RETENTION_DAYS=30)
    migrate(app)
    client = app.test_client()
    _, admin_headers = signed_in_admin(client, app, standin)
    kept, gone, live = (register(client, f"{name}@bistro.example") for name in ("kept", "gone", "live"))
    deactivate(client, admin_headers, kept)
    delete_own(client, standin, gone)
    run_sql(app, "UPDATE users SET deleted_at = '2026-03-01 11:00:00+00' WHERE id = :id", id=kept["id"])
    run_sql(app, "UPDATE users SET deleted_at = '2026-04-01 11:00:00+00' WHERE id = :id", id=gone["id"])

    data = printed(export(app, "--all-deleted"))
    assert data["retention_days"] == 30
    assert [
        (entry["email"], entry["state"], entry["last_action"], entry["deleted_at"], entry["erase_after"])
        for entry in data["accounts"]
    ] == [
        (
            "kept@bistro.example",
            "deactivated",
            "deactivated",
            "2026-03-01T12:00:00+01:00",
            "2026-03-31T13:00:00+02:00",
        ),
    ]
    listed = export(app, "--all-deleted").stdout
    assert live["email"] not in listed
    assert gone["email"] not in listed  # deleted by its owner: erased at once, nothing waits
    assert (
        printed(export(app, "kept@bistro.example"))["accounts"][0]["erase_after"]
        == "2026-03-31T13:00:00+02:00"
    )


def test_retention_defaults_to_90_days(app, client, standin):
    _, admin_headers = signed_in_admin(client, app, standin)
    kept = register(client, "kept@bistro.example")
    deactivate(client, admin_headers, kept)
    run_sql(app, "UPDATE users SET deleted_at = '2026-01-10 11:00:00+00' WHERE id = :id", id=kept["id"])
    data = printed(export(app, "--all-deleted"))
    assert data["retention_days"] == 90
    assert [entry["erase_after"] for entry in data["accounts"]] == ["2026-04-10T13:00:00+02:00"]


def test_clerk_adds_the_clerk_user_withholding_every_other_address(app, client, standin):
    user = register(client, ADDRESS)
    add_primary_address(standin, user["clerk_user_id"], "new.address@elsewhere.example")
    data = printed(export(app, ADDRESS, "--clerk"))
    [entry] = data["accounts"]
    assert entry["clerk_user"]["id"] == user["clerk_user_id"]
    addresses = [item["email_address"] for item in entry["clerk_user"]["email_addresses"]]
    assert sorted(addresses) == sorted([ADDRESS, iris_export.WITHHELD])
    assert "elsewhere" not in json.dumps(data)


def test_clerk_unreachable_is_one_line_and_exit_1(app, client, standin):
    register(client, ADDRESS)
    standin.control.add_fault(method="GET", path="/v1/users/", status=503)
    result = export(app, ADDRESS, "--clerk")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: Clerk could not be asked what it holds: ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [[], [ADDRESS, "--all-deleted"], ["--all-deleted", "--clerk"], [" "]])
def test_it_takes_an_address_or_all_deleted(app, args):
    result = export(app, *args)
    assert result.exit_code == 2
    assert result.stdout == ""


def test_mail_to_the_address_for_an_account_that_moved_away_says_only_what_and_when(app, client, standin):
    """The account changed its address at Clerk (reconcile brought the row in step): a mail to the old
    address is data about whoever holds it, but the account and its new address are not theirs to see."""
    user = register(client, ADDRESS)
    add_primary_address(standin, user["clerk_user_id"], "new.address@elsewhere.example")
    assert app.test_cli_runner().invoke(args=["iris", "reconcile"]).exit_code == 0
    assert scalars(app, "SELECT email FROM users") == ["new.address@elsewhere.example"]

    result = export(app, ADDRESS)
    data = printed(result)
    assert data["accounts"] == []
    assert [(mail["kind"], mail["to_this_address"]) for mail in data["other_mail"]] == [
        ("verify_email", True)
    ]
    assert "elsewhere" not in result.stdout and user["id"] not in result.stdout
    [moved] = printed(export(app, "new.address@elsewhere.example"))["accounts"]
    assert [mail["to_this_address"] for mail in moved["mails"]] == [False]
