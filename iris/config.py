"""Configuration: read the environment once, at start-up, by the names design.md gives.

Service settings keep their ecosystem names (DATABASE_URL, CLERK_*, IRIS_*). Flask's own settings and those of
its extensions come in as FLASK_<NAME> through ``Config.from_prefixed_env`` in the factory.

Development (FLASK_DEBUG=1, as ``make run`` sets it) gets embedded defaults so that nothing has to be set up:
a SQLite file in the instance folder, a generated secret key and the local Clerk stand-in. Anywhere else a
missing required variable stops start-up with one message naming every missing variable.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

# Where `make run` starts the local Clerk stand-in (iris.clerk_standin), and the key it accepts.
DEV_CLERK_API_URL = "http://127.0.0.1:5001"
DEV_CLERK_SECRET_KEY = "sk_test_iris_local_standin"  # noqa: S105 (the stand-in's key, not a secret)

# Variables that must be set outside development, mapped to the config key each one fills.
REQUIRED_OUTSIDE_DEVELOPMENT = {
    "DATABASE_URL": "SQLALCHEMY_DATABASE_URI",
    "CLERK_SECRET_KEY": "CLERK_SECRET_KEY",
    "FLASK_SECRET_KEY": "SECRET_KEY",
}

# Upper bound for any one statement or lock wait on PostgreSQL (IRIS_DB_STATEMENT_TIMEOUT_MS). A blocked
# query (a table locked by a migration, a hung backend) would otherwise hold a gunicorn thread for as long as
# it lasts.
DEFAULT_STATEMENT_TIMEOUT_MS = 5000

# How long after reserving an email, or after losing Clerk's answer to a write, that write may still land at
# Clerk (iris.registration): longer than a whole registration (98.7 s at worst, see gunicorn.conf.py) and
# than any request Clerk may still be working on when Iris stops waiting.
DEFAULT_PENDING_TIMEOUT_SECONDS = 120

# The engine execution option that carries the bound to every connection of the app's engine;
# iris.extensions applies it at the start of each transaction. None on a connection turns it off (migrations).
STATEMENT_TIMEOUT_OPTION = "iris_statement_timeout_ms"


class ConfigError(RuntimeError):
    """The environment cannot start the app; the message says what to set."""


def database_uri(url: str) -> str:
    """Return ``url`` as a SQLAlchemy URL that psycopg 3 drives.

    Neon and most hosts hand out ``postgres://`` or ``postgresql://``; SQLAlchemy would pick psycopg2 for
    the latter and rejects the former, so both become ``postgresql+psycopg://``. Other URLs pass through.
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def engine_options(
    uri: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
) -> dict[str, Any]:
    """SQLAlchemy engine options for ``uri``, with ``overrides`` merged in (``connect_args`` and
    ``execution_options`` key by key).

    The PostgreSQL settings are for Neon behind its PgBouncer pooler (ops-notes.md section 1). On PostgreSQL
    every transaction is bounded by ``statement_timeout_ms`` (see ``STATEMENT_TIMEOUT_OPTION``); SQLite gets
    no options at all.
    """
    options: dict[str, Any] = {}
    if uri.startswith("postgresql"):
        options = {
            # A small pool per process in front of Neon's pooler: no double pooling, and workers x 5
            # client connections stay far below the pooler's limit.
            "pool_size": 5,
            # Never open connections beyond the pool; a request waits pool_timeout instead.
            "max_overflow": 0,
            # Fail fast (and answer 503) instead of queueing for the default 30 s when the pool is empty.
            "pool_timeout": 10,
            # Neon suspends idle computes and kills their connections: test each one at checkout.
            "pool_pre_ping": True,
            # Retire connections before Neon's 5-minute suspend can kill them under us.
            "pool_recycle": 240,
            "connect_args": {
                # A cold Neon compute wakes in well under this; a dead host should not hang a request.
                "connect_timeout": 5,
                # Server-side prepared statements break behind PgBouncer in transaction mode.
                "prepare_threshold": None,
            },
            # Not a connect argument (`options=-c statement_timeout=...`): PgBouncer in transaction mode
            # refuses that startup parameter, so the bound is set inside each transaction instead.
            "execution_options": {STATEMENT_TIMEOUT_OPTION: statement_timeout_ms},
        }
    for key, value in (overrides or {}).items():
        if key in ("connect_args", "execution_options"):
            options[key] = {**options.get(key, {}), **value}
        else:
            options[key] = value
    return options


def direct_engine(url: str) -> sa.Engine:
    """An engine for DATABASE_URL_DIRECT (migrations, checks): no pool, the app's connect arguments.

    It carries no statement timeout: a long migration is legitimate. The caller disposes of it when done.
    """
    uri = database_uri(url)
    return sa.create_engine(
        uri, poolclass=sa.pool.NullPool, connect_args=engine_options(uri).get("connect_args", {})
    )


