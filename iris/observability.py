"""Logs: one line per request, and application logs carrying the request id.

Production (anything but development) writes JSON lines for the log collector. Development (``app.debug``,
as ``make run`` serves) writes the same records as plain lines for a person at a terminal, e.g.
``12:01:32 POST /api/v1/auth/register 201 12 ms``, and silences werkzeug's own request line, so each request
appears once.

What a log line may hold: method, path (never the query string; a route carrying a token logs its rule
instead, ``loggable_path``), status, duration, request id, user id,
client address, and messages written by our code. What it never holds: request or response bodies, headers,
passwords, tokens, or keys. Nothing here reads a body, so nothing here can leak one.

Every response carries the request id in ``X-Request-ID``: a well-formed incoming header is kept, otherwise a
new id is generated, so a client, the logs and an error body all name the same request.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid

from flask import Flask, Response, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

request_log = logging.getLogger("iris.request")

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{8,128}")


def request_id() -> str:
    """The current request's id (see module docstring)."""
    if "request_id" not in g:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if REQUEST_ID_PATTERN.fullmatch(incoming) else uuid.uuid4().hex
    return g.request_id


def assign_request_id() -> None:
    request_id()


def add_request_id_header(response: Response) -> Response:
    response.headers["X-Request-ID"] = request_id()
    return response


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


class PlainFormatter(logging.Formatter):
    """One readable line per record, for development: ``HH:MM:SS`` then, for a request, ``METHOD path status
    duration ms``; for anything else, the level, the logger and the message (and a traceback, if any)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        duration = getattr(record, "duration_ms", None)
        if record.name == request_log.name and duration is not None:
            return f"{self.formatTime(record, self.datefmt)} {record.getMessage()} {duration:.0f} ms"
        return super().format(record)


def plain_handler(stream=None) -> logging.Handler:
    """A handler writing ``PlainFormatter`` lines: the development console."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(PlainFormatter())
    handler.addFilter(RequestContextFilter())
    return handler


# The format of werkzeug's own per-request line (WSGIRequestHandler.log_request): in development our
# iris.request line says the same, so werkzeug's is dropped.
WERKZEUG_REQUEST_FORMAT = '"%s" %s %s'


def drop_werkzeug_request_lines(record: logging.LogRecord) -> bool:
    """A logging filter: False for werkzeug's per-request line, True for everything else it logs (its
    start-up notices, the debugger PIN, reloads, errors)."""
    return not (isinstance(record.msg, str) and record.msg.endswith(WERKZEUG_REQUEST_FORMAT))


def configure_logging(app: Flask) -> None:
    """Send the app's logs to stderr (gunicorn passes them on), once per process: JSON lines, or plain lines
    in development (``app.debug``), where werkzeug's duplicate request line is dropped.

    Left alone in tests (pytest captures records itself) and when something else already configured the
    root logger.
    """
    root = logging.getLogger()
    if app.testing or root.handlers:
        return
    if app.debug:
        root.addHandler(plain_handler())
        logging.getLogger("werkzeug").addFilter(drop_werkzeug_request_lines)
    else:
        root.addHandler(json_handler())
    root.setLevel(logging.INFO)


def start_timer() -> None:
    g.request_started = time.perf_counter()


def url_carries_secret() -> bool:
    """Whether the request's route has a secret in its URL (a ``token`` variable, as in
    ``/verify-email/<token>``): such a URL is never logged, nor handed to anyone else."""
    rule = request.url_rule
    return rule is not None and "token" in rule.arguments


def loggable_path() -> str:
    """``request.path``, except for a route whose URL carries a secret (``url_carries_secret``): then its
    rule, so no log line ever holds the token."""
    if url_carries_secret():
        return request.url_rule.rule  # type: ignore[union-attr]
    return request.path


def log_request(response: Response) -> Response:
    started = g.get("request_started")
    user = g.get("user")
    request_log.info(
        "%s %s %s",
        request.method,
        loggable_path(),
        response.status_code,
        extra={
            "method": request.method,
            "path": loggable_path(),
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
    """Configure the logs; give every request an id first, and put it on every response last."""
    configure_logging(app)
    app.before_request(assign_request_id)
    app.before_request(start_timer)
    app.after_request(add_request_id_header)  # after_request runs in reverse: this one runs last
    app.after_request(log_request)
