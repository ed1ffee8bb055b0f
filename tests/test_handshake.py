"""Clerk's handshake on Iris's pages (iris/handshake.py): when a page GET is sent to Clerk's Frontend API for
a fresh session token, how the answer is checked and applied, and who else could present one.

The app's Frontend API is the stand-in (CLERK_FRONTEND_API_URL); payloads are signed with the stand-in's key,
as Clerk signs them with the instance's, through its control API. Requests are made as a browser makes a
navigation (``Sec-Fetch-Dest: document``). The whole protocol in a real browser through nginx is
tests/test_handshake_browser.py.
"""

from __future__ import annotations

import logging
import time
from types import MappingProxyType
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from iris.config import DEV_PUBLISHABLE_KEY
from iris.handshake import STATE_PARAMETER
from iris.tokens import SESSION_TOKEN_CATEGORY
from tests.helpers import PASSWORD, b64url, claims, migrate, register, session_token

PUBLIC_URL = "https://iris.test"
DOCUMENT = MappingProxyType({"Sec-Fetch-Dest": "document", "Accept": "text/html"})
STATE_COOKIE = "__Host-iris_hs_"  # + the state: one cookie per handshake under way
EPOCH = "Expires=Thu, 01 Jan 1970 00:00:00 GMT"


@pytest.fixture
def app(make_app, standin):
    app = make_app(CLERK_FRONTEND_API_URL=standin.base_url, CLERK_PUBLISHABLE_KEY=DEV_PUBLISHABLE_KEY)
    migrate(app)
    return app


@pytest.fixture
def user(client) -> dict:
    return register(client)


def page(client, path: str = "/account", headers: dict | None = None, **cookies: str):
    for name, value in cookies.items():
        client.set_cookie(name, value, domain="localhost")
    return client.get(path, headers={**DOCUMENT, **(headers or {})})


def signed_in(response) -> bool:
    return response.status_code == 200 and "Your account" in response.get_data(as_text=True)


def handshake_query(response) -> dict[str, str]:
    assert response.status_code == 307, response.get_data(as_text=True)[:300]
    location = urlsplit(response.headers["Location"])
    return {name: values[0] for name, values in parse_qs(location.query).items()}


def set_cookies(response) -> list[str]:
    return response.headers.getlist("Set-Cookie")


def now() -> int:
    return int(time.time())


# ---- when to handshake: Clerk's decision table


def test_no_clerk_cookies_at_all_is_signed_out_without_a_redirect(client):
    response = page(client)
    assert response.status_code == 200
    assert "You are signed out" in response.get_data(as_text=True)


def test_a_sign_in_elsewhere_without_a_session_cookie_handshakes(client, standin):
    """The Account Portal's way back: ``__client_uat`` on the parent domain, no ``__session`` here."""
    response = page(client, "/account?tab=1", __client_uat=str(now()))
    location = urlsplit(response.headers["Location"])
    assert (
        f"{location.scheme}://{location.netloc}{location.path}" == standin.base_url + "/v1/client/handshake"
    )
    query = handshake_query(response)
    back = urlsplit(query.pop("redirect_url"))
    assert f"{back.scheme}://{back.netloc}{back.path}" == PUBLIC_URL + "/account"
    back_query = parse_qs(back.query)
    assert back_query["tab"] == ["1"]
    state = back_query[STATE_PARAMETER][0]
    assert query == {
        "__clerk_api_version": "2025-11-10",
        "suffixed_cookies": "false",
        "__clerk_hs_reason": "client-uat-but-no-session-token",
        "format": "token",
    }
    assert response.headers["Cache-Control"] == "no-store"
    cookies = set_cookies(response)
    assert any(
        c.startswith("__clerk_redirect_count=1;") and "Max-Age=2" in c and "HttpOnly" in c for c in cookies
    )
    [state_cookie] = [c for c in cookies if c.startswith(STATE_COOKIE)]
    assert state_cookie.startswith(f"{STATE_COOKIE}{state}=1;")
    assert all(part in state_cookie for part in ("Secure", "HttpOnly", "Path=/", "SameSite=Lax"))
    assert "Domain" not in state_cookie


