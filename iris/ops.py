"""Operational endpoints for load balancers and orchestrators."""

import sqlalchemy as sa
from flask import Blueprint, jsonify

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
