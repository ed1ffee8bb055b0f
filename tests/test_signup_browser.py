"""The sign-up page in a real browser, the way restaurants reach it: Chromium opens https through nginx
running deploy/nginx-iris.conf (TLS terminated with a certificate made here) in front of gunicorn with
gunicorn.conf.py and production settings (no FLASK_DEBUG, CSRF on, Secure session cookie, IRIS_PROXY_HOPS=1),
the Clerk stand-in and PostgreSQL. The browser honours every header the app sends. Screenshots of the pages go
to test-output/.

Needs Chromium and nginx (tests/browsers.py, tests/servers.py say how each is found): without them these
tests skip on a developer's machine and fail in CI.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page

from iris import security
from tests.browsers import BrowserSite, accounts, browser_site, screenshot
from tests.helpers import PASSWORD, clerk_users
from tests.servers import migrated_schema

# Starts gunicorn, nginx and Chromium: seconds before the first test.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def web(admin_engine, standin_server, tmp_path_factory) -> Iterator[BrowserSite]:
    directory = tmp_path_factory.mktemp("signup")
    with migrated_schema(admin_engine) as schema, browser_site(directory, schema, standin_server) as web:
        yield web


def visitor(web: BrowserSite, problems: list[str], **options) -> Page:
    """A new visitor (no cookies yet) in its own browser context. Console errors land in ``problems``: a
    blocked stylesheet (CSP) or a blocked cookie would show there. "Failed to load resource" lines only
    repeat HTTP statuses (the absent favicon, a 409 page), which the tests check themselves."""
    page = web.browser.new_context(**options).new_page()

    def note(message) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource:"):
            problems.append(message.text)

    page.on("console", note)
    page.on("pageerror", lambda error: problems.append(str(error)))
    return page


@pytest.fixture
def desktop(web) -> Iterator[Page]:
    problems: list[str] = []
    page = visitor(web, problems, viewport={"width": 1280, "height": 800})
    yield page
    page.context.close()
    assert problems == []


@pytest.fixture
def phone(web) -> Iterator[Page]:
    problems: list[str] = []
    page = visitor(web, problems, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    yield page
    page.context.close()
    assert problems == []


def new_email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}@bistro.example"


def open_signup(page: Page, web: BrowserSite) -> None:
    """Open the sign-up page over https and check what the browser got: the app's own headers, and the
    session cookie as production sets it."""
    response = page.goto(web.url + "/signup")
    assert response is not None and response.status == 200
    headers = response.headers
    assert headers["referrer-policy"] == security.REFERRER_POLICY
    # Forms may end at Clerk's Frontend API (the handshake; here the stand-in on loopback), nowhere else.
    policy = headers["content-security-policy"]
    frontend_api = r"form-action 'self' http://127\.0\.0\.1:\d+;"
    assert re.sub(frontend_api, "form-action 'self';", policy) == security.CONTENT_SECURITY_POLICY
    assert headers["strict-transport-security"] == security.HSTS
    [session] = [cookie for cookie in page.context.cookies() if cookie["name"] == "session"]
    assert (session["secure"], session["httpOnly"], session["sameSite"]) == (True, True, "Lax")


def submit(page: Page, web: BrowserSite):
    """Click "Create account" and return the answer to the form's POST, checking it carried the page's
    own address as Referer (what Flask-WTF's https check needs)."""
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.get_by_role("button", name="Create account").click()
    answer = posted.value
    assert answer.request.header_value("referer") == web.url + "/signup"
    page.wait_for_load_state()
    return answer


def no_horizontal_scroll(page: Page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_a_restaurant_signs_up_by_keyboard_on_a_desktop(web, desktop, admin_engine, standin):
    page, email = desktop, new_email("owner")
    page.goto(web.url + "/")
    page.get_by_role("link", name="Create your restaurant account").click()
    assert page.title() == "Create your restaurant account · Iris"
    open_signup(page, web)

    # Keyboard only: Tab from the top of the page reaches the email field, then the password, then Enter.
    page.keyboard.press("Tab")  # skip link
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "email":
            break
    assert page.evaluate("document.activeElement.id") == "email"
    page.keyboard.type(email)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "password"
    page.keyboard.type(PASSWORD)
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.keyboard.press("Enter")
    assert posted.value.status == 303

    page.wait_for_url(web.url + "/signup/done")
    assert page.title() == "Account created · Iris"
    assert page.get_by_role("heading", level=1).inner_text() == "Welcome to Iris"
    assert email in page.locator("main").inner_text()
    assert "Sign in with Clerk" in page.locator("main").inner_text()
    assert no_horizontal_scroll(page)
    screenshot(page, "signup-success.png")

    [row] = accounts(admin_engine, web.schema, email)
    [clerk_user] = clerk_users(standin)
    assert row.clerk_user_id == clerk_user["id"]


def test_a_taken_email_and_a_password_clerk_refuses_are_shown_at_their_fields_on_a_phone(
    web, phone, admin_engine, standin
):
    page, taken = phone, new_email("taken")
    open_signup(page, web)
    page.get_by_label("Email address").fill(taken)
    page.get_by_label("Password").fill(PASSWORD)
    assert submit(page, web).status == 303
    assert len(clerk_users(standin)) == 1

    # The same person, later, with the email in other letters.
    open_signup(page, web)
    page.get_by_label("Email address").fill(taken.upper())
    page.get_by_label("Password").fill(PASSWORD)
    assert submit(page, web).status == 409
    assert page.title() == "Fix 1 problem: Create your restaurant account · Iris"
    summary = page.get_by_role("alert")
    assert "There is a problem" in summary.inner_text()
    email = page.get_by_label("Email address")
    assert email.input_value() == taken.upper()  # what the person typed, kept
    assert email.get_attribute("aria-invalid") == "true"
    assert page.locator("#email-error").inner_text() == "An account with this email address already exists."
    assert page.get_by_label("Password").input_value() == ""  # never sent back
    assert no_horizontal_scroll(page)
    screenshot(page, "signup-failure.png")

    # The summary's link takes keyboard focus to the field in error.
    summary.get_by_role("link").click()
    assert page.evaluate("document.activeElement.id") == "email"

    # Fixing the email surfaces Clerk's own password rule at the password field: the re-rendered form
    # carries a working CSRF token too.
    fresh = new_email("new")
    email.fill(fresh)
    page.get_by_label("Password").fill("short")
    assert submit(page, web).status == 422
    assert page.locator("#password-error").inner_text() == "Passwords must be 8 characters or more."
    assert page.get_by_label("Email address").input_value() == fresh
    screenshot(page, "signup-password-refused.png")
    assert len(clerk_users(standin)) == 1
    assert accounts(admin_engine, web.schema, fresh) == []


def test_an_invalid_email_is_shown_at_its_field_and_nothing_is_made(web, desktop, admin_engine, standin):
    page = desktop
    open_signup(page, web)
    page.get_by_label("Email address").fill("owner at bistro")
    page.get_by_label("Password").fill(PASSWORD)
    assert submit(page, web).status == 422
    assert page.locator("#email-error").inner_text() == "Enter a valid email address."
    assert page.get_by_label("Email address").input_value() == "owner at bistro"
    screenshot(page, "signup-invalid-email.png")
    assert clerk_users(standin) == []
    assert accounts(admin_engine, web.schema, "owner at bistro") == []
