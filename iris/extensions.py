"""Flask extensions, created unbound here and bound to the app in ``create_app``."""

import select
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import DeclarativeBase

# The engine execution option that carries the bound to every connection of the app's engine
# (``config.engine_options`` sets it); ``bound_the_transaction`` below applies it at the start of each
# transaction. None on a connection turns it off (migrations).
STATEMENT_TIMEOUT_OPTION = "iris_statement_timeout_ms"


class Base(DeclarativeBase):
    # Stable constraint names, so migrations can name (and later drop) every constraint.
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
csrf = CSRFProtect()


def default_limit() -> str:
    """The limit on every route without one of its own, from RATELIMIT_DEFAULT."""
    return current_app.config["RATELIMIT_DEFAULT"]


def register_limit() -> str:
    """The limit shared by every way to register (API and sign-up page), from RATELIMIT_REGISTER."""
    return current_app.config["RATELIMIT_REGISTER"]


def verification_email_limit() -> str:
    """The limit shared by every way to ask for a new verification mail, from RATELIMIT_VERIFICATION_EMAIL."""
    return current_app.config["RATELIMIT_VERIFICATION_EMAIL"]


def wrong_password_limit() -> str:
    """The limit on wrong passwords per client IP, shared by every page that asks for one, from
    RATELIMIT_WRONG_PASSWORD."""
    return current_app.config["RATELIMIT_WRONG_PASSWORD"]


def refused_a_password(response: Any) -> bool:
    """Flask-Limiter's ``deduct_when`` for those pages: they answer 422 exactly when the password was
    missing or wrong, and only that counts."""
    return response.status_code == 422


# Per client IP (request.remote_addr, which ProxyFix corrects behind trusted proxies). Storage and switches
# come from the app config (RATELIMIT_STORAGE_URI, RATELIMIT_ENABLED, ...). The limits are read from the
# config on each request: Flask-Limiter would otherwise keep the first app's defaults for every later app.
limiter = Limiter(key_func=get_remote_address, default_limits=[default_limit])


def wrong_passwords_limited(exempt_when: Callable[[], bool] | None = None) -> Callable:
    """For the views of every page that asks for a password: at most ``wrong_password_limit`` wrong ones per
    client IP, counted together across those pages (scope ``wrong_password``); a request over the limit is
    the 429 page before Clerk is asked. ``exempt_when`` spares a request that carries no password."""
    return limiter.shared_limit(
        wrong_password_limit,
        scope="wrong_password",
        methods=["POST"],
        deduct_when=refused_a_password,
        exempt_when=exempt_when,
    )


@sa.event.listens_for(sa.Engine, "begin")
def bound_the_transaction(connection: sa.Connection) -> None:
    """Start every PostgreSQL transaction with statement_timeout and lock_timeout set LOCAL to the
    connection's ``STATEMENT_TIMEOUT_OPTION`` (milliseconds), in one round trip.

    Guarantee: on an engine built with ``config.engine_options`` (the app's), no statement and no lock wait
    in any transaction lasts longer than IRIS_DB_STATEMENT_TIMEOUT_MS; PostgreSQL cancels it, and the app
    answers 503 ``database_unavailable``. The settings end with the transaction (``set_config(..., true)`` is
    ``SET LOCAL``), so they never outlive it on a pooled connection, nor on a PgBouncer server connection
    that the next client gets. Engines without the option (SQLite in development, ``config.direct_engine``,
    any other engine) and connections that set it to None (migrations/env.py) are left alone.

    Listening on the Engine class covers every engine, however many apps one process builds; the value
    travels with each engine's execution options, so each app keeps its own and no registry is needed.
    """
    timeout = connection.get_execution_options().get(STATEMENT_TIMEOUT_OPTION)
    if not timeout or connection.dialect.name != "postgresql":
        return
    # One statement: psycopg's extended protocol refuses two in one string, and a second would cost another
    # round trip. Runs inside the transaction this event begins (SQLAlchemy allows executing here).
    connection.exec_driver_sql(
        "SELECT set_config('statement_timeout', %(ms)s, true), set_config('lock_timeout', %(ms)s, true)",
        {"ms": str(timeout)},
    )


@sa.event.listens_for(sa.pool.Pool, "checkout")
def discard_closed_connection(dbapi_connection, connection_record, connection_proxy) -> None:
    """Refuse a pooled psycopg connection that the server (or a pooler in between) has closed while it sat
    idle in the pool, so SQLAlchemy replaces it before the request uses it. Costs one ``poll`` system call:
    no round trip, unlike ``pool_pre_ping``'s ping (an empty statement) on every checkout.

    Guarantee: a connection whose server end is gone because PostgreSQL or PgBouncer restarted, or the
    backend was terminated (``pg_terminate_backend``, an idle timeout), is never handed out: the server sends
    its last message and closes the socket, so the socket is readable although no query is running. Raising
    ``DisconnectionError`` makes the pool open a new connection and run this check again (twice at most; then
    the request fails with ``database_unavailable`` as before). An idle connection in good health has nothing
    to read (Iris never LISTENs), so a false alarm costs at most one reconnect. What this cannot see, no
    check short of a round trip can: a peer that vanished without closing (a network partition); libpq's TCP
    keepalives and the statement timeout bound those. Neon's idle suspend is met earlier, by ``pool_recycle``
    (``config.engine_options``).

    Only psycopg connections are checked; SQLite's have no socket.
    """
    pgconn = getattr(dbapi_connection, "pgconn", None)
    if pgconn is None:
        return
    if dbapi_connection.closed or dbapi_connection.broken:
        raise sa.exc.DisconnectionError("the connection is closed")
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN | select.POLLPRI)
    if poller.poll(0):
        raise sa.exc.DisconnectionError("the server closed the connection while it was idle in the pool")
