"""Every page with a form works in a real browser over https, as production serves it, and CSRF still
refuses what it must.

Chromium opens https through nginx running deploy/nginx-iris.conf in front of gunicorn with gunicorn.conf.py
and production settings (tests/browsers.py). FORM_PAGES lists every page with a form and how a person fills it
in; each one is submitted there, so a header or proxy change that breaks forms fails here. A page with a form
that is not in FORM_PAGES fails test_every_form_page_is_in_the_browser_harness.

Also, in the browser: a form posted from another site is refused and changes nothing, and a plain-http
deployment gets a page that says what is wrong (not "form expired") with one log line for the operator.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import pytest
from playwright.sync_api import Page

from iris import errors
from tests.browsers import BrowserSite, accounts, browser_site, other_site, screenshot
from tests.helpers import PASSWORD, clerk_users
from tests.servers import migrated_schema


@dataclass
class FormPage:
    """A page with a form: ``path`` makes the URL path to open (a rule with variables needs e.g. a token
    made for the test), ``fill`` fills the form in as a person would, with values the app accepts."""

    path: Callable[[BrowserSite], str]
    fill: Callable[[Page], None]


def fill_signup(page: Page) -> None:
    page.get_by_label("Email address").fill(f"harness-{uuid.uuid4().hex[:8]}@bistro.example")
    page.get_by_label("Password").fill(PASSWORD)


# Every URL rule outside /api/ that accepts a CSRF-checked method, by rule.
FORM_PAGES: Mapping[str, FormPage] = MappingProxyType(
    {
        "/signup": FormPage(path=lambda web: "/signup", fill=fill_signup),
    }
)


@pytest.fixture(scope="module")
def web(admin_engine, standin_server, tmp_path_factory) -> Iterator[BrowserSite]:
    directory = tmp_path_factory.mktemp("forms")
    with migrated_schema(admin_engine) as schema, browser_site(directory, schema, standin_server) as web:
        yield web


@pytest.fixture
def page(web) -> Iterator[Page]:
    """A new visitor: its own browser context, no cookies yet."""
    context = web.browser.new_context(viewport={"width": 1280, "height": 800})
    yield context.new_page()
    context.close()


def refusal(page: Page) -> str:
    """The refused-form page's explanation, after checking its heading and its way back to the form."""
    assert page.get_by_role("heading", level=1).inner_text() == "Your form was not sent"
    assert page.get_by_role("link", name="Open the form again").get_attribute("href") == "/signup"
    return page.locator("main .lede").inner_text()


def test_every_form_page_is_in_the_browser_harness(make_app):
    app = make_app()  # the URL map needs no database
    checked = set(app.config["WTF_CSRF_METHODS"])
    form_rules = {
        rule.rule
        for rule in app.url_map.iter_rules()
        if checked & set(rule.methods or ()) and not rule.rule.startswith("/api/")
    }
    assert form_rules == set(FORM_PAGES), "add each page with a form to FORM_PAGES (and remove gone ones)"


@pytest.mark.parametrize("rule", sorted(FORM_PAGES))
def test_each_form_page_is_accepted_over_https_in_the_browser(web, page, rule):
    form_page = FORM_PAGES[rule]
    url = web.url + form_page.path(web)
    opened = page.goto(url)
    assert opened is not None and opened.status == 200
    form_page.fill(page)
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.locator("form[method=post] [type=submit]").click()
    answer = posted.value
    assert answer.request.header_value("referer") == url  # same-origin: the full address
    assert answer.status < 400, page.content()


def test_a_form_posted_from_another_site_is_refused_and_changes_nothing(web, page, admin_engine, standin):
    """The visitor has the sign-up page's session cookie, then opens another site whose page posts a sign-up
    form to us on load. It cannot know the CSRF token; the browser does not send the SameSite=Lax cookie
    along either."""
    email = f"forged-{uuid.uuid4().hex[:8]}@bistro.example"
    page.goto(web.url + "/signup")
    forged = f"""<!doctype html><title>Win a free dinner</title>
<form method="post" action="{web.url}/signup">
  <input name="email" value="{email}"><input name="password" value="{PASSWORD}">
</form>
<script>document.forms[0].submit()</script>"""
    with other_site(forged) as url, page.expect_response(f"{web.url}/signup") as posted:
        page.goto(url)
    answer = posted.value
    assert answer.request.method == "POST"
    assert answer.status == 400
    page.wait_for_load_state()
    message, _ = errors.CSRF_REASONS["The CSRF token is missing."]
    assert refusal(page) == message
    screenshot(page, "form-refused-other-site.png")
    assert clerk_users(standin) == []
    assert accounts(admin_engine, web.schema, email) == []


def test_over_plain_http_the_page_says_https_is_needed_and_the_log_says_why(web, page, admin_engine, standin):
    """A deployment serving the site over plain http: the browser refuses to keep the Secure session cookie,
    so no form can be accepted. The person is told to use https; the operator gets one line saying why."""
    email = f"plain-{uuid.uuid4().hex[:8]}@bistro.example"
    opened = page.goto(web.plain_url + "/signup")
    assert opened is not None and opened.status == 200
    assert page.context.cookies() == []  # Set-Cookie arrived with Secure over http: not kept
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.get_by_role("button", name="Create account").click()
    answer = posted.value
    assert answer.status == 400
    page.wait_for_load_state()
    message, problem = errors.OVER_PLAIN_HTTP
    assert refusal(page) == message
    screenshot(page, "form-refused-plain-http.png")

    request_id = answer.headers["x-request-id"]
    lines = [
        record
        for record in web.site.gunicorn.records()
        if record.get("request_id") == request_id and record.get("logger") == "iris.errors"
    ]
    assert [(line["level"], line["message"]) for line in lines] == [
        ("WARNING", f"form refused on POST /signup: {problem}")
    ]
    assert clerk_users(standin) == []
    assert accounts(admin_engine, web.schema, email) == []
