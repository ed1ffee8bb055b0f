"""The verification link from an attacker's side: confirming proves the password (pre-hijacking), wrong
passwords are bounded per client and per account, links reveal nothing and work once, and mails to one
address are bounded whatever asks for them. Real stand-in over HTTP, real PostgreSQL, real SMTP."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging

import requests
import sqlalchemy as sa

from iris import mail
from iris.extensions import db
from tests.helpers import (
    BAPI_HEADERS,
    ME,
    PASSWORD,
    URL,
    assert_error,
    bearer,
    link_in,
    migrate,
    run_sql,
    session_token,
)

VICTIM = "victim@bistro.example"
ATTACKERS_PASSWORD = "attacker-chose-this-one-7731"
WRONG = "not-the-password-at-all-4411"


def mailing_app(make_app, smtp, **overrides):
    app = make_app(MAIL_SERVER="127.0.0.1", MAIL_PORT=smtp.port, **overrides)
    migrate(app)
    return app


def registered_link(app, smtp, email: str = VICTIM, password: str = PASSWORD) -> str:
    """Register ``email`` with ``password`` through the API; the path of the link in the mail it got."""
    before = len(smtp.messages)
    response = app.test_client().post(URL, json={"email": email, "password": password})
    assert response.status_code == 201, response.get_data(as_text=True)
    [message] = smtp.wait_for(before + 1)[before:]
    return link_in(message)


def rows(app) -> list[sa.Row]:
    """Every account row, oldest first, with its confirmation and deletion times."""
    with app.app_context():
        found = db.session.execute(
            sa.text(
                "SELECT id, email, clerk_user_id, email_verified_at, deleted_at"
                " FROM users ORDER BY created_at"
            )
        ).all()
        db.session.rollback()
    return found


def clerk_status(standin, clerk_user_id: str) -> str:
    """The user's address verification status, read from the stand-in (``GET /v1/users/{id}``)."""
    response = requests.get(f"{standin.api_url}/users/{clerk_user_id}", headers=BAPI_HEADERS, timeout=5)
    response.raise_for_status()
    [address] = response.json()["email_addresses"]
    return address["verification"]["status"]


def password_checks_at_clerk(standin) -> int:
    return sum(
        count for route, count in standin.control.stats()["requests"].items() if "verify_password" in route
    )


def confirm(client, path: str, password: str | None, ip: str = "198.51.100.7"):
    data = {"confirm": "1"} if password is None else {"confirm": "1", "password": password}
    return client.post(path, data=data, environ_base={"REMOTE_ADDR": ip})


# ---- pre-hijacking


def test_pre_hijacking_the_victim_pressing_confirm_does_not_hand_the_attacker_a_verified_account(
    make_app, smtp, standin, caplog
):
    """The attacker registers the victim's address with a password of their own. The victim opens the mail's
    link and presses "Yes, this is my account" without the attacker's password: nothing is confirmed, here
    or at Clerk. Only the person who chose the password (the legitimate owner's path) can confirm."""
    caplog.set_level(logging.DEBUG)
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    path = registered_link(app, smtp, VICTIM, ATTACKERS_PASSWORD)
    [account] = rows(app)

    for typed in (None, "", WRONG):
        answer = confirm(client, path, typed)
        assert answer.status_code == 422, answer.get_data(as_text=True)
        body = answer.get_data(as_text=True)
        assert "Nothing was confirmed" in body and "Is this your account?" in body
        if typed:
            assert typed not in body  # never echoed
        [row] = rows(app)
        assert row.email_verified_at is None
        assert clerk_status(standin, account.clerk_user_id) == "unverified"

    page = client.get(path).get_data(as_text=True)  # it says why, and what to do instead
    assert "password you chose when you signed up" in page
    assert "If you did not choose a password on Iris, this account is not yours" in page

    done = confirm(client, path, ATTACKERS_PASSWORD)
    assert done.status_code == 200, done.get_data(as_text=True)
    assert "Thank you: your address is confirmed." in done.get_data(as_text=True)
    assert rows(app)[0].email_verified_at is not None
    assert clerk_status(standin, account.clerk_user_id) == "verified"
    assert all(WRONG not in record.getMessage() + str(record.__dict__) for record in caplog.records)
    assert all(ATTACKERS_PASSWORD not in str(dict(row._mapping)) for row in rows(app))


