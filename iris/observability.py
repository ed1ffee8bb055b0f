"""Logs: one JSON line per request, and JSON application logs carrying the request id.

What a log line may hold: method, path (never the query string), status, duration, request id, user id,
client address, and messages written by our code. What it never holds: request or response bodies, headers,
passwords, tokens, or keys. Nothing here reads a body, so nothing here can leak one.
"""

from __future__ import annotations

import logging
import sys
import time

from flask import Flask, Response, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

from iris.errors import request_id

request_log = logging.getLogger("iris.request")


class RequestContextFilter(logging.Filter):
    """Adds the current request id to every record made while a request is being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context() and not hasattr(record, "request_id"):
            record.request_id = request_id()
        return True


def json_handler(stream=None) -> logging.Handler:
    """A handler writing one JSON object per line: time, level, logger, message, and any extras."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            timestamp=False,
        )
    )
    handler.addFilter(RequestContextFilter())
    return handler


def configure_logging(app: Flask) -> None:
    """Send the app's logs as JSON lines to stderr (gunicorn passes them on), once per process.

    Left alone in tests (pytest captures records itself) and when something else already configured the
    root logger.
    """
    root = logging.getLogger()
    if app.testing or root.handlers:
        return
    root.addHandler(json_handler())
    root.setLevel(logging.INFO)


def start_timer() -> None:
    g.request_started = time.perf_counter()


def log_request(response: Response) -> Response:
    started = g.get("request_started")
    user = g.get("user")
    request_log.info(
        "%s %s %s",
        request.method,
        request.path,
        response.status_code,
        extra={
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1) if started else None,
            "request_id": request_id(),
            "user_id": str(user.id) if user is not None else None,
            "remote_addr": request.remote_addr,
            "scheme": request.scheme,
        },
    )
    return response


def init_app(app: Flask) -> None:
    configure_logging(app)
    app.before_request(start_timer)
    app.after_request(log_request)