@pytest.mark.parametrize(
    ("cookie_changes", "uat_offset", "reason"),
    [
        ({}, None, "session-token-but-no-client-uat"),
        ({}, "0", "session-token-but-no-client-uat"),
        ({"iat": -30}, "-10", "session-token-iat-before-client-uat"),
        ({"exp": -60, "iat": -120, "nbf": -130}, "-200", "session-token-expired"),
        ({"nbf": 60}, "-200", "session-token-nbf"),
    ],
    ids=["no-uat", "uat-zero", "iat-before-uat", "expired", "not-yet-valid"],
)
def test_a_session_cookie_that_needs_refreshing_handshakes(
    client, standin, user, cookie_changes, uat_offset, reason
):
    t = now()
    token = standin.control.sign(
        claims(user["clerk_user_id"], **{name: t + offset for name, offset in cookie_changes.items()})
    )
    cookies = {"__session": token}
    if uat_offset is not None:
        cookies["__client_uat"] = uat_offset if uat_offset == "0" else str(t + int(uat_offset))
    assert handshake_query(page(client, **cookies))["__clerk_hs_reason"] == reason


def test_a_fresh_session_cookie_newer_than_the_sign_in_is_signed_in_at_once(client, standin, user):
    token = session_token(standin, user["clerk_user_id"])
    assert signed_in(page(client, __session=token, __client_uat=str(now() - 5)))


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/api/v1/users/me", DOCUMENT),
        ("GET", "/account", {"Sec-Fetch-Dest": "empty", "Accept": "text/html"}),
        ("GET", "/account", {"Accept": "application/json"}),
        ("GET", "/account", {**DOCUMENT, "Authorization": "Bearer x.y.z"}),
        ("POST", "/verify-email", DOCUMENT),
        ("GET", "/healthz", DOCUMENT),
    ],
    ids=["api", "fetch", "not-html", "authorization-header", "post", "operations"],
)
def test_only_page_navigations_ever_redirect(client, method, path, headers):
    client.set_cookie("__client_uat", str(now()), domain="localhost")
    response = client.open(path, method=method, headers=headers)
    assert response.status_code != 307
    assert "/v1/client/handshake" not in response.headers.get("Location", "")


def test_a_navigation_without_fetch_metadata_but_asking_for_html_handshakes(client):
    response = page(client, headers={"Sec-Fetch-Dest": None, "Accept": "text/html,application/xhtml+xml"})
    assert response.status_code == 200  # no Clerk cookie: nothing to refresh
    client.set_cookie("__client_uat", str(now()), domain="localhost")
    response = client.get("/account", headers={"Accept": "text/html,application/xhtml+xml"})
    assert handshake_query(response)["__clerk_hs_reason"] == "client-uat-but-no-session-token"


def test_the_way_back_is_built_from_the_public_url_never_from_the_host(client):
    client.set_cookie("__client_uat", str(now()), domain="evil.example")
    response = client.get("/account?x=1", headers={**DOCUMENT, "Host": "evil.example"})
    redirect_url = handshake_query(response)["redirect_url"]
    assert redirect_url.startswith(PUBLIC_URL + "/account?x=1&")
    assert "evil.example" not in response.headers["Location"]


def test_without_a_frontend_api_nothing_redirects(make_app):
    app = make_app()  # no publishable key and no CLERK_FRONTEND_API_URL: as tests and old setups run
    migrate(app)
    client = app.test_client()
    client.set_cookie("__client_uat", str(now()), domain="localhost")
    assert client.get("/account", headers=DOCUMENT).status_code == 200


