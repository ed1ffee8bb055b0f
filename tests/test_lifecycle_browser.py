"""An account's life in a real browser, the way people reach it: Chromium over https through nginx running
deploy/nginx-iris.conf in front of gunicorn with production settings (CSRF on, Secure cookies, the app's CSP
and Referrer-Policy), the Clerk stand-in and PostgreSQL. A restaurant owner deletes their account from
/account through its confirmation step, which asks for their password (a wrong one deletes nothing); an admin
finds an account, deactivates and reactivates it with their own password, and reads its audit trail, without
any JavaScript. Screenshots go to test-output/.

Needs Chromium and nginx: without them these tests skip on a developer's machine and fail in CI.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from playwright.sync_api import Page

from tests.browsers import BrowserSite, browser_site, screenshot, signed_in_cookies
from tests.helpers import PASSWORD, clerk_user_state, session_token
from tests.servers import migrated_schema

# Starts gunicorn, nginx and Chromium: seconds before the first test.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def web(admin_engine, standin_server, tmp_path_factory) -> Iterator[BrowserSite]:
    directory = tmp_path_factory.mktemp("lifecycle")
    with migrated_schema(admin_engine) as schema, browser_site(directory, schema, standin_server) as web:
        yield web


def users_table(schema: str) -> sa.TableClause:
    return sa.table(
        "users",
        sa.column("id"),
        sa.column("email"),
        sa.column("clerk_user_id"),
        sa.column("role"),
        sa.column("email_verified_at"),
        sa.column("deleted_at"),
        schema=schema,
    )


def account(web: BrowserSite, admin_engine: sa.Engine, *, admin: bool = False) -> sa.Row:
    """A confirmed account made on the sign-up page (an admin, as `flask iris promote` leaves one)."""
    email = f"{'boss' if admin else 'owner'}-{uuid.uuid4().hex[:8]}@bistro.example"
    context = web.browser.new_context()
    page = context.new_page()
    page.goto(web.url + "/signup")
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url(web.url + "/signup/done")
    context.close()
    users = users_table(web.schema)
    with admin_engine.begin() as connection:
        connection.execute(
            sa.update(users)
            .where(users.c.email == email)
            .values(role="admin" if admin else "restaurant", email_verified_at=sa.func.now())
        )
        return connection.execute(sa.select(users).where(users.c.email == email)).one()


@pytest.fixture
def visitor(web) -> Iterator[Page]:
    context = web.browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def signed_in(page: Page, web: BrowserSite, standin, clerk_user_id: str) -> None:
    """The __session cookie Clerk's frontend would set for this user."""
    token = session_token(standin, clerk_user_id, 600)
    page.context.add_cookies(signed_in_cookies(token, web.url))


def press(page: Page, name: str) -> int:
    """Press a form's button; the status of its POST."""
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.get_by_role("button", name=name, exact=True).click()
    page.wait_for_load_state()
    return posted.value.status


def state(admin_engine: sa.Engine, web: BrowserSite, user_id) -> sa.Row:
    users = users_table(web.schema)
    with admin_engine.connect() as connection:
        return connection.execute(sa.select(users).where(users.c.id == user_id)).one()


def test_an_owner_deletes_their_account_from_the_account_page(web, visitor, admin_engine, standin):
    owner = account(web, admin_engine)
    signed_in(visitor, web, standin, owner.clerk_user_id)
    visitor.goto(web.url + "/account")
    visitor.get_by_role("link", name="Delete my account").click()
    visitor.wait_for_url(web.url + "/account/delete")
    assert visitor.get_by_role("heading", level=1).inner_text() == "Delete your account?"
    screenshot(visitor, "account-delete-confirm.png")
    assert state(admin_engine, web, owner.id).deleted_at is None  # looking changed nothing

    # Without the password, and with a wrong one, nothing happens and the page says why.
    assert press(visitor, "Yes, delete my account") == 422
    assert "Enter your password" in visitor.get_by_role("alert").inner_text()
    visitor.get_by_label("Your password").fill("not-" + PASSWORD)
    assert press(visitor, "Yes, delete my account") == 422
    assert "That is not the password of this account" in visitor.get_by_role("alert").inner_text()
    assert visitor.get_by_label("Your password").input_value() == ""  # never sent back
    screenshot(visitor, "account-delete-wrong-password.png")
    assert state(admin_engine, web, owner.id).deleted_at is None
    assert clerk_user_state(standin, owner.clerk_user_id) is not None

    visitor.get_by_label("Your password").fill(PASSWORD)
    assert press(visitor, "Yes, delete my account") == 303
    visitor.wait_for_url(web.url + "/account/deleted")
    assert visitor.get_by_role("heading", level=1).inner_text() == "Your account is deleted"
    assert owner.email in visitor.locator("main").inner_text()
    screenshot(visitor, "account-deleted.png")
    assert state(admin_engine, web, owner.id).deleted_at is not None
    assert clerk_user_state(standin, owner.clerk_user_id) is None


def test_an_admin_finds_deactivates_and_reactivates_an_account(web, visitor, admin_engine, standin):
    owner = account(web, admin_engine)
    boss = account(web, admin_engine, admin=True)
    signed_in(visitor, web, standin, boss.clerk_user_id)
    visitor.goto(web.url + "/account")
    visitor.locator("header nav").get_by_role("link", name="Admin").click()
    visitor.wait_for_url(web.url + "/admin/users")
    visitor.get_by_label("Email contains").fill(owner.email.split("@")[0].upper())
    visitor.get_by_role("button", name="Search").click()
    visitor.wait_for_load_state()
    results = visitor.locator("table tbody tr")
    assert results.count() == 1
    screenshot(visitor, "admin-users-search.png")

    visitor.get_by_role("link", name=owner.email).click()
    visitor.get_by_role("link", name="Deactivate").click()
    assert visitor.get_by_role("heading", level=1).inner_text() == "Deactivate this account?"
    visitor.get_by_label("Your password").fill("not-" + PASSWORD)
    assert press(visitor, "Yes, deactivate it") == 422
    assert clerk_user_state(standin, owner.clerk_user_id)["banned"] is False
    visitor.get_by_label("Your password").fill(PASSWORD)
    assert press(visitor, "Yes, deactivate it") == 303
    visitor.wait_for_url(f"{web.url}/admin/users/{owner.id}")
    assert f"{owner.email} is deactivated." in visitor.get_by_role("status").inner_text()
    trail = visitor.locator("table tbody").inner_text()
    assert "deactivated" in trail and boss.email in trail
    assert clerk_user_state(standin, owner.clerk_user_id)["banned"] is True
    assert state(admin_engine, web, owner.id).deleted_at is not None

    visitor.get_by_role("link", name="Reactivate").click()
    visitor.get_by_label("Your password").fill(PASSWORD)
    assert press(visitor, "Yes, reactivate it") == 303
    visitor.wait_for_url(f"{web.url}/admin/users/{owner.id}")
    assert f"{owner.email} is reactivated." in visitor.get_by_role("status").inner_text()
    screenshot(visitor, "admin-user-audit-trail.png")
    assert clerk_user_state(standin, owner.clerk_user_id)["banned"] is False
    assert state(admin_engine, web, owner.id).deleted_at is None


def test_a_restaurant_owner_gets_the_404_page_under_admin(web, visitor, admin_engine, standin):
    owner = account(web, admin_engine)
    signed_in(visitor, web, standin, owner.clerk_user_id)
    response = visitor.goto(web.url + "/admin/users")
    assert response is not None and response.status == 404
    assert "Admin" not in visitor.locator("header nav").inner_text()
