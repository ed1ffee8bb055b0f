"""Iris's own mail: the outbox, building a message, and sending it over SMTP.

Guarantees:
- **Not lost.** A mail is due once its ``mail_outbox`` row is committed, in the same transaction as what makes
  it due (a completed registration, a request for a new link). It is sent after that commit; one that could
  not be sent stays unsent, and ``flask iris reconcile`` (``send_unsent``) tries it again, at most
  ``MAX_ATTEMPTS`` times in all.
- **At most one sender at a time.** A sender claims a row by raising ``attempts`` with a conditional UPDATE,
  so two senders never both send the same attempt. A process that dies between sending and recording
  ``sent_at`` may cause one repeat: a mail can arrive twice, never zero times while attempts remain.
- **Nothing secret stored or logged.** An outbox row holds who and what (user, kind, address), never a link,
  token or password. The link is made when the mail is built; only the kind, the row id and an error's type
  are logged. ``last_error`` holds an error type or SMTP code, never a message body.

Transport: SMTP from MAIL_SERVER, MAIL_PORT, MAIL_USERNAME, MAIL_PASSWORD, MAIL_USE_TLS (STARTTLS),
MAIL_USE_SSL (implicit TLS) and MAIL_DEFAULT_SENDER, with the standard library (``smtplib``,
``email.message``). Without MAIL_SERVER (only possible in development and tests: elsewhere start-up requires
it while verification is on) the mail is printed to the console, link included.
"""

from __future__ import annotations

import functools
import logging
import smtplib
import ssl
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import make_msgid
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import current_app

from iris.errors import DATABASE_UNREACHABLE, database_failure
from iris.extensions import db
from iris.models import MailOutbox, User

log = logging.getLogger(__name__)

# Builds the mail of a kind for an account, or None when it is no longer needed (iris.verification.compose).
Composer = Callable[[User, str], EmailMessage | None]

# How many times one outbox row is tried before it is given up (its last_error says why).
MAX_ATTEMPTS = 5
# Seconds for the SMTP connect and for each read or write after it. A mail is sent inside the request that
# made it due, so a slow or unreachable server must fail quickly; the mail then stays in the outbox.
SMTP_TIMEOUT_SECONDS = 3


def queue(user: User, kind: str) -> uuid.UUID:
    """Add a ``kind`` mail to ``user`` to the session's transaction; the caller commits, then calls
    ``send`` with the returned id."""
    outbox_id = uuid.uuid4()
    db.session.add(MailOutbox(id=outbox_id, user_id=user.id, kind=kind, to_address=user.email, attempts=0))
    return outbox_id


def send(outbox_id: uuid.UUID, compose: Composer) -> bool:
    """Claim and send one due mail; True when it went out. Never raises: a failure is recorded on the row
    (``last_error``), logged without the mail's content, and left for ``reconcile``.

    A row already sent, out of attempts, or claimed by another sender at this moment is left alone (False).
    A mail no longer needed (its account confirmed or removed meanwhile) is closed without sending.
    ``compose`` builds it from the account and the kind.
    """
    try:
        row = db.session.get(MailOutbox, outbox_id)
        if row is None or row.sent_at is not None or row.attempts >= MAX_ATTEMPTS:
            db.session.rollback()
            return False
        claimed = db.session.execute(
            sa.update(MailOutbox)
            .where(
                MailOutbox.id == outbox_id,
                MailOutbox.sent_at.is_(None),
                MailOutbox.attempts == row.attempts,
            )
            .values(attempts=MailOutbox.attempts + 1)
        ).rowcount
        user = db.session.get(User, row.user_id)  # live rows only
        kind = row.kind
        db.session.commit()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        log.warning("mail %s: database %s; left for reconcile", outbox_id, database_failure(error))
        return False
    if not claimed:
        return False
    message = compose(user, kind) if user is not None else None
    if message is None:
        _record(outbox_id, attempts=MAX_ATTEMPTS, last_error="not needed: account confirmed or removed")
        log.info("mail %s (%s) not sent: no longer needed", outbox_id, kind)
        return False
    try:
        deliver(message)
    except (OSError, smtplib.SMTPException) as error:
        reason = type(error).__name__
        code = getattr(error, "smtp_code", None)
        if code is not None:
            reason += f" {code}"
        _record(outbox_id, last_error=reason)
        log.warning("mail %s (%s) not sent: %s; left for reconcile", outbox_id, kind, reason)
        return False
    _record(outbox_id, sent_at=datetime.now(UTC), last_error=None)
    log.info("mail %s (%s) sent", outbox_id, kind)
    return True


