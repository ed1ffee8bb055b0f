"""Signing in locally: the stand-in's sign-in and sign-out pages over real HTTP (Clerk's checks and messages,
no open redirect), and the app's navigation in each state.

The stand-in's pages are development's Account Portal; the app links to them through IRIS_SIGN_IN_URL and
IRIS_SIGN_OUT_URL. The cookies those pages set and the handshake that follows are tested in
tests/test_standin_handshake.py and tests/test_handshake.py; the browser walk-through is
tests/test_sign_in_browser.py.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterator

import pytest
import requests
from flask import Flask

from clerk_standin import DEFAULT_AZP
from iris import config, web
from iris.config import ConfigError
from tests.helpers import PASSWORD, create_clerk_user, migrate, session_token

EMAIL = "owner@bistro.example"
BACK = DEFAULT_AZP + "/account"
SIGN_IN_URL = "https://accounts.bistro.example/sign-in"
SIGN_OUT_URL = "https://accounts.bistro.example/sign-out"


def sign_in(
    standin, email: str = EMAIL, password: str = PASSWORD, redirect_url: str = BACK
) -> requests.Response:
    return requests.post(
        standin.base_url + "/sign-in",
        data={"email": email, "password": password, "redirect_url": redirect_url},
        allow_redirects=False,
        timeout=5,
    )


def text_of(response: requests.Response) -> str:
    return html.unescape(response.text)


# --- the stand-in's sign-in page --------------------------------------------------------------------------


def test_the_sign_in_page_is_a_plain_form_that_keeps_the_redirect(standin):
    response = requests.get(standin.base_url + "/sign-in", params={"redirect_url": BACK}, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["Cache-Control"] == "no-store"
    assert '<form method="post" action="/sign-in">' in response.text
    assert f'<input type="hidden" name="redirect_url" value="{BACK}">' in response.text
    assert "<script" not in response.text
    assert "Set-Cookie" not in response.headers


def test_a_wrong_password_shows_the_form_again_with_clerks_message_and_no_cookie(standin):
    create_clerk_user(standin, EMAIL)
    response = sign_in(standin, password="not the password")
    assert response.status_code == 422
    page = text_of(response)
    assert "Password is incorrect. Try again, or use another method." in page
    assert f'value="{EMAIL}"' in page  # the email is kept
    assert "not the password" not in page  # the password never is
    assert "Set-Cookie" not in response.headers
    assert standin.control.stats()["requests"].get("POST /v1/sessions", 0) == 0


def test_an_unknown_email_shows_clerks_message(standin):
    create_clerk_user(standin, EMAIL)
    response = sign_in(standin, email="nobody@bistro.example")
    assert response.status_code == 422
    assert "Couldn't find your account." in text_of(response)
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize(
    "redirect_url",
    [
        "https://evil.example/account",
        "http://127.0.0.1:5001/",  # the stand-in itself: another origin
        "https://127.0.0.1:5000/account",  # another scheme
        "http://localhost:5000/account",  # another host, even if the same machine
        "http://127.0.0.1:5000@evil.example/",
        "http://127.0.0.1:5000\\@evil.example/",
        "//evil.example/account",
        "/account",
        "javascript:alert(1)",
        "http://127.0.0.1:5000/\naccount",
        "http://127.0.0.1:99999/",
    ],
)
def test_a_redirect_off_the_apps_origin_is_refused_and_signs_nobody_in(standin, redirect_url):
    create_clerk_user(standin, EMAIL)
    shown = requests.get(standin.base_url + "/sign-in", params={"redirect_url": redirect_url}, timeout=5)
    assert shown.status_code == 400
    assert f"redirect_url must be an address on {DEFAULT_AZP}." in text_of(shown)
    assert "<form" not in shown.text
    posted = sign_in(standin, redirect_url=redirect_url)
    assert posted.status_code == 400
    assert "Location" not in posted.headers
    assert "Set-Cookie" not in posted.headers


@pytest.mark.parametrize(
    ("given", "sent_to"),
    [
        (BACK + "?tab=profile#top", BACK + "?tab=profile#top"),
        ("HTTP://127.0.0.1:5000/account", "http://127.0.0.1:5000/account"),
        (None, DEFAULT_AZP + "/"),
    ],
)
def test_a_redirect_on_the_apps_origin_is_followed(standin, given, sent_to):
    create_clerk_user(standin, EMAIL)
    data = {"email": EMAIL, "password": PASSWORD}
    if given is not None:
        data["redirect_url"] = given
    response = requests.post(standin.base_url + "/sign-in", data=data, allow_redirects=False, timeout=5)
    assert response.status_code == 303
    assert response.headers["Location"] == sent_to


def test_signing_out_refuses_a_redirect_off_the_apps_origin(standin):
    response = requests.get(
        standin.base_url + "/sign-out",
        params={"redirect_url": "https://evil.example/"},
        allow_redirects=False,
        timeout=5,
    )
    assert response.status_code == 400
    assert "Set-Cookie" not in response.headers


# --- the app: configuration and navigation ---------------------------------------------------------------


def test_development_links_to_the_standins_pages_unless_told_otherwise(tmp_path):
    def settings(**environ: str) -> dict:
        return config.from_environment(environ, development=True, instance_path=str(tmp_path))

    assert settings()["IRIS_SIGN_IN_URL"] == "http://127.0.0.1:5001/sign-in"
    assert settings()["IRIS_SIGN_OUT_URL"] == "http://127.0.0.1:5001/sign-out"
    moved = settings(CLERK_API_URL="http://127.0.0.1:6001/")
    assert (moved["IRIS_SIGN_IN_URL"], moved["IRIS_SIGN_OUT_URL"]) == (
        "http://127.0.0.1:6001/sign-in",
        "http://127.0.0.1:6001/sign-out",
    )
    assert settings(IRIS_SIGN_IN_URL=SIGN_IN_URL)["IRIS_SIGN_IN_URL"] == SIGN_IN_URL
    real_clerk = settings(CLERK_SECRET_KEY="sk_test_abc")  # a real Clerk instance: its own front end
    assert (real_clerk["IRIS_SIGN_IN_URL"], real_clerk["IRIS_SIGN_OUT_URL"]) == (None, None)


def test_outside_development_the_links_are_optional_and_must_be_absolute(tmp_path):
    required = {
        "DATABASE_URL": "postgresql://db/iris",
        "CLERK_SECRET_KEY": "sk_live_x",
        "FLASK_SECRET_KEY": "k",
        "IRIS_PUBLIC_URL": "https://accounts.bistro.example",
        "CLERK_PUBLISHABLE_KEY": config.DEV_PUBLISHABLE_KEY,
        "MAIL_SERVER": "smtp.bistro.example",
    }
    unset = config.from_environment(required, development=False, instance_path=str(tmp_path))
    assert (unset["IRIS_SIGN_IN_URL"], unset["IRIS_SIGN_OUT_URL"]) == (None, None)
    given = config.from_environment(
        {**required, "IRIS_SIGN_IN_URL": SIGN_IN_URL}, development=False, instance_path=str(tmp_path)
    )
    assert given["IRIS_SIGN_IN_URL"] == SIGN_IN_URL
    for bad in ("accounts.bistro.example/sign-in", "/sign-in", "ftp://accounts.bistro.example/"):
        with pytest.raises(ConfigError, match="IRIS_SIGN_IN_URL must be an absolute"):
            config.from_environment(
                {**required, "IRIS_SIGN_IN_URL": bad}, development=False, instance_path=str(tmp_path)
            )


def test_the_redirect_url_is_added_to_the_query_the_link_already_has():
    assert (
        web.with_redirect_url("https://a.example/sign-in?lang=sv", "http://127.0.0.1:5000/account")
        == "https://a.example/sign-in?lang=sv&redirect_url=http%3A%2F%2F127.0.0.1%3A5000%2Faccount"
    )


@pytest.fixture
def linked_app(make_app) -> Flask:
    """An app whose pages link to sign-in and sign-out pages, as production's would to the Account Portal."""
    app = make_app(IRIS_SIGN_IN_URL=SIGN_IN_URL, IRIS_SIGN_OUT_URL=SIGN_OUT_URL)
    migrate(app)
    return app


