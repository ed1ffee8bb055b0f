"""The sign-up page in a real browser: Debian's Chromium, headless, driven by Playwright, against the app
served over real HTTP with CSRF on, the Clerk stand-in and PostgreSQL. Screenshots go to test-output/.

Needs Chromium (`apt-get install chromium`; IRIS_CHROMIUM names another binary). Without it these tests skip
with that reason on a developer's machine, and fail in CI (CI=true), where .ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from tests.conftest import make_test_app, migrate
from tests.test_register_api import PASSWORD, clerk_users, rows

CHROMIUM = os.environ.get("IRIS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
# Flags for a closed network: no background traffic, no component updates, no first-run UI.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("Chromium is required for the browser tests in CI; .ci/run should install it")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")


@pytest.fixture
def live_app(schema):
    app = make_test_app(schema, WTF_CSRF_ENABLED=True)
    migrate(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def screenshot(page, name: str) -> Path:
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a real rendering, not a blank page
    return path


def no_horizontal_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_a_restaurant_signs_up_by_keyboard_on_a_desktop(live_app, browser, standin):
    app, base_url = live_app
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(base_url + "/")
    page.get_by_role("link", name="Create your restaurant account").click()
    assert page.title() == "Create your restaurant account · Iris"

    # Keyboard only: Tab from the top of the page reaches the email field, then the password, then Enter.
    page.keyboard.press("Tab")  # skip link
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "email":
            break
    assert page.evaluate("document.activeElement.id") == "email"
    page.keyboard.type("owner@bistro.example")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "password"
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")

    page.wait_for_url(base_url + "/signup/done")
    assert page.title() == "Account created · Iris"
    assert page.get_by_role("heading", level=1).inner_text() == "Welcome to Iris"
    assert "owner@bistro.example" in page.locator("main").inner_text()
    assert "Sign in with Clerk" in page.locator("main").inner_text()
    assert no_horizontal_scroll(page)
    screenshot(page, "signup-success.png")

    [row] = rows(app)
    assert row.clerk_user_id == clerk_users(standin)[0]["id"]
    page.close()


def test_a_failed_sign_up_on_a_phone_shows_each_problem_at_its_field(live_app, browser, standin):
    app, base_url = live_app
    assert (
        app.test_client()
        .post("/api/v1/auth/register", json={"email": "taken@bistro.example", "password": PASSWORD})
        .status_code
        == 201
    )
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.goto(base_url + "/signup")
    page.get_by_label("Email address").fill("Taken@Bistro.example")
    page.get_by_label("Password").fill("short")
    page.get_by_role("button", name="Create account").click()

    assert page.title() == "Fix 1 problem: Create your restaurant account · Iris"
    summary = page.get_by_role("alert")
    assert "There is a problem" in summary.inner_text()
    email = page.get_by_label("Email address")
    assert email.input_value() == "Taken@Bistro.example"  # what the person typed, kept
    assert email.get_attribute("aria-invalid") == "true"
    assert page.locator("#email-error").inner_text() == "An account with this email address already exists."
    assert page.get_by_label("Password").input_value() == ""  # never sent back
    assert no_horizontal_scroll(page)
    screenshot(page, "signup-failure.png")

    # The summary's link takes keyboard focus to the field in error.
    summary.get_by_role("link").click()
    assert page.evaluate("document.activeElement.id") == "email"

    # Fixing the email surfaces Clerk's own password rule at the password field.
    email.fill("new@bistro.example")
    page.get_by_label("Password").fill("short")
    page.get_by_role("button", name="Create account").click()
    assert page.locator("#password-error").inner_text() == "Passwords must be 8 characters or more."
    assert page.get_by_label("Email address").input_value() == "new@bistro.example"
    assert len(clerk_users(standin)) == 1
    page.close()