def test_this_wasnt_me_needs_no_password_and_leads_the_note_to_a_squatted_addresss_owner(
    make_app, smtp, standin
):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    registered_link(app, smtp, VICTIM, ATTACKERS_PASSWORD)
    run_sql(app, "UPDATE mail_outbox SET created_at = created_at - interval '1 hour'")  # past the bound
    # The victim tries to sign up and finds the address taken: they get the note.
    assert_error(client.post(URL, json={"email": VICTIM, "password": PASSWORD}), 409, "email_taken")
    [_, note] = smtp.wait_for(2)
    text = note.get_body(preferencelist=("plain",)).get_content()
    assert text.index("This wasn't me") < text.index("Yes, this is my account")
    html = note.get_body(preferencelist=("html",)).get_content()
    assert html.index("This wasn") < html.index("Yes, this is my account")

    removed = client.post(link_in(note), data={"remove": "1"})
    assert removed.status_code == 200, removed.get_data(as_text=True)
    assert "The account is removed" in removed.get_data(as_text=True)
    assert [row.deleted_at is not None for row in rows(app)] == [True]
    assert client.post(URL, json={"email": VICTIM, "password": PASSWORD}).status_code == 201


# ---- bounds on wrong passwords


def test_wrong_passwords_are_bounded_per_account_from_however_many_client_addresses(make_app, smtp, standin):
    app = mailing_app(make_app, smtp)  # the per-IP limit is off: only the account's own bound counts
    client = app.test_client()
    path = registered_link(app, smtp)
    for n in range(5):
        assert confirm(client, path, WRONG, ip=f"203.0.113.{n}").status_code == 422
    checks = password_checks_at_clerk(standin)
    assert checks == 5

    limited = confirm(client, path, PASSWORD, ip="203.0.113.99")  # even the right one, from a new address
    assert limited.status_code == 429, limited.get_data(as_text=True)
    assert limited.mimetype == "text/html"
    assert 0 < int(limited.headers["Retry-After"]) <= 15 * 60 + 1
    assert password_checks_at_clerk(standin) == checks  # Clerk was not asked
    assert rows(app)[0].email_verified_at is None

    # "This wasn't me" is never blocked by it; and once the window has passed, the owner confirms.
    run_sql(app, "UPDATE verification_attempts SET created_at = created_at - interval '16 minutes'")
    assert confirm(client, path, PASSWORD).status_code == 200
    assert rows(app)[0].email_verified_at is not None


def test_wrong_passwords_are_limited_per_client_ip_and_removing_is_not(make_app, smtp, standin):
    app = mailing_app(make_app, smtp, RATELIMIT_ENABLED=True, RATELIMIT_WRONG_PASSWORD="2 per minute")
    client = app.test_client()
    path = registered_link(app, smtp)
    other = registered_link(app, smtp, "someone@bistro.example")
    ip = "203.0.113.50"
    assert confirm(client, path, WRONG, ip).status_code == 422
    assert confirm(client, path, WRONG, ip).status_code == 422
    limited = confirm(client, path, PASSWORD, ip)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert rows(app)[0].email_verified_at is None
    # The same client may still say "this wasn't me"; another client confirms with the password.
    removed = client.post(other, data={"remove": "1"}, environ_base={"REMOTE_ADDR": ip})
    assert removed.status_code == 200, removed.get_data(as_text=True)
    assert confirm(client, path, PASSWORD, "203.0.113.51").status_code == 200


def test_a_confirm_dressed_as_this_wasnt_me_still_counts_towards_the_limit(make_app, smtp, standin):
    """``remove=`` (empty) is not pressing "This wasn't me" (the view confirms with the password): it must not
    be spared by the limit, or guesses could be sent as many as one liked from one address."""
    app = mailing_app(make_app, smtp, RATELIMIT_ENABLED=True, RATELIMIT_WRONG_PASSWORD="2 per minute")
    client = app.test_client()
    path = registered_link(app, smtp)
    environ = {"REMOTE_ADDR": "203.0.113.60"}
    for _ in range(2):
        guess = client.post(path, data={"password": WRONG, "remove": ""}, environ_base=environ)
        assert guess.status_code == 422
    assert client.post(path, data={"password": WRONG, "remove": ""}, environ_base=environ).status_code == 429


