"""Chromium for browser tests: Debian's build, headless, driven by Playwright, and the HTTPS site it opens.

The browser is never told to ignore certificate errors in general: it trusts exactly the test certificate's
public key (``--ignore-certificate-errors-spki-list``), so everything else about TLS, cookies and the app's
headers (Secure, SameSite, Referrer-Policy, CSP, HSTS) works as it does for a visitor.

Needs Chromium (`apt-get install chromium`; IRIS_CHROMIUM names another binary). Without it the browser tests
skip with that reason on a developer's machine, and fail in CI (CI set), where .ci/run installs it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Browser, Page, sync_playwright

from tests.helpers import unavailable
from tests.servers import Site, app_environment, behind_nginx, site_ports, site_url

CHROMIUM = os.environ.get("IRIS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
# Flags for a closed network: no background traffic, no component updates, no first-run UI.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Names for other sites on this machine: *.test is reserved and never resolves anywhere else.
RESOLVE_TEST_NAMES = "--host-resolver-rules=MAP *.test 127.0.0.1"


def require_chromium() -> str:
    """Chromium's path. Without it: skip on a developer's machine; fail in CI (CI set)."""
    if CHROMIUM is None:
        unavailable("Chromium not installed (apt-get install chromium; IRIS_CHROMIUM names another binary)")
    return CHROMIUM


def spki_sha256(certificate: Path) -> str:
    """The base64 SHA-256 of the certificate's public key (SubjectPublicKeyInfo), as Chromium pins keys."""
    public_key = x509.load_pem_x509_certificate(certificate.read_bytes()).public_key()
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextlib.contextmanager
def chromium(trusted_certificate: Path) -> Iterator[Browser]:
    """A headless Chromium that trusts ``trusted_certificate``'s key, and resolves *.test to 127.0.0.1."""
    binary = require_chromium()
    trust = f"--ignore-certificate-errors-spki-list={spki_sha256(trusted_certificate)}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=binary, args=[*CHROMIUM_ARGS, trust, RESOLVE_TEST_NAMES]
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class BrowserSite:
    """The app as production runs it (gunicorn with gunicorn.conf.py behind deploy/nginx-iris.conf, no
    FLASK_DEBUG, CSRF on, Secure session cookie, IRIS_PROXY_HOPS=1), its schema, and a browser for it."""

    site: Site
    schema: str
    browser: Browser

    @property
    def url(self) -> str:
        return self.site.https_url

    @property
    def plain_url(self) -> str:
        """The same app over plain http (nginx's test-only listener), under a name that is no secure context
        for Chromium, as any host but localhost is."""
        return f"http://iris.test:{self.site.ports['plain']}"


@contextlib.contextmanager
def browser_site(directory: Path, schema: str, standin) -> Iterator[BrowserSite]:
    """The production stack on ``schema`` and a Chromium trusting its certificate (skips/fails first if
    either nginx or Chromium is missing)."""
    require_chromium()
    ports = site_ports()
    env = app_environment(schema, standin, IRIS_PROXY_HOPS="1", IRIS_PUBLIC_URL=site_url(ports))
    with behind_nginx(directory, env, ports) as site, chromium(site.certificate) as browser:
        yield BrowserSite(site, schema, browser)


def signed_in_cookies(token: str, url: str) -> list[dict[str, str]]:
    """The Clerk cookies a browser holds for ``url`` after a sign-in and a handshake (iris.handshake): the
    session token in ``__session`` and, no newer than the token, ``__client_uat``. For tests about something
    else; the protocol itself runs in tests/test_handshake_browser.py."""
    issued_at = jwt.decode(token, options={"verify_signature": False})["iat"]
    return [
        {"name": "__session", "value": token, "url": url},
        {"name": "__client_uat", "value": str(issued_at), "url": url},
    ]


def accounts(admin_engine: sa.Engine, schema: str, email: str) -> list[sa.Row]:
    """Rows in ``schema`` whose email is ``email`` (any case), live or deleted."""
    users = sa.table("users", sa.column("id"), sa.column("email"), sa.column("clerk_user_id"), schema=schema)
    query = sa.select(users).where(sa.func.lower(users.c.email) == email.lower())
    with admin_engine.connect() as connection:
        return connection.execute(query).all()


@contextlib.contextmanager
def other_site(html: str) -> Iterator[str]:
    """Another web site on this machine serving ``html`` at ``/``: returns its URL, http://other.test:<port>/,
    a different site from 127.0.0.1 for the browser."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://other.test:{server.server_port}/"
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()


def screenshot(page: Page, name: str) -> Path:
    """A full-page screenshot in test-output/ (ignored by git)."""
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a real rendering, not a blank page
    return path
