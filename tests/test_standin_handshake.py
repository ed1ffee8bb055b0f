"""The stand-in signs people in as Clerk's Account Portal does and serves Clerk's handshake, over real HTTP.

The sign-in page sets the stand-in's ``__client`` and ``__client_uat``, never ``__session``; the Frontend
API's ``GET /v1/client/handshake`` turns ``__client`` into signed ``Set-Cookie`` directives (in a cookie, in
the query, or behind a nonce the Backend API redeems once); ``POST /v1/sessions/{id}/revoke``; the ``fva``
and ``act`` claims; the handshake faults. Last, Clerk's own ``@clerk/backend`` (Node) judges the payloads.

One stand-in serves the module (no database needed), reset before each test through the control API.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests

from clerk_standin import (
    DEFAULT_AZP,
    DEFAULT_ISSUER,
    PUBLISHABLE_KEY,
    SESSION_TOKEN_CATEGORY,
    StandinServer,
)
from tests.helpers import StandinApi, only_clerk_error, unavailable

PASSWORD = "a fine long passphrase"
BACK = DEFAULT_AZP + "/account?tab=1"
HANDSHAKE = "/v1/client/handshake"
UAT_MAX_AGE = "315360000"
EPOCH = "Thu, 01 Jan 1970 00:00:00 GMT"
NODE_DIR = Path(__file__).resolve().parent / "node"


# Named like tests/conftest.py's autouse fixture, so this module runs on its own server without a database
# (conftest's ``api`` then drives this one).
@pytest.fixture(scope="module")
def standin() -> Iterator[StandinServer]:
    with StandinServer(port=0) as server:
        yield server


# --------------------------------------------------------------------------- helpers


def set_cookies(response: requests.Response) -> dict[str, dict[str, str]]:
    """Each Set-Cookie header of ``response`` by cookie name: ``{"value": ..., <attribute lower-cased>: ...}``
    (flags map to ``""``)."""
    cookies: dict[str, dict[str, str]] = {}
    for header in response.raw.headers.getlist("Set-Cookie"):
        first, *attributes = header.split("; ")
        name, _, value = first.partition("=")
        cookie = {"value": value}
        for attribute in attributes:
            key, _, attr_value = attribute.partition("=")
            cookie[key.lower()] = attr_value
        cookies[name] = cookie
    return cookies


def directives_by_name(directives: list[str]) -> dict[str, list[str]]:
    """``{cookie name: [value, attribute, ...]}`` of a handshake payload's directives."""
    parsed: dict[str, list[str]] = {}
    for directive in directives:
        first, *attributes = directive.split("; ")
        name, _, value = first.partition("=")
        assert name not in parsed, f"two directives for {name}"
        parsed[name] = [value, *attributes]
    return parsed


def sign_in(
    api: StandinApi, email: str = "owner@bistro.example", redirect_url: str = BACK
) -> requests.Response:
    data = {"email": email, "password": PASSWORD, "redirect_url": redirect_url}
    response = requests.post(api.base + "/sign-in", data=data, allow_redirects=False, timeout=5)
    assert response.status_code == 303, response.text
    return response


def signed_in_client(api: StandinApi, email: str = "owner@bistro.example") -> tuple[dict[str, Any], str, int]:
    """A user signed in through the page: the user, its ``__client`` token and its ``__client_uat``."""
    user = api.create_user(email)
    cookies = set_cookies(sign_in(api, email))
    return user, cookies["__client"]["value"], int(cookies["__client_uat"]["value"])


def handshake(
    api: StandinApi, client: str | None = None, redirect_url: str = BACK, **params: str
) -> requests.Response:
    query = {
        "redirect_url": redirect_url,
        "__clerk_api_version": "2025-11-10",
        "suffixed_cookies": "false",
        "__clerk_hs_reason": "client-uat-but-no-session-token",
        **params,
    }
    cookies = {"__client": client} if client is not None else {}
    return requests.get(api.base + HANDSHAKE, params=query, cookies=cookies, allow_redirects=False, timeout=5)


def verify(api: StandinApi, token: str) -> dict[str, Any]:
    """``token``'s claims, its signature checked against the stand-in's JWKS."""
    return jwt.decode(token, api.jwks_key(token), algorithms=["RS256"], options={"verify_aud": False})


