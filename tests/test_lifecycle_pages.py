"""The pages of an account's life: "Delete my account" on /account with its confirmation step, and the admin
pages under /admin (list, search, paging, one account with its audit trail, deactivate and reactivate with a
confirmation step). Through Flask's test client with the __session cookie a browser sends; the browser
itself (https, CSRF, the production stack) is in tests/test_lifecycle_browser.py and test_forms_browser.py.
"""

from __future__ import annotations

import re
import uuid
from types import MappingProxyType

import pytest

from tests.helpers import (
    FAILING_SOFT_DELETE,
    PASSWORD,
    audit_events,
    claims,
    clerk_user_state,
    clerk_users,
    register,
    rows,
    run_sql,
    session_token,
    signed_in_admin,
)

# The confirmation forms' body: the account's own password (the pages' recent sign-in).
WITH_PASSWORD = MappingProxyType({"password": PASSWORD})
IMPERSONATOR = "user_2supportDeskImpersonator"


def sign_in(client, standin, user: dict) -> None:
    client.set_cookie("__session", session_token(standin, user["clerk_user_id"], 600))


def impersonate(client, standin, user: dict) -> None:
    """The __session cookie of a session someone in Clerk's dashboard started as ``user`` (an ``act``
    claim), signed by the stand-in's key."""
    token = standin.control.sign(claims(user["clerk_user_id"], fva=[0, -1], act={"sub": IMPERSONATOR}))
    client.set_cookie("__session", token)


def text(response) -> str:
    return response.get_data(as_text=True)


# ---- Delete my account


def test_the_account_page_offers_deletion_behind_a_confirmation_step(app, client, standin):
    user = register(client)
    sign_in(client, standin, user)
    assert 'href="/account/delete"' in text(client.get("/account"))
    confirm = client.get("/account/delete")
    assert confirm.status_code == 200
    assert "<title>Delete your account? · Iris</title>" in text(confirm)
    assert "Yes, delete my account" in text(confirm)
    assert 'type="password"' in text(confirm) and 'autocomplete="current-password"' in text(confirm)
    assert clerk_users(standin) != [] and rows(app)[0].deleted_at is None  # looking changed nothing

    deleted = client.post("/account/delete", data=WITH_PASSWORD)
    assert deleted.status_code == 303
    assert deleted.headers["Location"] == "/account/deleted"
    page = client.get("/account/deleted")
    assert page.status_code == 200
    assert "Your account is deleted" in text(page) and "owner@bistro.example" in text(page)
    assert client.get("/account/deleted").status_code == 302  # said once
    assert clerk_users(standin) == []
    assert rows(app)[0].deleted_at is not None
    assert [event.action for event in audit_events(app)] == ["account_deleted", "erased"]
    assert client.get("/account").status_code == 403


def test_signed_out_the_deletion_page_sends_you_to_the_account_page(client):
    assert client.get("/account/delete").headers["Location"] == "/account"
    assert client.post("/account/delete").headers["Location"] == "/account"


def test_clerk_down_is_the_503_page_and_nothing_changes(app, client, standin):
    user = register(client)
    sign_in(client, standin, user)
    standin.control.add_fault(method="DELETE", path="/v1/users/", status=503, times=1)
    response = client.post("/account/delete", data=WITH_PASSWORD)
    assert response.status_code == 503 and response.mimetype == "text/html"
    assert "Try again" in text(response)
    assert clerk_user_state(standin, user["clerk_user_id"]) is not None
    assert rows(app)[0].deleted_at is None
    assert client.post("/account/delete", data=WITH_PASSWORD).status_code == 303


def test_the_database_failing_after_clerk_is_the_503_page_and_pressing_again_completes(app, client, standin):
    user = register(client, "fails@b.example")
    sign_in(client, standin, user)
    run_sql(app, FAILING_SOFT_DELETE)
    assert client.post("/account/delete", data=WITH_PASSWORD).status_code == 503
    run_sql(app, "DROP TRIGGER fail_soft_delete ON users")
    assert client.post("/account/delete", data=WITH_PASSWORD).status_code == 303
    assert rows(app)[0].deleted_at is not None


@pytest.mark.parametrize("password", ["", "hunter2-guess"], ids=["missing", "wrong"])
def test_a_missing_or_wrong_password_deletes_nothing(app, client, standin, password):
    user = register(client)
    sign_in(client, standin, user)
    response = client.post("/account/delete", data={"password": password})
    assert response.status_code == 422 and response.mimetype == "text/html"
    page = text(response)
    expected = "Enter your password" if not password else "That is not the password of this account"
    assert expected in page and 'aria-invalid="true"' in page
    if password:
        assert password not in page  # the typed password is never sent back
    assert clerk_user_state(standin, user["clerk_user_id"]) is not None
    assert rows(app)[0].deleted_at is None and audit_events(app) == []
    assert client.post("/account/delete", data=WITH_PASSWORD).status_code == 303  # then the right one works