def send_unsent(compose: Composer) -> dict[str, int]:
    """Try every unsent mail that has attempts left, oldest first: ``{"sent": n, "failed": n}``.

    Safe to run concurrently with requests and with itself (``send`` claims each attempt).
    """
    ids = (
        db.session.execute(
            sa.select(MailOutbox.id)
            .where(MailOutbox.sent_at.is_(None), MailOutbox.attempts < MAX_ATTEMPTS)
            .order_by(MailOutbox.created_at)
        )
        .scalars()
        .all()
    )
    db.session.rollback()
    counts = {"sent": 0, "failed": 0}
    for outbox_id in ids:
        if send(outbox_id, compose):
            counts["sent"] += 1
        else:
            still_due = db.session.execute(
                sa.select(sa.func.count()).where(
                    MailOutbox.id == outbox_id,
                    MailOutbox.sent_at.is_(None),
                    MailOutbox.attempts < MAX_ATTEMPTS,
                )
            ).scalar_one()
            db.session.rollback()
            counts["failed"] += bool(still_due)
    return counts


def last_queued(address: str) -> datetime | None:
    """When the newest mail to ``address`` was queued, or None; for the per-address resend limit."""
    newest = db.session.execute(
        sa.select(sa.func.max(MailOutbox.created_at)).where(MailOutbox.to_address == address)
    ).scalar_one()
    if newest is not None and newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)  # SQLite returns naive UTC
    return newest


def message(to: str, subject: str, text: str, html: str) -> EmailMessage:
    """A mail with a plain text body and an HTML alternative, from MAIL_DEFAULT_SENDER."""
    mail = EmailMessage()
    mail["From"] = sender()
    mail["To"] = to
    mail["Subject"] = subject
    mail["Message-ID"] = make_msgid(domain=_public_host())
    mail.set_content(text)
    mail.add_alternative(html, subtype="html")
    return mail


def sender() -> str:
    """MAIL_DEFAULT_SENDER, or ``Iris <no-reply@HOST>`` with HOST from IRIS_PUBLIC_URL."""
    return current_app.config.get("MAIL_DEFAULT_SENDER") or f"Iris <no-reply@{_public_host()}>"


def deliver(mail: EmailMessage) -> None:
    """Hand ``mail`` to MAIL_SERVER, or print it to the console without one. Raises ``OSError`` or
    ``smtplib.SMTPException`` when the server cannot be reached or refuses it."""
    config = current_app.config
    server = config.get("MAIL_SERVER")
    if not server:
        body = mail.get_body(preferencelist=("plain",))
        text = body.get_content() if body is not None else ""
        print(
            "\n--- mail (no MAIL_SERVER: printed, not sent)\n"
            f"To: {mail['To']}\nSubject: {mail['Subject']}\n\n{text}--- end of mail\n",
            file=sys.stdout,
            flush=True,
        )
        return
    port = config["MAIL_PORT"]
    if config.get("MAIL_USE_SSL"):
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            server, port, timeout=SMTP_TIMEOUT_SECONDS, context=_tls_context()
        )
    else:
        smtp = smtplib.SMTP(server, port, timeout=SMTP_TIMEOUT_SECONDS)
    with smtp:
        if config.get("MAIL_USE_TLS") and not config.get("MAIL_USE_SSL"):
            smtp.starttls(context=_tls_context())
        if config.get("MAIL_USERNAME"):
            smtp.login(config["MAIL_USERNAME"], config.get("MAIL_PASSWORD") or "")
        smtp.send_message(mail)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process: making one loads the system's CA bundle, about 18 ms of CPU,
    which every mail paid when it was made per mail (docs/performance.md). Contexts are safe to share."""
    return ssl.create_default_context()


def _record(outbox_id: uuid.UUID, **values: object) -> None:
    try:
        db.session.execute(sa.update(MailOutbox).where(MailOutbox.id == outbox_id).values(**values))
        db.session.commit()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        log.warning("mail %s: database %s while recording the outcome", outbox_id, database_failure(error))


def _public_host() -> str:
    return urlsplit(current_app.config.get("IRIS_PUBLIC_URL") or "http://localhost").hostname or "localhost"