def test_the_loop_guard_gives_up_at_three_handshakes_and_shows_the_page_signed_out(
    client, standin, user, caplog
):
    token = standin.control.sign(claims(user["clerk_user_id"], iat=now() - 30))
    cookies = {"__session": token, "__client_uat": str(now())}
    response = page(client, __clerk_redirect_count="2", **cookies)
    assert any(c.startswith("__clerk_redirect_count=3;") for c in set_cookies(response))
    with caplog.at_level(logging.WARNING, logger="iris.handshake"):
        response = page(client, __clerk_redirect_count="3", **cookies)
    assert response.status_code == 200
    assert "You are signed out" in response.get_data(as_text=True)  # though the token itself is valid
    assert "handshake loop (session-token-iat-before-client-uat): gave up after 3 redirects" in caplog.text
    assert token not in caplog.text


# ---- the way back: the payload


def start(client) -> str:
    """Start a handshake as a page would; the state that must come back."""
    response = page(client, __client_uat=str(now()))
    return parse_qs(urlsplit(handshake_query(response)["redirect_url"]).query)[STATE_PARAMETER][0]


def directives_for(token: str, uat: int) -> list[str]:
    """What Clerk's Frontend API sends back for a signed-in client (its shapes: /v1/client/handshake)."""
    return [
        f"__session={token}; Path=/; Expires=Wed, 08 Dec 2027 00:00:00 GMT; SameSite=Lax; Secure",
        f"__client_uat={uat}; Path=/; Max-Age=315360000; SameSite=Lax; Secure",
        f"__clerk_handshake=; Path=/; {EPOCH}",
    ]


def payload(standin, directives: list[str], **header) -> str:
    return standin.control.sign({"handshake": directives}, {"cat": SESSION_TOKEN_CATEGORY, **header})


def come_back(client, state: str | None, payload_jwt: str, *, as_query: bool = False, path: str = "/account"):
    query = {"tab": "2"}
    if state is not None:
        query[STATE_PARAMETER] = state
    if as_query:
        query["__clerk_handshake"] = payload_jwt
    else:
        client.set_cookie("__clerk_handshake", payload_jwt, domain="localhost")
    return client.get(path, query_string=query, headers=DOCUMENT)


@pytest.mark.parametrize("as_query", [False, True], ids=["cookie", "query"])
def test_a_payload_for_this_browser_sets_clerks_cookies_and_returns_to_a_clean_url(
    client, standin, user, as_query
):
    state = start(client)
    uat = now() - 1
    token = session_token(standin, user["clerk_user_id"])
    directives = directives_for(token, uat)
    response = come_back(client, state, payload(standin, directives), as_query=as_query)
    assert response.status_code == 303
    assert response.headers["Location"] == PUBLIC_URL + "/account?tab=2"
    assert response.headers["Cache-Control"] == "no-store"
    cookies = set_cookies(response)
    assert cookies[: len(directives)] == directives  # verbatim, in Clerk's order
    assert any(c.startswith(f"{STATE_COOKIE}{state}=;") for c in cookies)  # spent
    # The cookies as the browser now holds them: the page is signed in.
    client.delete_cookie("__clerk_handshake", domain="localhost")
    assert signed_in(page(client, __session=token, __client_uat=str(uat)))


def test_a_payload_without_a_session_signs_out(client, standin):
    state = start(client)
    wipe = [
        f"__session=; Path=/; {EPOCH}",
        "__client_uat=0; Path=/; Max-Age=315360000",
        f"__clerk_handshake=; {EPOCH}",
    ]
    response = come_back(client, state, payload(standin, wipe))
    assert response.status_code == 303
    assert set_cookies(response)[:3] == wipe


def refused(client, response, caplog_text: str, why: str) -> None:
    """The payload changed nothing: no Set-Cookie of Clerk's; the page went on to start a new handshake."""
    assert response.status_code == 307  # __client_uat is still > 0 and there is no session: try again
    assert not any(c.startswith(("__session=", "__client_uat=")) for c in set_cookies(response))
    assert why in caplog_text