def from_environment(environ: Mapping[str, str], *, development: bool, instance_path: str) -> dict:
    """Build the app's settings from ``environ``.

    In development, unset required values fall back to embedded defaults. Elsewhere they raise
    ``ConfigError`` naming every missing variable at once.
    """
    env = {name: value.strip() for name, value in environ.items() if value.strip()}
    settings: dict[str, Any] = {
        "DATABASE_URL_DIRECT": env.get("DATABASE_URL_DIRECT"),
        "CLERK_API_URL": env.get("CLERK_API_URL", "https://api.clerk.com").rstrip("/"),
        "CLERK_PUBLISHABLE_KEY": env.get("CLERK_PUBLISHABLE_KEY"),
        "CLERK_JWT_KEY": env.get("CLERK_JWT_KEY"),
        "CLERK_AUTHORIZED_PARTIES": _split(env.get("CLERK_AUTHORIZED_PARTIES", "")),
        "CLERK_WEBHOOK_SIGNING_SECRET": env.get("CLERK_WEBHOOK_SIGNING_SECRET"),
        "IRIS_TIMEZONE": env.get("IRIS_TIMEZONE", "Europe/Stockholm"),
        "IRIS_SIGNUP_ROLES": _split(env.get("IRIS_SIGNUP_ROLES", "restaurant")),
        "IRIS_PROXY_HOPS": _integer(env, "IRIS_PROXY_HOPS", 0),
        "IRIS_DB_STATEMENT_TIMEOUT_MS": _integer(
            env, "IRIS_DB_STATEMENT_TIMEOUT_MS", DEFAULT_STATEMENT_TIMEOUT_MS, minimum=1
        ),
        "IRIS_PENDING_TIMEOUT_SECONDS": _integer(
            env, "IRIS_PENDING_TIMEOUT_SECONDS", DEFAULT_PENDING_TIMEOUT_SECONDS, minimum=1
        ),
    }
    unknown = [role for role in settings["IRIS_SIGNUP_ROLES"] if role != "restaurant"]
    if unknown:
        # Admins are never self-registered, and no other role exists.
        raise ConfigError(
            "Iris cannot start: IRIS_SIGNUP_ROLES may only contain restaurant, not "
            + ", ".join(unknown)
            + "."
        )
    _check_clerk_keys(settings)
    if "RATELIMIT_STORAGE_URI" in env:
        settings["RATELIMIT_STORAGE_URI"] = env["RATELIMIT_STORAGE_URI"]
    if "DATABASE_URL" in env:
        settings["SQLALCHEMY_DATABASE_URI"] = env["DATABASE_URL"]
    if "FLASK_SECRET_KEY" in env:
        settings["SECRET_KEY"] = env["FLASK_SECRET_KEY"]
    if "CLERK_SECRET_KEY" in env:
        settings["CLERK_SECRET_KEY"] = env["CLERK_SECRET_KEY"]

    if development:
        settings.setdefault(
            "SQLALCHEMY_DATABASE_URI", "sqlite:///" + os.path.join(instance_path, "iris.sqlite3")
        )
        # A fresh key per start: development sessions and CSRF tokens do not survive a restart.
        settings.setdefault("SECRET_KEY", secrets.token_hex(32))
        if "CLERK_SECRET_KEY" not in env:
            settings["CLERK_SECRET_KEY"] = DEV_CLERK_SECRET_KEY
            settings["CLERK_API_URL"] = env.get("CLERK_API_URL", DEV_CLERK_API_URL).rstrip("/")
    missing = [name for name, key in REQUIRED_OUTSIDE_DEVELOPMENT.items() if key not in settings]
    if missing:
        raise ConfigError(
            "Iris cannot start: missing required configuration "
            + ", ".join(missing)
            + ". Set them in the environment (see README, Configuration), or run with FLASK_DEBUG=1"
            " for the development defaults."
        )
    return settings


def _check_clerk_keys(settings: Mapping[str, Any]) -> None:
    """Refuse to start with a malformed CLERK_PUBLISHABLE_KEY or CLERK_JWT_KEY (iris.auth decodes them)."""
    from iris import auth  # imported here: iris.auth needs the models, which need more than config

    try:
        if settings["CLERK_PUBLISHABLE_KEY"]:
            auth.issuer_from_publishable_key(settings["CLERK_PUBLISHABLE_KEY"])
        if settings["CLERK_JWT_KEY"]:
            auth.load_jwt_key(settings["CLERK_JWT_KEY"])
    except ConfigError as error:
        raise ConfigError(f"Iris cannot start: {error}") from None


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None) -> int:
    try:
        value = int(env.get(name, default))
    except ValueError:
        raise ConfigError(f"Iris cannot start: {name} must be a whole number.") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"Iris cannot start: {name} must be a whole number of at least {minimum}.")
    return value