@pytest.fixture
def signed_in(linked_app: Flask, standin) -> Iterator:
    """A test client of ``linked_app`` holding the ``__session`` cookie the stand-in's sign-in page set."""
    client = linked_app.test_client()
    registered = client.post("/api/v1/auth/register", json={"email": EMAIL, "password": PASSWORD})
    assert registered.status_code == 201
    # What the browser holds after the stand-in's sign-in page and a handshake (tests/test_handshake.py):
    # Clerk's __client_uat and a fresh session token in __session.
    client.set_cookie("__session", session_token(standin, registered.json["clerk_user_id"]))
    client.set_cookie("__client_uat", str(int(time.time()) - 1))
    yield client


def nav(page: str) -> str:
    start = page.index('<nav aria-label="Main">')
    return page[start : page.index("</nav>", start)]


def links(page: str) -> dict[str, str]:
    """The navigation's links, by their text, and its sign-out form as ``"Sign out": <its action>``."""
    found = {}
    for part in nav(page).split("<a href=")[1:]:
        href = html.unescape(part.split('"')[1])
        label = part.split(">", 1)[1].split("</a>")[0]
        found[label] = href
    if '<form class="nav-form" method="post" action="' in nav(page):
        action = nav(page).split('<form class="nav-form" method="post" action="')[1].split('"')[0]
        found[nav(page).split('class="link-button">')[1].split("</button>")[0]] = action
    return found


