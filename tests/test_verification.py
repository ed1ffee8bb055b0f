"""Email verification end to end: the mail over real SMTP, the link, confirm, remove, lost answers, logs."""

from __future__ import annotations

import email.utils
import logging
import uuid
from datetime import UTC, datetime
from types import MappingProxyType

import pytest
import requests
import sqlalchemy as sa

from iris import mail
from iris.extensions import db
from tests.helpers import (
    BAPI_HEADERS,
    PASSWORD,
    URL,
    assert_error,
    assert_nothing_left,
    clerk_users,
    free_port,
    link_in,
    migrate,
    rows,
    smtp_server,
    wait_for,
)

EMAIL = "owner@bistro.example"


def mailing_app(make_app, smtp, **overrides):
    app = make_app(MAIL_SERVER="127.0.0.1", MAIL_PORT=smtp.port, **overrides)
    migrate(app)
    return app


def verified_at(app):
    with app.app_context():
        return db.session.execute(sa.text("SELECT email_verified_at FROM users")).scalar_one()


def clerk_verification(standin):
    [user] = clerk_users(standin)
    return user["email_addresses"][0]["verification"]["status"]


def test_registration_mails_a_link_whose_visit_changes_nothing_and_whose_button_confirms(
    make_app, smtp, standin, caplog
):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    caplog.set_level(logging.INFO)
    response = client.post(URL, json={"email": EMAIL, "password": PASSWORD})
    assert response.status_code == 201
    assert response.json["email_verified"] is False
    assert clerk_verification(standin) == "unverified"
    [message] = smtp.wait_for(1)
    assert message["To"] == EMAIL
    assert message["From"] and message["Subject"] and message["Message-ID"]
    sent = email.utils.parsedate_to_datetime(message["Date"])
    assert abs((datetime.now(UTC) - sent).total_seconds()) < 60
    assert message.get_body(preferencelist=("html",)) is not None
    assert PASSWORD not in message.as_string()
    path = link_in(message)

    page = client.get(path)
    assert page.status_code == 200 and "Is this your account?" in page.get_data(as_text=True)
    assert verified_at(app) is None  # a scanner's GET changes nothing

    done = client.post(path, data={"confirm": "1", "password": PASSWORD})
    assert done.status_code == 200, done.get_data(as_text=True)
    assert verified_at(app) is not None
    assert clerk_verification(standin) == "verified"
    assert "already" in client.get(path).get_data(as_text=True)  # used: says so

    token = path.rsplit("/", 1)[1]
    assert token not in caplog.text
    assert "/verify-email/<token>" in caplog.text
    assert mail.wait_until_idle(app, 5)
    with app.app_context():
        outbox = db.session.execute(sa.text("SELECT * FROM mail_outbox")).mappings().one()
    assert outbox["sent_at"] is not None and token not in str(dict(outbox))


def test_i_did_not_sign_up_removes_the_account_and_frees_the_email(make_app, smtp, standin):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    assert client.post(URL, json={"email": EMAIL, "password": PASSWORD}).status_code == 201
    path = link_in(smtp.wait_for(1)[0])
    assert client.post(path, data={"remove": "1"}).status_code == 200
    assert clerk_users(standin) == []
    assert [row.deleted_at is not None for row in rows(app)] == [True]
    assert client.post(URL, json={"email": EMAIL, "password": PASSWORD}).status_code == 201
    assert client.get(path).status_code == 200  # the old link: "no longer exists"


def test_a_tampered_link_changes_nothing_and_offers_a_new_mail(make_app, smtp, standin):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    assert client.post(URL, json={"email": EMAIL, "password": PASSWORD}).status_code == 201
    path = link_in(smtp.wait_for(1)[0])
    page = client.post(path[:-2] + "xx", data={"remove": "1"})
    assert page.status_code == 404
    assert "Send me a new link" in page.get_data(as_text=True)
    assert len(clerk_users(standin)) == 1


def test_a_refused_unverify_undoes_the_registration(make_app, smtp, standin):
    app = mailing_app(make_app, smtp)
    standin.control.add_fault(method="PATCH", path="/v1/email_addresses/", status=500, times=1)
    response = app.test_client().post(URL, json={"email": EMAIL, "password": PASSWORD})
    assert response.status_code in (502, 503), response.get_data(as_text=True)
    assert_nothing_left(app, standin)
    assert mail.wait_until_idle(app, 5)
    assert smtp.messages == []


