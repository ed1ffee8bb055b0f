"""Operational drills (docs/drills.md): the app under load behind PgBouncer in transaction mode, as Neon's
pooler runs it, and through a PostgreSQL restart. Real servers, real HTTP, thousands of requests.

The app runs in its own process under gunicorn, with the production engine options. PgBouncer, initdb and
pg_ctl are required: without them these tests skip on a developer machine and fail in CI (``CI`` set).
Run them alone with ``.venv/bin/python -m pytest tests/test_drills.py -s`` to see the figures.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from iris import config, registration
from iris.extensions import db
from tests.drill_app import drill_app
from tests.drill_support import (
    AppServer,
    Driver,
    Outcome,
    PgBouncer,
    PrivateCluster,
    app_log_records,
    clerk_users,
    create_clerk_user,
    label,
    libpq_url,
    status_counts,
    wait_until,
)
from tests.helpers import PASSWORD, TEST_DATABASE_URL, URL, dispose, migrate, session_token

# Each drill runs for many seconds: `make test-fast` (pytest -m "not slow") leaves them out.
pytestmark = pytest.mark.slow

PREPARED_STATEMENT_ERROR = re.compile(r'prepared statement "_pg3_\d+" (does not exist|already exists)')
APP_THREADS = 8  # gunicorn threads in the app's one worker


def assert_production_engine(app: Flask) -> None:
    """The drill must exercise what production runs: config.engine_options, so prepare_threshold=None."""
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"] == config.engine_options(uri)
    with app.app_context(), db.engine.connect() as connection:
        raw = connection.connection.driver_connection
        assert isinstance(raw, psycopg.Connection)
        assert raw.prepare_threshold is None
        assert db.engine.pool.size() == 5


def register_token_users(base_url: str, standin, count: int) -> tuple[list[str], dict[str, str]]:
    """Register ``count`` users through the app; a Clerk session token for each, and token -> user id."""
    tokens, owners = [], {}
    for n in range(count):
        response = requests.post(
            base_url + URL,
            json={"email": f"token-{uuid.uuid4().hex[:8]}-{n}@drill.example", "password": PASSWORD},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        # An hour: the drill outlasts the stand-in's default token lifetime.
        token = session_token(standin, response.json()["clerk_user_id"], expires_in_seconds=3600)
        tokens.append(token)
        owners[token] = response.json()["id"]
    return tokens, owners


def wrong_users(outcomes: list[Outcome], owners: dict[str, str]) -> list[Outcome]:
    """Successful GET /users/me answers naming someone other than the token's user (there must be none)."""
    return [
        outcome
        for outcome in outcomes
        if outcome.kind == "me" and outcome.status == 200 and outcome.body.get("id") != owners[outcome.token]
    ]


def errors_in(records: list[str]) -> list[str]:
    return [record for record in records if record.startswith(("ERROR", "CRITICAL"))]


