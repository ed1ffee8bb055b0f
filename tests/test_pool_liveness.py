"""Pooled connections: one the server closed is replaced at checkout, and checking costs no round trip.

Iris does not use ``pool_pre_ping`` (a ping round trip on every checkout); ``pool_recycle`` retires
connections before Neon's idle limit, and ``iris.extensions.discard_closed_connection`` refuses one whose
server end has closed (docs/performance.md). These tests close server ends for real, with
``pg_terminate_backend``, as a PostgreSQL restart or an idle timeout does.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from iris.extensions import db, discard_closed_connection


def backend_pids(app, count: int) -> set[int]:
    """Check out ``count`` pooled connections at once, read each one's server process id, return them all."""
    with app.app_context(), contextlib.ExitStack() as stack:
        connections = [stack.enter_context(db.engine.connect()) for _ in range(count)]
        return {
            connection.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() for connection in connections
        }


def terminate(admin_engine: sa.Engine, pids: set[int]) -> None:
    """Close the server end of each connection, and wait until each server process is gone."""
    with admin_engine.connect() as connection:
        for pid in pids:
            assert connection.execute(
                sa.text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid}
            ).scalar()
        connection.commit()


@contextlib.contextmanager
def without_the_check() -> Iterator[None]:
    sa.event.remove(sa.pool.Pool, "checkout", discard_closed_connection)
    try:
        yield
    finally:
        sa.event.listen(sa.pool.Pool, "checkout", discard_closed_connection)


def test_the_app_pool_does_not_pre_ping(app):
    with app.app_context():
        assert db.engine.pool._pre_ping is False
        assert 0 < db.engine.pool._recycle < 300  # under Neon's 5-minute idle limit


def test_connections_the_server_closed_while_pooled_are_replaced_at_checkout(app, client, admin_engine):
    before = backend_pids(app, 3)
    with app.app_context():
        assert db.engine.pool.checkedin() == 3
    terminate(admin_engine, before)

    after = backend_pids(app, 3)  # would raise OperationalError if a dead connection were handed out

    assert len(after) == 3
    assert not after & before
    # And through a request: the readiness check's transaction gets a live connection.
    terminate(admin_engine, after)
    answer = client.get("/readyz")
    assert answer.status_code == 200, answer.get_json()


def test_control_without_the_check_a_closed_pooled_connection_fails_the_request(app, admin_engine):
    """Shows the test above can fail: the same closed connection, handed out unchecked, fails its request."""
    terminate(admin_engine, backend_pids(app, 1))
    with without_the_check(), app.app_context():
        with pytest.raises(sa.exc.OperationalError):
            db.session.execute(sa.text("SELECT 1"))
        db.session.rollback()


def frontend_statements(trace: Path) -> list[str]:
    """The SQL texts the client sent (simple-protocol Query, extended-protocol Parse), from a libpq trace,
    whose lines are ``time<TAB>F<TAB>length<TAB>Query<TAB> "BEGIN"`` or ``...Parse<TAB> "" "SELECT 42" 1 0``.
    """
    statements = []
    for line in trace.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 5 and fields[1] == "F" and fields[3] in ("Query", "Parse"):
            quoted = re.findall(r'"((?:[^"]|"")*)"', fields[4])
            statements.append(quoted[0] if fields[3] == "Query" else quoted[1])
    return statements


def traced_transaction(app, trace: Path) -> list[str]:
    """One session transaction (``SELECT 42``, commit) on a pooled connection whose protocol is traced."""
    with app.app_context():
        backend_pids(app, 1)  # one connection in the pool, the one traced below
        raw = db.engine.raw_connection()
        pgconn = raw.driver_connection.pgconn
        with trace.open("w") as sink:
            pgconn.trace(sink.fileno())
            raw.close()  # back to the pool
            try:
                db.session.execute(sa.text("SELECT 42"))
                db.session.commit()
            finally:
                pgconn.untrace()
    return frontend_statements(trace)


def test_a_checkout_adds_no_statement_to_the_transaction(app, tmp_path):
    statements = traced_transaction(app, tmp_path / "trace")

    # Four round trips: BEGIN, the statement bound (iris.extensions.bound_the_transaction), the work, COMMIT.
    assert len(statements) == 4, statements
    begin, bound, work, commit = statements
    assert (begin, work, commit) == ("BEGIN", "SELECT 42", "COMMIT")
    assert bound.startswith("SELECT set_config('statement_timeout'")


def test_control_pool_pre_ping_adds_a_round_trip(make_app, tmp_path):
    """Shows the test above can fail: with pool_pre_ping the same transaction costs a fifth round trip, the
    ping (SQLAlchemy's PostgreSQL dialect pings with an empty statement, ``;``)."""
    app = make_app(SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True})

    statements = traced_transaction(app, tmp_path / "trace")

    assert len(statements) == 5, statements
    assert statements[:2] == [";", "BEGIN"]


def test_psycopg_exposes_what_the_check_reads(app):
    with app.app_context():
        raw = db.engine.raw_connection()
        try:
            connection = raw.driver_connection
            assert isinstance(connection, psycopg.Connection)
            assert connection.pgconn.socket > 0
            assert connection.closed is False and connection.broken is False
        finally:
            raw.close()
