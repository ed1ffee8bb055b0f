"""The sign-up page through the Flask test client: every branch of the view, against the real service."""

from __future__ import annotations

import re

import pytest

from iris.config import DEV_PUBLISHABLE_KEY
from tests.helpers import PASSWORD, clerk_users, migrate, rows

EMAIL = "owner@bistro.example"


def signup(client, **fields):
    return client.post("/signup", data={"email": EMAIL, "password": PASSWORD, **fields})


def field_error(page: str, name: str) -> str:
    match = re.search(rf'<p class="field-error" id="{name}-error">(.*?)</p>', page, re.S)
    assert match, f"no error shown at {name}"
    return match.group(1).strip()


def input_tag(page: str, name: str) -> str:
    match = re.search(rf'<(?:input|select)[^>]*\bname="{name}"[^>]*>', page)
    assert match, f"no {name} input"
    return match.group(0)


def test_the_form_is_labelled_and_autocompletes(client):
    response = client.get("/signup")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "<title>Create your restaurant account · Iris</title>" in page
    assert '<label class="label" for="email">Email address</label>' in page
    assert '<label class="label" for="password">Password</label>' in page
    assert 'autocomplete="email"' in input_tag(page, "email")
    assert 'autocomplete="new-password"' in input_tag(page, "password")
    assert 'type="password"' in input_tag(page, "password")
    assert "aria-invalid" not in page
    assert 'name="role"' not in page  # one signup role: no choice to make
    assert '<link rel="stylesheet" href="/static/iris.css">' in page
    assert "<script" not in page  # works with JavaScript off: there is none


def test_the_home_page_links_to_sign_up(client):
    assert 'href="/signup"' in client.get("/").get_data(as_text=True)


def test_success_redirects_to_a_confirmation_page_that_says_what_is_next(app, client, standin):
    response = signup(client)
    assert response.status_code == 303
    assert response.headers["Location"] == "/signup/done"

    page = client.get("/signup/done").get_data(as_text=True)
    assert f"<strong>{EMAIL}</strong>" in page
    assert "Sign in with Clerk" in page
    # Shown once: a reload does not keep the email around in the session.
    assert EMAIL not in client.get("/signup/done").get_data(as_text=True)

    [row] = rows(app)
    [clerk_user] = clerk_users(standin)
    assert row.email == EMAIL
    assert row.clerk_user_id == clerk_user["id"]


def test_an_invalid_email_is_shown_at_its_field_and_kept(client, standin):
    response = signup(client, email="owner at bistro")
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert field_error(page, "email") == "Enter a valid email address."
    tag = input_tag(page, "email")
    assert 'value="owner at bistro"' in tag
    assert 'aria-invalid="true"' in tag
    assert 'aria-describedby="email-error"' in tag
    assert 'class="error-summary" role="alert"' in page
    assert '<a href="#email">Enter a valid email address.</a>' in page
    assert "<title>Fix 1 problem: Create your restaurant account · Iris</title>" in page
    assert PASSWORD not in page
    assert standin.control.stats()["requests"].get("POST /v1/users", 0) == 0


def test_missing_fields_are_all_shown(client):
    response = client.post("/signup", data={"email": "", "password": ""})
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert field_error(page, "email") == "Enter your email address."
    assert field_error(page, "password") == "Enter a password."
    assert 'aria-describedby="password-hint password-error"' in input_tag(page, "password")
    assert "There are 2 problems" in page


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("short", "Passwords must be 8 characters or more."),
        ("password123", "Password has been found in an online data breach."),
    ],
)
def test_clerks_password_message_is_shown_at_the_password_field(app, client, standin, password, message):
    response = signup(client, password=password)
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert field_error(page, "password").startswith(message)
    assert 'value="owner@bistro.example"' in input_tag(page, "email")
    assert password not in input_tag(page, "password")
    assert f'value="{password}"' not in page
    assert rows(app) == []
    assert clerk_users(standin) == []


def test_a_taken_email_is_shown_at_the_email_field(client):
    assert signup(client).status_code == 303
    response = signup(client, email="Owner@Bistro.example")
    assert response.status_code == 409
    page = response.get_data(as_text=True)
    assert field_error(page, "email") == "An account with this email address already exists."
    assert PASSWORD not in page


def test_clerk_down_gives_a_friendly_503_page(app, client, standin):
    standin.control.add_fault(method="POST", path="/v1/users", status=503, times=1)
    response = signup(client)
    assert response.status_code == 503
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "The sign-in service is unavailable right now." in page
    assert "Nothing was saved." in page
    assert 'href="/signup"' in page
    assert PASSWORD not in page
    assert rows(app) == []


def test_database_down_gives_a_friendly_503_page(make_app):
    app = make_app(SQLALCHEMY_DATABASE_URI="postgresql+psycopg://postgres@127.0.0.1:1/x")
    response = signup(app.test_client())
    assert response.status_code == 503
    assert "temporarily unavailable" in response.get_data(as_text=True)


@pytest.fixture
def csrf_app(make_app):
    app = make_app(WTF_CSRF_ENABLED=True)
    migrate(app)
    return app


def test_a_form_post_without_a_csrf_token_is_an_html_400(csrf_app, standin):
    response = signup(csrf_app.test_client())
    assert response.status_code == 400
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "<h1>Your form was not sent</h1>" in page
    assert "This form did not come from this site" in page  # tests/test_form_refusals.py: every reason
    assert standin.control.stats()["requests"].get("POST /v1/users", 0) == 0


def test_a_form_post_with_the_pages_csrf_token_succeeds(csrf_app):
    client = csrf_app.test_client()
    page = client.get("/signup").get_data(as_text=True)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    assert signup(client, csrf_token=token).status_code == 303


def test_csrf_is_off_for_the_json_api(csrf_app):
    response = csrf_app.test_client().post(
        "/api/v1/auth/register", json={"email": EMAIL, "password": PASSWORD}
    )
    assert response.status_code == 201


def test_the_session_cookie_is_httponly_lax_and_secure_outside_development(client):
    signup(client)
    cookie = client.get_cookie("session")
    assert cookie is not None
    assert cookie.http_only
    assert cookie.same_site == "Lax"
    assert cookie.secure


@pytest.mark.parametrize(("debug", "secure"), [("1", False), ("0", True)])
def test_the_session_cookie_is_secure_everywhere_but_the_development_server(
    monkeypatch, tmp_path, debug, secure
):
    from iris import create_app

    monkeypatch.setenv("FLASK_DEBUG", debug)
    for name, value in {"DATABASE_URL": f"sqlite:///{tmp_path}/d.db", "FLASK_SECRET_KEY": "k"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CLERK_SECRET_KEY", "sk_test_x")
    monkeypatch.setenv("IRIS_EMAIL_VERIFICATION", "off")
    monkeypatch.setenv("IRIS_PUBLIC_URL", "https://iris.test")
    monkeypatch.setenv("CLERK_PUBLISHABLE_KEY", DEV_PUBLISHABLE_KEY)
    assert create_app().config["SESSION_COOKIE_SECURE"] is secure


def test_a_role_choice_appears_only_with_several_signup_roles_and_admin_is_still_refused(make_app, standin):
    app = make_app(IRIS_SIGNUP_ROLES=["restaurant", "admin"])
    migrate(app)
    client = app.test_client()
    page = client.get("/signup").get_data(as_text=True)
    assert '<select class="input" id="role" name="role">' in page
    response = signup(client, role="admin")
    assert response.status_code == 422
    assert field_error(response.get_data(as_text=True), "role") == "Choose one of: restaurant."
    assert clerk_users(standin) == []