def test_resend_answers_the_same_and_mails_once_per_interval(make_app, smtp, standin):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    assert client.post(URL, json={"email": EMAIL, "password": PASSWORD}).status_code == 201
    asked = client.post("/api/v1/auth/verification-email", json={"email": EMAIL})
    unknown = client.post("/api/v1/auth/verification-email", json={"email": "nobody@bistro.example"})
    assert asked.status_code == unknown.status_code == 202
    assert asked.json == unknown.json
    smtp.wait_for(1)
    assert mail.wait_until_idle(app, 5)
    assert len(smtp.messages) == 1  # the registration's mail was within the interval


def test_a_taken_unconfirmed_address_is_409_and_reconcile_removes_it_after_the_ttl(make_app, smtp, standin):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    assert client.post(URL, json={"email": EMAIL, "password": PASSWORD}).status_code == 201
    assert_error(client.post(URL, json={"email": EMAIL, "password": PASSWORD}), 409, "email_taken")
    with app.app_context():
        db.session.execute(sa.text("UPDATE users SET created_at = now() - interval '200 hours'"))
        db.session.commit()
    result = app.test_cli_runner().invoke(args=["iris", "reconcile"])
    assert "unconfirmed_removed 1" in result.output, result.output
    assert clerk_users(standin) == []


def test_with_verification_off_accounts_are_confirmed_and_no_mail_is_sent(make_app, smtp, standin):
    app = mailing_app(make_app, smtp, IRIS_EMAIL_VERIFICATION="off")
    response = app.test_client().post(URL, json={"email": EMAIL, "password": PASSWORD})
    assert response.json["email_verified"] is True
    assert mail.wait_until_idle(app, 5)
    assert smtp.messages == []
    assert clerk_verification(standin) == "verified"


# ---- Clerk failing while the owner confirms or removes

NEW_LINK = "/api/v1/auth/verification-email"


def registered_link(app, smtp, email=EMAIL, password=PASSWORD) -> str:
    """Register ``email`` through the API and return the path of the link in the mail it got."""
    before = len(smtp.messages)
    response = app.test_client().post(URL, json={"email": email, "password": password})
    assert response.status_code == 201, response.get_data(as_text=True)
    [message] = smtp.wait_for(before + 1)[before:]
    assert message["To"] == email
    return link_in(message)


def clerk_status_by_id(standin, clerk_user_id: str) -> str:
    """The user's address verification status from ``GET /v1/users/{id}`` at the stand-in."""
    response = requests.get(f"{standin.api_url}/users/{clerk_user_id}", headers=BAPI_HEADERS, timeout=5)
    response.raise_for_status()
    [address] = response.json()["email_addresses"]
    return address["verification"]["status"]


def clerk_user_exists(standin, clerk_user_id: str) -> bool:
    response = requests.get(f"{standin.api_url}/users/{clerk_user_id}", headers=BAPI_HEADERS, timeout=5)
    if response.status_code == 404:
        return False
    response.raise_for_status()
    return True


def assert_consistent(app, standin) -> None:
    """Never a live row whose Clerk user is gone, never a soft-deleted row whose Clerk user still exists."""
    for row in rows(app):
        exists = clerk_user_exists(standin, row.clerk_user_id)
        if row.deleted_at is None:
            assert exists, f"live row {row.id} points at a deleted Clerk user"
        else:
            assert not exists, f"soft-deleted row {row.id} still has its Clerk user"


CONFIRM_FAULTS = MappingProxyType(
    {
        "5xx": {"status": 500},
        "answer_lost_not_done": {"action": "drop"},
        "answer_lost_after_done": {"action": "drop", "after_commit": True},
    }
)


@pytest.mark.parametrize("fault", sorted(CONFIRM_FAULTS))
def test_confirm_while_clerk_fails_is_503_changes_nothing_here_and_a_retry_confirms(
    make_app, smtp, standin, fault
):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    path = registered_link(app, smtp)
    [row] = rows(app)
    standin.control.add_fault(method="PATCH", path="/v1/email_addresses/", times=1, **CONFIRM_FAULTS[fault])

    failed = client.post(path, data={"confirm": "1", "password": PASSWORD})
    assert failed.status_code == 503, failed.get_data(as_text=True)
    assert verified_at(app) is None
    assert "Is this your account?" in client.get(path).get_data(as_text=True)  # still open

    done = client.post(path, data={"confirm": "1", "password": PASSWORD})
    assert done.status_code == 200, done.get_data(as_text=True)
    assert "Thank you: your address is confirmed." in done.get_data(as_text=True)
    assert verified_at(app) is not None
    assert clerk_status_by_id(standin, row.clerk_user_id) == "verified"


REMOVE_FAULTS = MappingProxyType(
    {
        "delete_not_done": {"action": "drop"},
        "delete_done": {"action": "drop", "after_commit": True},
    }
)


