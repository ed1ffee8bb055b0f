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
from typing import Any

import pytest
import sqlalchemy as sa
from playwright.sync_api import Page

from iris import errors
from tests.browsers import (
    BrowserSite,
    accounts,
    chromium,
    other_site,
    require_chromium,
    screenshot,
    signed_in_cookies,
)
from tests.helpers import PASSWORD, clerk_users, link_in, session_token, smtp_server
from tests.servers import app_environment, behind_nginx, migrated_schema, site_ports, site_url


@dataclass
class MailingSite(BrowserSite):
    """The production stack mailing to a real SMTP server (aiosmtpd) run by the test: ``mailbox.messages``."""

    mailbox: Any = None
    standin: Any = None
    admin_engine: Any = None


@dataclass
class FormPage:
    """A page with a form: ``path`` makes the URL path to open (a rule with variables needs e.g. a token
    made for the test), ``fill`` fills the form in as a person would, with values the app accepts,
    ``button`` is the name of the submit button to press (None: the page's only one), and ``session`` makes
    the Clerk session token of the visitor, for a page only a signed-in person (or an admin) can use."""

    path: Callable[[MailingSite], str]
    fill: Callable[[Page], None]
    button: str | None = None
    session: Callable[[MailingSite], str] | None = None


def fill_signup(page: Page) -> None:
    page.get_by_label("Email address").fill(f"harness-{uuid.uuid4().hex[:8]}@bistro.example")
    page.get_by_label("Password").fill(PASSWORD)


def fill_new_link(page: Page) -> None:
    page.get_by_label("Email address").fill(f"harness-{uuid.uuid4().hex[:8]}@bistro.example")


def fill_nothing(page: Page) -> None:
    pass


def fill_password(page: Page) -> None:
    page.get_by_label("Your Iris password").fill(PASSWORD)


def fill_own_password(page: Page) -> None:
    """The confirmation pages of destructive acts ask for the signed-in person's own password."""
    page.get_by_label("Your password").fill(PASSWORD)


def registered_in_the_browser(web: MailingSite) -> tuple[str, str]:
    """A new account made on the sign-up page of the stack: its email and the path of the link the stack
    mailed to it (the link itself is on the stack's IRIS_PUBLIC_URL, the site's own origin)."""
    email = f"link-{uuid.uuid4().hex[:8]}@bistro.example"
    context = web.browser.new_context()
    try:
        page = context.new_page()
        page.goto(web.url + "/signup")
        page.get_by_label("Email address").fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        with page.expect_response(lambda response: response.request.method == "POST") as posted:
            page.get_by_role("button", name="Create account").click()
        assert posted.value.status == 303, page.content()
    finally:
        context.close()
    # The stack's mail courier sends the mail after it answered.
    [message] = web.mailbox.wait_for(1, to=email)
    return email, link_in(message)


def an_open_link(web: MailingSite) -> str:
    return registered_in_the_browser(web)[1]


def account_made_in_the_browser(web: MailingSite, *, admin: bool = False, deleted: bool = False) -> sa.Row:
    """A new account (made on the sign-up page), confirmed; an admin, or soft-deleted, when asked."""
    email, _ = registered_in_the_browser(web)
    users = sa.table(
        "users",
        sa.column("email"),
        sa.column("role"),
        sa.column("email_verified_at"),
        sa.column("deleted_at"),
        schema=web.schema,
    )
    with web.admin_engine.begin() as connection:
        connection.execute(
            sa.update(users)
            .where(users.c.email == email)
            .values(
                role="admin" if admin else "restaurant",
                email_verified_at=sa.func.now(),
                deleted_at=sa.func.now() if deleted else None,
            )
        )
    [account] = accounts(web.admin_engine, web.schema, email)
    return account


def a_new_owners_session(web: MailingSite) -> str:
    return session_token(web.standin, account_made_in_the_browser(web).clerk_user_id, 600)


def an_admins_session(web: MailingSite) -> str:
    return session_token(web.standin, account_made_in_the_browser(web, admin=True).clerk_user_id, 600)


def a_live_accounts_deactivation(web: MailingSite) -> str:
    return f"/admin/users/{account_made_in_the_browser(web).id}/deactivate"


def a_deactivated_accounts_reactivation(web: MailingSite) -> str:
    return f"/admin/users/{account_made_in_the_browser(web, deleted=True).id}/reactivate"


CONFIRM = "Yes, this is my account"
REMOVE = "This wasn't me: remove the account"


# Every URL rule outside /api/ that accepts a CSRF-checked method, by rule.
FORM_PAGES: Mapping[str, FormPage] = MappingProxyType(
    {
        "/signup": FormPage(path=lambda web: "/signup", fill=fill_signup),
        "/verify-email": FormPage(path=lambda web: "/verify-email", fill=fill_new_link),
        "/verify-email/<token>": FormPage(path=an_open_link, fill=fill_password, button=CONFIRM),
        "/account/delete": FormPage(
            path=lambda web: "/account/delete",
            fill=fill_own_password,
            button="Yes, delete my account",
            session=a_new_owners_session,
        ),
        "/admin/users/<uuid:user_id>/deactivate": FormPage(
            path=a_live_accounts_deactivation,
            fill=fill_own_password,
            button="Yes, deactivate it",
            session=an_admins_session,
        ),
        "/admin/users/<uuid:user_id>/reactivate": FormPage(
            path=a_deactivated_accounts_reactivation,
            fill=fill_own_password,
            button="Yes, reactivate it",
            session=an_admins_session,
        ),
        # The navigation's "Sign out" on every page of a signed-in person.
        "/sign-out": FormPage(
            path=lambda web: "/account", fill=fill_nothing, button="Sign out", session=a_new_owners_session
        ),
    }
)


