"""Security headers on every response."""

from __future__ import annotations

from flask import Flask, Response, request

# Only our own scripts, styles and images; no inline script anywhere; never framed.
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


def add_security_headers(response: Response) -> Response:
    """Set the headers unless a view chose its own (a page with other needs sets its own CSP)."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", REFERRER_POLICY)
    if request.is_secure:  # behind the proxy, ProxyFix makes this reflect the client's scheme
        headers.setdefault("Strict-Transport-Security", HSTS)
    return response


def init_app(app: Flask) -> None:
    app.after_request(add_security_headers)