@pytest.mark.parametrize("fault", sorted(REMOVE_FAULTS))
def test_remove_while_the_delete_answer_is_lost_is_honest_and_never_splits_row_and_clerk_user(
    make_app, smtp, standin, fault
):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    path = registered_link(app, smtp)
    [row] = rows(app)
    standin.control.add_fault(method="DELETE", path="/v1/users/", times=1, **REMOVE_FAULTS[fault])

    answer = client.post(path, data={"remove": "1"})
    assert_consistent(app, standin)
    if fault == "delete_done":  # Clerk deleted it: the lookup finds it gone, so the removal is done
        assert answer.status_code == 200, answer.get_data(as_text=True)
        assert "The account is removed" in answer.get_data(as_text=True)
        assert not clerk_user_exists(standin, row.clerk_user_id)
        assert [r.deleted_at is not None for r in rows(app)] == [True]
        return
    # Not carried out: the user is still at Clerk, so nothing changed here and the person is told to retry.
    assert answer.status_code == 503, answer.get_data(as_text=True)
    assert clerk_user_exists(standin, row.clerk_user_id)
    assert [r.deleted_at for r in rows(app)] == [None]

    again = client.post(path, data={"remove": "1"})
    assert again.status_code == 200, again.get_data(as_text=True)
    assert "The account is removed" in again.get_data(as_text=True)
    assert not clerk_user_exists(standin, row.clerk_user_id)
    assert [r.deleted_at is not None for r in rows(app)] == [True]
    assert_consistent(app, standin)


def test_a_delete_that_lands_after_iris_answered_503_is_settled_by_a_retry(make_app, smtp, standin):
    """The delete is held at Clerk past Iris's timeout; the lookup still finds the user, so the answer is 503
    and the row stays. The delete then lands: a retry (Clerk: no such user) finishes the removal."""
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    path = registered_link(app, smtp)
    [row] = rows(app)
    held = standin.control.add_fault(method="DELETE", path="/v1/users/", action="hold", times=1)

    answer = client.post(path, data={"remove": "1"})
    assert answer.status_code == 503, answer.get_data(as_text=True)
    assert [r.deleted_at for r in rows(app)] == [None]
    standin.control.release(held["id"])
    wait_for(lambda: not clerk_user_exists(standin, row.clerk_user_id))

    again = client.post(path, data={"remove": "1"})
    assert again.status_code == 200, again.get_data(as_text=True)
    assert "The account is removed" in again.get_data(as_text=True)
    assert [r.deleted_at is not None for r in rows(app)] == [True]
    assert_consistent(app, standin)


# ---- the mail server down


def outbox(app) -> list[dict]:
    with app.app_context():
        return [dict(row) for row in db.session.execute(sa.text("SELECT * FROM mail_outbox")).mappings()]


def test_a_mail_the_server_refused_waits_in_the_outbox_and_reconcile_sends_it_later(make_app, standin):
    port = free_port()  # nothing listens here yet: the mail server is down
    app = make_app(MAIL_SERVER="127.0.0.1", MAIL_PORT=port)
    migrate(app)
    client = app.test_client()
    response = client.post(URL, json={"email": EMAIL, "password": PASSWORD})
    assert response.status_code == 201, response.get_data(as_text=True)
    assert mail.wait_until_idle(app, 5)  # the courier tried, after the answer
    [row] = outbox(app)
    assert row["sent_at"] is None and row["attempts"] == 1 and row["last_error"]

    with smtp_server(port) as mailbox:  # the server is back, on the configured port
        result = app.test_cli_runner().invoke(args=["iris", "reconcile"])
        assert result.exit_code == 0, result.output
        assert "mail_sent 1," in result.output and "failed 0" in result.output
        again = app.test_cli_runner().invoke(args=["iris", "reconcile"])
        assert "mail_sent 0," in again.output and "failed 0" in again.output  # sent once, not again
    [message] = mailbox.messages
    assert message["To"] == EMAIL
    [row] = outbox(app)
    assert row["sent_at"] is not None

    path = link_in(message)
    done = client.post(path, data={"confirm": "1", "password": PASSWORD})
    assert done.status_code == 200, done.get_data(as_text=True)
    assert verified_at(app) is not None


# ---- secrets in mail, outbox and logs


def backdate_outbox(app) -> None:
    """Let the per-address resend interval pass for every queued mail."""
    with app.app_context():
        db.session.execute(sa.text("UPDATE mail_outbox SET created_at = created_at - interval '1 hour'"))
        db.session.commit()


