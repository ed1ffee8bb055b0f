"""Iris's own mail: the outbox, building a message, and sending it over SMTP from a background courier.

Guarantees:
- **Not lost.** A mail is due once its ``mail_outbox`` row is committed, in the same transaction as what makes
  it due (a completed registration, a request for a new link). Only after that commit is its id handed to the
  courier (``send_later``), which sends it from a background thread of the same process, so the request that
  made it due never waits for SMTP. A mail that could not be sent, or that was still queued when its process
  died, stays unsent, and ``flask iris reconcile`` (``send_unsent``, which sends synchronously) tries it
  again, at most ``MAX_ATTEMPTS`` times in all.
- **At most one sender at a time.** A sender claims a row by raising ``attempts`` with a conditional UPDATE,
  so two senders never both send the same attempt. A process that dies between sending and recording
  ``sent_at`` may cause one repeat, and so may a server that drops a reused connection after taking a mail but
  before answering (the courier tries that mail once more on a fresh connection): a mail can arrive twice,
  never zero times while attempts remain.
- **Nothing secret stored or logged.** An outbox row holds who and what (user, kind, and a keyed hash of the
  address: ``iris.personal_data``), never the address itself, a link, token or password. The mail goes to
  the account's current address. The link is made when the mail is built (``compose``; the database keeps
  only its token's hash), so it exists only in the mail; only the kind, the row id and an error's type are
  logged. ``last_error`` holds an error type or SMTP code, never a message body.

The courier: one per app per process, made on first use in that process, so a gunicorn worker makes its
own and the master, which sends nothing, never starts a thread. Its daemon thread sends the mails in the
order they were handed over. While more are waiting they form one batch: one app context (its session
removed at the end) and one SMTP connection, closed once none are waiting; a reused connection the server
has dropped meanwhile is replaced once by a fresh one. The thread ends after ``COURIER_IDLE_SECONDS``
without mail, and the next mail starts another. At exit a process waits up to ``DRAIN_SECONDS`` for its
couriers; whatever is left waits for reconcile. ``wait_until_idle`` says when all handed over is done.

Transport: SMTP from MAIL_SERVER, MAIL_PORT, MAIL_USERNAME, MAIL_PASSWORD, MAIL_USE_TLS (STARTTLS),
MAIL_USE_SSL (implicit TLS) and MAIL_DEFAULT_SENDER, with the standard library (``smtplib``,
``email.message``). Without MAIL_SERVER (only possible in development and tests: elsewhere start-up requires
it while verification is on) the mail is printed to the console, link included.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import smtplib
import ssl
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate
from queue import Empty, SimpleQueue
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import Flask, current_app

from iris import metrics, personal_data
from iris.errors import DATABASE_UNREACHABLE, database_failure
from iris.extensions import db
from iris.models import MailOutbox, User

log = logging.getLogger(__name__)

# Builds the mail of a kind for an account, or None when it is no longer needed (iris.verification.compose);
# called inside the claim's transaction, which commits what it adds to the session.
Composer = Callable[[User, str], EmailMessage | None]
# Hands one built mail to the server (or the console), raising OSError or smtplib.SMTPException: ``deliver``.
Transport = Callable[[EmailMessage], None]

# How many times one outbox row is tried before it is given up (its last_error says why).
MAX_ATTEMPTS = 5
# Seconds for the SMTP connect and for each read or write after it. No request waits for it any more (the
# courier sends after the request), but a slow or unreachable server still holds up the mails queued behind
# the one it is sending, the exit drain and reconcile, so it fails quickly; the mail then stays in the outbox.
SMTP_TIMEOUT_SECONDS = 3
# Where an app keeps its courier (see the module docstring).
COURIER = "iris.mail_courier"
# Seconds the courier's thread waits for another mail before it ends, so an app that sent a few mails (a test,
# a CLI command) keeps no thread; under steady traffic it stays, and the next mail after a quiet spell starts
# a new one (~0.1 ms).
COURIER_IDLE_SECONDS = 10
# Seconds a process waits at exit, in all, for its couriers to send what they hold: a gunicorn worker stopped
# by a deploy or recycled by max_requests. gunicorn gives a stopping worker longer (graceful_timeout, 100 s,
# and its 30 s heartbeat timeout), so the wait never gets it killed; what is left waits for reconcile.
DRAIN_SECONDS = 5


def queue(user: User, kind: str) -> uuid.UUID:
    """Add a ``kind`` mail to ``user`` to the session's transaction; the caller commits, then hands the
    returned id to ``send_later`` (or ``send``)."""
    outbox_id = uuid.uuid4()
    db.session.add(
        MailOutbox(
            id=outbox_id,
            user_id=user.id,
            kind=kind,
            to_hmac=personal_data.address_hmac(user.email),
            hmac_key_id=personal_data.key_id(),
            attempts=0,
        )
    )
    return outbox_id


def send_later(outbox_id: uuid.UUID, compose: Composer) -> None:
    """Hand the committed outbox row ``outbox_id`` to the current app's courier, which sends it (``send``)
    from its own thread once it gets to it. Returns at once, without touching SMTP or the database, and never
    raises. Only after the commit that made the row due: a row the courier cannot see yet counts as gone."""
    _courier(current_app._get_current_object()).put(outbox_id, compose)


def wait_until_idle(app: Flask, timeout: float) -> bool:
    """Wait until every mail handed to ``app``'s courier in this process has been dealt with (sent, or its
    failure recorded for reconcile) and its SMTP connection and session are closed. True when so within
    ``timeout`` seconds (at once when nothing was handed over here), False when mails are still queued."""
    courier = app.extensions.get(COURIER)
    if courier is None or courier.pid != os.getpid():
        return True
    return courier.wait(timeout)


def send(outbox_id: uuid.UUID, compose: Composer, transport: Transport | None = None) -> bool:
    """Claim and send one due mail; True when it went out. Never raises for a database or SMTP failure: it is
    recorded on the row (``last_error``), logged without the mail's content, and left for ``reconcile``.

    A row already sent, out of attempts, or claimed by another sender at this moment is left alone (False).
    A mail no longer needed (its account confirmed or removed meanwhile) is closed without sending.
    ``compose`` builds it from the account and the kind, inside the claim's transaction (it may add rows to
    the session, committed with the claim; it must not commit); ``transport`` hands it over (default
    ``deliver``, a connection of its own; the courier passes its batch's connection).
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
        message = None
        failure: Exception | None = None
        if claimed and user is not None:
            # Built inside the claim's transaction: what building records (the link's row, whose token is
            # only in the mail) commits with the claim, and nothing after the claim touches the database, so
            # a database that goes away meanwhile cannot fail it. A mail that cannot be built still uses
            # up its attempt (the claim commits without what building added).
            try:
                message = compose(user, kind)
            except Exception as error:
                db.session.expunge_all()
                failure = error
        db.session.commit()
    except DATABASE_UNREACHABLE as error:
        db.session.rollback()
        log.warning("mail %s: database %s; left for reconcile", outbox_id, database_failure(error))
        return False
    if failure is not None:
        raise failure
    if not claimed:
        return False
    if message is None:
        _record(outbox_id, attempts=MAX_ATTEMPTS, last_error="not needed: account confirmed or removed")
        metrics.mail_sent("not_needed")
        log.info("mail %s (%s) not sent: no longer needed", outbox_id, kind)
        return False
    try:
        (transport or deliver)(message)
    except (OSError, smtplib.SMTPException) as error:
        reason = type(error).__name__
        code = getattr(error, "smtp_code", None)
        if code is not None:
            reason += f" {code}"
        _record(outbox_id, last_error=reason)
        metrics.mail_sent("failed")
        log.warning("mail %s (%s) not sent: %s; left for reconcile", outbox_id, kind, reason)
        return False
    _record(outbox_id, sent_at=datetime.now(UTC), last_error=None)
    metrics.mail_sent("sent")
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


def last_queued(address: str, kinds: tuple[str, ...] | None = None) -> datetime | None:
    """When the newest mail to ``address`` (of one of ``kinds``, when given) was queued, or None; for the
    per-address bound on verification mails (``iris.verification.queue_mail``). Recognised by its keyed hash
    (``iris.personal_data.address_hmac``): the outbox never holds the address itself, so the bound still
    holds after the account that had the address was erased."""
    hashed = personal_data.address_hmac(address)
    query = sa.select(sa.func.max(MailOutbox.created_at)).where(MailOutbox.to_hmac == hashed)
    if kinds is not None:
        query = query.where(MailOutbox.kind.in_(kinds))
    newest = db.session.execute(query).scalar_one()
    if newest is not None and newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)  # SQLite returns naive UTC
    return newest