def test_signed_out_pages_offer_sign_up_and_sign_in_back_to_the_account_page(linked_app):
    client = linked_app.test_client()
    back = "redirect_url=https%3A%2F%2Firis.test%2Faccount"  # IRIS_PUBLIC_URL, never the request's Host
    for path in ("/", "/signup", "/account"):
        page = client.get(path).get_data(as_text=True)
        assert links(page) == {"Sign up": "/signup", "Sign in": f"{SIGN_IN_URL}?{back}"}, path
    account = client.get("/account").get_data(as_text=True)
    assert f'<a class="button" href="{SIGN_IN_URL}?{back}">Sign in</a>' in html.unescape(account)


def test_signed_in_pages_offer_the_account_and_sign_out_and_no_sign_up(signed_in):
    for path in ("/", "/signup", "/account"):
        page = signed_in.get(path).get_data(as_text=True)
        assert links(page) == {"Account": "/account", "Sign out": "/sign-out"}, path
    account = signed_in.get("/account").get_data(as_text=True)
    assert EMAIL in account
    assert 'aria-current="page">Account</a>' in account


def test_without_a_sign_in_url_the_pages_say_where_to_sign_in_with_no_link(client):
    page = client.get("/account").get_data(as_text=True)
    assert links(page) == {"Sign up": "/signup", "Sign in": "/account"}
    assert "Sign in through the Iris front end (with Clerk) to see your account here." in page
    assert "redirect_url" not in page


def test_the_navigation_checks_the_session_once_per_request(signed_in, monkeypatch):
    calls = []
    current_user = web.auth.current_user

    def counted():
        calls.append(1)
        return current_user()

    monkeypatch.setattr(web.auth, "current_user", counted)
    for path, expected in (("/", 1), ("/account", 1)):
        calls.clear()
        assert signed_in.get(path).status_code == 200
        assert len(calls) == expected, path


def test_with_clerk_unreachable_pages_show_signed_out_and_only_the_account_page_fails(signed_in, standin):
    standin.control.add_fault(path="/v1/jwks", status=503)  # a fresh app: its keys are not cached yet
    home = signed_in.get("/")
    assert home.status_code == 200
    assert set(links(home.get_data(as_text=True))) == {"Sign up", "Sign in"}
    account = signed_in.get("/account")
    assert account.status_code == 503
    assert set(links(account.get_data(as_text=True))) == {"Sign up", "Sign in"}


def test_an_expired_sign_in_cookie_shows_signed_out(linked_app, standin):
    client = linked_app.test_client()
    registered = client.post("/api/v1/auth/register", json={"email": EMAIL, "password": PASSWORD})
    claims = {
        "sub": registered.json["clerk_user_id"],
        "sid": "sess_x",
        "iat": 1_000_000,
        "nbf": 999_990,
        "exp": 1_000_060,
        "azp": DEFAULT_AZP,
        "sts": "active",
        "v": 2,
    }
    client.set_cookie("__session", standin.control.sign(claims))
    page = client.get("/account").get_data(as_text=True)
    assert "You are signed out" in page
    assert set(links(page)) == {"Sign up", "Sign in"}