def test_the_password_is_in_no_mail_outbox_row_or_log_record_and_the_token_in_no_log_record(
    make_app, smtp, standin, caplog
):
    password = f"Unique-{uuid.uuid4().hex}-pw"
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    caplog.set_level(logging.DEBUG)

    assert client.post(URL, json={"email": EMAIL, "password": password}).status_code == 201  # mail 1
    backdate_outbox(app)
    assert client.post(NEW_LINK, json={"email": EMAIL}).status_code == 202  # mail 2: resend over the API
    backdate_outbox(app)
    assert client.post("/verify-email", data={"email": EMAIL}).status_code == 200  # mail 3: the page
    backdate_outbox(app)
    assert_error(client.post(URL, json={"email": EMAIL, "password": password}), 409, "email_taken")  # mail 4
    smtp.wait_for(4)
    assert mail.wait_until_idle(app, 5)  # its log records too
    assert len(smtp.raw) == len(smtp.messages) == 4  # every path really mailed

    tokens = [link_in(message).rsplit("/", 1)[1] for message in smtp.messages]
    path = link_in(smtp.messages[-1])
    assert client.get(path).status_code == 200  # the links reach the request log too
    assert client.post(path, data={"confirm": "1", "password": password}).status_code == 200

    for raw, message in zip(smtp.raw, smtp.messages, strict=True):
        assert password.encode() not in raw
        parts = [part.get_content() for part in message.walk() if not part.is_multipart()]
        assert parts and all(password not in part for part in parts)
    for row in outbox(app):
        assert password not in str(row)
        assert all(token not in str(row) for token in tokens)

    # Every record of this process but the test SMTP server's own (aiosmtpd's "mail.log" echoes DATA).
    records = [record for record in caplog.records if not record.name.startswith("mail.log")]
    assert records
    for record in records:
        text = record.getMessage() + " " + str(record.__dict__)
        assert password not in text, record.name
        assert all(token not in text for token in tokens), record.name
    assert any(
        record.name == "iris.request" and "/verify-email/<token>" in record.getMessage() for record in records
    )


# ---- resending: per-IP limit, one answer for every address

PAGE_NEW_LINK = "/verify-email"


def test_asking_for_new_links_is_limited_per_ip_across_the_api_and_the_page(make_app, smtp, standin):
    app = mailing_app(make_app, smtp, RATELIMIT_ENABLED=True, RATELIMIT_VERIFICATION_EMAIL="2 per minute")
    client = app.test_client()
    ip = {"REMOTE_ADDR": "203.0.113.9"}
    assert client.post(NEW_LINK, json={"email": EMAIL}, environ_base=ip).status_code == 202
    assert client.post(PAGE_NEW_LINK, data={"email": EMAIL}, environ_base=ip).status_code == 200
    api = client.post(NEW_LINK, json={"email": EMAIL}, environ_base=ip)
    assert_error(api, 429, "rate_limited")
    assert int(api.headers["Retry-After"]) > 0
    page = client.post(PAGE_NEW_LINK, data={"email": EMAIL}, environ_base=ip)
    assert page.status_code == 429
    assert page.mimetype == "text/html"
    assert int(page.headers["Retry-After"]) > 0
    # Another address keeps its own allowance; reading the page is not limited.
    other = {"REMOTE_ADDR": "203.0.113.10"}
    assert client.post(PAGE_NEW_LINK, data={"email": EMAIL}, environ_base=other).status_code == 200
    assert client.get(PAGE_NEW_LINK, environ_base=ip).status_code == 200


def test_the_new_link_answer_is_the_same_for_unknown_confirmed_and_unconfirmed_addresses(
    make_app, smtp, standin
):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    unconfirmed, confirmed = "waiting@bistro.example", "done@bistro.example"
    registered_link(app, smtp, unconfirmed)
    confirm_path = registered_link(app, smtp, confirmed)
    assert client.post(confirm_path, data={"confirm": "1", "password": PASSWORD}).status_code == 200
    backdate_outbox(app)  # past the resend interval: only the unconfirmed address may get a mail
    before = len(smtp.messages)

    answers = {
        email: client.post(NEW_LINK, json={"email": email})
        for email in ("nobody@bistro.example", confirmed, unconfirmed)
    }
    assert {response.status_code for response in answers.values()} == {202}
    bodies = {response.get_data() for response in answers.values()}
    assert len(bodies) == 1, bodies
    assert len({tuple(sorted(set(r.headers.keys()))) for r in answers.values()}) == 1
    smtp.wait_for(before + 1)
    assert mail.wait_until_idle(app, 5)
    assert [message["To"] for message in smtp.messages[before:]] == [unconfirmed]  # the cases did differ