def by_message(records: list[str]) -> dict[str, int]:
    """How often each kind of log record occurred (ids and request ids blanked out)."""
    kinds = Counter()
    for record in records:
        line = re.sub(r" \[request [^]]*\]$", "", record.splitlines()[0])
        kinds[re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", line)] += 1
    return dict(kinds.most_common())


def explain(items: list, records: list[str], *needles: str | None) -> str:
    """Failure detail: ``items``, every log record that mentions one of ``needles``, and every error record
    (gunicorn's "Error handling request" carries no request id)."""
    wanted = [needle for needle in needles if needle]
    related = [record for record in records if any(needle in record for needle in wanted)]
    related += [record for record in errors_in(records) if record not in related]
    return "\n".join([*map(repr, items[:10]), "related log records:", *related[:20]])


def print_figures(title: str, figures: dict) -> None:
    print(f"\n=== {title}")
    for name, value in figures.items():
        print(f"  {name}: {value}")


# ------------------------------------------------------------------------------------------ drill 1

BOUNCER_POOL_SIZE = 3  # server connections PgBouncer shares among all clients: fewer than the app's pool of 5
DRILL_THREADS = 8  # concurrent HTTP clients: more than the app's pool, which is more than PgBouncer's
REGISTRATIONS_PER_THREAD = 250  # 2,000 registrations in all, each followed by GET /readyz and /users/me
STALE_REGISTRATIONS = 40  # pending rows whose lease ran out long ago; half of them have their Clerk user
RECONCILE_AFTER = 300  # registrations made before reconcile runs alongside the load
CONTROL_THREADS = 8
CONTROL_QUERIES = 40  # per connection: well past psycopg's default prepare_threshold of 5


def prepared_statement_control(url: sa.URL, **connect_args) -> dict:
    """Several connections through the pooler each run one query many times, all at once.

    Returns the errors, the number of queries, each connection's prepare_threshold, and for each connection
    the PostgreSQL backends that served it (more than one: PgBouncer moved it between server connections).
    """
    errors: list[str] = []
    backends: dict[int, set[int]] = {}
    thresholds: set[int | None] = set()
    queries = Counter()
    start = threading.Barrier(CONTROL_THREADS)

    def client(n: int) -> None:
        with psycopg.connect(libpq_url(url), autocommit=True, **connect_args) as connection:
            thresholds.add(connection.prepare_threshold)
            backends[n] = set()
            start.wait(timeout=30)
            for _ in range(CONTROL_QUERIES):
                queries[n] += 1
                try:
                    backends[n].add(connection.execute("SELECT pg_backend_pid()").fetchone()[0])
                except psycopg.Error as error:
                    errors.append(str(error).splitlines()[0])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CONTROL_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "control clients hung"
    assert len(backends) == CONTROL_THREADS, "a control client failed to connect"
    return {
        "errors": errors,
        "queries": sum(queries.values()),
        "backends": backends,
        "thresholds": thresholds,
    }


def make_stale_registrations(url: sa.URL, standin) -> list[str]:
    """Registrations that died half-way long ago: pending rows, the first half with a Clerk user (which
    reconcile completes), the second half without (which reconcile removes). Returns their ids."""
    ids = [str(uuid.uuid4()) for _ in range(STALE_REGISTRATIONS)]
    emails = [f"stale-{n}-{uuid.uuid4().hex[:6]}@drill.example" for n in range(STALE_REGISTRATIONS)]
    with psycopg.connect(libpq_url(url)) as connection:
        for user_id, email in zip(ids, emails, strict=True):
            connection.execute(
                "INSERT INTO users (id, email, role, created_at, pending_until)"
                " VALUES (%s, %s, 'restaurant', now() - interval '10 minutes', now() - interval '8 minutes')",
                (user_id, email),
            )
    for user_id, email in list(zip(ids, emails, strict=True))[: STALE_REGISTRATIONS // 2]:
        create_clerk_user(standin.api_url, standin.secret_key, email, user_id)
    return ids


def test_pgbouncer_transaction_mode_drill(admin_engine, standin):
    """2,000 registrations and their reads, and a reconcile run alongside, through PgBouncer in transaction
    mode: no prepared-statement error, no 5xx. A control shows the same pooler breaks psycopg's default
    (auto-preparing) settings."""
    dbname = f"iris_drill_{uuid.uuid4().hex[:10]}"
    direct = sa.make_url(TEST_DATABASE_URL).set(database=dbname)
    bouncer = PgBouncer(direct, dbname, pool_size=BOUNCER_POOL_SIZE)  # skips/fails here without pgbouncer
    began = time.monotonic()
    with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{dbname}"'))
    apps: list[Flask] = []
    try:
        # Migrations go straight to PostgreSQL, as in production they go over Neon's direct URL
        # (DATABASE_URL_DIRECT), never through the pooler.
        apps.append(drill_app(direct, standin.base_url))
        migrate(apps[-1])
        dispose(apps[-1])

        with bouncer:
            pooled = bouncer.url(direct)
            pooler_settings = {
                row["key"]: row["value"]
                for row in bouncer.show("SHOW CONFIG")
                if row["key"] in ("pool_mode", "default_pool_size", "max_prepared_statements")
            }
            if bouncer.version >= (1, 21):
                assert pooler_settings.pop("max_prepared_statements") == "0"
            default = prepared_statement_control(pooled)
            disabled = prepared_statement_control(pooled, prepare_threshold=None)

            apps.append(drill_app(pooled, standin.base_url))
            assert_production_engine(apps[-1])
            stale = make_stale_registrations(direct, standin)
            log_offset = len(bouncer.log_text())
            with AppServer(pooled, standin.base_url, threads=APP_THREADS) as server:
                tokens, owners = register_token_users(server.base_url, standin, 4)
                driver = Driver(
                    server.base_url,
                    threads=DRILL_THREADS,
                    registrations=REGISTRATIONS_PER_THREAD,
                    tokens=tokens,
                )
                driver.start()
                try:
                    wait_until(
                        lambda: sum(o.kind == "register" for o in driver.snapshot()) >= RECONCILE_AFTER,
                        120,
                        f"{RECONCILE_AFTER} registrations before reconcile runs",
                    )
                    # Reconcile, as cron runs it, while the load goes on: it commits once per row and never
                    # rolls back, so psycopg would auto-prepare its statements (see docs/drills.md).
                    with apps[-1].app_context():
                        reconcile_started = time.monotonic()
                        reconciled = registration.reconcile()
                        reconcile_ended = time.monotonic()
                except BaseException:
                    driver.stop()
                    raise
                finally:
                    driver.join(timeout=600)
                dispose(apps[-1])
                server.stop()
                app_log = server.log_text()
            stats = {row["database"]: row for row in bouncer.show("SHOW STATS")}[dbname]
            servers = [row for row in bouncer.show("SHOW SERVERS") if row["database"] == dbname]
            bouncer_log = bouncer.log_text()[log_offset:]

        with psycopg.connect(libpq_url(direct)) as connection:
            complete, pending = connection.execute(
                "SELECT count(clerk_user_id), count(*) - count(clerk_user_id) FROM users"
            ).fetchone()
            stale_left = connection.execute(
                "SELECT id::text FROM users WHERE id = ANY(%s::uuid[]) AND clerk_user_id IS NOT NULL",
                (stale,),
            ).fetchall()
        at_clerk = clerk_users(standin.api_url, standin.secret_key)
    finally:
        for app in apps:
            dispose(app)
        with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))

    outcomes = driver.snapshot()
    counts = status_counts(outcomes)
    seconds = driver.finished_at - driver.started_at
    records = app_log_records(app_log)
    prepared = "max_prepared_statements=0" if bouncer.version >= (1, 21) else "no prepared-statement support"
    print_figures(
        "Drill 1: PgBouncer in transaction mode",
        {
            "pgbouncer": f"{bouncer.version_text}, transaction mode, pool {BOUNCER_POOL_SIZE}, {prepared}",
            "control, psycopg's default prepare_threshold=5": (
                f"{default['queries']} queries, {len(default['errors'])} errors, e.g. {default['errors'][:2]}"
            ),
            "control, prepare_threshold=None": (
                f"{disabled['queries']} queries, {len(disabled['errors'])} errors"
            ),
            "server backends behind the 8 control connections": len(
                set().union(*default["backends"].values())
            ),
            "backends each control connection was moved between": sorted(
                map(len, default["backends"].values())
            ),
            "app": f"gunicorn, 1 worker x {APP_THREADS} threads, SQLAlchemy pool 5",
            "client threads": DRILL_THREADS,
            "requests": len(outcomes),
            "statuses": counts,
            "requests per second": round(len(outcomes) / seconds, 1),
            "slowest request (s)": round(max(o.seconds for o in outcomes), 3),
            "reconcile alongside the load": (
                f"{reconciled} in {reconcile_ended - reconcile_started:.2f} s,"
                f" {sum(o.started > reconcile_ended for o in outcomes)} requests made after it ended"
            ),
            "pgbouncer transactions / queries": f"{stats['total_xact_count']} / {stats['total_query_count']}",
            "pgbouncer server connections at the end": len(servers),
            "app log records (WARNING+)": by_message(records),
            "rows complete / pending": f"{complete} / {pending}",
            "users at the stand-in": len(at_clerk),
            "wall time (s)": round(time.monotonic() - began, 1),
        },
    )

    # The control: the pooler really is in transaction mode and really breaks auto-prepared statements.
    assert pooler_settings == {"pool_mode": "transaction", "default_pool_size": str(BOUNCER_POOL_SIZE)}
    assert default["thresholds"] == {5}
    # Eight client connections at once, served by at most three server connections: they share them.
    assert len(set().union(*default["backends"].values())) <= BOUNCER_POOL_SIZE
    assert default["errors"], "auto-prepared statements survived the pooler: the drill would prove nothing"
    assert all(PREPARED_STATEMENT_ERROR.search(error) for error in default["errors"]), default["errors"][:5]
    assert disabled["thresholds"] == {None}
    assert disabled["errors"] == []
    assert len(set().union(*disabled["backends"].values())) <= BOUNCER_POOL_SIZE

    # The drill: every request answered as it should, and nothing anywhere mentions a prepared statement.
    assert driver.crashes == []
    registrations = DRILL_THREADS * REGISTRATIONS_PER_THREAD
    assert counts == {
        "register": {"201": registrations},
        "readyz": {"200": registrations},
        "me": {"200": registrations},
    }, [o for o in outcomes if not o.ok][:5]
    assert wrong_users(outcomes, owners) == []
    half = STALE_REGISTRATIONS // 2
    assert reconciled == {"completed": half, "removed": half, "failed": 0}
    assert sorted(row[0] for row in stale_left) == sorted(stale[:half])
    assert reconcile_started > driver.started_at
    assert any(o.started > reconcile_ended for o in outcomes)  # it really ran alongside the load
    for text in [app_log, bouncer_log, *(str(o.body) for o in outcomes if not o.ok)]:
        assert "prepared statement" not in text, text[-3000:]
    assert errors_in(records) == []
    assert len(servers) <= BOUNCER_POOL_SIZE
    assert int(stats["total_xact_count"]) >= registrations * 3  # the load really went through the pooler
    assert (complete, pending) == (registrations + len(tokens) + half, 0)
    assert len(at_clerk) == registrations + len(tokens) + half


