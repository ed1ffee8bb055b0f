"""Signing in locally, in a real browser, the way a newcomer does after `make run`: Chromium registers on the
app, follows "Sign in" to the Clerk stand-in's page, which sets ``__client`` and ``__client_uat`` (never
``__session``, as Clerk's Account Portal never does), lands on /account, where one handshake with the
stand-in's Frontend API brings the ``__session`` cookie, signed in; then signs out.

The servers are `make run`'s, over plain http on loopback: the app under gunicorn with FLASK_DEBUG=1 (the
development settings, so IRIS_SIGN_IN_URL and IRIS_SIGN_OUT_URL default to the stand-in's pages) on
PostgreSQL, and a stand-in of its own whose allowed origin is the app's. Both are on 127.0.0.1: cookies
belong to a host, not a port, so the stand-in's ``__client_uat`` reaches the app as Clerk's reaches a
production app from the parent domain. The same protocol in production's setting (TLS nginx, Secure cookies)
is tests/test_handshake_browser.py.

Needs Chromium (tests/browsers.py): without it this skips on a developer's machine and fails in CI.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from clerk_standin import StandinServer
from tests.browsers import CHROMIUM_ARGS, require_chromium, screenshot
from tests.helpers import PASSWORD, free_port
from tests.servers import Gunicorn, app_environment, migrated_schema


@dataclass
class DevelopmentSite:
    app_url: str
    standin: StandinServer
    browser: Browser


@pytest.fixture(scope="module")
def dev(admin_engine, tmp_path_factory) -> Iterator[DevelopmentSite]:
    binary = require_chromium()
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    with (
        StandinServer(azp=app_url) as standin,
        migrated_schema(admin_engine) as schema,
    ):
        # The origin the stand-in sends people back to, and the app's own links and handshakes name.
        env = app_environment(schema, standin, FLASK_DEBUG="1", IRIS_PUBLIC_URL=app_url)
        env["GUNICORN_BIND"] = f"127.0.0.1:{port}"
        # No Clerk key, as with `make run`: development's defaults point at the stand-in (CLERK_API_URL).
        del env["CLERK_SECRET_KEY"]
        with (
            Gunicorn(tmp_path_factory.mktemp("sign-in"), env),
            sync_playwright() as playwright,
        ):
            browser = playwright.chromium.launch(executable_path=binary, args=list(CHROMIUM_ARGS))
            try:
                yield DevelopmentSite(app_url, standin, browser)
            finally:
                browser.close()


@pytest.fixture
def page(dev) -> Iterator[Page]:
    context = dev.browser.new_context(viewport={"width": 1280, "height": 800})
    yield context.new_page()
    context.close()


def nav_links(page: Page) -> list[str]:
    """The navigation's links and buttons ("Sign out" is a form's button), by their text."""
    return [text.strip() for text in page.locator("header nav a, header nav button").all_inner_texts()]


def session_cookies(page: Page) -> list[dict]:
    return [cookie for cookie in page.context.cookies() if cookie["name"] == "__session"]


def handshakes(standin: StandinServer) -> int:
    return standin.control.stats()["requests"].get("GET /v1/client/handshake", 0)


def test_register_sign_in_through_the_standin_see_the_account_and_sign_out(dev, page):
    email = f"newcomer-{uuid.uuid4().hex[:8]}@bistro.example"
    page.goto(dev.app_url + "/")
    assert nav_links(page) == ["Sign up", "Sign in"]

    page.get_by_role("link", name="Sign up").click()
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url(dev.app_url + "/signup/done")

    page.locator("header nav").get_by_role("link", name="Sign in").click()
    back = quote(dev.app_url + "/account", safe="")
    page.wait_for_url(f"{dev.standin.base_url}/sign-in?redirect_url={back}")
    assert page.title() == "Sign in · Clerk stand-in"

    page.get_by_label("Email address").fill(email)
    page.get_by_label("Password").fill(PASSWORD + " but wrong")
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.get_by_role("button", name="Continue").click()
    assert posted.value.status == 422
    assert (
        page.get_by_role("alert").inner_text() == "Password is incorrect. Try again, or use another method."
    )
    assert page.get_by_label("Email address").input_value() == email
    assert session_cookies(page) == []
    screenshot(page, "sign-in-wrong-password.png")

    page.get_by_label("Password").fill(PASSWORD)
    before = handshakes(dev.standin)
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url(dev.app_url + "/account")
    assert page.title() == "Your account · Iris"
    assert email in page.locator("main").inner_text()
    assert nav_links(page) == ["Account", "Sign out"]
    assert handshakes(dev.standin) == before + 1
    [cookie] = session_cookies(page)  # written by the app from the handshake's directives
    assert (cookie["domain"], cookie["path"], cookie["sameSite"], cookie["httpOnly"]) == (
        "127.0.0.1",
        "/",
        "Lax",
        False,
    )
    page.goto(dev.app_url + "/signup")  # signed in on every page, not only /account
    assert nav_links(page) == ["Account", "Sign out"]
    screenshot(page, "signed-in-signup-page.png")

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(dev.app_url + "/")
    assert nav_links(page) == ["Sign up", "Sign in"]
    assert session_cookies(page) == []
    [uat] = [cookie for cookie in page.context.cookies() if cookie["name"] == "__client_uat"]
    assert uat["value"] == "0"  # the stand-in's sign-out, as Clerk's, says so to every app
    page.goto(dev.app_url + "/account")
    assert page.get_by_role("heading", level=1).inner_text() == "You are signed out"
    assert page.locator("main").get_by_role("link", name="Sign in").get_attribute("href") == (
        f"{dev.standin.base_url}/sign-in?redirect_url={back}"
    )


def test_an_unknown_email_is_told_so_on_the_standins_page(dev, page):
    page.goto(dev.app_url + "/account")
    page.locator("main").get_by_role("link", name="Sign in").click()
    page.get_by_label("Email address").fill(f"nobody-{uuid.uuid4().hex[:8]}@bistro.example")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Continue").click()
    assert page.get_by_role("alert").inner_text() == "Couldn't find your account."
    assert page.url == dev.standin.base_url + "/sign-in"