@pytest.mark.parametrize("state", [None, "someone-elses-state"], ids=["no-state", "wrong-state"])
def test_a_payload_that_did_not_come_back_to_the_browser_that_asked_is_ignored(
    client, standin, user, state, caplog
):
    """Login CSRF: the attacker's own valid payload, planted as a cookie from a sibling subdomain or sent as
    a link, must not sign the victim in as the attacker."""
    start(client)
    attackers = directives_for(session_token(standin, user["clerk_user_id"]), now() - 1)
    with caplog.at_level(logging.WARNING, logger="iris.handshake"):
        response = come_back(client, state, payload(standin, attackers), as_query=state is None)
    refused(client, response, caplog.text, "did not come back to the browser that asked for it")


def forged_with_another_key(standin, directives: list[str]) -> str:
    import jwt

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kid = standin.app.signing_key.kid
    return jwt.encode({"handshake": directives}, pem, algorithm="RS256", headers={"kid": kid})


def tampered(standin, directives: list[str]) -> str:
    header, _, signature = payload(standin, directives).split(".")
    return f"{header}.{b64url({'handshake': [*directives, '__session=x; Path=/']})}.{signature}"


@pytest.mark.parametrize(
    "make",
    [
        forged_with_another_key,
        tampered,
        lambda standin, directives: payload(standin, directives, cat="cl_B7d4PD222AAA"),
        lambda standin, directives: payload(standin, directives, typ="at+jwt"),
        lambda standin, directives: standin.control.sign({"handshake": "__session=x"}),
        lambda standin, directives: f"{b64url({'alg': 'none'})}.{b64url({'handshake': directives})}.",
    ],
    ids=["another-key", "tampered", "template-category", "other-typ", "not-a-list", "alg-none"],
)
def test_a_payload_clerk_did_not_sign_as_a_handshake_is_refused(client, standin, user, make, caplog):
    state = start(client)
    directives = directives_for(session_token(standin, user["clerk_user_id"]), now() - 1)
    with caplog.at_level(logging.WARNING, logger="iris.handshake"):
        response = come_back(client, state, make(standin, directives))
    refused(client, response, caplog.text, "handshake payload refused (token): unauthorized")


@pytest.mark.parametrize(
    "extra",
    [
        "session=attacker; Path=/",
        "__Host-iris_hs_AAAAAAAAAAAAAAAAAAAAAA=1; Path=/; Secure",
        "csrftoken=x; Domain=iris.test",
        "__session=x; Path=/\r\nX-Injected: 1",
        "__session_toolongsuffix=x",
    ],
    ids=["flask-session", "our-state", "another-apps-cookie", "header-injection", "not-a-clerk-suffix"],
)
def test_a_directive_for_a_cookie_that_is_not_clerks_refuses_the_whole_payload(
    client, standin, user, extra, caplog
):
    state = start(client)
    directives = [*directives_for(session_token(standin, user["clerk_user_id"]), now() - 1), extra]
    with caplog.at_level(logging.WARNING, logger="iris.handshake"):
        response = come_back(client, state, payload(standin, directives))
    refused(client, response, caplog.text, "a directive for a cookie that is not Clerk's")


def test_a_payloads_token_that_needs_refreshing_again_counts_towards_the_loop_guard(client, standin, user):
    """The redirect count is not reset by a resolved handshake: a payload whose session token is stale
    (Clerk and Iris disagreeing on keys or clocks) ends at the guard, not in an endless loop."""
    state = start(client)
    stale = standin.control.sign(
        claims(user["clerk_user_id"], iat=now() - 120, exp=now() - 60, nbf=now() - 130)
    )
    response = come_back(client, state, payload(standin, directives_for(stale, now() - 1)))
    assert response.status_code == 303
    assert not any(c.startswith("__clerk_redirect_count=;") for c in set_cookies(response))


# ---- forms and sign-out


