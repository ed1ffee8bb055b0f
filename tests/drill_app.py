"""The app as the drills serve it: production engine options, the Clerk stand-in, no rate limits.

``create()`` is the factory gunicorn loads in the drill's server process (``tests.drill_app:create()``); it
reads the database and stand-in URLs from the environment the drill sets. Its Python log records (WARNING
and up, with tracebacks and the request id) go to stderr as lines starting with ``LOG_PREFIX``, which the
drill reads back.
"""

from __future__ import annotations

import logging
import os
import sys

import sqlalchemy as sa
from flask import Flask, has_request_context

from iris.observability import request_id
from tests.helpers import make_test_app

DATABASE_URL_VARIABLE = "IRIS_DRILL_DATABASE_URL"
CLERK_URL_VARIABLE = "IRIS_DRILL_CLERK_API_URL"
LOG_PREFIX = "DRILL-LOG"


def drill_app(url: sa.URL | str, clerk_api_url: str) -> Flask:
    """The app on ``url`` with exactly the production engine options (config.engine_options: no per-test
    search_path), talking to the stand-in, with rate limits off (every drill client is 127.0.0.1)."""
    if isinstance(url, sa.URL):
        url = url.render_as_string(hide_password=False)
    return make_test_app(
        "public",
        clerk_api_url,
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS={},
        RATELIMIT_ENABLED=False,
    )


class RequestIdFilter(logging.Filter):
    """Adds the request id (as the app reports it in X-Request-ID) to records made during a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id() if has_request_context() else "-"
        return True


def create() -> Flask:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(LOG_PREFIX + " %(levelname)s %(name)s: %(message)s [request %(request_id)s]")
    )
    handler.setLevel(logging.WARNING)
    handler.addFilter(RequestIdFilter())
    logging.getLogger().addHandler(handler)
    return drill_app(os.environ[DATABASE_URL_VARIABLE], os.environ[CLERK_URL_VARIABLE])
