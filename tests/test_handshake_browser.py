"""Clerk's handshake in a real browser, in production's setting: Chromium, the app under gunicorn behind the
repository's TLS nginx site with production settings, and the Clerk stand-in as the instance's Account Portal
and Frontend API, itself behind TLS as Clerk's are.

A person signs in on the stand-in's page, which (like Clerk's Account Portal) leaves ``__client`` and
``__client_uat`` and never ``__session``; the app's page then handshakes once with the Frontend API and
shows them signed in. What a production browser would hold cannot be had here in one respect: Clerk's
Frontend API sits on the app's parent domain and sets ``__client_uat`` there; the stand-in and the app share
the host 127.0.0.1 instead (cookies are per host, not per port). See docs/authentication.md.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import jwt
import pytest
import requests
from playwright.sync_api import Browser, Page

from clerk_standin import StandinServer
from tests.browsers import chromium, require_chromium, screenshot
from tests.helpers import BAPI_HEADERS, PASSWORD, claims, free_port
from tests.servers import app_environment, behind_nginx, migrated_schema, site_ports, site_url, tls_proxy

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    url: str  # the app's public origin (IRIS_PUBLIC_URL)
    clerk: str  # the stand-in's Frontend API, over https
    portal: str  # the stand-in's Account Portal (sign-in and sign-out pages), over https, another origin
    standin: StandinServer
    browser: Browser


@pytest.fixture(scope="module")
def stack(admin_engine, tmp_path_factory) -> Iterator[Stack]:
    require_chromium()
    ports = site_ports()
    url = site_url(ports)
    # Two origins, as Clerk's Frontend API (clerk.<domain>) and Account Portal (accounts.<domain>) are: the
    # browser holds forms to the page's form-action across each of them.
    clerk_port, portal_port = free_port(), free_port()
    clerk, portal = f"https://127.0.0.1:{clerk_port}", f"https://127.0.0.1:{portal_port}"
    with StandinServer(azp=url) as standin, migrated_schema(admin_engine) as schema:
        env = app_environment(
            schema,
            standin,
            IRIS_PROXY_HOPS="1",
            IRIS_PUBLIC_URL=url,
            CLERK_FRONTEND_API_URL=clerk,
            IRIS_SIGN_IN_URL=portal + "/sign-in",
            IRIS_SIGN_OUT_URL=portal + "/sign-out",
        )
        site_directory = tmp_path_factory.mktemp("handshake-site")
        with (
            behind_nginx(site_directory, env, ports) as site,
            tls_proxy(tmp_path_factory.mktemp("clerk"), clerk_port, standin.port, site.certificate),
            tls_proxy(tmp_path_factory.mktemp("portal"), portal_port, standin.port, site.certificate),
            chromium(site.certificate) as browser,
        ):
            yield Stack(url, clerk, portal, standin, browser)


@pytest.fixture
def page(stack) -> Iterator[Page]:
    context = stack.browser.new_context(viewport={"width": 1280, "height": 800})
    yield context.new_page()
    context.close()


def handshakes(stack: Stack) -> int:
    return stack.standin.control.stats()["requests"].get("GET /v1/client/handshake", 0)


def cookie(page: Page, name: str) -> dict | None:
    found = [c for c in page.context.cookies() if c["name"] == name]
    assert len(found) <= 1, found
    return found[0] if found else None


def heading(page: Page) -> str:
    return page.get_by_role("heading", level=1).inner_text()


def register(stack: Stack) -> str:
    """A new account, registered through the API; its email (its password is PASSWORD)."""
    email = f"hs-{uuid.uuid4().hex[:8]}@bistro.example"
    answer = requests.post(
        stack.url + "/api/v1/auth/register",
        json={"email": email, "password": PASSWORD},
        verify=False,  # noqa: S501 (the test certificate; the browser checks it properly)
        timeout=20,
    )
    assert answer.status_code == 201, answer.text
    return email


def sign_in(page: Page, stack: Stack, email: str) -> None:
    """From a signed-out /account: "Sign in", the stand-in's form, and back to /account."""
    page.goto(stack.url + "/account")
    assert heading(page) == "You are signed out"
    page.locator("main").get_by_role("link", name="Sign in").click()
    page.wait_for_url(f"{stack.portal}/sign-in?**")
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url(stack.url + "/account")


def a_minute_on(page: Page, stack: Stack, token: dict) -> str:
    """Make the browser's cookies what they are a minute and a bit after the sign-in, without sleeping: the
    ``__session`` cookie is still there (it lives a year) but its token, of the same session, has expired
    (60 s, and the 5 s of leeway Clerk's backends and Iris allow, are over); ``__client_uat`` still names
    the sign-in, before the token was made. Returns the expired token."""
    now = int(time.time())
    signed_in_at = now - 70
    expired = stack.standin.control.sign(
        claims(
            token["sub"],
            sid=token["sid"],
            azp=stack.url,
            iat=signed_in_at + 1,
            nbf=signed_in_at - 9,
            exp=signed_in_at + 61,
        )
    )
    page.context.add_cookies(
        [
            {"name": "__session", "value": expired, "url": stack.url, "secure": True},
            {"name": "__client_uat", "value": str(signed_in_at), "url": stack.url, "secure": True},
        ]
    )
    return expired


@pytest.fixture(autouse=True)
def quiet_warnings():
    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)


