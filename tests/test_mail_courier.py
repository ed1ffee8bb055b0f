"""The mail courier (iris.mail): requests hand committed mails to a background thread and answer without
waiting for SMTP; the thread batches what is queued over one connection, survives failures, lives per
process, and the process drains it at exit. Real SMTP (aiosmtpd) and real PostgreSQL throughout."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from iris import mail, verification
from iris.extensions import db
from iris.models import User
from tests.helpers import (
    PASSWORD,
    URL,
    Mailbox,
    assert_error,
    link_in,
    migrate,
    register,
    smtp_server,
)

ROOT = Path(__file__).resolve().parents[1]
NEW_LINK = "/api/v1/auth/verification-email"


class HeldMailbox(Mailbox):
    """Takes each message but answers it only once ``release`` is set, or after ``hold`` seconds; ``answered``
    is set when it first answers a message. Counts the QUIT commands it got in ``quits``."""

    def __init__(self, hold: float) -> None:
        super().__init__()
        self.hold = hold
        self.release = threading.Event()
        self.answered = threading.Event()
        self.quits = 0

    async def handle_DATA(self, server, session, envelope) -> str:
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, self.hold)
        self.answered.set()
        return await super().handle_DATA(server, session, envelope)

    async def handle_QUIT(self, server, session, envelope) -> str:
        self.quits += 1
        return "221 Bye"


class DroppingMailbox(HeldMailbox):
    """A held mailbox that closes a connection when a second mail starts on it, as a server does whose idle
    timeout ran out: silently, or first answering ``421`` (``answer``)."""

    def __init__(self, hold: float, answer: str | None) -> None:
        super().__init__(hold)
        self.answer = answer

    async def handle_MAIL(self, server, session, envelope, address, mail_options) -> str:
        if session.peer in self.peers:  # this connection already delivered a message
            if self.answer:
                await server.push(self.answer)
            server.transport.close()
            return "421 4.4.2 closing"  # not written: the connection is closed
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"


@pytest.fixture
def slow_smtp(monkeypatch) -> Iterator[HeldMailbox]:
    """A held mailbox that answers after at most 8 s, with the app's SMTP timeout raised above that."""
    monkeypatch.setattr(mail, "SMTP_TIMEOUT_SECONDS", 10)
    with smtp_server(mailbox=HeldMailbox(hold=8)) as mailbox:
        try:
            yield mailbox
        finally:
            mailbox.release.set()


def mailing_app(make_app, smtp):
    app = make_app(MAIL_SERVER="127.0.0.1", MAIL_PORT=smtp.port)
    migrate(app)
    return app


def unconfirmed_account(app, email: str) -> uuid.UUID:
    """A complete, unconfirmed account made straight in the table (no mail queued for it)."""
    with app.app_context():
        user = User(email=email, role="restaurant", clerk_user_id=f"user_{uuid.uuid4().hex[:12]}")
        db.session.add(user)
        db.session.commit()
        return user.id


def queued_mail(app, email: str) -> uuid.UUID:
    """A committed outbox row for a new unconfirmed account, handed to nobody yet."""
    user_id = unconfirmed_account(app, email)
    with app.app_context():
        outbox_id = mail.queue(db.session.get(User, user_id), verification.VERIFY)
        db.session.commit()
    return outbox_id


def outbox(app) -> dict[str, dict]:
    """Every outbox row, by its account's address (the outbox holds only a keyed hash of it)."""
    with app.app_context():
        rows = db.session.execute(
            sa.text("SELECT o.*, u.email FROM mail_outbox o JOIN users u ON u.id = o.user_id")
        ).mappings()
        return {row["email"]: dict(row) for row in rows}


# ---- the request does not wait for SMTP

REQUESTS = ("registration", "new link", "taken address")


@pytest.mark.parametrize("kind", REQUESTS)
def test_the_answer_comes_before_the_mail_server_answers_and_the_mail_arrives_after(make_app, standin, kind):
    """The server holds each message for up to 2 s, less than the SMTP timeout: a request that sent the
    mail itself would get the server's answer before answering its client."""
    with smtp_server(mailbox=HeldMailbox(hold=2)) as smtp:
        try:
            app = mailing_app(make_app, smtp)
            client = app.test_client()
            email = "owner@bistro.example"
            if kind == "registration":
                assert client.post(URL, json={"email": email, "password": PASSWORD}).status_code == 201
            elif kind == "new link":
                unconfirmed_account(app, email)
                assert client.post(NEW_LINK, json={"email": email}).status_code == 202
            else:
                unconfirmed_account(app, email)
                assert_error(
                    client.post(URL, json={"email": email, "password": PASSWORD}), 409, "email_taken"
                )
            assert not smtp.answered.is_set()
            assert smtp.messages == []
            smtp.release.set()
            [message] = smtp.wait_for(1)
        finally:
            smtp.release.set()
    assert message["To"] == email
    assert "/verify-email/" in link_in(message)
    assert mail.wait_until_idle(app, 5)
    row = outbox(app)[email]
    assert row["sent_at"] is not None and row["attempts"] == 1 and row["last_error"] is None


