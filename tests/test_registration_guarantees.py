"""The guarantees listed in iris/registration.py's docstring, each proven end to end:
real HTTP to the Clerk stand-in, real PostgreSQL, real failures (a cut TCP link, a killed process)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests
import sqlalchemy as sa
from sqlalchemy import event
from werkzeug.serving import make_server

from iris import mail, registration
from iris.extensions import db
from tests.helpers import (
    FAILING_TRIGGER,
    PASSWORD,
    TEST_DATABASE_URL,
    URL,
    assert_error,
    clerk_users,
    expire_leases,
    free_port,
    migrate,
    rows,
    wait_for,
)
from tests.tcpproxy import TCPProxy


def clerk_received_create(standin) -> bool:
    return standin.control.stats()["requests"].get("POST /v1/users", 0) > 0


def test_the_password_is_found_nowhere(app, client, standin, schema, caplog):
    """Password only to Clerk: not in the database, the logs, any response body, on success or failure."""
    secret = f"Pw-{uuid.uuid4().hex}"
    short_secret = f"s{uuid.uuid4().hex[:6]}"  # too short for Clerk: the rejected-password path
    caplog.set_level(logging.DEBUG)
    bodies = []

    def attempt(email, password=secret):
        response = client.post(URL, json={"email": email, "password": password})
        bodies.append(response.get_data(as_text=True))
        return response.status_code

    assert attempt("ok@b.example") == 201
    assert attempt("ok@b.example") == 409
    assert attempt("not-an-email") == 422
    assert attempt("short@b.example", short_secret) == 422
    standin.control.add_fault(method="POST", path="/v1/users", after_commit=True, status=500, times=1)
    assert attempt("lost@b.example") == 201  # the answer was lost; the lookup found the user
    standin.control.add_fault(method="POST", path="/v1/users", action="hang", seconds=3, times=1)
    assert attempt("slow@b.example") == 503
    with app.app_context():
        db.session.execute(sa.text(FAILING_TRIGGER))
        db.session.commit()
    assert attempt("fails@b.example") == 500

    dump = subprocess.run(
        ["pg_dump", "--data-only", "--inserts", f"--schema={schema}", _libpq_url()],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "ok@b.example" in dump  # the dump really holds the data
    assert "clerk POST /users" in caplog.text  # the logs really cover the Clerk calls
    for text in [dump, caplog.text, *bodies]:
        assert secret not in text
        assert short_secret not in text


def test_local_write_failing_after_clerk_created_the_user_deletes_the_clerk_user(app, client, standin):
    """Nothing on failure: the database refuses the completing write; Clerk's user is deleted again."""
    with app.app_context():
        db.session.execute(sa.text(FAILING_TRIGGER))
        db.session.commit()
    response = client.post(URL, json={"email": "fails@b.example", "password": PASSWORD})
    error = assert_error(response, 500, "internal_error")
    assert "disk full" not in error["message"]
    assert clerk_received_create(standin)
    assert clerk_users(standin) == []
    assert rows(app) == []


def test_database_lost_during_the_clerk_call_undoes_clerk_and_reconcile_cleans_up(make_app, standin):
    """Nothing on failure, and No stuck email: the link to PostgreSQL is cut while Clerk creates the user."""
    proxy = TCPProxy(("127.0.0.1", _libpq_port()))
    proxied = sa.make_url(TEST_DATABASE_URL).set(host="127.0.0.1", port=proxy.port)
    app = make_app(SQLALCHEMY_DATABASE_URI=proxied.render_as_string(hide_password=False))
    migrate(app)
    standin.control.add_fault(method="POST", path="/v1/users", latency_ms=500, times=1)
    outcome = {}

    def register():
        outcome["response"] = app.test_client().post(URL, json={"email": "a@b.example", "password": PASSWORD})

    worker = threading.Thread(target=register)
    worker.start()
    wait_for(lambda: clerk_received_create(standin))
    proxy.cut()
    worker.join(timeout=20)

    assert_error(outcome["response"], 503, "database_unavailable")
    assert clerk_users(standin) == []  # Clerk's user was deleted again
    proxy.restore()
    # The database could not be told, so the reservation is still pending...
    assert [row.clerk_user_id for row in rows(app)] == [None]
    # ... until reconcile (or a later attempt) sees Clerk holds nothing for it.
    with app.app_context():
        counts = registration.reconcile(now=datetime.now(UTC) + timedelta(minutes=5))
    assert counts == {"completed": 0, "removed": 1, "failed": 0}
    assert rows(app) == []
    assert app.test_client().post(URL, json={"email": "a@b.example", "password": PASSWORD}).status_code == 201
    proxy.close()


CRASHING_REGISTRATION = """
import sys
from tests.helpers import make_test_app
from iris import registration
schema, standin_url = sys.argv[1:3]
app = make_test_app(schema, standin_url, CLERK_TIMEOUT=(1, 60))
with app.app_context():
    registration.register("crash@b.example", "correct horse battery staple")
"""


