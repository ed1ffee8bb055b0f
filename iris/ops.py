"""Operational endpoints for load balancers, orchestrators and the metrics scraper."""

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, jsonify, request

from iris import metrics
from iris.errors import DatabaseUnavailable
from iris.extensions import db

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: the process answers. No I/O, so a slow database never gets a healthy worker killed."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Readiness: one round trip to the database; 503 ``database_unavailable`` when it fails."""
    try:
        db.session.execute(sa.text("SELECT 1"))
    except (sa.exc.OperationalError, sa.exc.TimeoutError) as error:
        raise DatabaseUnavailable() from error
    finally:
        db.session.rollback()
    return jsonify(status="ok", database="ok")


@bp.get("/metrics")
def prometheus_metrics():
    """Prometheus' text format (iris.metrics), for a scraper on the host talking to gunicorn directly.

    Not for the public: behind a proxy (IRIS_PROXY_HOPS > 0) a request that carries X-Forwarded-For came
    through it, and gets the same 404 as any unknown path. The nginx site refuses the path before that; this
    is the second line. No session, no rate limit, no database: a scrape only reads counters.
    """
    if current_app.config["IRIS_PROXY_HOPS"] > 0 and "X-Forwarded-For" in request.headers:
        abort(404)
    body, content_type = metrics.exposition()
    return body, 200, {"Content-Type": content_type, "Cache-Control": "no-store"}