def test_a_form_posted_with_a_token_that_needs_refreshing_goes_back_to_its_page(client, standin, user):
    expired = standin.control.sign(
        claims(user["clerk_user_id"], iat=now() - 120, exp=now() - 60, nbf=now() - 130)
    )
    client.set_cookie("__session", expired, domain="localhost")
    client.set_cookie("__client_uat", str(now() - 200), domain="localhost")
    response = client.post("/account/delete", data={}, headers={"Sec-Fetch-Dest": "document"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/account/delete"
    assert standin.control.stats()["requests"].get("DELETE /v1/users/<user_id>", 0) == 0
    notice = page(client, "/account/delete", __session=session_token(standin, user["clerk_user_id"]))
    assert "Your sign-in needed refreshing, so nothing was done yet. Please submit again." in notice.get_data(
        as_text=True
    )


def test_signing_out_revokes_the_session_clears_the_cookie_and_goes_to_clerks_sign_out(
    make_app, standin, user
):
    app = make_app(
        CLERK_FRONTEND_API_URL=standin.base_url,
        CLERK_PUBLISHABLE_KEY=DEV_PUBLISHABLE_KEY,
        IRIS_SIGN_OUT_URL="https://accounts.iris.test/sign-out",
    )
    migrate(app)
    client = app.test_client()
    token = standin.control.sign(
        claims(user["clerk_user_id"], exp=now() - 600, iat=now() - 700, nbf=now() - 700)
    )
    client.set_cookie("__session", token, domain="evil.example")
    response = client.post("/sign-out", headers={"Host": "evil.example"})  # links never follow the Host
    assert response.status_code == 303
    assert response.headers["Location"] == (
        "https://accounts.iris.test/sign-out?redirect_url=https%3A%2F%2Firis.test%2F"
    )
    assert any(c.startswith("__session=;") and "1970" in c for c in set_cookies(response))
    assert standin.control.stats()["requests"].get("POST /v1/sessions/<session_id>/revoke") == 1


def test_a_forged_session_cookie_revokes_nothing_but_still_signs_out(client, standin, user):
    forged = forged_with_another_key(standin, [])
    client.set_cookie("__session", forged, domain="localhost")
    response = client.post("/sign-out")
    assert response.status_code == 303
    assert response.headers["Location"] == PUBLIC_URL + "/"
    assert "POST /v1/sessions/<session_id>/revoke" not in standin.control.stats()["requests"]


# ---- the nonce: the payload left at the Backend API


def nonce_for_a_signed_in_client(standin, redirect_url: str) -> str:
    """Sign in on the stand-in's page (its ``__client``), then ask its Frontend API for a nonce-format
    handshake, as a browser would be sent: the nonce it leaves in ``__clerk_handshake_nonce``."""
    import requests

    signed_in = requests.post(
        standin.base_url + "/sign-in",
        data={
            "email": "owner@bistro.example",
            "password": PASSWORD,
            "redirect_url": "http://127.0.0.1:5000/",
        },
        allow_redirects=False,
        timeout=10,
    )
    assert signed_in.status_code == 303, signed_in.text
    answer = requests.get(
        standin.base_url + "/v1/client/handshake",
        params={"redirect_url": redirect_url, "format": "nonce"},
        cookies={"__client": signed_in.cookies["__client"]},
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 307, answer.text
    return answer.cookies["__clerk_handshake_nonce"]


def test_a_nonce_is_swapped_at_the_backend_api_and_its_directives_applied(client, standin, user):
    state = start(client)
    nonce = nonce_for_a_signed_in_client(standin, "http://127.0.0.1:5000/account")
    client.set_cookie("__clerk_handshake_nonce", nonce, domain="localhost")
    response = client.get("/account", query_string={STATE_PARAMETER: state}, headers=DOCUMENT)
    assert response.status_code == 303
    session = [c for c in set_cookies(response) if c.startswith("__session=")]
    assert len(session) == 1 and not session[0].startswith("__session=;")
    assert standin.control.stats()["requests"].get("GET /v1/clients/handshake_payload") == 1


def test_a_nonce_clerk_no_longer_has_changes_nothing(app, client, standin, user, caplog):
    state = start(client)
    nonce = nonce_for_a_signed_in_client(standin, "http://127.0.0.1:5000/account")
    client.set_cookie("__clerk_handshake_nonce", nonce, domain="localhost")
    client.get("/account", query_string={STATE_PARAMETER: state}, headers=DOCUMENT)  # used once
    client = app.test_client()  # another browser, or the same one again, with that nonce
    state = start(client)
    client.set_cookie("__clerk_handshake_nonce", nonce, domain="localhost")
    with caplog.at_level(logging.WARNING, logger="iris.handshake"):
        response = client.get("/account", query_string={STATE_PARAMETER: state}, headers=DOCUMENT)
    assert not any(c.startswith(("__session=", "__client_uat=")) for c in set_cookies(response))
    assert "handshake payload refused (nonce): auth_provider_error" in caplog.text
    assert nonce not in caplog.text


# ---- absolute links never come from the Host header


def test_no_page_ever_names_the_requests_host(make_app, standin, user):
    """Signed in or not, every page the navigation reaches, the way back from a handshake and the sign-out
    answer carry IRIS_PUBLIC_URL's origin, whatever Host the request named (nginx's default server refuses
    unknown hosts too; the app does not rely on it)."""
    app = make_app(
        CLERK_FRONTEND_API_URL=standin.base_url,
        CLERK_PUBLISHABLE_KEY=DEV_PUBLISHABLE_KEY,
        IRIS_SIGN_IN_URL="https://accounts.iris.test/sign-in",
        IRIS_SIGN_OUT_URL="https://accounts.iris.test/sign-out",
    )
    migrate(app)
    evil = {"Host": "evil.example"}
    for signed_in_now in (False, True):
        client = app.test_client()
        if signed_in_now:
            client.set_cookie(
                "__session", session_token(standin, user["clerk_user_id"]), domain="evil.example"
            )
            client.set_cookie("__client_uat", str(now() - 5), domain="evil.example")
        for path in ("/", "/signup", "/account", "/account/delete", "/verify-email", "/docs", "/nowhere"):
            response = client.get(path, headers={**DOCUMENT, **evil})
            assert response.status_code in (200, 302, 404), (path, response.status_code)
            seen = response.get_data(as_text=True) + str(response.headers)
            assert "evil.example" not in seen, path
        answer = client.post("/sign-out", headers=evil)
        assert "evil.example" not in str(answer.headers)
    client = app.test_client()
    client.set_cookie("__client_uat", str(now()), domain="evil.example")
    assert "evil.example" not in page(client, "/account", headers=evil).headers["Location"]


# ---- what a review found: the link's secret, two payloads, a widened session cookie, odd states, tabs


def test_a_page_whose_url_carries_a_secret_never_handshakes(client, user):
    """redirect_url would hand the verification token to Clerk's (and its CDN's) logs."""
    client.set_cookie("__client_uat", str(now()), domain="localhost")
    response = client.get("/verify-email/" + "t" * 43, headers=DOCUMENT)
    assert response.status_code != 307
    assert "tttttttttt" not in response.headers.get("Location", "")


def test_two_payloads_at_once_are_both_refused(client, standin, user, caplog):
    """A sibling subdomain's planted cookie beside Clerk's own: trust neither."""
    state = start(client)
    ours = payload(standin, directives_for(session_token(standin, user["clerk_user_id"]), now() - 1))
    planted = payload(standin, directives_for(session_token(standin, user["clerk_user_id"]), now() - 1))
    client.set_cookie("__clerk_handshake", planted, domain="localhost")
    with caplog.at_level(logging.WARNING, logger="iris.handshake"):
        response = come_back(client, state, ours, as_query=True)
    refused(client, response, caplog.text, "more than one came back")


def test_a_session_cookie_for_more_than_this_host_refuses_the_payload(client, standin, user, caplog):
    state = start(client)
    token = session_token(standin, user["clerk_user_id"])
    widened = [f"__session={token}; Path=/; Domain=iris.test; Secure", f"__client_uat={now() - 1}; Path=/"]
    with caplog.at_level(logging.WARNING, logger="iris.handshake"):
        response = come_back(client, state, payload(standin, widened))
    refused(client, response, caplog.text, "a session cookie for more than this host")


@pytest.mark.parametrize("state", ["é" * 22, "x" * 22 + "'", "A" * 1000], ids=["non-ascii", "quote", "long"])
def test_a_state_that_is_not_ours_is_ignored_without_an_error(client, standin, user, state, caplog):
    start(client)
    directives = directives_for(session_token(standin, user["clerk_user_id"]), now() - 1)
    with caplog.at_level(logging.WARNING, logger="iris.handshake"):
        response = come_back(client, state, payload(standin, directives))
    refused(client, response, caplog.text, "did not come back to the browser that asked for it")


def test_tabs_restored_together_each_resolve_their_own_handshake(client, standin, user):
    first, second = start(client), start(client)
    assert first != second
    directives = directives_for(session_token(standin, user["clerk_user_id"]), now() - 1)
    assert come_back(client, first, payload(standin, directives)).status_code == 303
    client.delete_cookie("__session", domain="localhost")
    assert come_back(client, second, payload(standin, directives)).status_code == 303


def test_forms_may_end_at_clerks_frontend_api_and_sign_out_and_nowhere_else(make_app, standin):
    """Browsers hold a form to form-action through every redirect: a form sent back to be submitted again
    goes through Clerk's Frontend API, and "Sign out" ends at Clerk's sign-out page."""
    app = make_app(
        CLERK_FRONTEND_API_URL="https://clerk.iris.test",
        CLERK_PUBLISHABLE_KEY=DEV_PUBLISHABLE_KEY,
        IRIS_SIGN_OUT_URL="https://accounts.iris.test/sign-out",
    )
    policy = app.test_client().get("/healthz").headers["Content-Security-Policy"]
    assert "form-action 'self' https://accounts.iris.test https://clerk.iris.test;" in policy
    assert "script-src 'self';" in policy


def signed_in_client(make_app, standin, user, **settings):
    app = make_app(
        CLERK_FRONTEND_API_URL=standin.base_url, CLERK_PUBLISHABLE_KEY=DEV_PUBLISHABLE_KEY, **settings
    )
    migrate(app)
    client = app.test_client()
    client.set_cookie("__session", session_token(standin, user["clerk_user_id"]), domain="localhost")
    return client


@pytest.mark.parametrize("fault", ["revoke", "keys"])
def test_a_sign_out_clerk_could_not_hear_is_a_503_not_a_pretence(make_app, standin, user, fault):
    """Without IRIS_SIGN_OUT_URL nothing else would end the session, and the next page's handshake would sign
    the person back in: say so instead of pretending."""
    client = signed_in_client(make_app, standin, user)
    path = "/v1/sessions/" if fault == "revoke" else "/v1/jwks"
    standin.control.add_fault(path=path, status=503)
    response = client.post("/sign-out")
    assert response.status_code == 503
    assert not any(c.startswith("__session=;") for c in set_cookies(response))


def test_a_sign_out_clerk_could_not_hear_still_goes_to_clerks_sign_out_page(make_app, standin, user):
    client = signed_in_client(
        make_app, standin, user, IRIS_SIGN_OUT_URL="https://accounts.iris.test/sign-out"
    )
    standin.control.add_fault(path="/v1/sessions/", status=503)
    response = client.post("/sign-out")
    assert response.status_code == 303
    assert response.headers["Location"].startswith("https://accounts.iris.test/sign-out?")
