"""API documentation: the OpenAPI 3.1 document and the Swagger UI page that renders it.

Guarantees:

- ``GET /api/v1/openapi.json`` serves ``iris/openapi.json`` byte for byte, as written and reviewed by hand
  (no framework generates it). It is read and parsed once at import, so a malformed document stops start-up
  instead of failing a request.
- ``GET /docs`` renders Swagger UI from files this app serves itself: Swagger UI's own assets come from the
  ``flask-swagger-ui`` package (Swagger UI 5.x, the first line that renders OpenAPI 3.1), served under
  ``/docs/assets/``, and the start-up code is ``static/docs/swagger-init.js``. The page has no inline script
  and no inline event handler, and loads nothing from another origin.
- The page needs nothing beyond the app-wide Content-Security-Policy of ``iris.security``: ``script-src
  'self'``; ``style-src 'self'`` (Swagger UI 5 sets its inline styles through the CSSOM, which CSP does not
  restrict); ``img-src 'self' data:`` (its icons are ``data:`` SVGs); and ``connect-src`` falling back to
  ``default-src 'self'`` (it fetches the document, and "Try it out" calls the API, on this origin).
  tests/test_openapi.py renders it in Chromium under the app's policy and fails on any violation.
- Only the Swagger UI files the page uses are served (``ASSETS``); any other name is 404.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, render_template, send_from_directory

bp = Blueprint("docs", __name__)

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
_OPENAPI_BYTES = OPENAPI_PATH.read_bytes()
_OPENAPI = json.loads(_OPENAPI_BYTES)

SWAGGER_UI_DIST = Path(str(importlib.resources.files("flask_swagger_ui").joinpath("dist")))
SWAGGER_UI_VERSION = (SWAGGER_UI_DIST / "VERSION").read_text().strip().removeprefix("v")
# The Swagger UI files /docs uses; nothing else from the package is served.
ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "index.css", "favicon-32x32.png"})


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the OpenAPI document (callers may change it freely)."""
    return copy.deepcopy(_OPENAPI)


@bp.get("/api/v1/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI 3.1 document, exactly as the file holds it."""
    return Response(_OPENAPI_BYTES, mimetype="application/json")


@bp.get("/docs")
def swagger_ui() -> Response:
    """The interactive API reference (Swagger UI)."""
    return Response(render_template("docs.html", swagger_ui_version=SWAGGER_UI_VERSION))


@bp.get("/docs/assets/<name>")
def swagger_ui_asset(name: str) -> Response:
    """One of Swagger UI's own files (``ASSETS``), from the installed package; anything else is 404."""
    if name not in ASSETS:
        abort(404)
    return send_from_directory(SWAGGER_UI_DIST, name)