def message(to: str, subject: str, text: str, html: str) -> EmailMessage:
    """A mail with a plain text body and an HTML alternative, from MAIL_DEFAULT_SENDER."""
    mail = EmailMessage()
    mail["From"] = sender()
    mail["To"] = to
    mail["Subject"] = subject
    # Not email.utils.make_msgid: it draws from the global random module, which the courier thread must leave
    # alone (Hypothesis tests fail when it changes while they draw an example). uuid4 reads os.urandom.
    mail["Message-ID"] = f"<{uuid.uuid4().hex}@{_public_host()}>"
    mail["Date"] = formatdate(usegmt=True)  # RFC 5322 requires it; filters score a mail without one
    mail.set_content(text)
    mail.add_alternative(html, subtype="html")
    return mail


def sender() -> str:
    """MAIL_DEFAULT_SENDER, or ``Iris <no-reply@HOST>`` with HOST from IRIS_PUBLIC_URL."""
    return current_app.config.get("MAIL_DEFAULT_SENDER") or f"Iris <no-reply@{_public_host()}>"


def deliver(mail: EmailMessage) -> None:
    """Hand ``mail`` to MAIL_SERVER over a connection of its own, or print it to the console without one.
    Raises ``OSError`` or ``smtplib.SMTPException`` when the server cannot be reached or refuses it."""
    if not current_app.config.get("MAIL_SERVER"):
        body = mail.get_body(preferencelist=("plain",))
        text = body.get_content() if body is not None else ""
        # The process's own stdout: the courier prints from its thread, and sys.stdout may be redirected
        # meanwhile by foreground code (a CLI command capturing its output) that this mail is no part of.
        print(
            "\n--- mail (no MAIL_SERVER: printed, not sent)\n"
            f"To: {mail['To']}\nSubject: {mail['Subject']}\n\n{text}--- end of mail\n",
            file=sys.__stdout__,
            flush=True,
        )
        return
    with _connect() as smtp:
        smtp.send_message(mail)


