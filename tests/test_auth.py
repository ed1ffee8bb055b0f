"""Session-token verification (iris.tokens, iris.auth), rule by rule, end to end through GET /api/v1/users/me.

Tokens are minted by the Clerk stand-in over real HTTP: through its Backend API (session, then token) like
Clerk mints them, or hand-crafted with its control API (``standin.control.sign``, signed by its current key).
The forgeries that no honest signer makes (alg none, HS256 keyed with the public key, another RSA key) are
built here. JWKS traffic is counted at the stand-in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import g

from clerk_standin import DEFAULT_AZP, DEFAULT_ISSUER, DEFAULT_SECRET_KEY
from iris import auth, config, tokens
from iris.config import ConfigError
from iris.extensions import db
from tests.helpers import (
    ME,
    app_with,
    assert_unauthorized,
    b64url,
    bearer,
    claims,
    register,
    session_token,
)

# The publishable key of a Clerk instance whose Frontend API is the stand-in's issuer host.
STANDIN_PUBLISHABLE_KEY = "pk_test_" + base64.b64encode(b"standin.clerk.accounts.dev$").decode().rstrip("=")


def jwks_requests(standin) -> int:
    return standin.control.stats()["requests"].get("GET /v1/jwks", 0)


@pytest.fixture
def user(client) -> dict:
    return register(client)


# ---- a valid token


def test_a_token_minted_by_clerk_signs_the_user_in(client, standin, user):
    response = client.get(ME, headers=bearer(session_token(standin, user["clerk_user_id"])))
    assert response.status_code == 200
    assert response.json == user


def test_a_hand_signed_token_with_clerks_claims_signs_the_user_in(client, standin, user):
    response = client.get(ME, headers=bearer(standin.control.sign(claims(user["clerk_user_id"]))))
    assert response.status_code == 200
    assert response.json["id"] == user["id"]


# ---- time: exp required, exp/nbf/iat with 5 s of leeway


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"exp": -60}, "The session token has expired; get a fresh one."),
        ({"nbf": 60}, "The session token is invalid."),
        ({"iat": 60}, "The session token is invalid."),
        ({"exp": None}, "The session token is invalid."),
    ],
    ids=["expired", "not-yet-valid", "issued-in-the-future", "no-exp"],
)
def test_a_token_outside_its_lifetime_is_401(client, standin, user, changes, message):
    now = int(time.time())
    shifted = {name: None if offset is None else now + offset for name, offset in changes.items()}
    token = standin.control.sign(claims(user["clerk_user_id"], **shifted))
    error = assert_unauthorized(client.get(ME, headers=bearer(token)), token)
    assert error["message"] == message


@pytest.mark.parametrize(
    ("claim", "offset", "status"),
    [
        ("exp", -3, 200),  # expired 3-4 s ago: inside the 5 s leeway
        ("exp", -7, 401),  # expired 7-8 s ago: outside it
        ("nbf", 3, 200),  # valid from 2-3 s ahead
        ("nbf", 7, 401),  # valid from 6-7 s ahead
        ("iat", 3, 200),
        ("iat", 7, 401),
    ],
)
def test_clock_skew_leeway_is_five_seconds(client, standin, user, claim, offset, status):
    token = standin.control.sign(claims(user["clerk_user_id"], **{claim: int(time.time()) + offset}))
    assert client.get(ME, headers=bearer(token)).status_code == status


# ---- signature and algorithm


def test_a_signature_by_another_rsa_key_with_the_right_kid_is_401(client, standin, user):
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = {"kid": standin.app.signing_key.kid, "cat": tokens.SESSION_TOKEN_CATEGORY}
    token = jwt.encode(claims(user["clerk_user_id"]), other_key, algorithm="RS256", headers=header)
    assert_unauthorized(client.get(ME, headers=bearer(token)), token)


def test_alg_none_is_401_and_never_fetches_keys(client, standin, user):
    header = {
        "alg": "none",
        "typ": "JWT",
        "kid": standin.app.signing_key.kid,
        "cat": tokens.SESSION_TOKEN_CATEGORY,
    }
    token = f"{b64url(header)}.{b64url(claims(user['clerk_user_id']))}."
    assert_unauthorized(client.get(ME, headers=bearer(token)), token)
    assert jwks_requests(standin) == 0


def test_hs256_keyed_with_the_public_key_is_401(client, standin, user):
    """The classic algorithm confusion: an HMAC "signature" made with the (public) RSA key as the secret."""
    pem = standin.control.public_key_pem()
    header = {
        "alg": "HS256",
        "typ": "JWT",
        "kid": standin.app.signing_key.kid,
        "cat": tokens.SESSION_TOKEN_CATEGORY,
    }
    signing_input = f"{b64url(header)}.{b64url(claims(user['clerk_user_id']))}"
    signature = hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(signature)}"
    assert_unauthorized(client.get(ME, headers=bearer(token)), token)
    assert jwks_requests(standin) == 0


@pytest.mark.parametrize("alg", ["RS384", "RS512"])
def test_other_rsa_algorithms_are_401_even_with_the_right_key(client, standin, user, alg):
    token = standin.control.sign(claims(user["clerk_user_id"]), {"alg": alg})
    assert_unauthorized(client.get(ME, headers=bearer(token)), token)


def test_an_unknown_kid_is_401(client, standin, user):
    token = standin.control.sign(claims(user["clerk_user_id"]), {"kid": "ins_" + secrets.token_hex(13)})
    assert_unauthorized(client.get(ME, headers=bearer(token)), token)


def test_a_token_without_kid_is_401(client, standin, user):
    token = standin.control.sign(claims(user["clerk_user_id"]), {"kid": None})
    assert_unauthorized(client.get(ME, headers=bearer(token)), token)


# ---- required claims


@pytest.mark.parametrize(
    "changes",
    [{"sub": None}, {"sub": ""}, {"sub": 42}, {"sid": None}, {"sid": ""}, {"sid": ["sess_1"]}],
    ids=["no-sub", "empty-sub", "number-sub", "no-sid", "empty-sid", "list-sid"],
)
def test_sub_and_sid_are_required_strings(client, standin, user, changes):
    token = standin.control.sign(claims(**{"sub": user["clerk_user_id"], **changes}))
    assert_unauthorized(client.get(ME, headers=bearer(token)), token)


# ---- session status (sts): only an active session signs in


def test_a_pending_session_is_401_with_a_message_that_says_why(client, standin, user):
    """A required step (password reset, MFA setup, choosing an organisation) is not done yet."""
    token = standin.control.sign(claims(user["clerk_user_id"], sts="pending"))
    error = assert_unauthorized(client.get(ME, headers=bearer(token)), token)
    assert error["message"] == tokens.PENDING
    assert error["message"].startswith("The session is pending")


def test_a_pending_session_cookie_shows_the_signed_out_page(client, standin, user):
    client.set_cookie("__session", standin.control.sign(claims(user["clerk_user_id"], sts="pending")))
    response = client.get("/account")
    assert response.status_code == 200
    assert "You are signed out" in response.get_data(as_text=True)
    assert user["email"] not in response.get_data(as_text=True)


def test_a_token_without_sts_is_accepted(client, standin, user):
    """Version 1 tokens carry neither ``v`` nor ``sts``."""
    token = standin.control.sign(claims(user["clerk_user_id"], sts=None, v=None))
    assert client.get(ME, headers=bearer(token)).json["id"] == user["id"]


@pytest.mark.parametrize("status", ["revoked", "ended", "Active", "", None, 1, ["active"]])
def test_an_unknown_session_status_is_401(client, standin, user, status):
    token = standin.control.sign({**claims(user["clerk_user_id"]), "sts": status})
    error = assert_unauthorized(client.get(ME, headers=bearer(token)), token)
    assert error["message"] == "The session token is invalid."


# ---- azp, only when CLERK_AUTHORIZED_PARTIES is set


def test_azp_must_be_listed_when_authorized_parties_are_set(make_app, standin):
    with app_with(make_app, CLERK_AUTHORIZED_PARTIES=["https://app.iris.example", DEFAULT_AZP]) as app:
        client = app.test_client()
        sub = register(client)["clerk_user_id"]
        assert client.get(ME, headers=bearer(session_token(standin, sub))).status_code == 200
        listed = standin.control.sign(claims(sub, azp="https://app.iris.example"))
        assert client.get(ME, headers=bearer(listed)).status_code == 200
        for azp in ("https://evil.example", "https://app.iris.example/", None):
            token = standin.control.sign(claims(sub, azp=azp))
            assert_unauthorized(client.get(ME, headers=bearer(token)), token)


def test_without_authorized_parties_any_azp_or_none_is_accepted(client, standin, user):
    for azp in ("https://anywhere.example", None):
        token = standin.control.sign(claims(user["clerk_user_id"], azp=azp))
        assert client.get(ME, headers=bearer(token)).status_code == 200


# ---- iss, only when CLERK_PUBLISHABLE_KEY is set


def test_iss_must_match_the_publishable_key_when_it_is_set(make_app, standin):
    with app_with(make_app, CLERK_PUBLISHABLE_KEY=STANDIN_PUBLISHABLE_KEY) as app:
        client = app.test_client()
        sub = register(client)["clerk_user_id"]
        assert client.get(ME, headers=bearer(session_token(standin, sub))).status_code == 200
        for iss in (
            "https://other.clerk.accounts.dev",
            "http://standin.clerk.accounts.dev",
            "https://standin.clerk.accounts.dev/",
            None,
        ):
            token = standin.control.sign(claims(sub, iss=iss))
            assert_unauthorized(client.get(ME, headers=bearer(token)), token)


def test_without_a_publishable_key_iss_is_not_checked(client, standin, user):
    token = standin.control.sign(claims(user["clerk_user_id"], iss="https://other.clerk.accounts.dev"))
    assert client.get(ME, headers=bearer(token)).status_code == 200


@pytest.mark.parametrize(
    ("publishable_key", "issuer"),
    [
        (
            "pk_test_ZXhhbXBsZS1kZXN0aW5lZC1jYW1lbC0xMy5jbGVyay5hY2NvdW50cy5kZXYk",
            "https://example-destined-camel-13.clerk.accounts.dev",
        ),
        ("pk_live_Y2xlcmsuZXhhbXBsZS5jb20k", "https://clerk.example.com"),
        (STANDIN_PUBLISHABLE_KEY, DEFAULT_ISSUER),
    ],
)
def test_the_issuer_is_decoded_from_the_publishable_key(publishable_key, issuer):
    assert config.issuer_from_publishable_key(publishable_key) == issuer


@pytest.mark.parametrize(
    "publishable_key",
    [
        "sk_test_Y2xlcmsuZXhhbXBsZS5jb20k",  # a secret key pasted by mistake
        "pk_test_",
        "pk_test_!!!!",
        "pk_live_" + base64.b64encode(b"clerk.example.com").decode(),  # no "$"
        "pk_live_" + base64.b64encode(b"clerk.example.com$$").decode(),
        "pk_live_" + base64.b64encode(b"localhost$").decode(),  # no dot
        "pk_live_" + base64.b64encode(b"evil.example/path$").decode(),
        "pk_live_" + base64.b64encode(b"\xff\xfe.example$").decode(),
    ],
)
def test_a_malformed_publishable_key_is_a_config_error(publishable_key):
    with pytest.raises(ConfigError, match="CLERK_PUBLISHABLE_KEY is not a Clerk publishable key"):
        config.issuer_from_publishable_key(publishable_key)


def test_a_malformed_publishable_key_fails_the_first_request_with_the_reason_logged(
    make_app, standin, caplog
):
    with app_with(make_app, CLERK_PUBLISHABLE_KEY="pk_test_not-a-key") as app:
        client = app.test_client()
        sub = register(client)["clerk_user_id"]
        response = client.get(ME, headers=bearer(session_token(standin, sub)))
    assert response.status_code == 500
    assert response.json["error"]["code"] == "internal_error"
    assert "CLERK_PUBLISHABLE_KEY is not a Clerk publishable key" in caplog.text


# ---- the cat header


@pytest.mark.parametrize("category", ["cl_B7d4PD222AAA", "cl_B7d4PD333AAA", "cl_I7d4PD111IIJ", ""])
def test_a_token_of_another_category_is_401(client, standin, user, category):
    token = standin.control.sign(claims(user["clerk_user_id"]), {"cat": category})
    assert_unauthorized(client.get(ME, headers=bearer(token)), token)


def test_a_token_of_clerks_ignore_category_is_accepted(client, standin, user):
    """Instances with ``use_ignore_jwt_cat`` stamp ``cl_I7d4PD111III`` on every token, session tokens
    included; Clerk's JS backend accepts it beside the session category (clerk/javascript
    jwtCategories.ts)."""
    token = standin.control.sign(claims(user["clerk_user_id"]), {"cat": "cl_I7d4PD111III"})
    assert client.get(ME, headers=bearer(token)).status_code == 200


def test_a_token_without_cat_is_accepted(client, standin, user):
    """Older Clerk tokens carry no category."""
    token = standin.control.sign(claims(user["clerk_user_id"]), {"cat": None})
    assert client.get(ME, headers=bearer(token)).status_code == 200


# ---- malformed input


def _truncations(token: str) -> list[str]:
    head, body, signature = token.split(".")
    return [
        token[:-1],
        token[:-20],
        f"{head}.{body}",
        f"{head}.{body}.",
        head,
        f"{head}..{signature}",
        token + ".",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "not-a-token",
        "a.b.c",
        "a.b",
        "a.b.c.d",
        "%%%.%%%.%%%",
        "e30.e30.e30",  # {} . {} . garbage
        b64url(b"[]") + "." + b64url(b"{}") + ".x",  # a header that is not an object
        "x" * 9000,
    ],
)
def test_malformed_strings_are_401(client, standin, text):
    assert_unauthorized(client.get(ME, headers=bearer(text)), text)
    assert jwks_requests(standin) == 0


def test_a_validly_signed_token_over_8_kb_is_refused_unparsed(client, standin, user):
    """Clerk keeps session tokens small enough for a cookie (about 4 KB at most)."""
    token = standin.control.sign(claims(user["clerk_user_id"], padding="x" * 6200))
    assert len(token) > tokens.MAX_TOKEN_LENGTH
    assert_unauthorized(client.get(ME, headers=bearer(token)), token)
    assert jwks_requests(standin) == 0


def test_truncated_tokens_are_401(client, standin, user):
    token = session_token(standin, user["clerk_user_id"])
    for text in _truncations(token):
        assert_unauthorized(client.get(ME, headers=bearer(text)), text)


def test_no_token_at_all_is_401_with_a_plain_bearer_challenge(client):
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        error = assert_unauthorized(client.get(ME, headers=headers), token_given=False)
        assert error["message"].startswith("Sign in first")


# ---- where the token comes from


def test_the_session_cookie_alone_signs_the_user_in(client, standin, user):
    client.set_cookie("__session", session_token(standin, user["clerk_user_id"]))
    assert client.get(ME).json["id"] == user["id"]


def test_the_authorization_header_wins_over_the_cookie(client, standin):
    alice, bob = register(client, "alice@bistro.example"), register(client, "bob@bistro.example")
    client.set_cookie("__session", session_token(standin, bob["clerk_user_id"]))
    response = client.get(ME, headers=bearer(session_token(standin, alice["clerk_user_id"])))
    assert response.json["id"] == alice["id"]
    # The header is used even when its token is bad: no silent fallback to the cookie.
    assert_unauthorized(client.get(ME, headers=bearer("not-a-token")))
    # A header in another scheme is not ours: the cookie counts.
    assert client.get(ME, headers={"Authorization": "Basic dXNlcjpwYXNz"}).json["id"] == bob["id"]


def test_a_bad_cookie_is_401(client, standin, user):
    token = standin.control.sign(claims(user["clerk_user_id"], exp=int(time.time()) - 60))
    client.set_cookie("__session", token)
    assert_unauthorized(client.get(ME), token)


# ---- CLERK_JWT_KEY: networkless


def test_clerk_jwt_key_verifies_without_any_jwks_request(make_app, standin):
    with app_with(make_app, CLERK_JWT_KEY=standin.control.public_key_pem()) as app:
        client = app.test_client()
        sub = register(client)["clerk_user_id"]
        for _ in range(5):
            assert client.get(ME, headers=bearer(session_token(standin, sub))).status_code == 200
        # The kid does not pick the key, so an unknown one costs no request either.
        token = standin.control.sign(claims(sub), {"kid": "ins_" + secrets.token_hex(13)})
        assert client.get(ME, headers=bearer(token)).status_code == 200
        # And a key the stand-in rotated to is not trusted: CLERK_JWT_KEY is the only key.
        standin.control.rotate_key()
        token = session_token(standin, sub)
        assert_unauthorized(client.get(ME, headers=bearer(token)), token)
    assert jwks_requests(standin) == 0


@pytest.mark.parametrize("shape", ["one-line", "escaped-newlines"])
def test_clerk_jwt_key_may_be_given_on_one_line(make_app, standin, shape):
    pem = standin.control.public_key_pem()
    pem = pem.replace("\n", "") if shape == "one-line" else pem.replace("\n", "\\n")
    with app_with(make_app, CLERK_JWT_KEY=pem) as app:
        client = app.test_client()
        sub = register(client)["clerk_user_id"]
        assert client.get(ME, headers=bearer(session_token(standin, sub))).status_code == 200
    assert jwks_requests(standin) == 0


@pytest.mark.parametrize("pem", ["not a key", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"])
def test_a_malformed_clerk_jwt_key_is_a_config_error(pem):
    with pytest.raises(ConfigError, match="CLERK_JWT_KEY is not an RSA public key"):
        config.load_jwt_key(pem)


# ---- JWKS: cached, refetched on a miss at most once per interval


def test_many_verifications_make_one_jwks_request(client, standin, user):
    for _ in range(20):
        token = standin.control.sign(claims(user["clerk_user_id"]))
        assert client.get(ME, headers=bearer(token)).status_code == 200
    assert jwks_requests(standin) == 1


def test_keys_are_fetched_again_once_the_ttl_has_passed(client, standin, user, monkeypatch):
    monkeypatch.setattr(tokens, "JWKS_TTL", 0.0)
    for _ in range(3):
        token = standin.control.sign(claims(user["clerk_user_id"]))
        assert client.get(ME, headers=bearer(token)).status_code == 200
    assert jwks_requests(standin) == 3


def test_a_thousand_tokens_with_random_kids_make_only_a_handful_of_jwks_requests(app, standin, user):
    payload = b64url(claims(user["clerk_user_id"]))

    def forged(_: int) -> int:
        header = {"alg": "RS256", "typ": "JWT", "kid": "ins_" + secrets.token_hex(13)}
        token = f"{b64url(header)}.{payload}.{b64url(secrets.token_bytes(256))}"
        return app.test_client().get(ME, headers=bearer(token)).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(forged, range(1000)))
    assert statuses == [401] * 1000
    # The first fetch, then at most one refetch per 10 s interval.
    assert 1 <= jwks_requests(standin) <= 3
    # Honest tokens still verify from the cache.
    before = jwks_requests(standin)
    token = standin.control.sign(claims(user["clerk_user_id"]))
    assert app.test_client().get(ME, headers=bearer(token)).status_code == 200
    assert jwks_requests(standin) == before


def test_bad_signatures_with_a_known_kid_refetch_at_most_once_per_interval(client, standin, user):
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = {"kid": standin.app.signing_key.kid}
    for _ in range(20):
        token = jwt.encode(claims(user["clerk_user_id"]), other_key, algorithm="RS256", headers=header)
        assert_unauthorized(client.get(ME, headers=bearer(token)), token)
    assert jwks_requests(standin) == 2


def test_a_rotated_key_is_picked_up_without_a_restart(client, standin, user):
    old_token = session_token(standin, user["clerk_user_id"])
    assert client.get(ME, headers=bearer(old_token)).status_code == 200
    standin.control.rotate_key()
    new_token = session_token(standin, user["clerk_user_id"])
    assert client.get(ME, headers=bearer(new_token)).status_code == 200
    assert jwks_requests(standin) == 2
    # The old key left the JWKS with the rotation, so its tokens are refused (without another fetch).
    assert_unauthorized(client.get(ME, headers=bearer(old_token)), old_token)
    assert jwks_requests(standin) == 2


def test_during_a_rotation_that_keeps_the_previous_key_both_keys_verify(client, standin, user):
    old_token = session_token(standin, user["clerk_user_id"])
    assert client.get(ME, headers=bearer(old_token)).status_code == 200
    standin.control.rotate_key(keep_previous=True)
    new_token = session_token(standin, user["clerk_user_id"])
    assert client.get(ME, headers=bearer(new_token)).status_code == 200
    assert client.get(ME, headers=bearer(old_token)).status_code == 200
    assert jwks_requests(standin) == 2


# ---- JWKS unavailable: 503, not 401


def assert_provider_unavailable(response) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.json["error"]["code"] == "auth_provider_unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    assert "WWW-Authenticate" not in response.headers


def test_jwks_unreachable_is_503(make_app, standin):
    with app_with(make_app, CLERK_API_URL="http://127.0.0.1:1") as app:
        token = standin.control.sign(claims("user_x"))
        assert_provider_unavailable(app.test_client().get(ME, headers=bearer(token)))


@pytest.mark.parametrize("fault", [{"status": 503}, {"status": 500}, {"action": "hang", "seconds": 3}])
def test_jwks_failing_is_503(client, standin, user, fault):
    standin.control.add_fault(method="GET", path="/v1/jwks", times=1, **fault)
    token = standin.control.sign(claims(user["clerk_user_id"]))
    assert_provider_unavailable(client.get(ME, headers=bearer(token)))


def test_after_a_failed_fetch_requests_get_503_at_once_until_the_backoff_ends(
    client, standin, user, monkeypatch
):
    standin.control.add_fault(method="GET", path="/v1/jwks", times=1, status=503)
    token = standin.control.sign(claims(user["clerk_user_id"]))
    assert_provider_unavailable(client.get(ME, headers=bearer(token)))
    assert_provider_unavailable(client.get(ME, headers=bearer(token)))
    assert jwks_requests(standin) == 1  # the second request did not wait on Clerk again
    monkeypatch.setattr(tokens, "FETCH_FAILURE_BACKOFF", 0.0)  # the backoff has passed
    assert client.get(ME, headers=bearer(token)).status_code == 200
    assert jwks_requests(standin) == 2


# ---- nothing secret in the logs


def test_tokens_never_reach_the_logs(client, standin, user, caplog):
    caplog.set_level(logging.DEBUG)
    sub = user["clerk_user_id"]
    tokens = [
        session_token(standin, sub),
        standin.control.sign(claims(sub, exp=int(time.time()) - 60)),
        standin.control.sign(claims(sub), {"kid": "ins_unknown"}),
        standin.control.sign(claims(sub, sid=None)),
        standin.control.sign(claims(sub, sts="pending")),
        "not-a-token",
    ]
    for token in tokens:
        client.get(ME, headers=bearer(token))
    assert "session token rejected" in caplog.text
    for token in tokens:
        for part in token.split("."):
            assert part not in caplog.text
    assert DEFAULT_SECRET_KEY not in caplog.text


# ---- the helpers views use


def test_require_user_puts_the_live_user_in_g(app, standin, user):
    view = auth.require_user(lambda: g.user)
    with app.test_request_context(headers=bearer(session_token(standin, user["clerk_user_id"]))):
        assert str(view().id) == user["id"]
    with app.test_request_context(), pytest.raises(auth.Unauthorized):
        view()


def test_current_user_is_none_when_signed_out_and_the_user_when_signed_in(app, standin, user):
    expired = standin.control.sign(claims(user["clerk_user_id"], exp=int(time.time()) - 60))
    with app.test_request_context():
        assert auth.current_user() is None
    with app.test_request_context(headers=bearer(expired)):
        assert auth.current_user() is None
    with app.test_request_context(
        headers={"Cookie": f"__session={session_token(standin, user['clerk_user_id'])}"}
    ):
        assert str(auth.current_user().id) == user["id"]


def test_current_user_still_raises_for_a_deleted_account(app, standin, user):
    with app.app_context():
        db.session.execute(sa.text("UPDATE users SET deleted_at = now()"))
        db.session.commit()
    token = session_token(standin, user["clerk_user_id"])
    with app.test_request_context(headers=bearer(token)), pytest.raises(auth.Forbidden):
        auth.current_user()