def test_clerk_unreachable_while_checking_the_password_is_503_changes_nothing_and_uses_no_try(
    make_app, smtp, standin
):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    path = registered_link(app, smtp)
    [account] = rows(app)
    standin.control.add_fault(method="POST", path="/v1/users/", action="drop", times=6)
    for _ in range(6):
        failed = confirm(client, path, PASSWORD)
        assert failed.status_code == 503, failed.get_data(as_text=True)
    assert rows(app)[0].email_verified_at is None
    assert clerk_status(standin, account.clerk_user_id) == "unverified"
    done = confirm(client, path, PASSWORD)  # six unanswered checks did not use up the account's five
    assert done.status_code == 200, done.get_data(as_text=True)


# ---- links reveal nothing and work once


def decodings(token: str) -> list[bytes]:
    """Every way a reader might decode the token: as is, and base64 / base64url (padded, per segment)."""
    found = [token.encode()]
    for part in [token, *token.split(".")]:
        padded = part + "=" * (-len(part) % 4)
        for decode in (base64.urlsafe_b64decode, base64.b64decode):
            with contextlib.suppress(binascii.Error, ValueError):
                found.append(decode(padded))
    return found


def every_stored_value(app) -> str:
    """The text of every row of every table of the app's schema."""
    with app.app_context():
        tables = db.session.execute(
            sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
        ).scalars()
        dumped = [
            str(row)
            for table in list(tables)
            # The table names come from the catalogue, not from input.
            for row in db.session.execute(sa.text(f'SELECT row_to_json(t)::text FROM "{table}" t')).scalars()  # noqa: S608
        ]
        db.session.rollback()
    return "\n".join(dumped)


def test_the_token_reveals_nothing_and_the_database_holds_only_its_hash(make_app, smtp, standin):
    app = mailing_app(make_app, smtp)
    path = registered_link(app, smtp)
    token = path.rsplit("/", 1)[1]
    [account] = rows(app)
    about_the_account = [VICTIM, "victim", "bistro", str(account.id), account.id.hex, account.clerk_user_id]
    for decoded in decodings(token):
        for value in about_the_account:
            assert value.encode() not in decoded, (value, decoded)
        assert b'"user"' not in decoded and b'"email"' not in decoded
    stored = every_stored_value(app)
    assert VICTIM in stored  # the dump really read the tables
    assert token not in stored
    assert hashlib.sha256(token.encode()).hexdigest() in stored


def test_a_used_link_is_inert_and_a_changed_address_invalidates_it(make_app, smtp, standin):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    path = registered_link(app, smtp)
    assert confirm(client, path, PASSWORD).status_code == 200
    again = client.post(path, data={"remove": "1"})  # used: removes nothing
    assert again.status_code == 200 and "This link was used already" in again.get_data(as_text=True)
    assert [row.deleted_at for row in rows(app)] == [None]

    other = registered_link(app, smtp, "moved@bistro.example")
    run_sql(app, "UPDATE users SET email = 'elsewhere@bistro.example' WHERE email = 'moved@bistro.example'")
    page = client.post(other, data={"remove": "1"})
    assert page.status_code == 200 and "or its email address has changed" in page.get_data(as_text=True)
    assert [row.deleted_at for row in rows(app)] == [None, None]


def test_an_expired_link_is_410_and_changes_nothing(make_app, smtp, standin):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    path = registered_link(app, smtp)
    run_sql(app, "UPDATE email_verification_links SET expires_at = now() - interval '1 second'")
    page = confirm(client, path, PASSWORD)
    assert page.status_code == 410 and "This link has expired" in page.get_data(as_text=True)
    assert client.post(path, data={"remove": "1"}).status_code == 410
    [row] = rows(app)
    assert row.email_verified_at is None and row.deleted_at is None


# ---- mails to one address are bounded whatever asks


def test_register_delete_register_three_times_mails_the_address_once(make_app, smtp, standin):
    """The attacker registers the victim's address, signs in, deletes the account and registers it again:
    each registration succeeds, but the victim's inbox gets one mail, not three."""
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    for _ in range(3):
        created = client.post(URL, json={"email": VICTIM, "password": ATTACKERS_PASSWORD})
        assert created.status_code == 201, created.get_data(as_text=True)
        token = session_token(standin, created.json["clerk_user_id"], 600)
        deleted = client.delete(ME, headers=bearer(token))
        assert deleted.status_code == 204, deleted.get_data(as_text=True)
    assert mail.wait_until_idle(app, 5)
    assert len(rows(app)) == 3
    assert [message["To"] for message in smtp.messages] == [VICTIM]
    with app.app_context():
        queued = db.session.execute(sa.text("SELECT count(*) FROM mail_outbox")).scalar_one()
    assert queued == 1
