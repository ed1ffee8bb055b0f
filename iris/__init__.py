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
    _load_config(app, test_config)
    _init_extensions(app)
    _register_blueprints(app)
    _init_request_handling(app)
    _trust_proxies(app)
    return app


def _load_config(app: Flask, test_config: dict[str, Any] | None) -> None:
    """Code defaults, then the environment (or ``test_config``), then the engine options that follow."""
    app.config.from_mapping(config.defaults(debug=app.debug))
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


def _init_extensions(app: Flask) -> None:
    from iris import models  # registers the models with db.metadata
    from iris.extensions import csrf, db, limiter, migrate

    db.init_app(app)
    migrate.init_app(app, db)
    csrf.init_app(app)
    limiter.init_app(app)
    app.add_template_filter(models.local_isoformat, "localtime")


def _register_blueprints(app: Flask) -> None:
    from iris import admin, api, docs, ops, web, webhooks
    from iris.extensions import csrf, limiter

    app.register_blueprint(api.bp)
    # No form tokens in the JSON API: it accepts the __session cookie too, so iris.auth refuses a
    # state-changing API request authorised by the cookie alone unless its Origin is Iris's own (403
    # csrf_failed); Bearer requests cannot be forged by another site. Pages keep Flask-WTF's CSRF tokens.
    csrf.exempt(api.bp)
    app.register_blueprint(webhooks.bp)
    csrf.exempt(webhooks.bp)
    limiter.exempt(webhooks.bp)  # Svix signs its requests; a limit would only multiply its retries
    app.register_blueprint(ops.bp)
    limiter.exempt(ops.bp)  # load balancers poll these, Prometheus scrapes /metrics
    app.register_blueprint(web.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(docs.bp)


def _init_request_handling(app: Flask) -> None:
    """Error handlers, request ids and logs, metrics, security headers, and the ``flask iris`` commands."""
    from iris import cli, errors, handshake, metrics, observability, security

    errors.init_app(app)
    handshake.init_app(app)
    observability.init_app(app)
    metrics.init_app(app)
    security.init_app(app)
    cli.init_app(app)


def _trust_proxies(app: Flask) -> None:
    """Behind IRIS_PROXY_HOPS trusted proxies, take the client's address and scheme from their headers."""
    hops = app.config["IRIS_PROXY_HOPS"]
    if hops > 0:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # Each proxy appends to X-Forwarded-For, but the nearest one sets (overwrites) X-Forwarded-Proto.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=1)  # type: ignore[method-assign]