def _connect() -> smtplib.SMTP:
    """A connection to MAIL_SERVER, with STARTTLS and login done as configured. Raises ``OSError`` or
    ``smtplib.SMTPException`` (the socket closed)."""
    config = current_app.config
    server, port = config["MAIL_SERVER"], config["MAIL_PORT"]
    if config.get("MAIL_USE_SSL"):
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            server, port, timeout=SMTP_TIMEOUT_SECONDS, context=_tls_context()
        )
    else:
        smtp = smtplib.SMTP(server, port, timeout=SMTP_TIMEOUT_SECONDS)
    try:
        if config.get("MAIL_USE_TLS") and not config.get("MAIL_USE_SSL"):
            smtp.starttls(context=_tls_context())
        if config.get("MAIL_USERNAME"):
            smtp.login(config["MAIL_USERNAME"], config.get("MAIL_PASSWORD") or "")
    except BaseException:
        smtp.close()
        raise
    return smtp


class _Connection:
    """The courier's transport for one batch: an SMTP connection opened for its first mail and reused for the
    next ones until ``close``. Without MAIL_SERVER each mail goes to the console (``deliver``)."""

    def __init__(self) -> None:
        self.smtp: smtplib.SMTP | None = None

    def deliver(self, mail: EmailMessage) -> None:
        """As ``deliver``. A failure closes the connection, so the next mail opens a fresh one; on a reused
        connection the server dropped meanwhile (disconnected, or 421: closing) the mail is tried once more on
        a fresh one."""
        if not current_app.config.get("MAIL_SERVER"):
            deliver(mail)
            return
        reused = self.smtp is not None
        try:
            if self.smtp is None:
                self.smtp = _connect()
            self.smtp.send_message(mail)
        except (OSError, smtplib.SMTPException) as error:
            self.close()
            dropped = (
                isinstance(error, smtplib.SMTPServerDisconnected) or getattr(error, "smtp_code", 0) == 421
            )
            if not (reused and dropped):
                raise
            self.deliver(mail)  # not reused now: tried once more at most

    def close(self) -> None:
        smtp, self.smtp = self.smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()


