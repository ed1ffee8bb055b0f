"""Configuration: read the environment once, at start-up, by the names listed in ``ENVIRONMENT``.

Service settings keep the names their own providers document (DATABASE_URL as Neon gives it, CLERK_* as
Clerk does) or IRIS_*; ``ENVIRONMENT`` lists each one once, with the config key it fills, its default and how
its text is read. Flask's own settings and those of
its extensions come in as FLASK_<NAME> through ``Config.from_prefixed_env`` in the factory, on top of
``defaults``.

Development (FLASK_DEBUG=1, as ``make run`` sets it) gets embedded defaults so that nothing has to be set
up: a SQLite file in the instance folder, a generated secret key, the local Clerk stand-in and mails printed
to the console. Anywhere else a missing required variable stops start-up with one message naming every
missing variable.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import os
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from iris.extensions import STATEMENT_TIMEOUT_OPTION
from iris.models import SIGNUP_ROLES

# Where `make run` starts the local Clerk stand-in, and the key it accepts.
DEV_CLERK_API_URL = "http://127.0.0.1:5001"
DEV_CLERK_SECRET_KEY = "sk_test_iris_local_standin"  # noqa: S105 (the stand-in's key, not a secret)
# The signing secret `make run` gives the stand-in and the app, so the stand-in's webhooks verify.
DEV_WEBHOOK_SIGNING_SECRET = "whsec_aXJpcy1sb2NhbC1zdGFuZGluLXdlYmhvb2tzLTMyYnl0ZXM="  # noqa: S105
DEV_PUBLIC_URL = "http://127.0.0.1:5000"  # `make run`'s app (scripts/dev.py sets its own port)
# The stand-in's instance, as a publishable key names it: its tokens' issuer, https://standin.clerk.accounts.dev
# (clerk_standin's DEFAULT_ISSUER). Its Frontend API answers on CLERK_API_URL, which the app is told with
# CLERK_FRONTEND_API_URL: a real instance's answers on the host the key names.
DEV_PUBLISHABLE_KEY = "pk_test_c3RhbmRpbi5jbGVyay5hY2NvdW50cy5kZXYk"

# Upper bound for any one statement or lock wait on PostgreSQL (IRIS_DB_STATEMENT_TIMEOUT_MS). A blocked
# query (a table locked by a migration, a hung backend) would otherwise hold a gunicorn thread for as long as
# it lasts.
DEFAULT_STATEMENT_TIMEOUT_MS = 5000

# How long after reserving an email, or after losing Clerk's answer to a write, that write may still land at
# Clerk (iris.registration): longer than a whole registration (98.7 s at worst, see gunicorn.conf.py) and
# than any request Clerk may still be working on when Iris stops waiting.
DEFAULT_PENDING_TIMEOUT_SECONDS = 120

FRONTEND_API_HOST = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+(:[0-9]{1,5})?")


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

    The PostgreSQL settings are for Neon behind its PgBouncer pooler; each one says why below. On PostgreSQL
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
            # Neon suspends idle computes and kills their connections. Retire each connection before that
            # 5-minute mark, and refuse at checkout one whose server end has closed anyway (a restart, a
            # terminated backend): ``extensions.discard_closed_connection``, one poll() and no round trip.
            # pool_pre_ping would add a ping round trip to every transaction (docs/performance.md).
            "pool_pre_ping": False,
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


@functools.lru_cache(maxsize=8)
def issuer_from_publishable_key(publishable_key: str) -> str:
    """``https://`` + the Frontend API host that a publishable key encodes; ``ConfigError`` when malformed.

    The key is ``pk_test_``/``pk_live_`` + base64(host + "$") with the padding stripped.
    """
    prefix, encoded = publishable_key[:8], publishable_key[8:]
    host = ""
    if prefix in ("pk_test_", "pk_live_"):
        try:
            decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        if decoded.endswith("$") and FRONTEND_API_HOST.fullmatch(decoded[:-1]):
            host = decoded[:-1]
    if not host:
        raise ConfigError(
            "CLERK_PUBLISHABLE_KEY is not a Clerk publishable key: expected pk_test_ or pk_live_ followed by"
            " the base64 of the Frontend API host and '$'. Copy it from the Clerk Dashboard (API keys)."
        )
    return "https://" + host


@functools.lru_cache(maxsize=8)
def load_jwt_key(pem: str) -> RSAPublicKey:
    """CLERK_JWT_KEY as an RSA public key; ``ConfigError`` when it is not one.

    Accepts the PEM as the Clerk Dashboard shows it, on one line, or with literal ``\\n`` (as .env files often
    hold it).
    """
    text = pem.strip().replace("\\n", "\n")
    try:
        key = load_pem_public_key(text.encode())
    except ValueError:
        key = None
    if not isinstance(key, RSAPublicKey):
        raise ConfigError(
            "CLERK_JWT_KEY is not an RSA public key in PEM form (-----BEGIN PUBLIC KEY-----...). Copy it from"
            " the Clerk Dashboard (API keys, JWT public key), or unset it to fetch keys from Clerk."
        )
    return key


def _text(name: str, value: str) -> str:
    return value


def _url(name: str, value: str) -> str:
    return value.rstrip("/")


def _page_url(name: str, value: str) -> str:
    """An absolute http(s) address a browser is sent to (a link on our pages)."""
    if not re.fullmatch(r"https?://[^/\s?#]+([/?#]\S*)?", value):
        raise ConfigError(f"Iris cannot start: {name} must be an absolute http:// or https:// address.")
    return value


def _public_url(name: str, value: str) -> str:
    """The site's public origin (scheme, host, optional port), without a trailing slash."""
    if not re.fullmatch(r"https?://[^/\s?#]+/?", value):
        raise ConfigError(f"Iris cannot start: {name} must be an origin such as https://iris.example.")
    return value.rstrip("/")


