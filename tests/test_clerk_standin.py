"""The local Clerk Backend API stand-in, driven over real HTTP on a loopback port.

Every test talks to a real threaded server through ``requests`` (or Clerk's own Python SDK);
nothing calls the Flask app in-process except the key-file check. The server is shared by the
module and reset before each test through the control API.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
import pytest
import requests

from clerk_standin import (
    BREACHED_PASSWORDS,
    DEFAULT_AZP,
    DEFAULT_ISSUER,
    DEFAULT_SECRET_KEY,
    SESSION_TOKEN_CATEGORY,
    ClerkStandin,
    StandinServer,
)
from tests.helpers import StandinApi, only_clerk_error, user_ids

ID_RE = MappingProxyType(
    {prefix: re.compile(rf"^{prefix}_[0-9A-Za-z]{{27}}$") for prefix in ("user", "idn", "sess", "ins")}
)
TIMEOUT = 5

# Fields clerk-backend-api 7.0.0's User model requires (the SDK's own model, not our choice).
REQUIRED_USER_FIELDS = frozenset(
    {
        "id",
        "object",
        "external_id",
        "primary_email_address_id",
        "primary_phone_number_id",
        "primary_web3_wallet_id",
        "username",
        "first_name",
        "last_name",
        "has_image",
        "public_metadata",
        "email_addresses",
        "phone_numbers",
        "web3_wallets",
        "passkeys",
        "password_enabled",
        "two_factor_enabled",
        "totp_enabled",
        "backup_code_enabled",
        "mfa_enabled_at",
        "mfa_disabled_at",
        "external_accounts",
        "saml_accounts",
        "enterprise_accounts",
        "last_sign_in_at",
        "banned",
        "locked",
        "lockout_expires_in_seconds",
        "verification_attempts_remaining",
        "updated_at",
        "created_at",
        "delete_self_enabled",
        "create_organization_enabled",
        "last_active_at",
        "legal_accepted_at",
    }
)


# Deliberately named like tests/conftest.py's autouse ``standin`` fixture: inside this module it
# replaces that one, so these tests run on their own server and need no database.
@pytest.fixture(scope="module")
def standin() -> Iterator[StandinServer]:
    server = StandinServer(port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api(standin: StandinServer) -> StandinApi:
    """A reset stand-in (no users, sessions, faults, counts; original key)."""
    api = StandinApi(standin)
    assert api.control("POST", "/reset").status_code == 200
    return api


# --------------------------------------------------------------------------- auth, routing


def test_missing_authorization_header_is_401_format_invalid(api: StandinApi) -> None:
    response = requests.get(api.base + "/v1/users", timeout=TIMEOUT)
    only_clerk_error(response, 401, "authorization_header_format_invalid")
    assert response.headers["Clerk-Api-Version"] == "2021-02-05"


def test_non_bearer_authorization_is_401_format_invalid(api: StandinApi) -> None:
    response = api.get("/v1/users", headers={"Authorization": f"Basic {DEFAULT_SECRET_KEY}"})
    only_clerk_error(response, 401, "authorization_header_format_invalid")


def test_wrong_secret_key_is_401_clerk_key_invalid(api: StandinApi) -> None:
    response = api.get("/v1/jwks", headers={"Authorization": "Bearer sk_test_wrong"})
    error = only_clerk_error(response, 401, "clerk_key_invalid")
    assert "Secret Key is invalid" in error["message"]


def test_unknown_route_is_404_clerk_envelope(api: StandinApi) -> None:
    only_clerk_error(api.get("/v1/no_such_thing"), 404, "resource_not_found")
    only_clerk_error(api.request("PUT", "/v1/users"), 404, "resource_not_found")


def test_api_version_header_is_echoed(api: StandinApi) -> None:
    response = api.get("/v1/users", headers={"Clerk-API-Version": "2025-11-10"})
    assert response.headers["Clerk-Api-Version"] == "2025-11-10"
    assert api.get("/v1/users").headers["Clerk-Api-Version"] == "2021-02-05"


# --------------------------------------------------------------------------- create user


def test_create_user_returns_200_and_the_full_user_object(api: StandinApi) -> None:
    before = int(time.time() * 1000)
    response = api.post(
        "/v1/users",
        {
            "email_address": ["Owner@Example.com"],
            "password": "correct horse battery",
            "external_id": "row-1",
            "first_name": "Ada",
            "public_metadata": {"role": "restaurant"},
            "private_metadata": {"note": 1},
        },
    )
    after = int(time.time() * 1000)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    user = response.json()
    assert set(user) >= REQUIRED_USER_FIELDS
    assert ID_RE["user"].match(user["id"])
    assert user["object"] == "user"
    assert user["external_id"] == "row-1"
    assert user["first_name"] == "Ada" and user["last_name"] is None
    assert user["public_metadata"] == {"role": "restaurant"}
    assert user["private_metadata"] == {"note": 1}
    assert user["unsafe_metadata"] == {}
    assert user["password_enabled"] is True
    assert before <= user["created_at"] <= after and user["updated_at"] == user["created_at"]
    [email] = user["email_addresses"]
    assert ID_RE["idn"].match(email["id"]) and user["primary_email_address_id"] == email["id"]
    assert email["object"] == "email_address"
    assert email["email_address"] == "Owner@Example.com"
    assert email["verification"] == {
        "object": "verification_admin",
        "status": "verified",
        "strategy": "admin",
        "attempts": None,
        "expire_at": None,
    }
    assert email["reserved"] is False and email["linked_to"] == []
    assert "correct horse battery" not in response.text


def test_create_user_accepts_explicit_nulls(api: StandinApi) -> None:
    body = {
        "email_address": ["nulls@example.com"],
        "password": None,
        "external_id": None,
        "skip_password_checks": None,
        "first_name": None,
        "last_name": None,
        "username": None,
        "public_metadata": None,
        "private_metadata": None,
        "unsafe_metadata": None,
    }
    response = api.post("/v1/users", body)
    assert response.status_code == 200, response.text
    user = response.json()
    assert user["external_id"] is None and user["public_metadata"] == {}
    assert user["password_enabled"] is False


def test_unknown_parameters_are_422_form_param_unknown(api: StandinApi) -> None:
    response = api.post("/v1/users", {"email_address": ["x@example.com"], "role": "admin", "age": 3})
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert [(e["code"], e["meta"]["param_name"]) for e in errors] == [
        ("form_param_unknown", "age"),
        ("form_param_unknown", "role"),
    ]
    assert errors[1]["long_message"] == "role is not a valid parameter for this request."
    assert api.get("/v1/users/count").json()["total_count"] == 0


def test_email_uniqueness_is_case_insensitive(api: StandinApi) -> None:
    api.create_user("Chef@Example.com")
    response = api.post("/v1/users", {"email_address": ["chef@EXAMPLE.com"], "password": "another long one"})
    error = only_clerk_error(response, 422, "form_identifier_exists")
    assert error["message"] == "That email address is taken. Please try another."
    assert error["meta"] == {"param_name": "email_address"}
    assert api.get("/v1/users/count").json()["total_count"] == 1


def test_concurrent_creates_of_one_email_yield_exactly_one_user(api: StandinApi) -> None:
    def create(index: int) -> int:
        email = "Race@Example.com" if index % 2 else "race@example.com"
        body = {"email_address": [email], "password": "a fine long passphrase"}
        return api.post("/v1/users", body).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = sorted(pool.map(create, range(20)))
    assert statuses == [200] + [422] * 19
    assert api.get("/v1/users/count").json()["total_count"] == 1


def test_duplicate_external_id_is_422_identifier_exists_on_external_id(api: StandinApi) -> None:
    api.create_user("one@example.com", external_id="row-7")
    response = api.post("/v1/users", {"email_address": ["two@example.com"], "external_id": "row-7"})
    error = only_clerk_error(response, 422, "form_identifier_exists")
    assert error["meta"] == {"param_name": "external_id"}
    assert api.get("/v1/users/count").json()["total_count"] == 1


@pytest.mark.parametrize(
    "email", ["not-an-email", "a@b", "two@@example.com", "sp ace@example.com", "@example.com"]
)
def test_bad_email_format_is_422_format_invalid(api: StandinApi, email: str) -> None:
    response = api.post("/v1/users", {"email_address": [email], "password": "a fine long passphrase"})
    error = only_clerk_error(response, 422, "form_param_format_invalid")
    assert error["meta"] == {"param_name": "email_address"}


def test_missing_email_is_422_form_param_missing(api: StandinApi) -> None:
    error = only_clerk_error(
        api.post("/v1/users", {"password": "a fine long passphrase"}), 422, "form_param_missing"
    )
    assert error["meta"] == {"param_name": "email_address"}


def test_wrong_types_are_422_type_invalid(api: StandinApi) -> None:
    response = api.post("/v1/users", {"email_address": "single@example.com"})
    assert only_clerk_error(response, 422, "form_param_type_invalid")["meta"] == {
        "param_name": "email_address"
    }
    response = api.post("/v1/users", {"email_address": ["m@example.com"], "public_metadata": [1]})
    assert only_clerk_error(response, 422, "form_param_type_invalid")["meta"] == {
        "param_name": "public_metadata"
    }


@pytest.mark.parametrize("password", ["", "short", "1234567"])
def test_short_password_is_422_length_too_short(api: StandinApi, password: str) -> None:
    response = api.post("/v1/users", {"email_address": ["p@example.com"], "password": password})
    error = only_clerk_error(response, 422, "form_password_length_too_short")
    assert error["message"] == "Passwords must be 8 characters or more."
    assert error["meta"] == {"param_name": "password"}


@pytest.mark.parametrize(
    "password", ["password", "password123", "12345678", "qwertyuiop", "iloveyou1", "Password123"]
)
def test_breached_password_is_422_pwned(api: StandinApi, password: str) -> None:
    response = api.post("/v1/users", {"email_address": ["p@example.com"], "password": password})
    error = only_clerk_error(response, 422, "form_password_pwned")
    assert error["message"] == (
        "Password has been found in an online data breach. "
        "For account safety, please use a different password."
    )
    assert error["meta"] == {"param_name": "password"}


def test_breach_list_entries_are_long_enough_to_reach_the_breach_check() -> None:
    assert all(len(password) >= 8 for password in BREACHED_PASSWORDS)


@pytest.mark.parametrize("password", ["short", "password123"])
def test_skip_password_checks_skips_length_and_breach_checks(api: StandinApi, password: str) -> None:
    body = {"email_address": [f"{password}@example.com"], "password": password, "skip_password_checks": True}
    response = api.post("/v1/users", body)
    assert response.status_code == 200, response.text
    assert response.json()["password_enabled"] is True


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"'])
def test_unparseable_or_non_object_body_is_400_request_body_invalid(api: StandinApi, raw: bytes) -> None:
    response = api.post("/v1/users", data=raw, headers={"Content-Type": "application/json"})
    only_clerk_error(response, 400, "request_body_invalid")


def test_password_is_never_stored_echoed_or_logged(
    standin: StandinServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Zebra-Quartz-Lantern-4471"
    with StandinServer(log_requests=True) as logged, caplog.at_level(logging.DEBUG):
        api = StandinApi(logged)
        created = api.post("/v1/users", {"email_address": ["quiet@example.com"], "password": secret})
        fetched = api.get(f"/v1/users/{created.json()['id']}")
        listed = api.get("/v1/users")
        too_short = api.post("/v1/users", {"email_address": ["q2@example.com"], "password": secret[:5]})
        stored = repr(logged.app.users) + repr(logged.app.sessions)
    assert created.status_code == 200 and too_short.status_code == 422
    assert "POST /v1/users" in caplog.text  # request lines are logged ...
    for text in (created.text, fetched.text, listed.text, too_short.text, stored, caplog.text):
        assert secret not in text and secret[:5] not in text  # ... bodies and passwords never
    assert "quiet@example.com" not in caplog.text


# --------------------------------------------------------------------------- get, delete


def test_get_user_returns_it_and_404_when_unknown(api: StandinApi) -> None:
    user = api.create_user("get@example.com")
    response = api.get(f"/v1/users/{user['id']}")
    assert response.status_code == 200 and response.json() == user
    error = only_clerk_error(api.get("/v1/users/user_doesnotexist"), 404, "resource_not_found")
    assert "user_doesnotexist" in error["long_message"]


def test_delete_user_returns_deleted_object_then_404(api: StandinApi) -> None:
    plain = api.create_user("del1@example.com")
    linked = api.create_user("del2@example.com", external_id="row-9")
    response = api.delete(f"/v1/users/{plain['id']}")
    assert response.status_code == 200
    assert response.json() == {"object": "user", "id": plain["id"], "deleted": True}
    response = api.delete(f"/v1/users/{linked['id']}")
    assert response.json() == {"object": "user", "id": linked["id"], "deleted": True, "external_id": "row-9"}
    only_clerk_error(api.get(f"/v1/users/{plain['id']}"), 404, "resource_not_found")
    only_clerk_error(api.delete(f"/v1/users/{plain['id']}"), 404, "resource_not_found")
    # the email is free again
    api.create_user("DEL1@example.com")


# --------------------------------------------------------------------------- list, count


def test_list_is_a_bare_array_newest_first_with_default_limit_10(api: StandinApi) -> None:
    created = [api.create_user(f"u{i:02d}@example.com")["id"] for i in range(12)]
    assert user_ids(api.get("/v1/users")) == created[::-1][:10]


def test_list_paging_with_limit_and_offset(api: StandinApi) -> None:
    created = [api.create_user(f"p{i:02d}@example.com")["id"] for i in range(7)]
    newest_first = created[::-1]
    assert user_ids(api.get("/v1/users", params={"limit": 3})) == newest_first[:3]
    assert user_ids(api.get("/v1/users", params={"limit": 3, "offset": 3})) == newest_first[3:6]
    assert user_ids(api.get("/v1/users", params={"limit": 3, "offset": 6})) == newest_first[6:]
    assert user_ids(api.get("/v1/users", params={"offset": 50})) == []
    assert len(user_ids(api.get("/v1/users", params={"limit": 500}))) == 7


def test_list_order_by(api: StandinApi) -> None:
    ids = {
        email: api.create_user(email)["id"] for email in ["b@example.com", "C@example.com", "a@example.com"]
    }
    in_creation = list(ids.values())
    assert user_ids(api.get("/v1/users", params={"order_by": "+created_at"})) == in_creation
    assert user_ids(api.get("/v1/users", params={"order_by": "created_at"})) == in_creation
    assert user_ids(api.get("/v1/users", params={"order_by": "-created_at"})) == in_creation[::-1]
    assert user_ids(api.get("/v1/users", params={"order_by": "-updated_at"})) == in_creation[::-1]
    by_email = [ids["a@example.com"], ids["b@example.com"], ids["C@example.com"]]
    assert user_ids(api.get("/v1/users", params={"order_by": "email_address"})) == by_email
    assert user_ids(api.get("/v1/users", params={"order_by": "-email_address"})) == by_email[::-1]


def test_list_filters_email_case_insensitively_with_repeated_keys(api: StandinApi) -> None:
    first = api.create_user("first@example.com")["id"]
    second = api.create_user("Second@Example.com")["id"]
    api.create_user("third@example.com")
    query = "email_address=FIRST%40example.com&email_address=second%40example.COM&email_address=none%40x.com"
    assert sorted(user_ids(api.get(f"/v1/users?{query}"))) == sorted([first, second])
    assert api.get(f"/v1/users/count?{query}").json() == {"object": "total_count", "total_count": 2}
    assert user_ids(api.get("/v1/users", params={"email_address": "nobody@example.com"})) == []
    assert user_ids(api.get("/v1/users?email_address=")) == []


def test_list_filters_external_id_and_user_id(api: StandinApi) -> None:
    one = api.create_user("e1@example.com", external_id="row-1")["id"]
    two = api.create_user("e2@example.com", external_id="row-2")["id"]
    api.create_user("e3@example.com")
    assert user_ids(api.get("/v1/users", params={"external_id": "row-2"})) == [two]
    both = user_ids(api.get("/v1/users", params=[("external_id", "row-1"), ("external_id", "row-2")]))
    assert sorted(both) == sorted([one, two])
    assert user_ids(api.get("/v1/users", params={"user_id": one})) == [one]
    assert user_ids(api.get("/v1/users", params={"user_id": one, "external_id": "row-2"})) == []
    count = api.get("/v1/users/count", params={"external_id": "row-1"}).json()
    assert count == {"object": "total_count", "total_count": 1}
    assert api.get("/v1/users/count").json()["total_count"] == 3


@pytest.mark.parametrize(
    ("name", "value"), [("limit", "0"), ("limit", "501"), ("limit", "ten"), ("offset", "-1"), ("offset", "x")]
)
def test_list_bad_paging_values_are_422_value_invalid(api: StandinApi, name: str, value: str) -> None:
    error = only_clerk_error(api.get("/v1/users", params={name: value}), 422, "form_param_value_invalid")
    assert error["meta"] == {"param_name": name}


def test_list_unknown_order_by_is_422_value_invalid(api: StandinApi) -> None:
    error = only_clerk_error(
        api.get("/v1/users", params={"order_by": "-password"}), 422, "form_param_value_invalid"
    )
    assert error["meta"] == {"param_name": "order_by"}


# --------------------------------------------------------------------------- email addresses

# What an address marked unverified shows (the stand-in's choice: Clerk's own rendering is unconfirmed,
# and its admin verification cannot say "unverified"); what a Backend API-made or -verified one shows.
UNVERIFIED = MappingProxyType(
    {
        "object": "verification_otp",
        "status": "unverified",
        "strategy": "email_code",
        "attempts": None,
        "expire_at": None,
    }
)
VERIFIED_BY_ADMIN = MappingProxyType(
    {
        "object": "verification_admin",
        "status": "verified",
        "strategy": "admin",
        "attempts": None,
        "expire_at": None,
    }
)


def two_address_user(api: StandinApi) -> dict[str, Any]:
    response = api.post(
        "/v1/users", {"email_address": ["first@example.com", "second@example.com"], "password": None}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_get_email_address_is_the_users_address_and_404_when_unknown(api: StandinApi) -> None:
    user = two_address_user(api)
    for address in user["email_addresses"]:
        response = api.get(f"/v1/email_addresses/{address['id']}")
        assert response.status_code == 200, response.text
        assert response.json() == address
    error = only_clerk_error(api.get("/v1/email_addresses/idn_missing"), 404, "resource_not_found")
    assert "idn_missing" in error["long_message"]


def test_patch_verified_false_then_true_shows_in_the_address_and_the_user(api: StandinApi) -> None:
    user = api.create_user("owner@example.com")
    [address] = user["email_addresses"]
    url = f"/v1/email_addresses/{address['id']}"
    time.sleep(0.005)  # timestamps are milliseconds: let the clock move past created_at

    response = api.patch(url, {"verified": False})
    assert response.status_code == 200, response.text
    changed = response.json()
    assert changed["verification"] == UNVERIFIED
    assert changed["updated_at"] > address["updated_at"]
    assert {k: v for k, v in changed.items() if k not in ("verification", "updated_at")} == {
        k: v for k, v in address.items() if k not in ("verification", "updated_at")
    }
    assert api.get(url).json() == changed
    fetched = api.get(f"/v1/users/{user['id']}").json()
    assert fetched["email_addresses"] == [changed]
    assert fetched["updated_at"] == changed["updated_at"] > user["updated_at"]
    assert fetched["primary_email_address_id"] == address["id"]
    [listed] = api.get("/v1/users", params={"email_address": "owner@example.com"}).json()
    assert listed == fetched

    time.sleep(0.005)
    again = api.patch(url, {"verified": True})
    assert again.status_code == 200, again.text
    assert again.json()["verification"] == VERIFIED_BY_ADMIN
    assert again.json()["updated_at"] > changed["updated_at"]
    assert api.get(f"/v1/users/{user['id']}").json()["email_addresses"] == [again.json()]


def test_patch_primary_true_makes_it_the_users_primary_address(api: StandinApi) -> None:
    user = two_address_user(api)
    first, second = user["email_addresses"]
    assert user["primary_email_address_id"] == first["id"]
    response = api.patch(f"/v1/email_addresses/{second['id']}", {"primary": True})
    assert response.status_code == 200, response.text
    assert response.json()["verification"] == VERIFIED_BY_ADMIN  # primary alone leaves it as it was
    fetched = api.get(f"/v1/users/{user['id']}").json()
    assert fetched["primary_email_address_id"] == second["id"]
    assert fetched["email_addresses"] == [first, response.json()]
    # primary: false has nothing to undo (a user always has a primary address); the other user is untouched.
    other = api.create_user("other@example.com")
    assert api.patch(f"/v1/email_addresses/{second['id']}", {"primary": False}).status_code == 200
    assert api.get(f"/v1/users/{user['id']}").json()["primary_email_address_id"] == second["id"]
    assert api.get(f"/v1/users/{other['id']}").json() == other


def test_patch_takes_nulls_as_absent_and_accepts_the_sdks_notify_flag(api: StandinApi) -> None:
    user = api.create_user("n@example.com")
    [address] = user["email_addresses"]
    body = {"verified": None, "primary": None, "notify_primary_email_address_changed": False}
    response = api.patch(f"/v1/email_addresses/{address['id']}", body)
    assert response.status_code == 200, response.text
    assert response.json()["verification"] == VERIFIED_BY_ADMIN
    assert api.get(f"/v1/users/{user['id']}").json()["primary_email_address_id"] == address["id"]


def test_patch_refusals_are_clerk_errors_and_change_nothing(api: StandinApi) -> None:
    user = api.create_user("r@example.com")
    [address] = user["email_addresses"]
    url = f"/v1/email_addresses/{address['id']}"
    unknown = api.patch(url, {"verified": False, "email_address": "x@example.com"})
    assert only_clerk_error(unknown, 422, "form_param_unknown")["meta"] == {"param_name": "email_address"}
    wrong = api.patch(url, {"verified": "false", "primary": 1})
    assert wrong.status_code == 422, wrong.text
    assert [(e["code"], e["meta"]) for e in wrong.json()["errors"]] == [
        ("form_param_type_invalid", {"param_name": "primary"}),
        ("form_param_type_invalid", {"param_name": "verified"}),
    ]
    only_clerk_error(api.patch(url, data=b"{not json"), 400, "request_body_invalid")
    missing = api.patch("/v1/email_addresses/idn_missing", {"verified": False})
    assert "idn_missing" in only_clerk_error(missing, 404, "resource_not_found")["long_message"]
    # Checked before the lookup, as for the other endpoints: a bad body is 422 whatever the id.
    only_clerk_error(api.patch("/v1/email_addresses/idn_missing", {"nope": 1}), 422, "form_param_unknown")
    assert api.get(f"/v1/users/{user['id']}").json() == user


def test_email_address_routes_meet_faults_and_are_counted(api: StandinApi) -> None:
    user = api.create_user("f@example.com")
    [address] = user["email_addresses"]
    url = f"/v1/email_addresses/{address['id']}"
    api.fault(method="PATCH", path="/v1/email_addresses/", times=1, status=429, retry_after=2)
    limited = api.patch(url, {"verified": False})
    only_clerk_error(limited, 429, "too_many_requests")
    assert limited.headers["Retry-After"] == "2"
    assert api.get(url).json() == address  # the faulted PATCH changed nothing
    api.fault(path="/v1/email_addresses/", times=1, action="garbage")
    assert api.get(url).text.startswith("<html>")  # the GET met the garbage fault
    assert api.patch(url, {"verified": False}).json()["verification"] == UNVERIFIED
    assert api.stats()["requests"] == {
        "POST /v1/users": 1,
        "GET /v1/email_addresses/<email_address_id>": 2,
        "PATCH /v1/email_addresses/<email_address_id>": 2,
    }


# --------------------------------------------------------------------------- sessions, tokens, keys


def test_create_session_returns_session_object(api: StandinApi) -> None:
    user = api.create_user("s@example.com")
    response = api.post("/v1/sessions", {"user_id": user["id"]})
    assert response.status_code == 200, response.text
    session = response.json()
    assert ID_RE["sess"].match(session["id"])
    assert session["object"] == "session" and session["status"] == "active"
    assert session["user_id"] == user["id"] and session["client_id"].startswith("client_")
    for field in ("last_active_at", "expire_at", "abandon_at", "created_at", "updated_at"):
        assert isinstance(session[field], int)
    assert session["expire_at"] > session["created_at"]


def test_create_session_errors(api: StandinApi) -> None:
    only_clerk_error(api.post("/v1/sessions", {"user_id": "user_missing"}), 404, "resource_not_found")
    only_clerk_error(api.post("/v1/sessions", {}), 422, "form_param_missing")
    only_clerk_error(api.post("/v1/sessions", {"user_id": "x", "extra": 1}), 422, "form_param_unknown")


def test_session_token_has_clerk_header_and_claims_and_verifies_against_jwks(api: StandinApi) -> None:
    user = api.create_user("t@example.com")
    session = api.post("/v1/sessions", {"user_id": user["id"]}).json()
    response = api.post(f"/v1/sessions/{session['id']}/tokens")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "token"
    token = body["jwt"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "kid": header["kid"], "typ": "JWT", "cat": SESSION_TOKEN_CATEGORY}
    assert ID_RE["ins"].match(header["kid"])
    claims = jwt.decode(token, api.jwks_key(token), algorithms=["RS256"], options={"require": ["exp", "sub"]})
    assert set(claims) == {"azp", "exp", "iat", "nbf", "iss", "jti", "sid", "sub", "v", "fva", "sts"}
    assert claims["sub"] == user["id"] and claims["sid"] == session["id"]
    assert claims["azp"] == DEFAULT_AZP and claims["iss"] == DEFAULT_ISSUER
    assert claims["exp"] == claims["iat"] + 60 and claims["nbf"] == claims["iat"] - 10
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["v"] == 2 and claims["sts"] == "active" and claims["fva"] == [0, -1]


def test_token_lifetime_is_configurable_and_bounded(api: StandinApi) -> None:
    user = api.create_user("life@example.com")
    session_id = api.post("/v1/sessions", {"user_id": user["id"]}).json()["id"]
    token = api.post(f"/v1/sessions/{session_id}/tokens", {"expires_in_seconds": 600}).json()["jwt"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600
    null_body = api.post(f"/v1/sessions/{session_id}/tokens", {"expires_in_seconds": None})
    assert null_body.status_code == 200
    too_short = api.post(f"/v1/sessions/{session_id}/tokens", {"expires_in_seconds": 5})
    only_clerk_error(too_short, 422, "form_param_value_invalid")
    only_clerk_error(api.post("/v1/sessions/sess_missing/tokens"), 404, "resource_not_found")


def test_deleting_a_user_ends_its_sessions(api: StandinApi) -> None:
    user = api.create_user("gone@example.com")
    session_id = api.post("/v1/sessions", {"user_id": user["id"]}).json()["id"]
    api.delete(f"/v1/users/{user['id']}")
    only_clerk_error(api.post(f"/v1/sessions/{session_id}/tokens"), 404, "resource_not_found")


def test_jwks_shape_and_stable_kid(api: StandinApi) -> None:
    first = api.get("/v1/jwks")
    assert first.status_code == 200
    [key] = first.json()["keys"]
    assert set(key) == {"use", "kty", "kid", "alg", "n", "e"}
    assert (key["use"], key["kty"], key["alg"], key["e"]) == ("sig", "RSA", "RS256", "AQAB")
    assert ID_RE["ins"].match(key["kid"])
    assert api.get("/v1/jwks").json() == first.json()
    pem = api.control("GET", "/public-key.pem").text
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert jwt.PyJWK(key).key.public_numbers() == jwt.algorithms.RSAAlgorithm.from_jwk(key).public_numbers()
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    assert load_pem_public_key(pem.encode()).public_numbers() == jwt.PyJWK(key).key.public_numbers()


def test_key_file_is_created_once_and_keeps_the_kid(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "standin.pem"
    first = ClerkStandin(key_file=key_file)
    assert key_file.exists() and (key_file.stat().st_mode & 0o777) == 0o600
    second = ClerkStandin(key_file=key_file)
    assert first.signing_key.kid == second.signing_key.kid
    assert ClerkStandin().signing_key.kid != first.signing_key.kid


def test_rotate_key_serves_new_kid_and_optionally_keeps_the_old_one(api: StandinApi) -> None:
    user = api.create_user("rot@example.com")
    session_id = api.post("/v1/sessions", {"user_id": user["id"]}).json()["id"]
    old_token = api.post(f"/v1/sessions/{session_id}/tokens").json()["jwt"]
    old_kid = jwt.get_unverified_header(old_token)["kid"]

    rotated = api.control("POST", "/keys/rotate").json()
    assert rotated["kid"] != old_kid and rotated["jwks_kids"] == [rotated["kid"]]
    assert [k["kid"] for k in api.get("/v1/jwks").json()["keys"]] == [rotated["kid"]]
    new_token = api.post(f"/v1/sessions/{session_id}/tokens").json()["jwt"]
    assert jwt.get_unverified_header(new_token)["kid"] == rotated["kid"]
    jwt.decode(new_token, api.jwks_key(new_token), algorithms=["RS256"])
    with pytest.raises(StopIteration):
        api.jwks_key(old_token)  # the old kid is gone from the JWKS

    kept = api.control("POST", "/keys/rotate", {"keep_previous": True}).json()
    assert kept["jwks_kids"] == [kept["kid"], rotated["kid"]]
    jwt.decode(new_token, api.jwks_key(new_token), algorithms=["RS256"])  # previous key still served

    api.control("POST", "/reset")
    assert [k["kid"] for k in api.get("/v1/jwks").json()["keys"]] == [old_kid]


def test_sign_endpoint_signs_arbitrary_claims_with_the_current_key(api: StandinApi) -> None:
    now = int(time.time())
    claims = {
        "sub": "user_x",
        "sid": "sess_x",
        "iat": now - 120,
        "nbf": now - 130,
        "exp": now - 60,
        "azp": "evil",
    }
    response = api.control("POST", "/sign", {"claims": claims})
    assert response.status_code == 200, response.text
    token = response.json()["jwt"]
    key = api.jwks_key(token)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(token, key, algorithms=["RS256"])
    assert jwt.decode(token, key, algorithms=["RS256"], options={"verify_exp": False}) == claims
    assert jwt.get_unverified_header(token)["cat"] == SESSION_TOKEN_CATEGORY

    custom = api.control(
        "POST", "/sign", {"claims": {"sid": "s"}, "header": {"cat": None, "typ": None, "x": 1}}
    )
    header = jwt.get_unverified_header(custom.json()["jwt"])
    assert header == {"alg": "RS256", "kid": header["kid"], "x": 1}
    jwt.decode(custom.json()["jwt"], key, algorithms=["RS256"])  # no exp claim: still a valid signature

    assert api.control("POST", "/sign", {"claims": "nope"}).status_code == 400
    assert api.control("POST", "/sign", {"claims": {}, "header": {"alg": "HS256"}}).status_code == 400


# --------------------------------------------------------------------------- faults


def test_global_latency_fault_slows_every_v1_request_but_not_control(api: StandinApi) -> None:
    api.fault(latency_ms=300)
    started = time.monotonic()
    assert api.get("/v1/jwks").status_code == 200
    assert api.post("/v1/users", {"email_address": ["slow@example.com"]}).status_code == 200
    slow = (time.monotonic() - started) / 2
    started = time.monotonic()
    api.stats()
    control = time.monotonic() - started
    assert 0.3 <= slow < 1.5
    assert control < 0.25
    assert api.control("DELETE", "/faults").json() == {"cleared": 1}
    started = time.monotonic()
    api.get("/v1/jwks")
    assert time.monotonic() - started < 0.25


def test_status_fault_is_limited_to_method_path_and_times_with_retry_after(api: StandinApi) -> None:
    api.fault(method="POST", path="/v1/users", times=1, status=429, retry_after=7)
    assert api.get("/v1/users").status_code == 200  # other method: untouched
    body = {"email_address": ["rl@example.com"], "password": "a fine long passphrase"}
    limited = api.post("/v1/users", body)
    error = only_clerk_error(limited, 429, "too_many_requests")
    assert limited.headers["Retry-After"] == "7"
    assert limited.headers["Clerk-Api-Version"] == "2021-02-05"
    assert error["long_message"] == "Too many requests, retry later"
    assert api.get("/v1/users/count").json()["total_count"] == 0  # nothing was committed
    assert api.post("/v1/users", body).status_code == 200  # the fault was used up
    assert api.control("GET", "/faults").json() == {"faults": []}


@pytest.mark.parametrize(
    ("status", "code"), [(500, "internal_clerk_error"), (502, "bad_gateway"), (503, "service_unavailable")]
)
def test_status_faults_answer_clerk_envelopes(api: StandinApi, status: int, code: str) -> None:
    api.fault(path="/v1/users", status=status)
    only_clerk_error(api.get("/v1/users"), status, code)
    only_clerk_error(api.get("/v1/users/count"), status, code)  # path is a prefix, no times = until cleared
    assert api.get("/v1/jwks").status_code == 200
    assert "Retry-After" not in api.get("/v1/users").headers


def test_default_429_has_retry_after_one_and_custom_code(api: StandinApi) -> None:
    api.fault(status=429, times=1)
    assert api.get("/v1/jwks").headers["Retry-After"] == "1"
    api.fault(
        status=422, code="form_password_not_strong_enough", message="Given password is not strong enough."
    )
    error = only_clerk_error(api.get("/v1/jwks"), 422, "form_password_not_strong_enough")
    assert error["message"] == "Given password is not strong enough."


def test_hang_fault_exceeds_the_client_read_timeout(api: StandinApi) -> None:
    api.fault(method="POST", path="/v1/users", action="hang", seconds=2, times=1)
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        api.post("/v1/users", {"email_address": ["hang@example.com"]}, timeout=(2, 0.3))
    assert time.monotonic() - started < 1.5
    assert api.get("/v1/users/count").json()["total_count"] == 0


def test_drop_fault_closes_the_connection_without_a_response(api: StandinApi) -> None:
    api.fault(method="GET", path="/v1/jwks", action="drop", times=1)
    with pytest.raises(requests.ConnectionError):
        api.get("/v1/jwks")
    assert api.get("/v1/jwks").status_code == 200


def test_garbage_fault_returns_a_non_json_200(api: StandinApi) -> None:
    api.fault(action="garbage", times=1)
    response = api.get("/v1/users")
    assert response.status_code == 200
    with pytest.raises(requests.JSONDecodeError):
        response.json()


@pytest.mark.parametrize("fault", [{"status": 500}, {"action": "drop"}, {"action": "hang", "seconds": 0.5}])
def test_after_commit_fault_creates_the_user_then_fails(api: StandinApi, fault: dict[str, Any]) -> None:
    api.fault(method="POST", path="/v1/users", times=1, after_commit=True, **fault)
    body = {
        "email_address": ["half@example.com"],
        "password": "a fine long passphrase",
        "external_id": "row-h",
    }
    with pytest.raises((requests.ConnectionError, requests.HTTPError, requests.ReadTimeout)):
        response = api.post("/v1/users", body, timeout=(2, 0.2))
        response.raise_for_status()
    found = api.get("/v1/users", params={"external_id": "row-h"}).json()
    assert [u["email_addresses"][0]["email_address"] for u in found] == ["half@example.com"]
    retry = api.post("/v1/users", body)  # a naive retry now collides with the committed user
    assert retry.status_code == 422
    errors = [(e["code"], e["meta"]["param_name"]) for e in retry.json()["errors"]]
    assert errors == [("form_identifier_exists", "email_address"), ("form_identifier_exists", "external_id")]


def test_garbage_fault_with_a_status_is_a_gateway_error_page(api: StandinApi) -> None:
    api.fault(method="POST", path="/v1/users", action="garbage", status=502, times=1)
    response = api.post("/v1/users", {"email_address": ["gw@example.com"]})
    assert response.status_code == 502
    with pytest.raises(requests.JSONDecodeError):
        response.json()  # no Clerk envelope: something in front of Clerk answered
    assert api.get("/v1/users/count").json()["total_count"] == 0


def test_a_delayed_create_is_stored_after_the_caller_gave_up(api: StandinApi) -> None:
    api.fault(method="POST", path="/v1/users", latency_ms=800, times=1)
    body = {"email_address": ["late@example.com"], "password": "a fine long passphrase", "external_id": "r"}
    with pytest.raises(requests.ReadTimeout):
        api.post("/v1/users", body, timeout=(2, 0.2))
    assert api.get("/v1/users/count").json()["total_count"] == 0  # not yet ...
    deadline = time.monotonic() + 10
    while api.get("/v1/users/count").json()["total_count"] == 0:  # ... but it lands, whatever the caller did
        assert time.monotonic() < deadline, "the delayed create never landed"
        time.sleep(0.05)
    [user] = api.get("/v1/users", params={"external_id": "r"}).json()
    assert user["email_addresses"][0]["email_address"] == "late@example.com"


def test_hold_fault_parks_requests_until_released(api: StandinApi) -> None:
    held = api.fault(method="DELETE", path="/v1/users/", action="hold", times=1)
    user = api.create_user("held@example.com")
    answers: list[requests.Response] = []
    worker = threading.Thread(target=lambda: answers.append(api.delete(f"/v1/users/{user['id']}")))
    worker.start()
    deadline = time.monotonic() + 10
    while api.control("GET", f"/faults/{held['id']}/held").json()["held"] < 1:
        assert time.monotonic() < deadline, "the DELETE was never held"
        time.sleep(0.02)
    assert api.get(f"/v1/users/{user['id']}").status_code == 200  # parked: nothing done yet
    assert answers == []
    assert api.control("POST", f"/faults/{held['id']}/release").status_code == 200
    worker.join(timeout=10)
    assert [answer.status_code for answer in answers] == [200]
    assert api.get(f"/v1/users/{user['id']}").status_code == 404  # then handled normally
    assert api.control("POST", "/faults/999/release").status_code == 404
    assert api.control("GET", "/faults/999/held").status_code == 404


def test_hold_fault_with_seconds_lets_go_by_itself(api: StandinApi) -> None:
    api.fault(method="GET", path="/v1/jwks", action="hold", seconds=0.3, times=1)
    assert api.get("/v1/jwks").status_code == 200


def test_verify_password_answers_like_clerk(api: StandinApi) -> None:
    user = api.create_user("pw@example.com", password="a fine long passphrase")
    path = f"/v1/users/{user['id']}/verify_password"
    right = api.post(path, {"password": "a fine long passphrase"})
    assert (right.status_code, right.json()) == (200, {"verified": True})
    only_clerk_error(api.post(path, {"password": "a fine long passphrasE"}), 422, "incorrect_password")
    only_clerk_error(api.post(path, {"password": "a", "extra": 1}), 422, "form_param_unknown")
    only_clerk_error(
        api.post("/v1/users/user_missing/verify_password", {"password": "x"}), 404, "resource_not_found"
    )
    passwordless = api.create_user("nopw@example.com", password=None)
    only_clerk_error(
        api.post(f"/v1/users/{passwordless['id']}/verify_password", {"password": "x"}),
        422,
        "incorrect_password",
    )


def test_faults_are_listed_counted_down_and_cleared(api: StandinApi) -> None:
    first = api.fault(method="get", path="/v1/jwks", status=503, times=2)
    second = api.fault(latency_ms=10)
    assert first["method"] == "GET" and first["times"] == 2
    api.get("/v1/jwks")
    listed = api.control("GET", "/faults").json()["faults"]
    assert [(f["id"], f["times"]) for f in listed] == [(first["id"], 1), (second["id"], None)]
    assert api.control("DELETE", f"/faults/{first['id']}").status_code == 200
    assert api.control("DELETE", f"/faults/{first['id']}").status_code == 404
    assert api.get("/v1/jwks").status_code == 200
    assert api.control("DELETE", "/faults").json() == {"cleared": 1}


@pytest.mark.parametrize(
    "fault",
    [
        {},
        {"status": 200},
        {"action": "explode"},
        {"action": "hang"},
        {"after_commit": True, "latency_ms": 5},
        {"times": 0, "status": 500},
        {"status": 500, "colour": "red"},
    ],
)
def test_invalid_fault_specs_are_rejected(api: StandinApi, fault: dict[str, Any]) -> None:
    response = api.control("POST", "/faults", fault)
    assert response.status_code == 400 and response.json()["error"]
    assert api.control("GET", "/faults").json() == {"faults": []}


# --------------------------------------------------------------------------- connections, stats


def test_keep_alive_two_requests_share_one_connection(api: StandinApi) -> None:
    with requests.Session() as session:
        session.headers.update(api.headers)
        first = session.get(api.base + "/v1/jwks", timeout=TIMEOUT)
        second = session.post(
            api.base + "/v1/users", json={"email_address": ["ka@example.com"]}, timeout=TIMEOUT
        )
    assert first.status_code == 200 and second.status_code == 200
    assert first.headers.get("Connection", "").lower() != "close"
    stats = api.stats()
    assert stats["connections"] == 1
    assert stats["requests"] == {"GET /v1/jwks": 1, "POST /v1/users": 1}
    assert stats["requests_total"] == 2
    assert stats["connections_accepted"] >= 2  # the session's, and this stats call's


def test_connection_close_requests_open_one_connection_each(api: StandinApi) -> None:
    with requests.Session() as session:
        session.headers.update({**api.headers, "Connection": "close"})
        for _ in range(3):
            assert session.get(api.base + "/v1/jwks", timeout=TIMEOUT).status_code == 200
    assert api.stats()["connections"] == 3


def test_keep_alive_survives_unread_bodies_and_faults(api: StandinApi) -> None:
    """A request whose body the stand-in never reads (bad key, injected status) must not
    corrupt the next request on the same connection."""
    api.fault(method="POST", path="/v1/sessions", status=503, times=1)
    with requests.Session() as session:
        bad_key = session.post(
            api.base + "/v1/users",
            json={"email_address": ["x" * 5000 + "@example.com"]},
            headers={"Authorization": "Bearer wrong"},
            timeout=TIMEOUT,
        )
        faulted = session.post(
            api.base + "/v1/sessions", json={"user_id": "y" * 5000}, headers=api.headers, timeout=TIMEOUT
        )
        fine = session.get(api.base + "/v1/users/count", headers=api.headers, timeout=TIMEOUT)
    assert (bad_key.status_code, faulted.status_code, fine.status_code) == (401, 503, 200)
    assert fine.json() == {"object": "total_count", "total_count": 0}
    assert api.stats()["connections"] == 1


def test_stats_count_requests_per_route_including_unmatched(api: StandinApi) -> None:
    user = api.create_user("st@example.com")
    api.get(f"/v1/users/{user['id']}")
    api.get("/v1/users/user_other")
    api.get("/v1/nope")
    stats = api.stats()
    assert stats["requests"] == {
        "GET /v1/users/<user_id>": 2,
        "POST /v1/users": 1,
        "GET <unmatched>": 1,
    }
    assert api.control("POST", "/reset").status_code == 200
    assert api.stats()["requests"] == {}
    assert api.get("/v1/users/count").json()["total_count"] == 0


# --------------------------------------------------------------------------- CLI, Clerk's SDK


def test_cli_serves_with_defaults_and_logs_no_bodies(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key_file = tmp_path / "k.pem"
    command = [sys.executable, "-m", "clerk_standin", "--port", str(port), "--key-file", str(key_file)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(base + "/__standin/health", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "stand-in CLI did not start"
                time.sleep(0.05)
        headers = {"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"}
        body = {"email_address": ["cli@example.com"], "password": "Cli-Secret-Words-99"}
        assert (
            requests.post(base + "/v1/users", json=body, headers=headers, timeout=TIMEOUT).status_code == 200
        )
        kid = requests.get(base + "/v1/jwks", headers=headers, timeout=TIMEOUT).json()["keys"][0]["kid"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert key_file.exists()
    assert kid == ClerkStandin(key_file=key_file).signing_key.kid
    assert "POST /v1/users" in stderr and kid in stderr
    assert "Cli-Secret-Words-99" not in stderr and "cli@example.com" not in stderr


# The SDK reads its own deprecated query fields when building GET /v1/users (pydantic warns).
@pytest.mark.filterwarnings("ignore:.*DEPRECATED.*:DeprecationWarning")
def test_clerk_python_sdk_works_unchanged(standin: StandinServer, api: StandinApi) -> None:
    from clerk_backend_api import Clerk, models
    from clerk_backend_api.security import verify_token
    from clerk_backend_api.security.types import VerifyTokenOptions

    with Clerk(bearer_auth=standin.secret_key, server_url=standin.api_url) as clerk:
        user = clerk.users.create(
            email_address=["sdk@example.com"],
            password="sdk long passphrase",
            external_id=None,
            public_metadata={"role": "restaurant"},
        )
        assert user.id.startswith("user_") and user.email_addresses[0].email_address == "sdk@example.com"
        assert clerk.users.get(user_id=user.id).public_metadata == {"role": "restaurant"}
        listed = clerk.users.list(request={"email_address": ["SDK@example.com"]})
        assert [u.id for u in listed] == [user.id]
        assert clerk.users.count(request={}).total_count == 1

        with pytest.raises(models.ClerkErrors) as taken:
            clerk.users.create(email_address=["sdk@example.com"], password="sdk long passphrase")
        assert taken.value.data.errors[0].code == "form_identifier_exists"
        with pytest.raises(models.ClerkErrors) as pwned:
            clerk.users.create(email_address=["sdk2@example.com"], password="password123")
        assert pwned.value.data.errors[0].code == "form_password_pwned"

        session = clerk.sessions.create(request={"user_id": user.id})
        token = clerk.sessions.create_token(session_id=session.id).jwt
        assert token is not None

        remote = verify_token(
            token, VerifyTokenOptions(secret_key=standin.secret_key, api_url=standin.base_url)
        )
        assert remote["sub"] == user.id and remote["sid"] == session.id
        pem = api.control("GET", "/public-key.pem").text
        local = verify_token(token, VerifyTokenOptions(jwt_key=pem, authorized_parties=[DEFAULT_AZP]))
        assert local["sub"] == user.id

        deleted = clerk.users.delete(user_id=user.id)
        assert deleted.deleted is True and deleted.id == user.id
        with pytest.raises(models.ClerkErrors):
            clerk.users.get(user_id=user.id)


def test_clerk_python_sdk_reads_and_marks_email_verification(standin: StandinServer, api: StandinApi) -> None:
    from clerk_backend_api import Clerk, models

    user = api.create_user("sdk-verify@example.com")
    address_id = user["primary_email_address_id"]
    with Clerk(bearer_auth=standin.secret_key, server_url=standin.api_url) as clerk:
        marked = clerk.email_addresses.update(email_address_id=address_id, verified=False)
        assert isinstance(marked, models.EmailAddress) and marked.id == address_id
        assert isinstance(marked.verification, models.Otp)
        assert marked.verification.status == models.VerificationStatus.UNVERIFIED

        fetched = clerk.email_addresses.get(email_address_id=address_id)
        assert fetched.verification is not None and fetched.verification.status == "unverified"
        [listed] = clerk.users.get(user_id=user["id"]).email_addresses
        assert listed.id == address_id and listed.verification is not None
        assert listed.verification.status == "unverified"

        verified = clerk.email_addresses.update(email_address_id=address_id, verified=True, primary=True)
        assert isinstance(verified.verification, models.Admin)
        assert verified.verification.status == models.VerificationAdminVerificationStatus.VERIFIED
        assert clerk.users.get(user_id=user["id"]).email_addresses[0].verification == verified.verification

        with pytest.raises(models.ClerkErrors) as missing:
            clerk.email_addresses.get(email_address_id="idn_missing")
        assert missing.value.data.errors[0].code == "resource_not_found"
        with pytest.raises(models.ClerkErrors) as missing_update:
            clerk.email_addresses.update(email_address_id="idn_missing", verified=False)
        assert missing_update.value.data.errors[0].code == "resource_not_found"
