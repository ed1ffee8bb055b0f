"""Security headers on every response."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request

from iris import handshake
from iris.config import ConfigError

# Only our own scripts, styles and images; no inline script anywhere; never framed. Forms post to us alone,
# and may end at Clerk's (content_security_policy).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HSTS = "max-age=31536000; includeSubDomains"
# Our own pages get the full referrer, other sites none. Over https, Flask-WTF refuses a form POST whose
# Referer is missing or names another origin (WTF_CSRF_SSL_STRICT), so `no-referrer` made every form fail in
# a browser. `same-origin` keeps that check working and still tells no other site which page, with whatever
# token its URL carries, a visitor came from.
REFERRER_POLICY = "same-origin"


def content_security_policy(config: Mapping[str, Any]) -> str:
    """The site's policy for an app's configuration. Browsers hold a form's submission to ``form-action``
    through every redirect it follows: the sign-out form's answer (iris.web.sign_out) goes on to Clerk's
    sign-out page (IRIS_SIGN_OUT_URL), and a form sent back to its page to be submitted again
    (iris.handshake.SubmitAgain), or the home page after signing out, goes through Clerk's Frontend API
    (the handshake). Those origins, and no others, are added to ``form-action``."""
    try:
        frontend_api = handshake.frontend_api_of(config)
    except ConfigError:  # a malformed key fails the requests that need it, with the reason logged
        frontend_api = None
    ends = [config.get("IRIS_SIGN_OUT_URL"), frontend_api]
    origins = sorted({f"{parts.scheme}://{parts.netloc}" for parts in map(urlsplit, filter(None, ends))})
    if not origins:
        return CONTENT_SECURITY_POLICY
    return CONTENT_SECURITY_POLICY.replace("form-action 'self'", "form-action 'self' " + " ".join(origins))


def add_security_headers(response: Response) -> Response:
    """Set the headers unless a view chose its own (a page with other needs sets its own CSP)."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", current_app.extensions["iris.csp"])
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", REFERRER_POLICY)
    if request.is_secure:  # behind the proxy, ProxyFix makes this reflect the client's scheme
        headers.setdefault("Strict-Transport-Security", HSTS)
    return response


def init_app(app: Flask) -> None:
    app.extensions["iris.csp"] = content_security_policy(app.config)
    app.after_request(add_security_headers)