@pytest.fixture(scope="module")
def web(admin_engine, standin_server, tmp_path_factory) -> Iterator[MailingSite]:
    """tests.browsers.browser_site, with the stack mailing to an SMTP server of the test's own."""
    directory = tmp_path_factory.mktemp("forms")
    require_chromium()
    with migrated_schema(admin_engine) as schema, smtp_server() as mailbox:
        ports = site_ports()
        env = app_environment(schema, standin_server, IRIS_PROXY_HOPS="1", IRIS_PUBLIC_URL=site_url(ports))
        env["MAIL_PORT"] = str(mailbox.port)
        with behind_nginx(directory, env, ports) as site, chromium(site.certificate) as browser:
            yield MailingSite(site, schema, browser, mailbox, standin_server, admin_engine)


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
    if form_page.session is not None:
        page.context.add_cookies(signed_in_cookies(form_page.session(web), web.url))
    url = web.url + form_page.path(web)
    opened = page.goto(url)
    assert opened is not None and opened.status == 200
    form_page.fill(page)
    if form_page.button is None:
        submit = page.locator("form[method=post] [type=submit]")
    else:
        submit = page.get_by_role("button", name=form_page.button, exact=True)
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        submit.click()
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


def account_state(admin_engine: sa.Engine, schema: str, email: str) -> sa.Row:
    users = sa.table(
        "users", sa.column("email"), sa.column("email_verified_at"), sa.column("deleted_at"), schema=schema
    )
    with admin_engine.connect() as connection:
        return connection.execute(sa.select(users).where(users.c.email == email)).one()


def clerk_users_with(standin, email: str) -> list[dict]:
    return [user for user in clerk_users(standin) if user["email_addresses"][0]["email_address"] == email]


def press(page: Page, button: str) -> int:
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.get_by_role("button", name=button, exact=True).click()
    page.wait_for_load_state()
    return posted.value.status


def test_a_mailed_link_opened_in_the_browser_confirms_only_with_the_accounts_password(
    web, page, admin_engine, standin
):
    email, path = registered_in_the_browser(web)
    opened = page.goto(web.url + path)
    assert opened is not None and opened.status == 200
    assert page.get_by_role("heading", level=1).inner_text() == "Is this your account?"
    assert page.locator("form[method=post] [type=submit]").count() == 2
    assert "If you did not choose a password on Iris, this account is not yours" in page.inner_text("main")
    screenshot(page, "verify-email-open.png")
    assert account_state(admin_engine, web.schema, email).email_verified_at is None  # opening changed nothing

    page.get_by_label("Your Iris password").fill("not the password at all")
    assert press(page, CONFIRM) == 422, page.content()
    assert page.get_by_role("heading", level=2, name="Nothing was confirmed").is_visible()
    assert page.get_by_label("Your Iris password").input_value() == ""  # the typed password is not sent back
    assert "not the password at all" not in page.content()
    screenshot(page, "verify-email-wrong-password.png")
    assert account_state(admin_engine, web.schema, email).email_verified_at is None
    [user] = clerk_users_with(standin, email)
    assert user["email_addresses"][0]["verification"]["status"] == "unverified"

    page.get_by_label("Your Iris password").fill(PASSWORD)
    page.get_by_label("Your Iris password").press("Enter")  # Enter in the field confirms, never removes
    page.wait_for_load_state()
    assert page.get_by_role("heading", level=1).inner_text() == "Your email address is confirmed"
    screenshot(page, "verify-email-confirmed.png")
    row = account_state(admin_engine, web.schema, email)
    assert row.email_verified_at is not None and row.deleted_at is None
    [user] = clerk_users_with(standin, email)
    assert user["email_addresses"][0]["verification"]["status"] == "verified"


def test_this_wasnt_me_pressed_in_the_browser_removes_the_account_without_a_password(
    web, page, admin_engine, standin
):
    email, path = registered_in_the_browser(web)
    [account] = accounts(admin_engine, web.schema, email)
    opened = page.goto(web.url + path)
    assert opened is not None and opened.status == 200
    assert press(page, REMOVE) == 200, page.content()
    assert page.get_by_role("heading", level=1).inner_text() == "This account no longer exists"
    assert "The account is removed" in page.locator("main .lede").inner_text()
    screenshot(page, "verify-email-removed.png")
    assert accounts(admin_engine, web.schema, email) == []  # deleted and erased: no row holds the address
    assert accounts(admin_engine, web.schema, f"erased:{account.id}") != []
    assert clerk_users_with(standin, email) == []