def payload(api: StandinApi, response: requests.Response) -> list[str]:
    """The directives of a production-style handshake answer, its payload's signature checked; also checks
    the 307, ``no-store`` and the payload's header."""
    assert response.status_code == 307, response.text
    assert response.headers["Cache-Control"] == "no-store"
    token = set_cookies(response)["__clerk_handshake"]["value"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "kid": header["kid"], "typ": "JWT", "cat": SESSION_TOKEN_CATEGORY}
    claims = verify(api, token)
    assert set(claims) == {"handshake"}, "no exp, sub or other claim: only the directives"
    return claims["handshake"]


def session_token(directives: list[str]) -> str:
    return directives_by_name(directives)["__session"][0]


# --------------------------------------------------------------------------- the sign-in and sign-out pages


def test_sign_in_sets_client_and_client_uat_and_never_session(api: StandinApi) -> None:
    api.create_user("owner@bistro.example")
    before = int(time.time())
    response = sign_in(api)
    after = int(time.time())
    assert response.headers["Location"] == BACK
    cookies = set_cookies(response)
    assert set(cookies) == {"__client", "__client_uat"}, "the Account Portal gives the app no __session"
    client = cookies["__client"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", client["value"])
    assert {"httponly", "path", "samesite"} <= set(client) and "domain" not in client
    assert (client["path"], client["samesite"]) == ("/", "Lax")
    uat = cookies["__client_uat"]
    assert before <= int(uat["value"]) <= after
    assert (uat["path"], uat["samesite"], uat["max-age"]) == ("/", "Lax", UAT_MAX_AGE)
    assert "httponly" not in uat and "domain" not in uat and "secure" not in uat


def test_two_sign_ins_get_two_clients(api: StandinApi) -> None:
    api.create_user("owner@bistro.example")
    first, second = (set_cookies(sign_in(api))["__client"]["value"] for _ in range(2))
    assert first != second


def test_sign_out_ends_the_clients_session_and_sets_uat_zero(api: StandinApi) -> None:
    _, client, _ = signed_in_client(api)
    sid = verify(api, session_token(payload(api, handshake(api, client))))["sid"]
    response = requests.get(
        api.base + "/sign-out",
        params={"redirect_url": BACK},
        cookies={"__client": client},
        allow_redirects=False,
        timeout=5,
    )
    assert (response.status_code, response.headers["Location"]) == (303, BACK)
    cookies = set_cookies(response)
    assert set(cookies) == {"__client_uat"}
    assert (cookies["__client_uat"]["value"], cookies["__client_uat"]["max-age"]) == ("0", UAT_MAX_AGE)
    directives = directives_by_name(payload(api, handshake(api, client)))
    assert directives["__session"][:2] == ["", "Path=/"]
    assert directives["__client_uat"][0] == "0"
    only_clerk_error(api.post(f"/v1/sessions/{sid}/tokens", {}), 404, "resource_not_found")


def test_sign_out_without_or_with_a_forged_client_only_sets_uat_zero(api: StandinApi) -> None:
    _, client, _ = signed_in_client(api)
    for cookies in ({}, {"__client": client[:-1] + ("A" if client[-1] != "A" else "B")}):
        response = requests.post(api.base + "/sign-out", cookies=cookies, allow_redirects=False, timeout=5)
        assert response.status_code == 303 and response.headers["Location"] == DEFAULT_AZP + "/"
        assert set_cookies(response)["__client_uat"]["value"] == "0"
    # The real client is still signed in: a forged cookie ended nothing.
    assert verify(api, session_token(payload(api, handshake(api, client))))


# --------------------------------------------------------------------------- the handshake


def test_handshake_for_a_signed_in_client_sets_a_fresh_session_token(api: StandinApi) -> None:
    user, client, uat = signed_in_client(api)
    response = handshake(api, client)
    assert response.headers["Location"] == BACK
    transport = set_cookies(response)["__clerk_handshake"]
    assert (transport["path"], transport["samesite"], transport["max-age"]) == ("/", "Lax", "60")
    assert "httponly" in transport and "domain" not in transport
    directives = payload(api, response)
    parsed = directives_by_name(directives)
    assert list(parsed) == ["__session", "__client_uat", "__clerk_handshake"]
    token, *session_attributes = parsed["__session"]
    assert session_attributes[0] == "Path=/" and session_attributes[2] == "SameSite=Lax"
    expires = parsedate_to_datetime(session_attributes[1].removeprefix("Expires=")).timestamp()
    assert abs(expires - (time.time() + 365 * 86400)) < 60, "the cookie lives a year, the token 60 s"
    assert parsed["__client_uat"] == [str(uat), "Path=/", f"Max-Age={UAT_MAX_AGE}", "SameSite=Lax"]
    assert parsed["__clerk_handshake"] == ["", "Path=/", f"Expires={EPOCH}"]
    claims = verify(api, token)
    assert claims["sub"] == user["id"] and claims["sid"].startswith("sess_")
    assert claims["iat"] >= uat, "an app following Clerk's rules must not handshake again at once"
    assert claims["exp"] - claims["iat"] == 60
    assert claims["iss"] == DEFAULT_ISSUER and claims["azp"] == DEFAULT_AZP
    assert claims["fva"] == [0, -1] and "act" not in claims
    # Every handshake mints a new token; the client stays the same.
    again = directives_by_name(payload(api, handshake(api, client)))
    assert again["__session"][0] != token and again["__client_uat"][0] == str(uat)


def test_handshake_for_https_apps_marks_every_directive_secure(tmp_path: Path) -> None:
    origin = "https://iris.bistro.example"
    with StandinServer(port=0, azp=origin) as server:
        api = StandinApi(server)
        api.create_user("owner@bistro.example")
        client = set_cookies(sign_in(api, redirect_url=origin + "/"))["__client"]["value"]
        response = handshake(api, client, redirect_url=origin + "/account")
        assert "secure" in set_cookies(response)["__clerk_handshake"]
        directives = payload(api, response)
    assert len(directives) == 3 and all(d.endswith("; Secure") for d in directives)


@pytest.mark.parametrize("who", ["no client", "unknown client", "ended session"])
def test_handshake_for_anyone_not_signed_in_wipes_the_session(api: StandinApi, who: str) -> None:
    _, client, _ = signed_in_client(api)
    if who == "unknown client":
        client = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    elif who == "ended session":
        requests.get(api.base + "/sign-out", cookies={"__client": client}, allow_redirects=False, timeout=5)
    directives = payload(api, handshake(api, None if who == "no client" else client))
    assert directives == [
        f"__session=; Path=/; Expires={EPOCH}; SameSite=Lax",
        f"__client_uat=0; Path=/; Max-Age={UAT_MAX_AGE}; SameSite=Lax",
        f"__clerk_handshake=; Path=/; Expires={EPOCH}",
    ]


def test_development_style_puts_the_payload_in_the_query(api: StandinApi, standin: StandinServer) -> None:
    _, client, uat = signed_in_client(api)
    assert standin.control.set_handshake_style("development")["style"] == "development"
    response = handshake(api, client)
    assert response.status_code == 307 and response.headers["Cache-Control"] == "no-store"
    assert "Set-Cookie" not in response.headers
    location = urlsplit(response.headers["Location"])
    assert location._replace(query="").geturl() == DEFAULT_AZP + "/account"
    query = parse_qs(location.query)
    assert query["tab"] == ["1"]
    [token] = query["__clerk_handshake"]
    directives = verify(api, token)["handshake"]
    assert list(directives_by_name(directives)) == ["__session", "__client_uat"], "nothing to clear"
    assert directives_by_name(directives)["__client_uat"][0] == str(uat)
    # A reset brings back the style the stand-in started with.
    api.control("POST", "/reset")
    assert standin.control.handshake_settings() == {"style": "production", "publishable_key": PUBLISHABLE_KEY}


def test_publishable_key_names_the_issuers_host() -> None:
    assert PUBLISHABLE_KEY.startswith("pk_test_")
    encoded = PUBLISHABLE_KEY.removeprefix("pk_test_")
    decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    assert decoded == urlsplit(DEFAULT_ISSUER).hostname + "$"


@pytest.mark.parametrize(
    ("params", "param_name", "code"),
    [
        ({"redirect_url": "https://evil.example/account"}, "redirect_url", "form_param_value_invalid"),
        (
            {"redirect_url": DEFAULT_AZP.replace("5000", "5999") + "/"},
            "redirect_url",
            "form_param_value_invalid",
        ),
        ({"redirect_url": ""}, "redirect_url", "form_param_missing"),
        ({"format": "cookie"}, "format", "form_param_value_invalid"),
    ],
)
def test_handshake_refuses_other_origins_and_formats(
    api: StandinApi, params: dict[str, str], param_name: str, code: str
) -> None:
    _, client, _ = signed_in_client(api)
    response = handshake(api, client, **params)
    error = only_clerk_error(response, 400, code)
    assert error["meta"] == {"param_name": param_name}
    assert "Location" not in response.headers and "Set-Cookie" not in response.headers


def test_a_nonce_is_redeemed_once_and_only_with_the_secret_key(api: StandinApi) -> None:
    user, client, uat = signed_in_client(api)
    response = handshake(api, client, format="nonce")
    assert response.status_code == 307 and response.headers["Location"] == BACK
    cookies = set_cookies(response)
    assert set(cookies) == {"__clerk_handshake_nonce"} and "httponly" in cookies["__clerk_handshake_nonce"]
    nonce = cookies["__clerk_handshake_nonce"]["value"]
    path = "/v1/clients/handshake_payload"
    wrong = api.get(path, params={"nonce": nonce}, headers={"Authorization": "Bearer sk_test_wrong"})
    only_clerk_error(wrong, 401, "clerk_key_invalid")
    redeemed = api.get(path, params={"nonce": nonce})
    assert redeemed.status_code == 200, redeemed.text
    assert set(redeemed.json()) == {"directives"}
    directives = directives_by_name(redeemed.json()["directives"])
    assert verify(api, directives["__session"][0])["sub"] == user["id"]
    assert directives["__client_uat"][0] == str(uat)
    only_clerk_error(api.get(path, params={"nonce": nonce}), 404, "resource_not_found")
    only_clerk_error(api.get(path, params={"nonce": "made-up"}), 404, "resource_not_found")
    only_clerk_error(api.get(path), 422, "form_param_missing")


def test_revoke_session_stops_tokens_and_signs_the_client_out(api: StandinApi) -> None:
    _, client, _ = signed_in_client(api)
    sid = verify(api, session_token(payload(api, handshake(api, client))))["sid"]
    response = api.post(f"/v1/sessions/{sid}/revoke")
    assert response.status_code == 200, response.text
    revoked = response.json()
    assert (revoked["object"], revoked["id"], revoked["status"]) == ("session", sid, "revoked")
    assert not any(name.startswith("_") for name in revoked), "only Clerk's Session fields"
    only_clerk_error(api.post(f"/v1/sessions/{sid}/tokens", {}), 404, "resource_not_found")
    assert directives_by_name(payload(api, handshake(api, client)))["__client_uat"][0] == "0"
    assert api.post(f"/v1/sessions/{sid}/revoke").json()["status"] == "revoked"
    only_clerk_error(api.post("/v1/sessions/sess_missing/revoke"), 404, "resource_not_found")
    only_clerk_error(
        requests.post(api.base + f"/v1/sessions/{sid}/revoke", timeout=5),
        401,
        "authorization_header_format_invalid",
    )


def test_clients_survive_a_restart_with_a_state_file(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    with StandinServer(port=0, state_file=state_file) as server:
        api = StandinApi(server)
        user, client, uat = signed_in_client(api)
        key = server.app.initial_key.private_key
    assert client not in state_file.read_text(), "only a digest of the client token is stored"
    with StandinServer(port=0, state_file=state_file, private_key=key) as server:
        api = StandinApi(server)
        directives = directives_by_name(payload(api, handshake(api, client)))
        assert directives["__client_uat"][0] == str(uat)
        assert verify(api, directives["__session"][0])["sub"] == user["id"]


# --------------------------------------------------------------------------- fva and act


def bapi_session(api: StandinApi) -> str:
    user = api.create_user("staff@bistro.example")
    return api.post("/v1/sessions", {"user_id": user["id"]}).json()["id"]


def mint(api: StandinApi, session_id: str) -> dict[str, Any]:
    response = api.post(f"/v1/sessions/{session_id}/tokens", {})
    assert response.status_code == 200, response.text
    return verify(api, response.json()["jwt"])


def test_fva_counts_minutes_since_the_first_factor(api: StandinApi, standin: StandinServer) -> None:
    session_id = bapi_session(api)
    assert mint(api, session_id)["fva"] == [0, -1]
    aged = standin.control.set_first_factor_age(session_id, 42)
    assert aged["id"] == session_id and not any(name.startswith("_") for name in aged)
    assert mint(api, session_id)["fva"] == [42, -1]
    _, client, _ = signed_in_client(api, "owner@bistro.example")
    sid = verify(api, session_token(payload(api, handshake(api, client))))["sid"]
    standin.control.set_first_factor_age(sid, 11)
    assert verify(api, session_token(payload(api, handshake(api, client))))["fva"] == [11, -1]
    assert api.control("POST", "/sessions/sess_missing/first_factor", {"minutes_ago": 1}).status_code == 404
    for bad in ({"minutes_ago": -1}, {"minutes_ago": "5"}, {}):
        assert api.control("POST", f"/sessions/{session_id}/first_factor", bad).status_code == 400


def test_an_actor_shows_in_tokens_as_act(api: StandinApi, standin: StandinServer) -> None:
    session_id = bapi_session(api)
    actor = {"sub": "user_2impersonator000000000000000"}
    assert standin.control.set_session_actor(session_id, actor)["actor"] == actor
    assert mint(api, session_id)["act"] == actor
    assert standin.control.set_session_actor(session_id, None)["actor"] is None
    assert "act" not in mint(api, session_id)
    for bad in ({"actor": {"id": "x"}}, {"actor": "user_x"}, {}):
        assert api.control("POST", f"/sessions/{session_id}/actor", bad).status_code == 400
    assert api.control("POST", "/sessions/sess_missing/actor", {"actor": None}).status_code == 404


# --------------------------------------------------------------------------- faults


def test_bad_signature_fault_signs_with_a_key_not_in_the_jwks(
    api: StandinApi, standin: StandinServer
) -> None:
    _, client, _ = signed_in_client(api)
    assert standin.control.add_handshake_fault("bad_signature", times=1) == {
        "kind": "bad_signature",
        "times": 1,
    }
    token = set_cookies(handshake(api, client))["__clerk_handshake"]["value"]
    assert jwt.get_unverified_header(token)["kid"] == api.get("/v1/jwks").json()["keys"][0]["kid"]
    with pytest.raises(jwt.InvalidSignatureError):
        verify(api, token)
    assert standin.control.handshake_faults() == []
    assert session_token(payload(api, handshake(api, client)))  # used up: the next one is sound


def test_no_session_fault_leaves_out_the_session_directive(api: StandinApi, standin: StandinServer) -> None:
    _, client, uat = signed_in_client(api)
    standin.control.add_handshake_fault("no_session")
    for _ in range(2):  # without times, until cleared
        directives = directives_by_name(payload(api, handshake(api, client)))
        assert list(directives) == ["__client_uat", "__clerk_handshake"]
        assert directives["__client_uat"][0] == str(uat)
    standin.control.clear_handshake_faults()
    assert "__session" in directives_by_name(payload(api, handshake(api, client)))


def test_stale_nonce_fault_makes_the_nonce_unredeemable(api: StandinApi, standin: StandinServer) -> None:
    _, client, _ = signed_in_client(api)
    standin.control.add_handshake_fault("stale_nonce", times=1)
    assert session_token(payload(api, handshake(api, client)))  # a token-format handshake leaves it
    nonce = set_cookies(handshake(api, client, format="nonce"))["__clerk_handshake_nonce"]["value"]
    only_clerk_error(
        api.get("/v1/clients/handshake_payload", params={"nonce": nonce}), 404, "resource_not_found"
    )
    fresh = set_cookies(handshake(api, client, format="nonce"))["__clerk_handshake_nonce"]["value"]
    assert api.get("/v1/clients/handshake_payload", params={"nonce": fresh}).status_code == 200


def test_expired_token_fault_hands_out_a_token_already_expired(
    api: StandinApi, standin: StandinServer
) -> None:
    _, client, _ = signed_in_client(api)
    standin.control.add_handshake_fault("expired_token", times=2)
    for _ in range(2):
        token = session_token(payload(api, handshake(api, client)))
        with pytest.raises(jwt.ExpiredSignatureError):
            verify(api, token)
        assert jwt.decode(token, options={"verify_signature": False})["exp"] < time.time() - 30
    verify(api, session_token(payload(api, handshake(api, client))))


def test_iat_before_uat_fault_makes_every_token_look_stale(api: StandinApi, standin: StandinServer) -> None:
    _, client, _ = signed_in_client(api)
    standin.control.add_handshake_fault("iat_before_uat", times=1)
    directives = directives_by_name(payload(api, handshake(api, client)))
    claims = verify(api, directives["__session"][0])
    assert claims["iat"] < int(directives["__client_uat"][0]), "Clerk's rule: iat < uat means handshake again"
    directives = directives_by_name(payload(api, handshake(api, client)))
    assert verify(api, directives["__session"][0])["iat"] >= int(directives["__client_uat"][0])


@pytest.mark.parametrize(
    "body", [{"kind": "explode"}, {"kind": "no_session", "times": 0}, {"kind": "no_session", "colour": 1}]
)
def test_invalid_handshake_faults_are_refused(api: StandinApi, body: dict[str, Any]) -> None:
    assert api.control("POST", "/handshake/faults", body).status_code == 400
    assert api.control("GET", "/handshake/faults").json() == {"faults": []}
    assert api.control("PUT", "/handshake", {"style": "staging"}).status_code == 400


# --------------------------------------------------------------------------- Clerk's own @clerk/backend


def test_clerk_backend_accepts_the_handshake(api: StandinApi, standin: StandinServer) -> None:
    """``@clerk/backend`` (pinned in tests/node/package.json) verifies a session token minted by the
    handshake, and ``authenticateRequest`` resolves the stand-in's payload as signed in: from the cookie
    (production key), from the query (development key, with its redirect to the clean URL) and from a nonce
    it redeems at the stand-in's Backend API. A payload signed by another key is not believed."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@clerk" / "backend").is_dir():
        unavailable("Node or tests/node/node_modules is missing: run `npm ci --prefix tests/node`")
    _, client, _ = signed_in_client(api)
    cookie_payload = set_cookies(handshake(api, client))["__clerk_handshake"]["value"]
    token = session_token(verify(api, cookie_payload)["handshake"])
    standin.control.set_handshake_style("development")
    location = handshake(api, client).headers["Location"]
    query_payload = parse_qs(urlsplit(location).query)["__clerk_handshake"][0]
    standin.control.set_handshake_style("production")
    nonce = set_cookies(handshake(api, client, format="nonce"))["__clerk_handshake_nonce"]["value"]
    standin.control.add_handshake_fault("bad_signature", times=1)
    bad_payload = set_cookies(handshake(api, client))["__clerk_handshake"]["value"]
    case = {
        "pem": standin.control.public_key_pem(),
        "secretKey": standin.secret_key,
        "apiUrl": standin.base_url,
        "appUrl": BACK,
        "productionKey": "pk_live_" + PUBLISHABLE_KEY.removeprefix("pk_test_"),
        "developmentKey": PUBLISHABLE_KEY,
        "sessionToken": token,
        "cookiePayload": cookie_payload,
        "queryPayload": query_payload,
        "nonce": nonce,
        "badPayload": bad_payload,
    }
    run = subprocess.run(
        [node, str(NODE_DIR / "check-handshake.mjs")],
        input=json.dumps(case),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_DIR,
        env={**os.environ, "CLERK_TELEMETRY_DISABLED": "1"},
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    sid = verify(api, token)["sid"]
    assert result["verifyToken"]["sid"] == sid
    cookie = result["cookie"]
    assert (cookie["status"], cookie["token"], cookie["sessionId"]) == ("signed-in", token, sid)
    assert cookie["setCookie"] == verify(api, cookie_payload)["handshake"], "emitted verbatim"
    assert cookie["location"] is None, "production renders at once"
    query = result["query"]
    assert (query["status"], query["sessionId"]) == ("signed-in", sid)
    assert query["location"] == BACK, "development redirects to the URL without the payload"
    nonce_state = result["nonce"]
    assert (nonce_state["status"], nonce_state["sessionId"]) == ("signed-in", sid)
    assert any(c.startswith("__session=ey") for c in nonce_state["setCookie"])
    assert result["badSignature"]["status"] == "signed-out"
    assert result["badSignature"]["setCookie"] == []