def crash_mid_registration(schema, standin) -> None:
    """Kill -9 a process after Clerk created the user and before it could commit anything else."""
    standin.control.add_fault(
        method="POST", path="/v1/users", after_commit=True, action="hang", seconds=30, times=1
    )
    process = subprocess.Popen(
        [sys.executable, "-c", CRASHING_REGISTRATION, schema, standin.base_url],
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        wait_for(lambda: len(clerk_users(standin, email_address="crash@b.example")) == 1, timeout=20)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_a_crash_after_clerk_answered_never_leaves_the_email_stuck(app, client, standin, schema):
    """No stuck email, next-attempt path: the half-done registration is undone and the new one wins."""
    crash_mid_registration(schema, standin)
    [pending] = rows(app)
    assert pending.clerk_user_id is None
    [orphan] = clerk_users(standin)
    assert orphan["external_id"] == str(pending.id)

    # Right after the crash the reservation still looks in flight.
    response = client.post(URL, json={"email": "crash@b.example", "password": PASSWORD})
    assert_error(response, 409, "email_taken")
    assert int(response.headers["Retry-After"]) > 0

    expire_leases(app)  # time passes: the crashed registration's create can no longer land
    response = client.post(URL, json={"email": "crash@b.example", "password": PASSWORD})
    assert response.status_code == 201
    [clerk_user] = clerk_users(standin)  # never two Clerk users
    assert clerk_user["id"] != orphan["id"]
    assert clerk_user["external_id"] == response.json["id"]
    assert [(str(r.id), r.clerk_user_id) for r in rows(app)] == [(response.json["id"], clerk_user["id"])]


def test_a_crash_after_clerk_answered_is_completed_by_reconcile(app, runner, standin, schema):
    """No stuck email, reconcile path: `flask iris reconcile` completes it, since Clerk holds the user."""
    crash_mid_registration(schema, standin)
    expire_leases(app)
    result = runner.invoke(args=["iris", "reconcile"])
    assert result.exit_code == 0, result.output
    assert "pending_completed 1, pending_removed 0" in result.output
    [row] = rows(app)
    [clerk_user] = clerk_users(standin)
    assert row.clerk_user_id == clerk_user["id"]
    assert clerk_user["external_id"] == str(row.id)


def test_reconcile_leaves_fresh_registrations_alone(app, runner, standin, schema):
    crash_mid_registration(schema, standin)
    result = runner.invoke(args=["iris", "reconcile"])
    assert "pending_completed 0, pending_removed 0" in result.output
    assert [row.clerk_user_id for row in rows(app)] == [None]


def test_reconcile_exits_non_zero_when_clerk_is_unreachable(app, make_app, schema, standin):
    crash_mid_registration(schema, standin)
    expire_leases(app)
    app = make_app(CLERK_API_URL="http://127.0.0.1:1")
    result = app.test_cli_runner().invoke(args=["iris", "reconcile"])
    assert result.exit_code == 1
    assert "Failed: a pending registration could not be settled" in result.stderr
    assert "pending_completed 0, pending_removed 0" in result.output


def test_a_refused_connection_to_clerk_releases_the_email_at_once(make_app, standin):
    """A lost answer is not a no, but a request that never left is: with nothing listening on Clerk's port
    the connection is refused (after the client's one connect retry), Clerk did nothing, and nothing can land
    later. The reservation is released at once, so the person trying again a moment later, with Clerk back,
    registers instead of waiting out a lease as "in progress"."""
    refused = make_app(CLERK_API_URL=f"http://127.0.0.1:{free_port()}")  # a real socket; nothing listens
    migrate(refused)
    answer = refused.test_client().post(URL, json={"email": "refused@b.example", "password": PASSWORD})
    assert_error(answer, 503, "auth_provider_unavailable")
    assert rows(refused) == []

    back = make_app()  # the same database, Clerk reachable again
    again = back.test_client().post(URL, json={"email": "refused@b.example", "password": PASSWORD})
    assert again.status_code == 201, again.get_data(as_text=True)
    assert [user["external_id"] for user in clerk_users(standin)] == [again.json["id"]]


def serve(app):
    """Run ``app`` on a real threaded HTTP server; returns (base_url, server)."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def test_twenty_concurrent_registrations_of_one_email_make_one_account(app, standin):
    """One winner: one 201, nineteen 409s, one Clerk user."""
    base_url, server = serve(app)
    standin.control.add_fault(method="POST", path="/v1/users", latency_ms=200)
    start = threading.Barrier(20)
    statuses = []

    def register(n):
        start.wait()
        response = requests.post(
            base_url + URL, json={"email": "Same@B.example", "password": f"{PASSWORD} {n}"}, timeout=30
        )
        statuses.append(response.status_code)

    threads = [threading.Thread(target=register, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.shutdown()

    assert sorted(statuses) == [201] + [409] * 19
    assert len(clerk_users(standin, email_address="same@b.example")) == 1
    assert standin.control.stats()["requests"]["POST /v1/users"] == 1
    [row] = rows(app)
    assert row.clerk_user_id is not None


def test_no_database_connection_is_held_while_clerk_is_called(app, standin):
    """No connection held: sample the pool throughout the Clerk call; nothing may be checked out."""
    with app.app_context():
        engine = db.engine
    checked_out = []
    event.listen(engine, "checkout", lambda *args: checked_out.append(+1))
    event.listen(engine, "checkin", lambda *args: checked_out.append(-1))
    standin.control.add_fault(method="POST", path="/v1/users", latency_ms=600, times=1)
    outcome = {}

    def register():
        outcome["status"] = (
            app.test_client().post(URL, json={"email": "a@b.example", "password": PASSWORD}).status_code
        )

    worker = threading.Thread(target=register)
    worker.start()
    wait_for(lambda: clerk_received_create(standin))
    samples = []
    while worker.is_alive() and len(samples) < 40:
        samples.append(engine.pool.checkedout())
        time.sleep(0.01)
    worker.join()
    assert mail.wait_until_idle(app, 5)  # its mail's courier, after the answer, used the pool too

    assert outcome["status"] == 201
    assert len(samples) >= 20  # the samples really covered the Clerk call
    assert set(samples) == {0}
    assert sum(checked_out) == 0 and checked_out  # the registration did use the pool, before and after


def test_outbound_connections_to_clerk_are_reused(app, client, standin):
    for n in range(10):
        response = client.post(URL, json={"email": f"owner{n}@b.example", "password": PASSWORD})
        assert response.status_code == 201
    stats = standin.control.stats()
    assert stats["requests"]["POST /v1/users"] == 10
    assert stats["connections"] == 1


def _libpq_url() -> str:
    return sa.make_url(TEST_DATABASE_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def _libpq_port() -> int:
    return sa.make_url(TEST_DATABASE_URL).port or 5432


def proxied_app(make_app):
    """An app whose database link runs through a TCPProxy the test can cut."""
    proxy = TCPProxy(("127.0.0.1", _libpq_port()))
    proxied = sa.make_url(TEST_DATABASE_URL).set(host="127.0.0.1", port=proxy.port)
    app = make_app(SQLALCHEMY_DATABASE_URI=proxied.render_as_string(hide_password=False))
    migrate(app)
    return app, proxy


@pytest.mark.parametrize("moment", ["before_commit", "after_commit"])
def test_database_lost_around_the_completing_commit_keeps_one_consistent_account(make_app, standin, moment):
    """Nothing on failure, its one ambiguous case: the link dies as the completing COMMIT goes out (it may or
    may not land) or right after it landed. The Clerk user must stay, and the account ends up consistent."""
    from flask_sqlalchemy.session import Session

    app, proxy = proxied_app(make_app)
    commits = []

    def cut_at_the_completion(session):
        commits.append(1)
        if len(commits) == 2:  # 1: the reservation, 2: the completion
            proxy.cut()

    event.listen(Session, moment, cut_at_the_completion)
    try:
        response = app.test_client().post(URL, json={"email": "a@b.example", "password": PASSWORD})
    finally:
        event.remove(Session, moment, cut_at_the_completion)
    proxy.restore()
    [clerk_user] = clerk_users(standin)  # kept in both cases
    if moment == "before_commit":
        assert_error(response, 503, "database_unavailable")
        assert [row.clerk_user_id for row in rows(app)] == [None]  # the COMMIT never landed ...
        with app.app_context():  # ... so reconcile completes the row from Clerk's external_id
            counts = registration.reconcile(now=datetime.now(UTC) + timedelta(minutes=5))
        assert counts == {"completed": 1, "removed": 0, "failed": 0}
    else:
        assert response.status_code == 201  # the COMMIT landed and nothing else needed the database

    [row] = rows(app)
    assert row.clerk_user_id == clerk_user["id"]  # complete, and pointing at a live Clerk user
    assert clerk_user["external_id"] == str(row.id)
    retry = app.test_client().post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert_error(retry, 409, "email_taken")
    proxy.close()


def test_a_connection_lost_after_the_view_answered_does_not_become_a_bare_500(make_app, standin):
    """The teardown ROLLBACK on a dead connection must not escape: the 201 already happened."""
    app, proxy = proxied_app(make_app)
    app.after_request(lambda response: (proxy.cut(), response)[1])
    response = app.test_client().post(URL, json={"email": "a@b.example", "password": PASSWORD})
    assert response.status_code == 201
    proxy.restore()
    assert [row.clerk_user_id for row in rows(app)] == [response.json["clerk_user_id"]]
    proxy.close()