def test_without_a_mail_server_the_courier_prints_the_mail_with_its_link(make_app, standin, capfd):
    app = make_app()
    migrate(app)
    register(app.test_client())
    assert mail.wait_until_idle(app, 5)
    out = capfd.readouterr().out
    assert "--- mail (no MAIL_SERVER: printed, not sent)" in out
    assert "To: owner@bistro.example" in out
    assert "https://iris.test/verify-email/" in out
    assert outbox(app)["owner@bistro.example"]["sent_at"] is not None


def test_the_printed_mail_stays_out_of_a_cli_command_running_meanwhile(make_app, standin, monkeypatch, capfd):
    """The courier prints to the process's stdout, not into a foreground redirect (CliRunner's capture)."""
    app = make_app()
    migrate(app)
    printing = threading.Event()
    deliver = mail.deliver

    def held(message):  # the courier prints only while the command below runs
        printing.wait(5)
        deliver(message)

    monkeypatch.setattr(mail, "deliver", held)
    register(app.test_client())

    @app.cli.command("wait-for-the-mail")
    def wait_for_the_mail():
        printing.set()
        assert mail.wait_until_idle(app, 5)

    result = app.test_cli_runner().invoke(args=["wait-for-the-mail"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "--- mail (no MAIL_SERVER: printed, not sent)" in capfd.readouterr().out


# ---- batches: one connection while mails are waiting


def test_mails_queued_while_one_is_sent_share_its_connection_which_is_closed_once_none_wait(
    make_app, standin, slow_smtp
):
    app = mailing_app(make_app, slow_smtp)
    client = app.test_client()
    emails = [f"owner{n}@bistro.example" for n in range(3)]
    for email in emails:  # the first mail is held at the server meanwhile, so the others queue up
        register(client, email)
    slow_smtp.release.set()
    messages = slow_smtp.wait_for(3)
    assert mail.wait_until_idle(app, 5)
    assert [message["To"] for message in messages] == emails
    assert len(set(slow_smtp.peers)) == 1  # one connection
    assert slow_smtp.quits == 1  # closed once the queue was empty
    assert all(row["sent_at"] is not None for row in outbox(app).values())
    with app.app_context():
        assert db.engine.pool.checkedout() == 0  # the courier's session gave its connection back


@pytest.mark.parametrize("answer", [None, "421 4.4.2 Timeout exceeded, closing"], ids=["silently", "421"])
def test_a_reused_connection_the_server_dropped_does_not_lose_the_mail(
    make_app, standin, monkeypatch, answer
):
    monkeypatch.setattr(mail, "SMTP_TIMEOUT_SECONDS", 10)
    with smtp_server(mailbox=DroppingMailbox(hold=8, answer=answer)) as smtp:
        try:
            app = mailing_app(make_app, smtp)
            client = app.test_client()
            register(client, "first@bistro.example")
            register(client, "second@bistro.example")  # queued behind the first, for the same connection
            smtp.release.set()
            smtp.wait_for(2)
        finally:
            smtp.release.set()
    assert mail.wait_until_idle(app, 5)
    assert len(set(smtp.peers)) == 2  # the second mail went over a fresh connection
    rows = outbox(app)
    assert [(row["attempts"], row["last_error"]) for row in rows.values()] == [(1, None), (1, None)]
    assert all(row["sent_at"] is not None for row in rows.values())


def test_the_courier_survives_a_mail_it_cannot_build_and_reconcile_sends_that_one(
    make_app, standin, smtp, monkeypatch, caplog
):
    app = mailing_app(make_app, smtp)
    client = app.test_client()
    compose = verification.compose

    def broken_for_the_first(user, kind):
        if user.email == "first@bistro.example":
            raise RuntimeError("a bug")
        return compose(user, kind)

    monkeypatch.setattr(verification, "compose", broken_for_the_first)
    register(client, "first@bistro.example")
    register(client, "second@bistro.example")
    [message] = smtp.wait_for(1)
    assert message["To"] == "second@bistro.example"
    assert mail.wait_until_idle(app, 5)
    first = outbox(app)["first@bistro.example"]
    assert first["sent_at"] is None and first["attempts"] == 1
    [record] = [record for record in caplog.records if "in the courier" in record.getMessage()]
    assert record.getMessage() == f"mail {first['id']}: RuntimeError in the courier; left for reconcile"
    assert record.exc_info is None  # the id and the type only

    monkeypatch.setattr(verification, "compose", compose)
    result = app.test_cli_runner().invoke(args=["iris", "reconcile"])
    assert "mail_sent 1," in result.output and "failed 0" in result.output, result.output
    assert [message["To"] for message in smtp.wait_for(2)][1] == "first@bistro.example"


def test_the_mail_is_built_without_touching_the_database_after_the_claim(
    make_app, standin, smtp, monkeypatch
):
    """The claim's transaction reads all compose needs, so a database lost right after it (a restart) cannot
    fail the courier while it builds the mail."""
    app = mailing_app(make_app, smtp)
    with app.app_context():
        engine = db.engine
    compose = verification.compose
    statements_while_composing = []

    def counting(user, kind):
        statements = []

        def record(connection, cursor, statement, *args):
            statements.append(statement)

        sa.event.listen(engine, "before_cursor_execute", record)
        try:
            return compose(user, kind)
        finally:
            sa.event.remove(engine, "before_cursor_execute", record)
            statements_while_composing.append(statements)

    monkeypatch.setattr(verification, "compose", counting)
    register(app.test_client())
    smtp.wait_for(1)
    assert mail.wait_until_idle(app, 5)
    assert statements_while_composing == [[]]


# ---- one courier per process


# Python 3.12+ warns about any fork of a process with threads; the child here uses none it inherited.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_process_makes_its_own_courier_and_the_parent_keeps_its_own(make_app, standin, smtp):
    app = mailing_app(make_app, smtp)
    assert mail.COURIER not in app.extensions  # nothing is started before the first mail (a gunicorn master)
    register(app.test_client(), "parent@bistro.example")
    smtp.wait_for(1)
    assert mail.wait_until_idle(app, 5)
    parents = app.extensions[mail.COURIER]
    outbox_id = queued_mail(app, "child@bistro.example")

    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 1
        try:
            with app.app_context():
                db.engine.dispose(close=False)  # the parent's pooled connections stay the parent's
                mail.send_later(outbox_id, verification.compose)
                own = app.extensions[mail.COURIER]
                if own is not parents and own.pid == os.getpid() and mail.wait_until_idle(app, 10):
                    code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert [message["To"] for message in smtp.wait_for(2)] == [
        "parent@bistro.example",
        "child@bistro.example",
    ]
    assert app.extensions[mail.COURIER] is parents and parents.pid == os.getpid()


# ---- at exit

SEND_AND_EXIT = """
import sys, uuid
from iris import mail, verification
from tests.helpers import make_test_app

schema, clerk_url, port, outbox_id, drain = sys.argv[1:]
mail.DRAIN_SECONDS = float(drain)
app = make_test_app(schema, clerk_url, MAIL_SERVER="127.0.0.1", MAIL_PORT=int(port))
with app.app_context():
    mail.send_later(uuid.UUID(outbox_id), verification.compose)
sys.exit(0)  # at once: the mail is still at the server, held for a second
"""


@pytest.mark.parametrize("drain", [mail.DRAIN_SECONDS, 0.3], ids=["drained", "cut_short"])
def test_a_process_exiting_waits_for_its_courier_at_most_drain_seconds(make_app, schema, standin, drain):
    with smtp_server(mailbox=HeldMailbox(hold=1)) as smtp:
        app = mailing_app(make_app, smtp)
        outbox_id = queued_mail(app, "owner@bistro.example")
        finished = subprocess.run(
            [sys.executable, "-c", SEND_AND_EXIT, schema, standin.base_url, str(smtp.port), str(outbox_id),
             str(drain)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        smtp.release.set()
    assert finished.returncode == 0, finished.stderr
    row = outbox(app)["owner@bistro.example"]
    if drain == mail.DRAIN_SECONDS:
        assert row["sent_at"] is not None, finished.stderr
    else:  # the server answered after the process had gone: reconcile sends it
        assert row["sent_at"] is None
        assert "mail courier: 1 mails left at exit for reconcile" in finished.stderr
