"""Iris accounts backend: the application factory."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from iris import config


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app: configuration, extensions, blueprints, error handlers, CLI, proxy middleware.

    With ``test_config`` the environment is not read at all: the dict is the whole configuration on top of
    the code defaults, so a developer's environment cannot leak into tests. Nothing touches the database or
    the network here.
    """
    app = Flask(
        __name__,
        instance_relative_config=True,
        template_folder="../templates",
        static_folder="../static",
    )
    app.config.from_mapping(
        MAX_CONTENT_LENGTH=64 * 1024,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        # Browsers send a Secure cookie only over https: everywhere but the local development server.
        SESSION_COOKIE_SECURE=not app.debug,
        IRIS_TIMEZONE="Europe/Stockholm",
        IRIS_SIGNUP_ROLES=["restaurant"],
        IRIS_PROXY_HOPS=0,
        IRIS_PENDING_TIMEOUT_SECONDS=config.DEFAULT_PENDING_TIMEOUT_SECONDS,
        DATABASE_URL_DIRECT=None,
        IRIS_DB_STATEMENT_TIMEOUT_MS=config.DEFAULT_STATEMENT_TIMEOUT_MS,
        # Rate limits per client IP. Counters live in RATELIMIT_STORAGE_URI: memory:// is per process, so
        # several gunicorn workers need a shared store (redis://...). If the store fails, requests go on
        # with per-process counters rather than failing.
        RATELIMIT_STORAGE_URI="memory://",
        RATELIMIT_DEFAULT="300 per minute",
        RATELIMIT_REGISTER="10 per minute; 50 per hour",
        RATELIMIT_SWALLOW_ERRORS=True,
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=True,
    )
    if test_config is None:
        os.makedirs(app.instance_path, exist_ok=True)
        app.config.update(
            config.from_environment(os.environ, development=app.debug, instance_path=app.instance_path)
        )
        app.config.from_prefixed_env("FLASK")
    else:
        app.config.update(test_config)
    uri = config.database_uri(app.config["SQLALCHEMY_DATABASE_URI"])
    app.config["SQLALCHEMY_DATABASE_URI"] = uri
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = config.engine_options(
        uri,
        app.config.get("SQLALCHEMY_ENGINE_OPTIONS"),
        statement_timeout_ms=app.config["IRIS_DB_STATEMENT_TIMEOUT_MS"],
    )

    from iris import models  # registers the models with db.metadata
    from iris.extensions import csrf, db, limiter, migrate

    db.init_app(app)
    migrate.init_app(app, db)
    csrf.init_app(app)
    limiter.init_app(app)

    from iris import api, cli, docs, errors, observability, ops, security, web

    app.register_blueprint(api.bp)
    csrf.exempt(api.bp)  # the JSON API is not cookie-authenticated for writes; forms keep CSRF
    app.register_blueprint(ops.bp)
    limiter.exempt(ops.bp)  # load balancers poll these
    app.register_blueprint(web.bp)
    app.register_blueprint(docs.bp)
    errors.init_app(app)
    observability.init_app(app)
    security.init_app(app)
    cli.init_app(app)
    app.add_template_filter(models.local_isoformat, "localtime")

    if app.config["IRIS_PROXY_HOPS"] > 0:
        from werkzeug.middleware.proxy_fix import ProxyFix

        hops = app.config["IRIS_PROXY_HOPS"]
        # Each proxy appends to X-Forwarded-For, but the nearest one sets (overwrites) X-Forwarded-Proto.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=1)  # type: ignore[method-assign]
    return app
