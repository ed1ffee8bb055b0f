"""Prometheus metrics, and their text exposition for ``GET /metrics`` (served by iris.ops).

What is measured. Every name starts with ``iris_`` and carries its unit; every label has a small, fixed set
of values, so no id, email, token or raw path ever becomes a label value:

- ``iris_http_requests_total`` and ``iris_http_request_duration_seconds``, by ``method``, ``route`` and
  ``status``. ``route`` is the URL rule (``/api/v1/users/<uuid:user_id>``), ``<unmatched>`` when no rule
  matched (404, 405); ``method`` outside the usual seven is ``other``.
- ``iris_registrations_total`` by ``outcome``: ``created``, or the error code the registration answered with
  (``email_taken``, ``validation_error``, ``rate_limited``, ``auth_provider_unavailable``, ...; IrisError
  codes are class constants), ``error`` for anything unexpected. The rate limiter's refusals count as
  ``rate_limited`` too.
- ``iris_clerk_request_duration_seconds`` by ``method`` and ``path`` (the path template, ``/users/{id}``),
  and ``iris_clerk_errors_total`` by ``method``, ``path`` and ``kind``: ``timeout``, ``connection``,
  ``rate_limited`` (429), ``server_error`` (5xx), ``unreadable`` (a 2xx without JSON), ``refused`` (a 4xx
  Iris has no meaning for, e.g. a bad key). Answers the caller expects (not found, email taken, a password
  rule) are not errors.
- ``iris_jwks_fetches_total`` by ``outcome`` (``ok``, ``error``): fetches of Clerk's signing keys.
- ``iris_db_pool_checked_out_connections``: connections checked out of the app's pool right now.
- ``iris_mails_total`` by ``outcome``: ``sent``, ``failed`` (SMTP or the network; left for reconcile),
  ``not_needed`` (the account was confirmed or removed meanwhile); from the couriers and from reconcile.
- ``iris_mail_queued``: mails handed to the couriers (iris.mail) and not dealt with yet. It stays near zero;
  growing, it says the couriers are behind (they share each worker's CPU with its requests).

Processes. Under gunicorn every worker counts for itself. gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR
before any worker imports prometheus_client, which then keeps each value in a per-process file there, and a
scrape (whichever worker answers it) adds up the files of every process, dead workers' counters included;
the gauges sum live workers only. Anywhere else (``flask run``, ``make run``, the test client) there is
one process, and its own registry answers.

Cost per request: one counter increment and one histogram observation (``observe_request``).
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# The classic text format, which every Prometheus version reads (generate_latest writes it for names like
# ours; the library's default content type, version 1.0.0, is newer than some scrapers).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Decided when prometheus_client was imported, as its own choice of value store was: gunicorn.conf.py sets it
# before then, and nothing changes it later.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

UNMATCHED = "<unmatched>"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Seconds. A page or API call takes milliseconds; a registration waits on Clerk, 98.7 s at the very worst
# (gunicorn.conf.py).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0)
# One Clerk call lasts 14.1 s at most (iris.clerk: connect, one retry, read).
CLERK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0)

HTTP_REQUESTS = Counter(
    "iris_http_requests_total", "Requests answered by the app.", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "iris_http_request_duration_seconds",
    "Time from the app receiving a request to its response being ready.",
    ["method", "route", "status"],
    buckets=REQUEST_BUCKETS,
)
REGISTRATIONS = Counter("iris_registrations_total", "Registrations by how they ended.", ["outcome"])
CLERK_DURATION = Histogram(
    "iris_clerk_request_duration_seconds",
    "Calls to Clerk's Backend API, by path template, failed ones included.",
    ["method", "path"],
    buckets=CLERK_BUCKETS,
)
CLERK_ERRORS = Counter(
    "iris_clerk_errors_total", "Clerk calls that failed, by kind.", ["method", "path", "kind"]
)
JWKS_FETCHES = Counter("iris_jwks_fetches_total", "Fetches of Clerk's signing keys (JWKS).", ["outcome"])
POOL_CHECKED_OUT = Gauge(
    "iris_db_pool_checked_out_connections",
    "Database connections checked out of the app's pool now.",
    multiprocess_mode="livesum",
)

MAILS = Counter("iris_mails_total", "Mails the app tried to send, by how it ended.", ["outcome"])
MAIL_QUEUED = Gauge(
    "iris_mail_queued",
    "Mails handed to the mail couriers and not sent or failed yet.",
    multiprocess_mode="livesum",
)


def init_app(app: Flask) -> None:
    """Count and time every request, and follow the app's database pool. Needs ``db.init_app`` first and
    iris.observability's timer (``g.request_started``)."""
    from iris.extensions import db

    app.after_request(observe_request)
    with app.app_context():
        watch_pool(db.engine)


def observe_request(response: Response) -> Response:
    """after_request: the request's counter and duration, labelled by rule, never by path."""
    rule = request.url_rule
    route = rule.rule if rule is not None else UNMATCHED
    method = request.method if request.method in METHODS else "other"
    status = str(response.status_code)
    HTTP_REQUESTS.labels(method, route, status).inc()
    started = g.get("request_started")
    if started is not None:
        HTTP_DURATION.labels(method, route, status).observe(time.perf_counter() - started)
    return response


def registration(outcome: str) -> None:
    REGISTRATIONS.labels(outcome).inc()


def registration_rate_limited(_limit: object) -> None:
    """Flask-Limiter's ``on_breach`` for the registration limit: the refusal is a registration outcome too."""
    REGISTRATIONS.labels("rate_limited").inc()


def clerk_call(method: str, path: str, seconds: float, error: str | None = None) -> None:
    CLERK_DURATION.labels(method, path).observe(seconds)
    if error is not None:
        CLERK_ERRORS.labels(method, path, error).inc()


def jwks_fetch(outcome: str) -> None:
    JWKS_FETCHES.labels(outcome).inc()


def mail_sent(outcome: str) -> None:
    MAILS.labels(outcome).inc()


def mail_queued(change: int) -> None:
    MAIL_QUEUED.inc(change)


# Marks a pool record whose checkout was counted, so each is uncounted once: a connection that could not be
# made is checked in without having been checked out, and a detached one is never checked in.
_COUNTED = "iris.metrics.checked_out"


def watch_pool(engine: sa.Engine) -> None:
    """Keep ``iris_db_pool_checked_out_connections`` in step with ``engine``'s pool (and the pools that
    ``engine.dispose()`` makes after it: they share its listeners)."""
    sa.event.listen(engine, "checkout", _checked_out)
    sa.event.listen(engine, "checkin", _returned)
    sa.event.listen(engine, "detach", _returned)


def _checked_out(dbapi_connection, record, proxy) -> None:
    record.record_info[_COUNTED] = True
    POOL_CHECKED_OUT.inc()


def _returned(dbapi_connection, record) -> None:
    if record.record_info.pop(_COUNTED, False):
        POOL_CHECKED_OUT.dec()


def exposition() -> tuple[bytes, str]:
    """Every metric in Prometheus' text format, and its content type: all processes' under gunicorn (read
    from PROMETHEUS_MULTIPROC_DIR), else this process's."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE
