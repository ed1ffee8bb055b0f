"""Security headers on every response."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request

# Only our own scripts, styles and images; no inline script anywhere; never framed. Forms post to us alone;
# the one form that ends elsewhere, "Sign out", is let through to Clerk's sign-out (content_security_policy).
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


def content_security_policy(sign_out_url: str | None) -> str:
    """The site's policy. Browsers hold a form's submission to ``form-action`` through every redirect it
    follows, and the sign-out form's answer (iris.web.sign_out) redirects to Clerk's sign-out page
    (IRIS_SIGN_OUT_URL): that origin, and no other, is added to ``form-action``."""
    if not sign_out_url:
        return CONTENT_SECURITY_POLICY
    parts = urlsplit(sign_out_url)
    return CONTENT_SECURITY_POLICY.replace(
        "form-action 'self'", f"form-action 'self' {parts.scheme}://{parts.netloc}"
    )


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
    app.extensions["iris.csp"] = content_security_policy(app.config.get("IRIS_SIGN_OUT_URL"))
    app.after_request(add_security_headers)
