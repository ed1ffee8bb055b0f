"""The stand-in's sign-in and sign-out pages: development's stand-in for Clerk's Account Portal.

In production Clerk's Account Portal signs a person in on Clerk's Frontend API, which keeps the session in
its own ``__client`` cookie and sets ``__client_uat`` on the registrable domain; the app's host gets **no**
``__session`` from it and obtains one through the handshake (``clerk_standin.handshake``; Clerk's docs, "How
Clerk works"; clerk/javascript ``packages/backend/src/tokens/request.ts``, reason
``client-uat-but-no-session-token``). Here ``GET /sign-in`` shows a plain HTML form (email and password, no
JavaScript); ``POST /sign-in`` checks them against the stand-in's users with Clerk's messages, starts a
session and sets ``__client`` and ``__client_uat`` the same way. Cookies belong to a host, not to a port, so
``__client_uat`` set on 127.0.0.1:5001 reaches the app on 127.0.0.1:5000. ``/sign-out`` ends the client's
session and sets ``__client_uat=0``. This module holds what the pages need that is not state: the HTML, the
messages and the redirect check.

Guarantees:

- ``allowed_redirect`` accepts only an absolute http(s) URL on exactly the allowed origin (scheme, host and
  port as given to ``--azp``), with no user info, whitespace or control characters: the pages never send a
  person to another site (no open redirect).
- A password is never put back into the page, logged or stored: the form is re-shown with the email only.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from flask import Response, render_template_string

# Clerk's own wording for these sign-in failures.
ACCOUNT_NOT_FOUND = "Couldn't find your account."
PASSWORD_INCORRECT = "Password is incorrect. Try again, or use another method."  # noqa: S105 (a message)
# The long message of Clerk's user_banned error, shown once the password is right.
USER_BANNED = "You have been banned. If you think this was by mistake, please contact support."

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{{ title }} · Clerk stand-in</title>
  <style>
    body { font: 16px/1.5 system-ui, sans-serif; max-width: 26rem; margin: 3rem auto; padding: 0 1rem; }
    label { display: block; margin-top: 1rem; font-weight: 600; }
    input { display: block; width: 100%; box-sizing: border-box; padding: .5rem; font: inherit; }
    button { margin-top: 1.5rem; padding: .5rem 1.25rem; font: inherit; }
    .error { color: #a40000; font-weight: 600; }
    .note { color: #555; font-size: .875rem; margin-top: 2rem; }
  </style>
</head>
<body>
  <main>
    <h1>{{ title }}</h1>
    {% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
    {% if redirect_url %}
    <form method="post" action="/sign-in">
      <input type="hidden" name="redirect_url" value="{{ redirect_url }}">
      <label for="email">Email address</label>
      <input id="email" name="email" type="email" autocomplete="username" required value="{{ email }}">
      <label for="password">Password</label>
      <input id="password" name="password" type="password" autocomplete="current-password" required>
      <button type="submit">Continue</button>
    </form>
    {% endif %}
    <p class="note">The local Clerk stand-in, for development only: Clerk's Account Portal signs people in
      in production. Signing in here gives the app no session cookie: it asks the stand-in for one through
      Clerk's handshake.</p>
  </main>
</body>
</html>
"""


def sign_in_form(redirect_url: str, email: str = "", error: str | None = None, status: int = 200) -> Response:
    """The sign-in form, sending the person to ``redirect_url`` (already checked) once signed in."""
    html = render_template_string(PAGE, title="Sign in", redirect_url=redirect_url, email=email, error=error)
    return _page(html, status)


def refused_redirect(allowed_origin: str) -> Response:
    """400: the ``redirect_url`` is not on the app's origin, so the page will not send anyone there."""
    error = f"redirect_url must be an address on {allowed_origin}."
    html = render_template_string(PAGE, title="Cannot sign in", redirect_url=None, email="", error=error)
    return _page(html, 400)


def allowed_redirect(url: str, allowed_origin: str) -> str | None:
    """``url`` if it may be redirected to (module docstring), else None."""
    if any(ord(char) <= 0x20 or ord(char) == 0x7F or char == "\\" for char in url):
        return None
    try:
        parts = urlsplit(url)
        origin = urlsplit(allowed_origin.rstrip("/"))
        port, allowed_port = parts.port, origin.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or parts.username is not None or parts.password is not None:
        return None
    same = (
        parts.scheme == origin.scheme.lower()
        and parts.hostname == (origin.hostname or "")
        and (port or _default_port(parts.scheme)) == (allowed_port or _default_port(origin.scheme))
    )
    return urlunsplit(parts) if same else None


def _default_port(scheme: str) -> int:
    return 443 if scheme.lower() == "https" else 80


def _page(html: str, status: int) -> Response:
    response = Response(html, status, mimetype="text/html")
    # The form carries a password: never cached, never framed by another site.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    return response