class _Courier:
    """Sends the outbox mails of one app handed over in one process (``send_later``), from a daemon thread;
    see the module docstring."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.pid = os.getpid()
        self.queue: SimpleQueue[tuple[uuid.UUID, Composer]] = SimpleQueue()
        self.idle = threading.Condition()  # guards unfinished and thread
        self.unfinished = 0  # handed over and not dealt with yet
        self.thread: threading.Thread | None = None

    def put(self, outbox_id: uuid.UUID, compose: Composer) -> None:
        with self.idle:
            self.unfinished += 1
            self.queue.put((outbox_id, compose))
            metrics.mail_queued(1)
            if self.thread is not None:
                return
            thread = threading.Thread(target=self._run, name="iris-mail-courier", daemon=True)
            try:
                thread.start()
            except RuntimeError as error:
                # No thread now (the interpreter exiting, a thread limit): the next put starts one.
                log.warning(
                    "mail %s: courier not started (%s); left for reconcile", outbox_id, type(error).__name__
                )
                return
            self.thread = thread

    def wait(self, timeout: float) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: self.unfinished == 0, timeout)

    def _run(self) -> None:
        while True:
            try:
                batch = [self.queue.get(timeout=COURIER_IDLE_SECONDS)]
            except Empty:
                with self.idle:  # put() starts a new thread only once this one is gone
                    if self.queue.empty():
                        self.thread = None
                        return
                continue
            try:
                self._send(batch)
            except Exception as error:
                # The thread outlives anything; what it did not send stays queued or waits for reconcile.
                log.error("mail courier: %s during a batch of %d", type(error).__name__, len(batch))
            finally:
                with self.idle:
                    self.unfinished -= len(batch)
                    metrics.mail_queued(-len(batch))
                    self.idle.notify_all()

    def _send(self, batch: list[tuple[uuid.UUID, Composer]]) -> None:
        """Send ``batch``'s mail and every one queued meanwhile, appending each to ``batch`` as it is taken,
        over one connection, in one app context (its session is removed when the context ends)."""
        connection = _Connection()
        with self.app.app_context():
            try:
                while True:
                    outbox_id, compose = batch[-1]
                    try:
                        send(outbox_id, compose, connection.deliver)
                    except Exception as error:
                        # A bug or an unexpected database error: the id and the type only, as send logs.
                        db.session.rollback()
                        log.error(
                            "mail %s: %s in the courier; left for reconcile", outbox_id, type(error).__name__
                        )
                    try:
                        batch.append(self.queue.get_nowait())
                    except Empty:
                        return
            finally:
                connection.close()


_couriers: weakref.WeakSet[_Courier] = weakref.WeakSet()
_couriers_lock = threading.Lock()
_drain_pid: int | None = None  # the process whose atexit has _drain


def _courier(app: Flask) -> _Courier:
    """``app``'s courier in this process, made on first use here (a forked process makes its own), with the
    exit drain registered once per process."""
    global _drain_pid
    courier = app.extensions.get(COURIER)
    if courier is not None and courier.pid == os.getpid():
        return courier
    with _couriers_lock:
        courier = app.extensions.get(COURIER)
        if courier is None or courier.pid != os.getpid():
            courier = app.extensions[COURIER] = _Courier(app)
            _couriers.add(courier)
            if _drain_pid != os.getpid():
                atexit.register(_drain)  # atexit runs before daemon threads are stopped
                _drain_pid = os.getpid()
        return courier


def _drain() -> None:
    """At exit: wait up to ``DRAIN_SECONDS`` in all for this process's couriers to finish."""
    deadline = time.monotonic() + DRAIN_SECONDS
    for courier in list(_couriers):
        if courier.pid == os.getpid() and not courier.wait(max(0.0, deadline - time.monotonic())):
            log.warning("mail courier: %d mails left at exit for reconcile", courier.unfinished)


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