def _switch(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ConfigError(f"Iris cannot start: {name} must be true or false.")
    return lowered in ("true", "1", "yes", "on")


def _verification(name: str, value: str) -> str:
    if value not in ("required", "off"):
        raise ConfigError(f"Iris cannot start: {name} must be required or off.")
    return value


def _webhook_secret(name: str, value: str) -> str:
    """A Svix signing secret: ``whsec_`` and the base64 of the key, as Clerk's dashboard shows it."""
    key = b""
    if value.startswith("whsec_"):
        try:
            key = base64.b64decode(value[6:], validate=True)
        except binascii.Error:
            key = b""
    if not key:
        raise ConfigError(
            f"Iris cannot start: {name} is not a webhook signing secret (whsec_ followed by base64). Copy it"
            " from the Clerk Dashboard (Webhooks, your endpoint, Signing Secret)."
        )
    return value


def _role_name(name: str, value: str) -> str:
    """A PostgreSQL role name that needs no quoting: lower-case letters, digits and ``_``, at most 63."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
        raise ConfigError(
            f"Iris cannot start: {name} must be a PostgreSQL role name of lower-case letters, digits and _"
            " (at most 63, not starting with a digit)."
        )
    return value


def _list(name: str, value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _whole_number(name: str, value: str, minimum: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"Iris cannot start: {name} must be a whole number.") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"Iris cannot start: {name} must be a whole number of at least {minimum}.")
    return number


def _positive_whole_number(name: str, value: str) -> int:
    return _whole_number(name, value, minimum=1)


def _non_negative_whole_number(name: str, value: str) -> int:
    return _whole_number(name, value, minimum=0)


def _signup_roles(name: str, value: str) -> list[str]:
    roles = _list(name, value)
    unknown = [role for role in roles if role not in SIGNUP_ROLES]
    if unknown:
        # Admins are never self-registered, and no other role exists.
        raise ConfigError(
            f"Iris cannot start: {name} may only contain {', '.join(SIGNUP_ROLES)}, not {', '.join(unknown)}."
        )
    return roles


def _clerk_key(decode: Callable[[str], object]) -> Callable[[str, str], str]:
    """A reader that keeps the key as given, after ``decode`` has shown it to be well-formed."""

    def read(name: str, value: str) -> str:
        try:
            decode(value)
        except ConfigError as error:
            raise ConfigError(f"Iris cannot start: {error}") from None
        return value

    return read


class Setting(NamedTuple):
    """One environment variable: the config key it fills, its value when unset, and how its text is read
    (``parse(name, text)``, raising ``ConfigError`` with a message naming the variable)."""

    key: str
    default: Any = None
    parse: Callable[[str, str], Any] = _text
    # Must be set outside development: True always, or a test of the other settings (by config key).
    required: bool | Callable[[Mapping[str, Any]], bool] = False

    def required_by(self, settings: Mapping[str, Any]) -> bool:
        return self.required(settings) if callable(self.required) else self.required


def _verification_required(settings: Mapping[str, Any]) -> bool:
    return settings.get("IRIS_EMAIL_VERIFICATION") == "required"


def _outside_development(settings: Mapping[str, Any]) -> bool:
    """Required outside development, where the development defaults do without it."""
    return True


# Every service setting, by environment name. Errors are reported in this order; the required ones first, as
# the missing-configuration message names them.
ENVIRONMENT: dict[str, Setting] = {
    "DATABASE_URL": Setting("SQLALCHEMY_DATABASE_URI", required=True),
    "CLERK_SECRET_KEY": Setting("CLERK_SECRET_KEY", required=True),
    "FLASK_SECRET_KEY": Setting("SECRET_KEY", required=True),
    "DATABASE_URL_DIRECT": Setting("DATABASE_URL_DIRECT"),
    # The role DATABASE_URL connects as (or a group role it is a member of): migrations grant it what the app
    # needs, audit_events INSERT and SELECT only, when it exists (migrations/versions/0009_runtime_role.py).
    "IRIS_DB_RUNTIME_ROLE": Setting("IRIS_DB_RUNTIME_ROLE", "iris_app", _role_name),
    "CLERK_API_URL": Setting("CLERK_API_URL", "https://api.clerk.com", _url),
    "CLERK_AUTHORIZED_PARTIES": Setting("CLERK_AUTHORIZED_PARTIES", [], _list),
    # Unset: POST /api/v1/webhooks/clerk answers 404 (reconcile alone keeps Iris in step).
    "CLERK_WEBHOOK_SIGNING_SECRET": Setting("CLERK_WEBHOOK_SIGNING_SECRET", None, _webhook_secret),
    "IRIS_TIMEZONE": Setting("IRIS_TIMEZONE", "Europe/Stockholm"),
    "IRIS_PROXY_HOPS": Setting("IRIS_PROXY_HOPS", 0, _whole_number),
    "IRIS_DB_STATEMENT_TIMEOUT_MS": Setting(
        "IRIS_DB_STATEMENT_TIMEOUT_MS", DEFAULT_STATEMENT_TIMEOUT_MS, _positive_whole_number
    ),
    "IRIS_PENDING_TIMEOUT_SECONDS": Setting(
        "IRIS_PENDING_TIMEOUT_SECONDS", DEFAULT_PENDING_TIMEOUT_SECONDS, _positive_whole_number
    ),
    "IRIS_SIGNUP_ROLES": Setting("IRIS_SIGNUP_ROLES", list(SIGNUP_ROLES), _signup_roles),
    # Where "Sign in" and "Sign out" links go (redirect_url back to us is added): Clerk's Account Portal in
    # production; in development with the stand-in, its own pages. Unset: pages say to sign in through the
    # front end, with no link.
    "IRIS_SIGN_IN_URL": Setting("IRIS_SIGN_IN_URL", None, _page_url),
    "IRIS_SIGN_OUT_URL": Setting("IRIS_SIGN_OUT_URL", None, _page_url),
    # The instance's Frontend API (signed-in pages handshake there; tokens' iss must be it).
    "CLERK_PUBLISHABLE_KEY": Setting(
        "CLERK_PUBLISHABLE_KEY", None, _clerk_key(issuer_from_publishable_key), required=_outside_development
    ),
    # Where the Frontend API answers when not on the host the publishable key names (the stand-in).
    "CLERK_FRONTEND_API_URL": Setting("CLERK_FRONTEND_API_URL", None, _public_url),
    "CLERK_JWT_KEY": Setting("CLERK_JWT_KEY", None, _clerk_key(load_jwt_key)),
    # Rate-limit counters. memory:// is per process, so several gunicorn workers need a shared store
    # (redis://...). If the store fails, requests go on with per-process counters rather than failing.
    "RATELIMIT_STORAGE_URI": Setting("RATELIMIT_STORAGE_URI", "memory://"),
    # Email verification (iris.verification): ``required`` or ``off`` (accounts count as confirmed at once).
    "IRIS_EMAIL_VERIFICATION": Setting("IRIS_EMAIL_VERIFICATION", "required", _verification),
    # Every absolute link (mails, sign-in and sign-out, the handshake's way back) is built from this origin,
    # never from a request's Host.
    "IRIS_PUBLIC_URL": Setting("IRIS_PUBLIC_URL", None, _public_url, required=_outside_development),
    "IRIS_UNVERIFIED_TTL_HOURS": Setting("IRIS_UNVERIFIED_TTL_HOURS", 168, _positive_whole_number),
    # How long a deactivated account keeps its data (counted from deleted_at) before reconcile erases it and
    # deletes its Clerk user (iris.personal_data).
    "IRIS_DEACTIVATED_RETENTION_DAYS": Setting("IRIS_DEACTIVATED_RETENTION_DAYS", 90, _positive_whole_number),
    # How recent a sign-in (the token's fva[0], minutes since the first factor) deleting an account and admin
    # writes need (iris.auth.require_recent_sign_in); 0 switches the check off.
    "IRIS_REVERIFY_MINUTES": Setting("IRIS_REVERIFY_MINUTES", 10, _non_negative_whole_number),
    # SMTP for Iris's own mails (iris.mail); without MAIL_SERVER (development only) mails go to the console.
    "MAIL_SERVER": Setting("MAIL_SERVER", None, required=_verification_required),
    "MAIL_PORT": Setting("MAIL_PORT", 25, _positive_whole_number),
    "MAIL_USERNAME": Setting("MAIL_USERNAME"),
    "MAIL_PASSWORD": Setting("MAIL_PASSWORD"),
    "MAIL_USE_TLS": Setting("MAIL_USE_TLS", False, _switch),
    "MAIL_USE_SSL": Setting("MAIL_USE_SSL", False, _switch),
    # Unset: "Iris <no-reply@HOST>", HOST from IRIS_PUBLIC_URL.
    "MAIL_DEFAULT_SENDER": Setting("MAIL_DEFAULT_SENDER"),
}


def defaults(*, debug: bool) -> dict[str, Any]:
    """The code defaults the factory starts from: Flask's and its extensions' settings, then every
    ``ENVIRONMENT`` default (required settings have none). A fresh dict each call, lists included."""
    flask_settings = {
        "MAX_CONTENT_LENGTH": 64 * 1024,
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        # Browsers send a Secure cookie only over https: everywhere but the local development server.
        "SESSION_COOKIE_SECURE": not debug,
        # Rate limits per client IP, counted in RATELIMIT_STORAGE_URI.
        "RATELIMIT_DEFAULT": "300 per minute",
        "RATELIMIT_REGISTER": "10 per minute; 50 per hour",
        # Asking for a new verification mail (API and page), per client IP.
        "RATELIMIT_VERIFICATION_EMAIL": "5 per minute; 20 per hour",
        # Wrong passwords on every page that asks for one (confirming an address, deleting your account, an
        # admin's confirmations), per client IP and counted together; a verification link's account has its
        # own bound too, counted in the database (iris.verification.WRONG_PASSWORD_LIMIT).
        "RATELIMIT_WRONG_PASSWORD": "5 per minute; 20 per hour",
        "RATELIMIT_SWALLOW_ERRORS": True,
        "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True,
    }
    unset = {
        setting.key: copy.deepcopy(setting.default)
        for setting in ENVIRONMENT.values()
        if setting.required is not True
    }
    return flask_settings | unset


def from_environment(environ: Mapping[str, str], *, development: bool, instance_path: str) -> dict:
    """Build the app's settings from ``environ`` through ``ENVIRONMENT``; a blank value counts as unset.

    In development, unset required values fall back to embedded defaults. Elsewhere they raise
    ``ConfigError`` naming every missing variable at once. A malformed value raises ``ConfigError`` naming it.
    """
    env = {name: value.strip() for name, value in environ.items() if value.strip()}
    settings: dict[str, Any] = {}
    for name, setting in ENVIRONMENT.items():
        if name in env:
            settings[setting.key] = setting.parse(name, env[name])
        elif setting.required is not True:
            settings[setting.key] = copy.deepcopy(setting.default)
    if development:
        _fill_in_development_defaults(settings, env, instance_path)
    missing = [
        name
        for name, setting in ENVIRONMENT.items()
        # Development fills in every always-required value; the conditional ones (IRIS_PUBLIC_URL,
        # MAIL_SERVER) have development fallbacks of their own (a local address, the console).
        if (setting.required is True or not development)
        and setting.required_by(settings)
        and settings.get(setting.key) is None
    ]
    if missing:
        raise ConfigError(
            "Iris cannot start: missing required configuration "
            + ", ".join(missing)
            + ". Set them in the environment (see README, Configuration), or run with FLASK_DEBUG=1"
            " for the development defaults."
        )
    return settings


def _fill_in_development_defaults(
    settings: dict[str, Any], env: Mapping[str, str], instance_path: str
) -> None:
    """A SQLite file, a fresh secret key and the local Clerk stand-in (its API and its sign-in and sign-out
    pages), for whichever of them is unset."""
    settings.setdefault("SQLALCHEMY_DATABASE_URI", "sqlite:///" + os.path.join(instance_path, "iris.sqlite3"))
    # A fresh key per start: development sessions and CSRF tokens do not survive a restart.
    settings.setdefault("SECRET_KEY", secrets.token_hex(32))
    # Links in console mails (no MAIL_SERVER: see iris.mail) point at `make run`'s default address.
    if settings.get("IRIS_PUBLIC_URL") is None:
        settings["IRIS_PUBLIC_URL"] = DEV_PUBLIC_URL
    if "CLERK_SECRET_KEY" not in env:
        # No Clerk key: the stand-in, unless CLERK_API_URL names another server.
        settings["CLERK_SECRET_KEY"] = DEV_CLERK_SECRET_KEY
        if "CLERK_API_URL" not in env:
            settings["CLERK_API_URL"] = DEV_CLERK_API_URL
        # The stand-in's own sign-in and sign-out pages, development's Account Portal.
        if "IRIS_SIGN_IN_URL" not in env:
            settings["IRIS_SIGN_IN_URL"] = settings["CLERK_API_URL"] + "/sign-in"
        if "IRIS_SIGN_OUT_URL" not in env:
            settings["IRIS_SIGN_OUT_URL"] = settings["CLERK_API_URL"] + "/sign-out"
        # The stand-in's instance, and its Frontend API (the handshake of signed-in pages).
        if "CLERK_PUBLISHABLE_KEY" not in env:
            settings["CLERK_PUBLISHABLE_KEY"] = DEV_PUBLISHABLE_KEY
        if "CLERK_FRONTEND_API_URL" not in env:
            settings["CLERK_FRONTEND_API_URL"] = settings["CLERK_API_URL"]
        # The secret `make run` gives the stand-in for signing its webhooks.
        if "CLERK_WEBHOOK_SIGNING_SECRET" not in env:
            settings["CLERK_WEBHOOK_SIGNING_SECRET"] = DEV_WEBHOOK_SIGNING_SECRET
