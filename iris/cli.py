"""Command-line tools: ``flask iris ...``.

Every command's expected failures (Clerk or the database unreachable, a refusal, bad input) end it with one
line on stderr, ``Error: ...``, and exit status 1. An unexpected error is one line too, naming its type;
``flask iris --verbose COMMAND`` shows its traceback instead.
"""

from __future__ import annotations

import functools
import getpass
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

import click
import sqlalchemy as sa
from flask import Flask, current_app
from flask.cli import AppGroup

from iris import accounts, clerk, export, maintenance
from iris.config import database_uri, direct_engine
from iris.errors import (
    DATABASE_UNREACHABLE,
    AuthProviderError,
    AuthProviderUnavailable,
    ClerkRefused,
    DatabaseUnavailable,
    IrisError,
    NotFoundAtClerk,
    RateLimited,
    database_failure,
)
from iris.extensions import db
from iris.models import ADMIN, RESTAURANT, ROLES, User, normalise_email


class IrisGroup(AppGroup):
    """The ``iris`` group: turns what its commands raise into one ``Error:`` line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own: it prints them
        except DatabaseUnavailable as error:
            _fail(f"database {database_failure(error.__cause__)}; try again later.")
        except DATABASE_UNREACHABLE as error:
            _fail(f"database {database_failure(error)}; try again later.")
        except IrisError as error:
            _fail(error.message)
        except Exception as error:
            if ctx.params.get("verbose"):
                raise
            # Only the type: an unexpected error's text may hold a connection string or a key.
            command = ctx.invoked_subcommand or "COMMAND"
            _fail(
                f"unexpected {type(error).__name__} in `flask iris {command}`;"
                f" `flask iris --verbose {command} ...` shows the traceback."
            )


@click.group("iris", cls=IrisGroup)
@click.option("--verbose", is_flag=True, help="Show the traceback of an unexpected error.")
def iris_cli(verbose: bool) -> None:
    """Iris operations. Failures print one line, Error: ..., and exit with status 1."""


@iris_cli.command("reconcile")
@click.option("--dry-run", is_flag=True, help="Read everything, change nothing; list what would change.")
def reconcile_command(dry_run: bool) -> None:
    """The maintenance pass (iris.maintenance): settle registrations that died half-way, walk Clerk's users
    and Iris's accounts and repair drift both ways, remove accounts left unconfirmed longer than
    IRIS_UNVERIFIED_TTL_HOURS, send the mails not sent yet, erase accounts deactivated longer than
    IRIS_DEACTIVATED_RETENTION_DAYS (and delete their Clerk users), prune sent mails and webhook ids after
    30 days.

    Shows progress on a terminal, then every change made, the Clerk users this database did not make ("Not
    ours, left alone": never deleted or banned) and a summary line. Exits 1 when something could not be
    reached (Clerk, the database, the mail server): run it again later, it carries on safely. Runs alone: a
    second pass started meanwhile says so and exits 0. Safe from cron at any interval.
    """
    with maintenance.exclusive() as held:
        if not held:
            click.echo("Another `flask iris reconcile` is running; this one did nothing.")
            return
        report = maintenance.run(dry_run=dry_run, progress=_progress)
    if report.changes:
        click.echo("Would change:" if dry_run else "Changed:")
        for line in report.changes:
            click.echo(f"  {line}")
        if report.unlisted:
            click.echo(f"  ... and {report.unlisted} more")
    if report.left_alone:
        click.echo("Not ours, left alone (Clerk users this database did not make; see docs/deployment.md):")
        for line in report.left_alone:
            click.echo(f"  {line}")
        if report.counts["not_ours"] > len(report.left_alone):
            click.echo(f"  ... and {report.counts['not_ours'] - len(report.left_alone)} more")
    for line in report.failures:
        click.echo(f"Failed: {line}", err=True)
    counts = ", ".join(f"{kind} {report.counts[kind]}" for kind in SUMMARY_KINDS)
    extra = sorted(set(report.counts) - set(SUMMARY_KINDS))
    counts += "".join(f", {kind} {report.counts[kind]}" for kind in extra)
    click.echo(("Dry run, nothing changed: " if dry_run else "Summary: ") + counts)
    if report.counts["failed"]:
        raise SystemExit(1)


# The counts every reconcile summary shows, zeros included, in the order the pass makes them.
SUMMARY_KINDS = (
    "pending_completed",
    "pending_removed",
    "created",
    "completed",
    "email_changed",
    "confirmed",
    "unconfirmed",
    "deleted",
    "clerk_user_deleted",
    "clerk_user_banned",
    "not_ours",
    "unconfirmed_removed",
    "mail_sent",
    "retention_erased",
    "mails_pruned",
    "webhook_ids_forgotten",
    "failed",
)


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal; nothing otherwise (cron, pipes, logs)."""
    if not sys.stderr.isatty():
        yield lambda done: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update


@iris_cli.command("token")
@click.argument("email")
def token_command(email: str) -> None:
    """Print a fresh Clerk session token for the Clerk user with EMAIL (for trying the API by hand).

    Asks Clerk's Backend API: find the user by email, create a session, mint a token (valid 60 s). Only the
    token goes to stdout, so TOKEN=$(flask iris token EMAIL) works; errors go to stderr with exit status 1.
    Side effect: a new session at Clerk. Production instances refuse to create sessions this way.
    """
    try:
        users = clerk.find_users(email=normalise_email(email))
        if not users:
            _fail(f"No Clerk user has the email {normalise_email(email)}. Register it first.")
        session = _create_session(users[0]["id"])
        token = clerk.create_session_token(session["id"])
    except IrisError as error:
        _fail(f"Clerk could not be asked for a token: {error.message}")
    click.echo(token)


@iris_cli.command("users")
@click.option("--email", "email_part", metavar="TEXT", help="Only emails containing TEXT (any case).")
@click.option("--role", type=click.Choice(ROLES), help="Only accounts with this role.")
@click.option(
    "--deleted", "which", flag_value="deleted", help="Only deleted accounts (by default: live ones only)."
)
@click.option("--all", "which", flag_value="all", help="Live and deleted accounts.")
def users_command(email_part: str | None, role: str | None, which: str | None) -> None:
    """List accounts, newest first: email, role, status, created, deleted, and a count.

    Status is "active" (a complete account whose owner confirmed the email address), "unconfirmed" (a
    complete account whose email address is not confirmed yet), "pending" (a registration still in flight or
    unsettled: it has no Clerk user yet, see `flask iris reconcile`) or "deleted". Times are in
    IRIS_TIMEZONE. Reads only.
    """
    query = sa.select(User).order_by(User.created_at.desc(), User.email)
    if which in ("deleted", "all"):
        query = query.execution_options(include_deleted=True)
    if which == "deleted":
        query = query.where(User.deleted_at.is_not(None))
    if email_part:
        query = query.where(User.email.contains(normalise_email(email_part), autoescape=True))
    if role:
        query = query.where(User.role == role)
    users = db.session.execute(query).scalars().all()
    db.session.rollback()
    zone = current_app.config["IRIS_TIMEZONE"]
    header = ("email", "role", "status", f"created ({zone})", "deleted")
    table = [
        (user.email, user.role, _status(user), _local(user.created_at, zone), _local(user.deleted_at, zone))
        for user in users
    ]
    if table:
        widths = [max(len(row[column]) for row in [header, *table]) for column in range(len(header))]
        for row in [header, *table]:
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    click.echo(f"{len(table)} account{'' if len(table) == 1 else 's'}")


@iris_cli.command("promote")
@click.argument("email")
def promote_command(email: str) -> None:
    """Make the live account with EMAIL an admin. Only a complete account whose owner confirmed the email
    address can be promoted (admins are never self-registered). Recorded in the audit trail and the log
    (who: cli:<your user name>); an admin already is left as it is."""
    _change_role(email, ADMIN)


@iris_cli.command("demote")
@click.argument("email")
def demote_command(email: str) -> None:
    """Make the live admin account with EMAIL a restaurant account again. Recorded in the audit trail and the
    log (who: cli:<your user name>); an account that is no admin is left as it is."""
    _change_role(email, RESTAURANT)


@iris_cli.command("export")
@click.argument("email", required=False)
@click.option("--all-deleted", is_flag=True, help="Instead: every deleted account not erased yet, and when.")
@click.option("--clerk", "with_clerk", is_flag=True, help="Also what Clerk holds about each account.")
def export_command(email: str | None, all_deleted: bool, with_clerk: bool) -> None:
    """Print, as JSON, everything Iris holds about the person with EMAIL, for an access request: every
    account row with that address (live, pending, deactivated or deleted but not erased yet) with its audit
    events, mails and verification links' dates (iris.export). An address nobody has gives
    "accounts": [] and exit status 0. --clerk adds the Clerk user of each account, every other address in it
    withheld; Clerk unreachable is one Error: line and exit status 1.

    --all-deleted prints instead every deleted account that still holds its address, with the date it is to
    be erased (deactivated: IRIS_DEACTIVATED_RETENTION_DAYS after deletion; any other: at once). Only JSON
    goes to stdout; reads only.
    """
    if all_deleted == (email is not None):
        raise click.UsageError("Give either EMAIL or --all-deleted.")
    if all_deleted and with_clerk:
        raise click.UsageError("--clerk goes with EMAIL, not with --all-deleted.")
    zone = current_app.config["IRIS_TIMEZONE"]
    if email is None:
        data = export.waiting_for_erasure(zone)
    else:
        if not email.strip():
            raise click.UsageError("EMAIL is empty.")
        data = export.export(email, zone)
    db.session.rollback()  # reads only; no connection held while Clerk works
    if with_clerk:
        try:
            export.clerk_users(data)
        except IrisError as error:
            _fail(f"Clerk could not be asked what it holds: {error.message}")
    click.echo(export.to_json(data))


def _change_role(email: str, role: str) -> None:
    """``accounts.change_role`` as the operator running the command: one line saying what happened."""
    user, changed = accounts.change_role(email, role, actor_name=_operator())
    if not changed:
        already = "an admin" if role == ADMIN else "not an admin"
        click.echo(f"{user.email} is already {already}; nothing changed.")
    elif role == ADMIN:
        click.echo(f"{user.email} is an admin now.")
    else:
        click.echo(f"{user.email} is no longer an admin (role {role}).")


def _operator() -> str:
    """Who runs the command, for the audit trail: ``cli:<operating-system user>`` (``cli:unknown`` when the
    system cannot say, as in some containers)."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError):
        name = "unknown"
    return f"cli:{name}"[:100]


def _status(user: User) -> str:
    if user.deleted_at is not None:
        return "deleted"
    if not user.clerk_user_id:
        return "pending"
    return "active" if user.email_verified_at is not None else "unconfirmed"


def _local(moment: datetime | None, zone: str) -> str:
    """``YYYY-MM-DD HH:MM`` in ``zone``, or ``-``. A naive value (SQLite returns those) is UTC."""
    if moment is None:
        return "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")


def _create_session(clerk_user_id: str) -> dict:
    try:
        return clerk.create_session(clerk_user_id)
    except NotFoundAtClerk:
        raise  # the user went away meanwhile; not a refusal
    except ClerkRefused:
        _fail(
            "Clerk refused to create a session. Production instances (sk_live_ keys) refuse"
            " POST /v1/sessions, which exists for testing: use a development instance's key, or sign in"
            " through the frontend and copy the __session cookie."
        )


def _fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(1)


# sslmode values with which libpq must not connect without SSL.
SSL_REQUIRED_MODES = ("require", "verify-ca", "verify-full")


class CheckFailed(Exception):
    """One check of ``flask iris check`` failed; the message says why and holds no secret."""


class CheckWarning(Exception):
    """One check of ``flask iris check`` found something unsafe that still works; the message says what."""


# What the runtime role may do on audit_events (migrations/versions/0009_runtime_role.py), and what it is
# asked about: every table privilege that could change or remove a row, or add a trigger.
AUDIT_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
AUDIT_ALLOWED = frozenset({"SELECT", "INSERT"})
ROLES_DOC = "docs/deployment.md, 'Two database roles'"
# Who DATABASE_URL connects as, and what it may do on audit_events (NULLs when there is no such table).
RUNTIME_ROLE_QUERY = sa.text(
    "SELECT current_user AS name, r.rolsuper AS superuser, c.oid IS NOT NULL AS table_found,"
    " pg_get_userbyid(c.relowner) AS owner,"
    " pg_has_role(current_user, c.relowner, 'USAGE') AS acts_as_owner,"
    " (SELECT pg_has_role(current_user, o.oid, 'USAGE') FROM pg_roles o WHERE o.rolname = :runtime)"
    " AS in_runtime,"
    " ARRAY(SELECT p FROM unnest(CAST(:privileges AS text[])) AS p WHERE has_table_privilege(c.oid, p))"
    " AS privileges"
    " FROM pg_roles r LEFT JOIN pg_class c ON c.oid = to_regclass('audit_events')"
    " WHERE r.rolname = current_user"
)


@iris_cli.command("check")
def check_command() -> None:
    """Test the connections production needs, one round trip each, and print a verdict.

    Checks, each with its time in ms: the pooled database URL (DATABASE_URL, through the app's own engine and
    its connect timeout); on PostgreSQL, the role it connects as (``_check_runtime_role``); the direct URL
    (DATABASE_URL_DIRECT, as migrations connect) when it is set; and the Clerk secret key (one authenticated
    GET /v1/jwks). A database check reports the server version and whether the connection is encrypted, and
    fails when sslmode (in the URL, or PGSSLMODE) requires SSL but the connection does not use it. Passwords
    are masked; keys and tokens are never printed.

    Exit status: 0 when every check passed (a WARN passes, and the last line counts it), 1 when any failed.
    """
    config = current_app.config
    direct = config.get("DATABASE_URL_DIRECT")
    key = config["CLERK_SECRET_KEY"]
    secrets = [secret for secret in (*_passwords(db.engine.url), *_passwords(direct or ""), key) if secret]
    outcomes = [_run("database (pooled)", _shown(db.engine.url), lambda: _check_database(db.engine), secrets)]
    runtime = config["IRIS_DB_RUNTIME_ROLE"]
    if db.engine.dialect.name != "postgresql":
        click.echo(
            f"database role      not checked, {db.engine.dialect.name} has no roles (development only)"
        )
    elif outcomes[0] == "FAIL":
        click.echo("database role      not checked, the pooled database did not answer")
    else:
        check_role = functools.partial(_check_runtime_role, db.engine, runtime)
        outcomes.append(
            _run("database role", f"runtime role {runtime} (IRIS_DB_RUNTIME_ROLE)", check_role, secrets)
        )
    if direct:
        shown = _shown(database_uri(direct))
        outcomes.append(_run("database (direct)", shown, lambda: _check_direct(direct), secrets))
    else:
        click.echo("database (direct)  not set, migrations use the pooled URL")
    outcomes.append(_run("clerk", f"{config['CLERK_API_URL']}, {_key_kind(key)}", _check_clerk, secrets))
    failed, warned = outcomes.count("FAIL"), outcomes.count("WARN")
    if failed:
        click.echo(f"FAILED: {failed} of {len(outcomes)} checks failed")
        raise SystemExit(1)
    click.echo(f"OK: all {len(outcomes)} checks passed" + (f", {warned} with a warning" if warned else ""))


def _run(name: str, target: str, check: Callable[[], str], secrets: list[str]) -> str:
    """Print ``name`` and ``target``, run ``check``, print its outcome and time; ``OK``, ``WARN`` (it raised
    ``CheckWarning``) or ``FAIL``."""
    click.echo(f"{name:<18} {target}")
    started = time.perf_counter()
    try:
        outcome, verdict = check(), "OK"
    except CheckWarning as warning:
        outcome, verdict = str(warning), "WARN"
    except (CheckFailed, IrisError, sa.exc.SQLAlchemyError, ValueError) as error:
        cause = error.orig if isinstance(error, sa.exc.DBAPIError) else error
        outcome, verdict = "; ".join(line.strip() for line in str(cause).splitlines() if line.strip()), "FAIL"
    for secret in secrets:  # belt and braces: no message we print should hold one
        outcome = outcome.replace(secret, "***")
    elapsed = (time.perf_counter() - started) * 1000
    click.echo(f"  {verdict:<4} {elapsed:6.0f} ms  {outcome}")
    return verdict


def _check_database(engine: sa.Engine) -> str:
    """One round trip: the server version, and whether libpq encrypted this connection."""
    with engine.connect() as connection:
        if engine.dialect.name != "postgresql":
            connection.execute(sa.text("SELECT 1"))
            return f"{engine.dialect.name} answered (not PostgreSQL: development only)"
        version = connection.execute(sa.text("SELECT current_setting('server_version')")).scalar_one()
        driver = connection.connection.driver_connection
        # The client's own view: behind a pooler (Neon's -pooler host) the server's pg_stat_ssl describes
        # the pooler's connection to the server, not ours.
        encrypted = driver.pgconn.ssl_in_use
        sslmode = driver.info.get_parameters().get("sslmode", "prefer")
    if sslmode in SSL_REQUIRED_MODES and not encrypted:
        raise CheckFailed(f"sslmode={sslmode} requires SSL, but the connection is not encrypted")
    return f"PostgreSQL {version}, {'SSL in use' if encrypted else 'not encrypted'} (sslmode={sslmode})"


def _check_runtime_role(engine: sa.Engine, runtime: str) -> str:
    """The role DATABASE_URL connects as may append to audit_events and nothing more (two database roles).

    Fails when it may not INSERT or SELECT there (the app could not record a change). Warns, without
    failing, when it is a superuser, has the privileges of the table's owner (it could switch the append-only
    triggers off), holds any other privilege on the table (a Neon Console role, through neon_superuser's
    pg_write_all_data), is neither IRIS_DB_RUNTIME_ROLE nor a member of it, or when the table does not exist
    in its search path (nothing to check before ``flask db upgrade``).
    """
    with engine.connect() as connection:
        role = connection.execute(
            RUNTIME_ROLE_QUERY, {"runtime": runtime, "privileges": list(AUDIT_PRIVILEGES)}
        ).one()
    unsafe = f"it could switch the append-only triggers off; connect DATABASE_URL as {runtime} ({ROLES_DOC})"
    if role.superuser:
        raise CheckWarning(f"{role.name} is a superuser, whom no privilege binds: {unsafe}")
    if not role.table_found:
        raise CheckWarning(
            "no audit_events table in reach (flask db upgrade makes it, or the role lacks USAGE on its"
            " schema):"
            " privileges not checked"
        )
    if role.acts_as_owner:
        raise CheckWarning(
            f"{role.name} has the privileges of {role.owner}, the owner of audit_events: {unsafe}"
        )
    granted = set(role.privileges)
    if missing := [privilege for privilege in AUDIT_PRIVILEGES if privilege in AUDIT_ALLOWED - granted]:
        raise CheckFailed(
            f"{role.name} may not {', '.join(missing)} audit_events, so the app cannot record changes: run"
            f" flask db upgrade once the role exists, or the one-time grants ({ROLES_DOC})"
        )
    if extra := [privilege for privilege in AUDIT_PRIVILEGES if privilege in granted - AUDIT_ALLOWED]:
        raise CheckWarning(
            f"{role.name} may also {', '.join(extra)} audit_events (as members of neon_superuser may: create"
            f" the runtime role with SQL, {ROLES_DOC})"
        )
    if not role.in_runtime:
        raise CheckWarning(
            f"{role.name} is not {runtime} (IRIS_DB_RUNTIME_ROLE) nor a member of it: later migrations grant"
            f" to {runtime}, not to {role.name}"
        )
    shown = role.name if role.name == runtime else f"{role.name} (member of {runtime})"
    return f"{shown}: neither superuser nor owner; audit_events: INSERT and SELECT only"


def _check_direct(url: str) -> str:
    """The direct URL, connected to as migrations do (``config.direct_engine``)."""
    engine = direct_engine(url)
    try:
        return _check_database(engine)
    finally:
        engine.dispose()


def _check_clerk() -> str:
    """One authenticated call: Clerk's JWKS for this secret key's instance."""
    try:
        keys = clerk.get_jwks().get("keys", [])
    except ClerkRefused as error:
        status = error.status
        if status == 401:
            raise CheckFailed("key invalid (Clerk answered 401)") from None
        raise CheckFailed(
            f"Clerk refused GET /v1/jwks{f' with {status}' if status else ''}: key invalid, or"
            " CLERK_API_URL is not Clerk's Backend API"
        ) from None
    except RateLimited:
        raise CheckFailed("Clerk rate-limited the check; try again in a minute") from None
    except AuthProviderUnavailable:
        raise CheckFailed("Clerk unreachable, timing out or failing (5xx); is CLERK_API_URL right?") from None
    except AuthProviderError:
        raise CheckFailed("Clerk's answer was unusable; is CLERK_API_URL Clerk's Backend API?") from None
    return f"key accepted, {len(keys)} signing key(s)"


def _shown(url: str | sa.URL) -> str:
    """A database URL fit to print: password masked, in the userinfo and in the query string."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return "(a URL that cannot be parsed)"
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "MASKED"})
    return parsed.render_as_string(hide_password=True).replace("password=MASKED", "password=***")


def _passwords(url: str | sa.URL) -> list[str]:
    """The passwords in a database URL (userinfo and query string), to keep out of any message."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return []
    found = [parsed.password, parsed.query.get("password")]
    return [password for password in found if isinstance(password, str)]


def _key_kind(key: str) -> str:
    for prefix in ("sk_live_", "sk_test_"):
        if key.startswith(prefix):
            return f"{prefix} key"
    return "secret key of unknown kind (expected sk_live_ or sk_test_)"


def init_app(app: Flask) -> None:
    app.cli.add_command(iris_cli)