def test_an_impersonation_cannot_delete_the_account_on_the_page(app, client, standin):
    user = register(client)
    impersonate(client, standin, user)
    for response in (client.get("/account/delete"), client.post("/account/delete", data=WITH_PASSWORD)):
        assert response.status_code == 403 and response.mimetype == "text/html"
        assert "impersonation cannot delete the account" in text(response)
    assert clerk_user_state(standin, user["clerk_user_id"]) is not None
    assert rows(app)[0].deleted_at is None


def test_wrong_passwords_are_rate_limited_per_client_and_the_page_says_so(make_app, standin):
    from tests.helpers import migrate

    app = make_app(RATELIMIT_ENABLED=True, RATELIMIT_WRONG_PASSWORD="2 per minute")
    migrate(app)
    client = app.test_client()
    user = register(client)
    sign_in(client, standin, user)
    guesses = standin.control.stats()["requests"].get("POST /v1/users/{id}/verify_password", 0)
    for _ in range(2):
        assert client.post("/account/delete", data={"password": "guess"}).status_code == 422
    limited = client.post("/account/delete", data={"password": "guess"})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    # Over the limit, even the right password waits, and Clerk is not asked at all.
    assert client.post("/account/delete", data=WITH_PASSWORD).status_code == 429
    assert standin.control.stats()["requests"].get("POST /v1/users/{id}/verify_password", 0) <= guesses + 2
    assert clerk_user_state(standin, user["clerk_user_id"]) is not None
    # Another client is not held back by this one's guesses.
    other = client.post("/account/delete", data=WITH_PASSWORD, environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert other.status_code == 303


# ---- the admin pages


ADMIN_PAGES = (
    "/admin/users",
    "/admin/users/{id}",
    "/admin/users/{id}/deactivate",
    "/admin/users/{id}/reactivate",
)


@pytest.mark.parametrize("path", ADMIN_PAGES)
def test_everyone_but_an_admin_gets_the_404_page(app, client, standin, path):
    owner = register(client)
    url = path.format(id=owner["id"])
    assert client.get(url).status_code == 404  # signed out
    sign_in(client, standin, owner)
    response = client.get(url)
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert "Nothing is here." in text(response)
    if url.endswith("activate"):
        assert client.post(url).status_code == 404
    run_sql(app, "UPDATE users SET deleted_at = now()")
    assert client.get(url).status_code == 404  # a deleted account is nobody
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is False


@pytest.fixture
def admin_client(app, client, standin):
    admin, _ = signed_in_admin(client, app, standin)
    sign_in(client, standin, admin)
    return client


def test_the_list_searches_filters_and_pages(app, admin_client, standin):
    for number in range(5):
        register(admin_client, f"r{number}@bistro.example")
    register(admin_client, "solo@cafe.example")
    page = text(admin_client.get("/admin/users?limit=4"))
    assert page.count('href="/admin/users/') == 4
    assert '<a href="/admin">' not in page and ">Admin</a>" in page  # the navigation shows the area
    [next_url] = re.findall(r'href="(/admin/users\?[^"]*cursor=[^"]+)"', page)
    rest = text(admin_client.get(next_url.replace("&amp;", "&")))
    assert rest.count('href="/admin/users/') == 3
    assert "First page" in rest and "Next page" not in rest
    found = text(admin_client.get("/admin/users?q=CAFE&role=&verified="))
    assert "solo@cafe.example" in found and "r1@bistro.example" not in found
    assert 'value="CAFE"' in found  # the search stays in the box
    bad = admin_client.get("/admin/users?limit=1000&cursor=x")
    assert bad.status_code == 422
    assert "There is a problem with this search" in text(bad)


def test_deactivate_and_reactivate_with_confirmation_and_the_audit_trail(app, admin_client, standin):
    owner = register(admin_client, "owner@bistro.example")
    account = f"/admin/users/{owner['id']}"
    page = text(admin_client.get(account))
    # The trail starts with the registration, by the account itself.
    assert "registration started" in page and "registered" in page and "the account itself" in page
    assert f'href="{account}/deactivate"' in page

    confirm = admin_client.get(f"{account}/deactivate")
    assert confirm.status_code == 200 and "Yes, deactivate it" in text(confirm)
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is False  # looking changed nothing

    done = admin_client.post(f"{account}/deactivate", data=WITH_PASSWORD)
    assert (done.status_code, done.headers["Location"]) == (303, account)
    page = text(admin_client.get(account))
    assert "owner@bistro.example is deactivated." in page
    assert "deleted since" in page and "deactivated" in page and "admin@iris.example" in page
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is True
    [event] = audit_events(app)
    assert event.request_id in page

    assert admin_client.post(f"{account}/reactivate", data=WITH_PASSWORD).status_code == 303
    page = text(admin_client.get(account))
    assert "owner@bistro.example is reactivated." in page and "reactivated" in page
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is False
    assert [event.action for event in audit_events(app)] == ["deactivated", "reactivated"]


def test_your_own_account_has_no_deactivate_button_and_the_page_refuses(app, admin_client, standin):
    admin_id = rows(app)[0].id
    page = text(admin_client.get(f"/admin/users/{admin_id}"))
    assert "This is your own account" in page and "/deactivate" not in page
    for response in (
        admin_client.get(f"/admin/users/{admin_id}/deactivate"),
        admin_client.post(f"/admin/users/{admin_id}/deactivate"),
    ):
        assert response.status_code == 409
        assert "You cannot deactivate your own account. Another admin can do it." in text(response)
    assert audit_events(app) == []


def test_a_refused_reactivation_is_explained_on_the_confirmation_page(app, admin_client, standin):
    owner = register(admin_client, "owner@bistro.example")
    admin_client.post(f"/admin/users/{owner['id']}/deactivate", data=WITH_PASSWORD)
    run_sql(
        app,
        "INSERT INTO users (id, email, role, pending_until) VALUES (:id, :email, 'restaurant', now())",
        id=uuid.uuid4(),
        email=owner["email"],
    )
    response = admin_client.post(f"/admin/users/{owner['id']}/reactivate", data=WITH_PASSWORD)
    assert response.status_code == 409
    assert "Another live account has this email address now" in text(response)
    assert "Yes, reactivate it" in text(response)
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is True


def test_unknown_accounts_are_404_for_admins_too(admin_client):
    for path in ADMIN_PAGES[1:]:
        assert admin_client.get(path.format(id=uuid.uuid4())).status_code == 404
    assert admin_client.get("/admin/users/not-a-uuid").status_code == 404


@pytest.mark.parametrize("action", ["deactivate", "reactivate"])
@pytest.mark.parametrize("password", ["", "hunter2-guess"], ids=["missing", "wrong"])
def test_an_admin_confirmation_without_the_admins_password_does_nothing(
    app, admin_client, standin, action, password
):
    owner = register(admin_client, "owner@bistro.example")
    if action == "reactivate":
        assert (
            admin_client.post(f"/admin/users/{owner['id']}/deactivate", data=WITH_PASSWORD).status_code == 303
        )
    before = (audit_events(app), clerk_user_state(standin, owner["clerk_user_id"])["banned"], rows(app))
    response = admin_client.post(f"/admin/users/{owner['id']}/{action}", data={"password": password})
    assert response.status_code == 422
    assert "Not done" in text(response) and 'aria-invalid="true"' in text(response)
    after = (audit_events(app), clerk_user_state(standin, owner["clerk_user_id"])["banned"], rows(app))
    assert after == before
    # The owner's password is not the admin's: it does not work either.
    response = admin_client.post(f"/admin/users/{owner['id']}/{action}", data={"password": PASSWORD + "!"})
    assert response.status_code == 422


def test_an_admin_whose_address_is_not_confirmed_gets_the_403_page(app, admin_client, standin):
    owner = register(admin_client, "owner@bistro.example")
    run_sql(app, "UPDATE users SET email_verified_at = NULL WHERE role = 'admin'")
    for response in (
        admin_client.get(f"/admin/users/{owner['id']}/deactivate"),
        admin_client.post(f"/admin/users/{owner['id']}/deactivate", data=WITH_PASSWORD),
    ):
        assert response.status_code == 403 and response.mimetype == "text/html"
        assert "Confirm your email address first" in text(response)
    assert clerk_user_state(standin, owner["clerk_user_id"])["banned"] is False
    assert audit_events(app) == []
    assert admin_client.get(f"/admin/users/{owner['id']}").status_code == 200  # reading stays allowed


def test_an_impersonated_admins_confirmation_is_audited_as_the_impersonators(app, client, standin):
    admin, _ = signed_in_admin(client, app, standin)
    owner = register(client, "owner@bistro.example")
    impersonate(client, standin, admin)
    account = f"/admin/users/{owner['id']}"
    assert client.post(f"{account}/deactivate", data=WITH_PASSWORD).status_code == 303
    [event] = audit_events(app)
    assert (event.actor_name, str(event.actor_id)) == (f"impersonator:{IMPERSONATOR}", admin["id"])
    page = text(client.get(account))
    assert f"impersonator:{IMPERSONATOR}, impersonating admin@iris.example" in page