# ------------------------------------------------------------------------------------------ drill 2

RESTART_THREADS = 6
WARM_UP_REGISTRATIONS = 150  # successful registrations before the database goes away
MIN_OUTAGE_SECONDS = 2.0  # the database stays down at least this long ...
MIN_OUTAGE_503S = 20  # ... and until clients have seen this many 503s
RECOVERED_REQUESTS = 300  # successful requests after the restart before the load stops


def users_table(url: sa.URL) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(libpq_url(url)) as connection:
        return connection.execute("SELECT id::text, email, clerk_user_id FROM users").fetchall()


def test_postgresql_restart_under_load_drill(standin):
    """PostgreSQL stops (fast shutdown) and starts again while clients register and read: 503s while it is
    down, full service after, and no registration lost or half-made once reconcile has run."""
    cluster = PrivateCluster()  # skips/fails here without initdb/pg_ctl
    began = time.monotonic()
    with cluster:
        cluster.create_database("iris")
        url = cluster.url("iris")
        app = drill_app(url, standin.base_url)
        try:
            migrate(app)
            assert_production_engine(app)
            dispose(app)
            options = app.config["SQLALCHEMY_ENGINE_OPTIONS"]
            # No request may outlast waiting for a pooled connection plus opening a new one.
            longest_allowed = options["pool_timeout"] + options["connect_args"]["connect_timeout"]
            with AppServer(url, standin.base_url, threads=APP_THREADS) as server:
                tokens, owners = register_token_users(server.base_url, standin, 4)
                driver = Driver(
                    server.base_url, threads=RESTART_THREADS, registrations=100_000, tokens=tokens
                )
                driver.start()
                try:
                    wait_until(
                        lambda: (
                            sum(o.kind == "register" and o.ok for o in driver.snapshot())
                            >= WARM_UP_REGISTRATIONS
                        ),
                        60,
                        "the warm-up registrations",
                    )
                    stop_called = time.monotonic()
                    cluster.stop("fast")
                    down = time.monotonic()
                    wait_until(
                        lambda: (
                            time.monotonic() - down >= MIN_OUTAGE_SECONDS
                            and sum(o.status == 503 and o.started >= down for o in driver.snapshot())
                            >= MIN_OUTAGE_503S
                        ),
                        30,
                        f"{MIN_OUTAGE_503S} answers of 503 while the database is down",
                    )
                    start_called = time.monotonic()
                    cluster.start()
                    up = time.monotonic()
                    wait_until(
                        lambda: (
                            sum(o.ok and o.started >= up for o in driver.snapshot()) >= RECOVERED_REQUESTS
                        ),
                        60,
                        f"{RECOVERED_REQUESTS} successful requests after the restart",
                    )
                finally:
                    driver.stop()
                    driver.join(timeout=60)
                server.stop()
                app_log = server.log_text()

            rows_before = users_table(url)
            clerk_before = clerk_users(standin.api_url, standin.secret_key)
            with app.app_context():
                reconciled = registration.reconcile(now=datetime.now(UTC) + timedelta(minutes=10))
            rows_after = users_table(url)
            clerk_after = clerk_users(standin.api_url, standin.secret_key)
        finally:
            dispose(app)
        server_log = cluster.log_text()

    outcomes = driver.snapshot()
    counts = status_counts(outcomes)
    records = app_log_records(app_log)
    failures = [o for o in outcomes if not o.ok]
    after_restart = [o for o in outcomes if o.started >= up]
    first_success_after = min((o.ended for o in after_restart if o.ok), default=float("nan"))
    created = {o.body["id"]: o for o in outcomes if o.kind == "register" and o.status == 201}
    refused_emails = {o.email for o in outcomes if o.kind == "register" and o.status == 503}
    complete_before = {row[0]: row for row in rows_before if row[2] is not None}
    pending_before = {row[0]: row for row in rows_before if row[2] is None}
    clerk_links_before = {(user["external_id"], user["id"]) for user in clerk_before}
    pending_with_clerk_user = {user["external_id"] for user in clerk_before} & set(pending_before)
    answered_503_became_accounts = len({row[0] for row in rows_after} - set(created) - set(owners.values()))
    print_figures(
        "Drill 2: PostgreSQL restart under load",
        {
            "app": f"gunicorn, 1 worker x {APP_THREADS} threads, SQLAlchemy pool 5, direct to PostgreSQL",
            "client threads": RESTART_THREADS,
            "requests": len(outcomes),
            "statuses": counts,
            "database down (stop called -> start returned), s": round(up - stop_called, 2),
            "fast shutdown took / start took, s": f"{down - stop_called:.2f} / {up - start_called:.2f}",
            "503 answers": sum(o.status == 503 for o in outcomes),
            "first failed request started / last ended, s after stop called": (
                f"{min((o.started for o in failures), default=float('nan')) - stop_called:.2f}"
                f" / {max((o.ended for o in failures), default=float('nan')) - stop_called:.2f}"
            ),
            "first success after start returned, s": round(first_success_after - up, 3),
            "requests started after the restart / failed": (
                f"{len(after_restart)} / {sum(not o.ok for o in after_restart)}"
            ),
            "slowest request, s (allowed)": f"{max(o.seconds for o in outcomes):.3f} ({longest_allowed})",
            "app log records (WARNING+) / ERROR+": f"{len(records)} / {len(errors_in(records))}",
            "app log records by kind": by_message(records),
            "rows complete / pending before reconcile": f"{len(complete_before)} / {len(pending_before)}",
            "users at the stand-in before reconcile": len(clerk_before),
            "pending rows whose Clerk user exists (reconcile completes them)": len(pending_with_clerk_user),
            "reconcile": reconciled,
            "rows of registrations answered 503, after reconcile": answered_503_became_accounts,
            "rows / users at the stand-in after reconcile": f"{len(rows_after)} / {len(clerk_after)}",
            "wall time (s)": round(time.monotonic() - began, 1),
        },
    )

    assert driver.crashes == []
    # While the database is down: 503 database_unavailable, never a 500, never a hang.
    allowed = {
        "register": {"201", "503 database_unavailable"},
        "readyz": {"200", "503 database_unavailable"},
        "me": {"200", "503 database_unavailable"},
    }
    unexpected = [o for o in outcomes if label(o) not in allowed[o.kind]]
    assert unexpected == [], explain(unexpected, records, *(o.request_id for o in unexpected))
    assert sum(o.status == 503 for o in outcomes) >= MIN_OUTAGE_503S
    outside = [o for o in failures if not (o.started < up and o.ended > stop_called)]
    assert outside == [], explain(outside, records, *(o.request_id for o in outside))
    assert max(o.seconds for o in outcomes) < longest_allowed
    assert errors_in(records) == []
    # Once it is back: full service.
    assert len(after_restart) >= RECOVERED_REQUESTS
    assert [o for o in after_restart if not o.ok] == []
    assert wrong_users(outcomes, owners) == []

    # No registration lost: every 201 is a complete row, pointing at a Clerk user that points back.
    rows_by_id = {row[0]: row for row in rows_after}
    clerk_links_after = {(user["external_id"], user["id"]) for user in clerk_after}
    for user_id, outcome in created.items():
        assert rows_by_id.get(user_id) == (user_id, outcome.email, outcome.body["clerk_user_id"])
        assert (user_id, outcome.body["clerk_user_id"]) in clerk_links_after
    # None half-made, even before reconcile: every complete row points at a Clerk user that points back ...
    half_made = [row for row in complete_before.values() if (row[0], row[2]) not in clerk_links_before]
    assert half_made == [], explain(half_made, records, *(row[0] for row in half_made))
    # ... every Clerk user belongs to a complete row, or to a pending row whose completion the outage cut
    # off (reconcile completes it) ...
    complete_links_before = {(row[0], row[2]) for row in complete_before.values()}
    unexplained = [
        user
        for user in clerk_before
        if (user["external_id"], user["id"]) not in complete_links_before
        and user["external_id"] not in pending_before
    ]
    assert unexplained == [], explain(unexplained, records, *(user["external_id"] for user in unexplained))
    # ... and every row is a 201 (or a token user), or a registration answered 503: pending, or complete
    # because the database went away after its COMMIT had reached it.
    unanswered = set(complete_before) - set(created) - set(owners.values())
    assert {complete_before[user_id][1] for user_id in unanswered} <= refused_emails
    assert {row[1] for row in pending_before.values()} <= refused_emails
    # Reconcile finishes every pending row; then rows (all with Clerk ids) == Clerk users.
    assert reconciled == {
        "completed": len(pending_with_clerk_user),
        "removed": len(pending_before) - len(pending_with_clerk_user),
        "failed": 0,
    }
    assert all(row[2] is not None for row in rows_after)
    assert {(row[0], row[2]) for row in rows_after} == clerk_links_after
    assert set(rows_by_id) <= set(created) | set(owners.values()) | set(unanswered) | set(pending_before)
    assert "received fast shutdown request" in server_log
