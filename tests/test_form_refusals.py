"""A form Flask-WTF refuses (CSRF): each of its reasons gets an honest message for the person (HTML 400
``csrf_failed``) and one log line for the operator, and nothing is registered.

Through the Flask test client, with CSRF on and the production cookie settings. tests/test_forms_browser.py
shows the same in a browser behind nginx (another site's form, a plain-http deployment).
"""

from __future__ import annotations

import inspect
import logging
import re

import flask_wtf.csrf
import pytest

from iris import errors
from iris.errors import CSRF_REASONS, OVER_PLAIN_HTTP, csrf_explanation
from tests.helpers import PASSWORD, migrate

HTTPS = "https://localhost"
PAGE = HTTPS + "/signup"


@pytest.fixture
def csrf_app(make_app):
    app = make_app(WTF_CSRF_ENABLED=True)
    migrate(app)
    return app


def page_token(client, base_url: str = HTTPS) -> str:
    """Open the sign-up page as a browser would; the form's CSRF token (the session cookie is kept)."""
    page = client.get("/signup", base_url=base_url).get_data(as_text=True)
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)


def post(client, token: str | None, *, base_url: str = HTTPS, referrer: str | None = PAGE):
    data = {"email": "owner@bistro.example", "password": PASSWORD}
    if token is not None:
        data["csrf_token"] = token
    headers = {"Referer": referrer} if referrer else {}
    return client.post("/signup", data=data, base_url=base_url, headers=headers)


def refusal(response, caplog, standin) -> tuple[str, str]:
    """(what the page told the person, what the one log line told the operator), after checking that the
    answer is the refused-form page and that no registration reached Clerk."""
    assert response.status_code == 400
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "<h1>Your form was not sent</h1>" in page
    assert PASSWORD not in page
    [record] = [record for record in caplog.records if record.name == "iris.errors"]
    assert record.levelno == logging.WARNING
    prefix = "form refused on POST /signup: "
    assert record.getMessage().startswith(prefix)
    assert PASSWORD not in record.getMessage()
    assert standin.control.stats()["requests"].get("POST /v1/users", 0) == 0
    message = re.search(r'<p class="lede">(.*?)</p>', page, re.S).group(1)
    return message.replace("&#39;", "'"), record.getMessage().removeprefix(prefix)


@pytest.fixture(autouse=True)
def warnings_only(caplog):
    caplog.set_level(logging.WARNING, logger="iris.errors")


def test_every_reason_flask_wtf_gives_has_its_own_explanation():
    """Reasons read from the installed Flask-WTF: an upgrade that adds one fails here, not in production."""
    source = inspect.getsource(flask_wtf.csrf)
    reasons = set(re.findall(r'(?:ValidationError|_error_response)\("([^"]+)"\)', source))
    assert len(reasons) == 7
    assert reasons == set(CSRF_REASONS)
    assert len({message for message, _ in CSRF_REASONS.values()}) == len(CSRF_REASONS)


def test_no_token_is_a_form_from_elsewhere(csrf_app, caplog, standin):
    client = csrf_app.test_client()
    page_token(client)
    assert refusal(post(client, None), caplog, standin) == CSRF_REASONS["The CSRF token is missing."]


def test_no_session_cookie_over_https_asks_for_cookies(csrf_app, caplog, standin):
    token = page_token(csrf_app.test_client())
    response = post(csrf_app.test_client(), token)  # another client: the cookie never comes back
    assert refusal(response, caplog, standin) == CSRF_REASONS["The CSRF session token is missing."]


def test_no_session_cookie_over_plain_http_with_secure_cookies_asks_for_https(csrf_app, caplog, standin):
    """What a plain-http deployment gets: the Secure cookie was never kept, so it cannot come back."""
    assert csrf_app.config["SESSION_COOKIE_SECURE"] is True
    token = page_token(csrf_app.test_client(), "http://localhost")
    response = post(csrf_app.test_client(), token, base_url="http://localhost", referrer=None)
    message, problem = refusal(response, caplog, standin)
    assert (message, problem) == OVER_PLAIN_HTTP
    assert "https://" in message
    assert "X-Forwarded-Proto" in problem and "IRIS_PROXY_HOPS" in problem


def test_control_without_secure_cookies_plain_http_is_not_blamed(make_app, caplog, standin):
    """The development server's cookies are not Secure: a missing cookie there is the browser's doing."""
    app = make_app(WTF_CSRF_ENABLED=True, SESSION_COOKIE_SECURE=False)
    migrate(app)
    token = page_token(app.test_client(), "http://localhost")
    response = post(app.test_client(), token, base_url="http://localhost", referrer=None)
    assert refusal(response, caplog, standin) == CSRF_REASONS["The CSRF session token is missing."]


def test_an_expired_token_says_the_form_expired(csrf_app, caplog, standin):
    client = csrf_app.test_client()
    token = page_token(client)
    csrf_app.config["WTF_CSRF_TIME_LIMIT"] = -1  # every token is now older than the limit
    assert refusal(post(client, token), caplog, standin) == CSRF_REASONS["The CSRF token has expired."]


def test_an_altered_token_is_invalid(csrf_app, caplog, standin):
    client = csrf_app.test_client()
    token = page_token(client)
    altered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    message, problem = refusal(post(client, altered), caplog, standin)
    assert (message, problem) == CSRF_REASONS["The CSRF token is invalid."]
    assert "FLASK_SECRET_KEY" in problem


def test_a_token_from_another_session_does_not_match(csrf_app, caplog, standin):
    mine, theirs = csrf_app.test_client(), csrf_app.test_client()
    page_token(mine)
    response = post(mine, page_token(theirs))
    assert refusal(response, caplog, standin) == CSRF_REASONS["The CSRF tokens do not match."]


def test_no_referrer_over_https_says_the_browser_hid_it(csrf_app, caplog, standin):
    client = csrf_app.test_client()
    response = post(client, page_token(client), referrer=None)
    message, problem = refusal(response, caplog, standin)
    assert (message, problem) == CSRF_REASONS["The referrer header is missing."]
    assert "Referrer-Policy: same-origin" in problem


def test_another_origin_as_referrer_names_both_origins_for_the_operator(csrf_app, caplog, standin):
    client = csrf_app.test_client()
    response = post(client, page_token(client), referrer="https://localhost:8443/signup?token=s3cret")
    message, problem = refusal(response, caplog, standin)
    expected_message, expected_problem = CSRF_REASONS["The referrer does not match the host."]
    assert message == expected_message
    assert problem == f"{expected_problem}; Referer origin https://localhost:8443, Host localhost"
    assert "s3cret" not in problem  # the origin only: a path or query may carry a token
    assert "$http_host" in problem


def test_the_pages_own_token_cookie_and_referrer_are_accepted(csrf_app, caplog):
    client = csrf_app.test_client()
    assert post(client, page_token(client)).status_code == 303
    assert [record for record in caplog.records if record.name == "iris.errors"] == []


def test_a_reason_flask_wtf_adds_later_gets_a_general_message_and_is_logged_as_is(csrf_app):
    with csrf_app.test_request_context("/signup", method="POST", base_url=HTTPS):
        message, problem = csrf_explanation("The CSRF token smells odd.")
    assert message == f"This form could not be accepted. {errors.RELOAD}"
    assert problem == "The CSRF token smells odd."