def test_signing_in_on_clerks_page_lands_signed_in_through_one_handshake(stack, page):
    email = register(stack)
    before = handshakes(stack)
    sign_in(page, stack, email)
    assert heading(page) == "Your account"
    assert email in page.locator("main").inner_text()
    assert handshakes(stack) == before + 1
    session = cookie(page, "__session")
    assert session is not None
    # Host-only on the app's host, Secure (the way back was https), readable by scripts as Clerk's is.
    assert (session["domain"], session["secure"], session["httpOnly"], session["sameSite"]) == (
        "127.0.0.1",
        True,
        False,
        "Lax",
    )
    assert int(cookie(page, "__client_uat")["value"]) > 0
    assert cookie(page, "__clerk_handshake") is None  # the payload's own directive cleared it
    assert not any(c["name"].startswith("__Host-iris_hs_") for c in page.context.cookies())  # state spent
    assert "__iris_handshake" not in page.url and "__clerk" not in page.url
    screenshot(page, "handshake-signed-in.png")


def test_a_minute_later_a_navigation_renews_the_token_through_the_handshake(stack, page):
    email = register(stack)
    sign_in(page, stack, email)
    old = cookie(page, "__session")["value"]
    token = jwt.decode(old, options={"verify_signature": False})
    expired = a_minute_on(page, stack, token)
    before = handshakes(stack)
    page.goto(stack.url + "/signup")
    assert page.url == stack.url + "/signup"
    assert page.locator("header nav").get_by_role("link", name="Account").is_visible()  # signed in
    assert handshakes(stack) == before + 1
    renewed = cookie(page, "__session")["value"]
    assert renewed not in (old, expired)
    assert jwt.decode(renewed, options={"verify_signature": False})["sid"] == token["sid"]


def test_signing_out_at_clerk_signs_the_next_page_out(stack, page):
    email = register(stack)
    sign_in(page, stack, email)
    page.goto(f"{stack.portal}/sign-out?redirect_url={stack.url}/account")
    page.wait_for_url(stack.url + "/account")
    assert heading(page) == "You are signed out"
    assert cookie(page, "__session") is None  # wiped by the handshake's directives
    assert cookie(page, "__client_uat")["value"] == "0"


def test_the_navigations_sign_out_ends_the_session_at_clerk(stack, page):
    email = register(stack)
    sign_in(page, stack, email)
    sid = jwt.decode(cookie(page, "__session")["value"], options={"verify_signature": False})["sid"]
    page.locator("header nav").get_by_role("button", name="Sign out").click()
    page.wait_for_url(stack.url + "/")
    assert page.locator("header nav").get_by_role("link", name="Sign in").is_visible()
    assert cookie(page, "__session") is None
    minted = requests.post(f"{stack.standin.api_url}/sessions/{sid}/tokens", headers=BAPI_HEADERS, timeout=10)
    assert minted.status_code == 404  # revoked: no more tokens
    page.goto(stack.url + "/account")
    assert heading(page) == "You are signed out"


def test_a_form_sent_with_an_expired_token_comes_back_and_works_the_second_time(stack, page):
    email = register(stack)
    sign_in(page, stack, email)
    page.goto(stack.url + "/account/delete")
    token = jwt.decode(cookie(page, "__session")["value"], options={"verify_signature": False})
    a_minute_on(page, stack, token)
    page.get_by_label("Your password").fill(PASSWORD)
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.get_by_role("button", name="Yes, delete my account").click()
    assert posted.value.status == 303
    page.wait_for_url(stack.url + "/account/delete")
    assert (
        "Your sign-in needed refreshing, so nothing was done yet. Please submit again."
        in page.locator("main").inner_text()
    )
    assert (
        requests.get(
            f"{stack.standin.api_url}/users/{token['sub']}", headers=BAPI_HEADERS, timeout=10
        ).status_code
        == 200
    )  # nothing was deleted
    page.get_by_label("Your password").fill(PASSWORD)
    page.get_by_role("button", name="Yes, delete my account").click()
    page.wait_for_url(stack.url + "/account/deleted")
    assert (
        requests.get(
            f"{stack.standin.api_url}/users/{token['sub']}", headers=BAPI_HEADERS, timeout=10
        ).status_code
        == 404
    )


def test_a_handshake_that_loops_stops_at_three_and_shows_the_page_signed_out(stack, page):
    email = register(stack)
    sign_in(page, stack, email)
    stack.standin.control.add_handshake_fault("iat_before_uat")  # every token Clerk hands out looks stale
    try:
        page.context.clear_cookies(name="__session")
        # The sign-in's own handshake counted one; its 2-second count starts afresh on a later visit.
        page.context.clear_cookies(name="__clerk_redirect_count")
        before = handshakes(stack)
        page.goto(stack.url + "/account")
        assert heading(page) == "You are signed out"
        assert handshakes(stack) == before + 3
    finally:
        stack.standin.control.clear_handshake_faults()


def test_the_api_never_redirects(stack, page):
    email = register(stack)
    sign_in(page, stack, email)
    page.context.clear_cookies(name="__session")  # Clerk says signed in (__client_uat), no token here
    opened = page.goto(stack.url + "/api/v1/users/me")  # even as a document navigation
    assert opened is not None and opened.status == 401
    assert opened.headers["content-type"].startswith("application/json")
    assert page.url == stack.url + "/api/v1/users/me"
