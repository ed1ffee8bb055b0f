"""The OpenAPI document (iris/openapi.json) held against the app, and the /docs page.

- The document is valid OpenAPI 3.1, documents every API route the app has (and nothing it lacks), and each
  operation lists exactly the statuses ``EXPECTED_STATUSES`` gives it, with the headers it promises.
- Real responses, driven end to end (Clerk stand-in over HTTP, real PostgreSQL, real failures), conform to
  it: every status is documented for its operation, the body matches that status's schema (formats
  included), and every documented header is present and matches its schema.
- Schemathesis generates requests for every operation against the live app on a threaded server and finds
  no 5xx, no undocumented status, and no body, header or content type that contradicts the document.
- /docs renders Swagger UI from this app only: no external URL, no inline script, and (in Chromium) no
  Content-Security-Policy violation under the policy the app sends.
"""

from __future__ import annotations

import base64
import html.parser
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import pytest
import requests
import schemathesis
import sqlalchemy as sa
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from werkzeug.serving import make_server

from clerk_standin import DEFAULT_AZP, DEFAULT_ISSUER
from iris.docs import ASSETS, OPENAPI_PATH, openapi_document
from iris.extensions import db
from tests.helpers import (
    BAPI_HEADERS,
    FAILING_SOFT_DELETE,
    FAILING_TRIGGER,
    PASSWORD,
    USER_JSON_FIELDS,
    WEBHOOK_SECRET,
    migrate,
    register,
    session_token,
    svix_headers,
)

DOCUMENT = openapi_document()
DOCUMENT_URI = "urn:iris:openapi"
REGISTRY = Registry().with_resource(DOCUMENT_URI, Resource(contents=DOCUMENT, specification=DRAFT202012))

# Tokens outlive the whole schemathesis run (the stand-in's default is Clerk's 60 seconds).
TOKEN_SECONDS = 600
REGISTER = ("post", "/api/v1/auth/register")
VERIFICATION_EMAIL = ("post", "/api/v1/auth/verification-email")
ME = ("get", "/api/v1/users/me")
USER = ("get", "/api/v1/users/{user_id}")
DELETE_ME = ("delete", "/api/v1/users/me")
LIST = ("get", "/api/v1/users")
DEACTIVATE = ("post", "/api/v1/users/{user_id}/deactivate")
REACTIVATE = ("post", "/api/v1/users/{user_id}/reactivate")
WEBHOOK = ("post", "/api/v1/webhooks/clerk")
OPENAPI = ("get", "/api/v1/openapi.json")
HEALTHZ = ("get", "/healthz")
READYZ = ("get", "/readyz")

# The statuses each operation can answer with, operation by operation: exactly these are documented.
EXPECTED_STATUSES = MappingProxyType(
    {
        REGISTER: frozenset({201, 400, 409, 413, 415, 422, 429, 500, 502, 503}),
        VERIFICATION_EMAIL: frozenset({202, 400, 413, 415, 422, 429, 500, 503}),
        ME: frozenset({200, 401, 403, 404, 429, 500, 502, 503}),
        USER: frozenset({200, 401, 403, 404, 429, 500, 502, 503}),
        DELETE_ME: frozenset({204, 401, 403, 404, 429, 500, 502, 503}),
        LIST: frozenset({200, 401, 403, 404, 422, 429, 500, 502, 503}),
        DEACTIVATE: frozenset({200, 401, 403, 404, 409, 429, 500, 502, 503}),
        REACTIVATE: frozenset({200, 401, 403, 404, 409, 429, 500, 502, 503}),
        WEBHOOK: frozenset({200, 400, 404, 413, 500, 503}),
        OPENAPI: frozenset({200, 429, 500}),
        HEALTHZ: frozenset({200, 500}),
        READYZ: frozenset({200, 500, 503}),
    }
)
# Headers each status must promise (as required), whatever the operation.
REQUIRED_HEADERS = MappingProxyType(
    {
        201: frozenset({"Location"}),
        401: frozenset({"WWW-Authenticate"}),
        429: frozenset({"Retry-After"}),
        503: frozenset({"Retry-After"}),
    }
)
DATABASE_DOWN = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"


# ----------------------------------------------------------------------------- helpers


def pointer_escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def resolve(pointer: str) -> tuple[str, Any]:
    """The object at JSON pointer ``pointer`` of the document, following ``$ref`` chains; with its own
    pointer, so schemas found there can be validated in place (their ``$ref`` then resolve)."""
    while True:
        node: Any = DOCUMENT
        for token in pointer.lstrip("/").split("/"):
            node = node[token.replace("~1", "/").replace("~0", "~")]
        if isinstance(node, dict) and "$ref" in node:
            pointer = node["$ref"].removeprefix("#")
            continue
        return pointer, node


def validate_against(pointer: str, instance: Any) -> None:
    """Validate ``instance`` against the schema at ``pointer`` (formats checked); raise on any error."""
    validator = Draft202012Validator(
        {"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=REGISTRY, format_checker=FormatChecker()
    )
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(instance)
    ]
    assert not errors, f"{instance!r} does not match {pointer}: {errors}"


def assert_conforms(response, operation: tuple[str, str], status: int) -> None:
    """``response`` has ``status``, which ``operation`` documents; its body matches that response's schema;
    every documented header it must carry is there, and every documented header it carries matches."""
    method, path = operation
    assert response.status_code == status, response.get_data(as_text=True)
    responses = f"/paths/{pointer_escape(path)}/{method}/responses"
    assert str(status) in resolve(responses)[1], f"{status} is not documented for {method.upper()} {path}"
    pointer, definition = resolve(f"{responses}/{status}")
    for name in definition.get("headers", {}):
        header_pointer, header = resolve(f"{pointer}/headers/{pointer_escape(name)}")
        value = response.headers.get(name)
        if value is None:
            assert not header.get("required"), f"documented header {name} missing from {status}"
            continue
        validate_against(f"{header_pointer}/schema", value)
    if status == 204:
        assert "content" not in definition and response.data == b""
        return
    [media_type] = definition["content"]
    assert response.mimetype == media_type
    validate_against(f"{pointer}/content/{pointer_escape(media_type)}/schema", response.json)
    if status >= 400:
        assert response.json["error"]["request_id"] == response.headers["X-Request-ID"]


def clerk_call(standin, method: str, path: str, **kwargs) -> Any:
    """Call the stand-in's Backend API with the secret key, as a Clerk client would."""
    response = requests.request(
        method,
        standin.api_url + path,
        headers=BAPI_HEADERS,
        timeout=5,
        **kwargs,
    )
    response.raise_for_status()
    return response.json()


def signed_in(client, standin, email: str = "owner@bistro.example") -> tuple[dict[str, Any], dict[str, str]]:
    """A registered account and the Authorization header of a session token for it."""
    user = register(client, email)
    return user, {"Authorization": f"Bearer {session_token(standin, user['clerk_user_id'], TOKEN_SECONDS)}"}


def execute(app: Flask, statement: str, **params: Any) -> None:
    with app.app_context():
        db.session.execute(sa.text(statement), params)
        db.session.commit()


def url(operation: tuple[str, str], user_id: str | None = None) -> str:
    """The operation's path, ``{user_id}`` filled in with ``user_id`` or a fresh random UUID."""
    return operation[1].replace("{user_id}", user_id or str(uuid.uuid4()))


def operation_id(operation: tuple[str, str]) -> str:
    return f"{operation[0].upper()} {operation[1]}"


# ----------------------------------------------------------------------------- the document


def test_the_document_is_valid_openapi_3_1():
    assert DOCUMENT["openapi"].startswith("3.1.")
    validate(DOCUMENT, cls=OpenAPIV31SpecValidator)


def test_the_document_is_served_as_written(client):
    response = client.get(OPENAPI[1])
    assert_conforms(response, OPENAPI, 200)
    assert response.data == OPENAPI_PATH.read_bytes()


def test_every_api_route_is_documented_and_every_documented_operation_exists(app):
    """Routes under /api/ plus /healthz and /readyz, against the document's operations, both ways. A route
    that the document promises but the app lacks fails here (it is never skipped)."""
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/") or rule.rule in ("/healthz", "/readyz"):
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
            routes |= {(method.lower(), path) for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {
        (method, path)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routes == documented
    assert documented == set(EXPECTED_STATUSES)


@pytest.mark.parametrize("operation", sorted(EXPECTED_STATUSES), ids=operation_id)
def test_each_operation_documents_its_statuses_and_their_headers(operation):
    method, path = operation
    responses = DOCUMENT["paths"][path][method]["responses"]
    assert {int(status) for status in responses} == EXPECTED_STATUSES[operation]
    for status in responses:
        pointer, definition = resolve(f"/paths/{pointer_escape(path)}/{method}/responses/{status}")
        headers = {name: resolve(f"{pointer}/headers/{name}")[1] for name in definition.get("headers", {})}
        required = {name for name, header in headers.items() if header.get("required")}
        promised = {"X-Request-ID"} | REQUIRED_HEADERS.get(int(status), frozenset())
        assert promised <= required, (operation, status)
        assert list(definition.get("content", {})) == ([] if status == "204" else ["application/json"])


def test_the_documented_schemas_say_what_design_md_says():
    schemas = DOCUMENT["components"]["schemas"]
    register_request = schemas["RegisterRequest"]
    assert register_request["additionalProperties"] is False
    assert register_request["required"] == ["email", "password"]
    assert register_request["properties"]["role"]["enum"] == ["restaurant"]
    user = schemas["User"]
    assert set(user["required"]) == USER_JSON_FIELDS
    assert user["properties"]["email_verified"]["type"] == "boolean"
    assert user["properties"]["role"]["enum"] == ["restaurant", "admin"]
    assert user["properties"]["id"]["format"] == "uuid"
    validate_against("/components/schemas/Timestamp", "2026-11-26T12:01:32.123456+01:00")
    validate_against("/components/schemas/Timestamp", "2026-07-01T12:01:32+02:00")
    with pytest.raises(AssertionError):  # an offset is required, not Z and not none
        validate_against("/components/schemas/Timestamp", "2026-11-26T11:01:32Z")
    security = DOCUMENT["components"]["securitySchemes"]
    bearer = security["bearerAuth"]
    assert (bearer["type"], bearer["scheme"], bearer["bearerFormat"]) == ("http", "bearer", "JWT")
    assert (security["sessionCookie"]["in"], security["sessionCookie"]["name"]) == ("cookie", "__session")


# ----------------------------------------------------------------------------- real responses
# POST /api/v1/auth/register


def post_register(client, email: str = "a@b.example", password: str = PASSWORD):
    return client.post(REGISTER[1], json={"email": email, "password": password})


def test_register_201(client):
    assert_conforms(post_register(client), REGISTER, 201)


@pytest.mark.parametrize("body", ['{"email": ', "[]"])
def test_register_400(client, body):
    assert_conforms(client.post(REGISTER[1], data=body, content_type="application/json"), REGISTER, 400)


def test_register_409_taken_and_in_progress(app, client):
    register(client, "a@b.example")
    assert_conforms(post_register(client, "a@b.example"), REGISTER, 409)
    pending = (
        "INSERT INTO users (id, email, role, pending_until)"
        " VALUES (:id, 'c@d.example', 'restaurant', now() + interval '1 minute')"
    )
    execute(app, pending, id=uuid.uuid4())
    response = post_register(client, "c@d.example")
    assert_conforms(response, REGISTER, 409)
    assert "Retry-After" in response.headers


def test_register_413(client):
    assert_conforms(post_register(client, password="x" * 70_000), REGISTER, 413)


def test_register_415(client):
    assert_conforms(client.post(REGISTER[1], data='{"email": "a@b.example"}'), REGISTER, 415)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"email": "not-an-email", "password": PASSWORD, "role": "admin", "is_admin": True},
        {"email": "a@b.example", "password": "short"},  # refused by Clerk's password rules
    ],
)
def test_register_422(client, body):
    assert_conforms(client.post(REGISTER[1], json=body), REGISTER, 422)


def test_register_429_when_clerk_rate_limits(client, standin):
    standin.control.add_fault(method="POST", path="/v1/users", status=429, retry_after=17, times=1)
    response = post_register(client)
    assert_conforms(response, REGISTER, 429)
    assert response.headers["Retry-After"] == "17"


def test_register_429_from_our_own_rate_limit(make_app):
    app = make_app(RATELIMIT_ENABLED=True, RATELIMIT_REGISTER="1 per minute")
    migrate(app)
    client = app.test_client()
    register(client, "a@b.example")
    assert_conforms(post_register(client, "c@d.example"), REGISTER, 429)


def test_register_500(app, client):
    execute(app, FAILING_TRIGGER)
    assert_conforms(post_register(client, "fails@b.example"), REGISTER, 500)


def test_register_502(client, standin):
    standin.control.add_fault(method="POST", path="/v1/users", action="garbage", times=1)
    assert_conforms(post_register(client), REGISTER, 502)


@pytest.mark.parametrize("fault", [{"status": 503}, {"action": "hang", "seconds": 3}], ids=["5xx", "timeout"])
def test_register_503_when_clerk_fails(client, standin, fault):
    standin.control.add_fault(method="POST", path="/v1/users", times=1, **fault)
    assert_conforms(post_register(client), REGISTER, 503)


def test_register_503_when_the_database_is_down(make_app):
    client = make_app(SQLALCHEMY_DATABASE_URI=DATABASE_DOWN).test_client()
    assert_conforms(post_register(client), REGISTER, 503)


# POST /api/v1/auth/verification-email


def test_verification_email_202_and_422(client):
    response = client.post(VERIFICATION_EMAIL[1], json={"email": "nobody@b.example"})
    assert_conforms(response, VERIFICATION_EMAIL, 202)
    assert_conforms(client.post(VERIFICATION_EMAIL[1], json={}), VERIFICATION_EMAIL, 422)
    # Not an address any account can have (PostgreSQL refuses a NUL in text): the same 202, no 500.
    odd = client.post(VERIFICATION_EMAIL[1], json={"email": "a\u0000@b.example"})
    assert_conforms(odd, VERIFICATION_EMAIL, 202)


# GET /api/v1/users/me and /api/v1/users/{user_id}


@pytest.mark.parametrize("credential", ["bearer", "cookie"])
def test_me_200(client, standin, credential):
    user, headers = signed_in(client, standin)
    if credential == "cookie":
        client.set_cookie("__session", headers.pop("Authorization").removeprefix("Bearer "))
    response = client.get(ME[1], headers=headers)
    assert_conforms(response, ME, 200)
    assert response.json == user


@pytest.mark.parametrize("operation", [ME, USER], ids=operation_id)
@pytest.mark.parametrize("authorization", [None, "Bearer not.a.token", "Bearer " + "a" * 20])
def test_401(client, operation, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = client.get(url(operation), headers=headers)
    assert_conforms(response, operation, 401)
    expected = 'Bearer error="invalid_token"' if authorization else "Bearer"
    assert response.headers["WWW-Authenticate"] == expected


@pytest.mark.parametrize("operation", [ME, USER], ids=operation_id)
def test_403_for_a_deleted_account(app, client, standin, operation):
    user, headers = signed_in(client, standin)
    execute(app, "UPDATE users SET deleted_at = now()")
    assert_conforms(client.get(url(operation, user["id"]), headers=headers), operation, 403)


@pytest.mark.parametrize("operation", [ME, USER], ids=operation_id)
def test_404_user_not_found_for_a_clerk_user_without_an_account(client, standin, operation):
    clerk_user = clerk_call(
        standin, "POST", "/users", json={"email_address": ["x@y.example"], "password": PASSWORD}
    )
    headers = {"Authorization": f"Bearer {session_token(standin, clerk_user['id'], TOKEN_SECONDS)}"}
    response = client.get(url(operation), headers=headers)
    assert_conforms(response, operation, 404)
    assert response.json["error"]["code"] == "user_not_found"


@pytest.mark.parametrize("operation", [ME, USER, OPENAPI], ids=operation_id)
def test_429_from_the_default_rate_limit(make_app, operation):
    app = make_app(RATELIMIT_ENABLED=True, RATELIMIT_DEFAULT="2 per minute")
    client = app.test_client()
    path = url(operation)
    assert [client.get(path).status_code for _ in range(2)] in ([200, 200], [401, 401])
    assert_conforms(client.get(path), operation, 429)


@pytest.mark.parametrize("operation", [ME, USER], ids=operation_id)
def test_500(app, client, standin, operation):
    user, headers = signed_in(client, standin)
    execute(app, "ALTER TABLE users RENAME TO users_gone")
    response = client.get(url(operation, user["id"]), headers=headers)
    assert_conforms(response, operation, 500)


@pytest.mark.parametrize("operation", [ME, USER], ids=operation_id)
def test_502_when_clerks_keys_are_unreadable(client, standin, operation):
    user, headers = signed_in(client, standin)
    standin.control.add_fault(method="GET", path="/v1/jwks", action="garbage", times=1)
    response = client.get(url(operation, user["id"]), headers=headers)
    assert_conforms(response, operation, 502)


@pytest.mark.parametrize("operation", [ME, USER], ids=operation_id)
def test_503_when_clerks_keys_are_unreachable(client, standin, operation):
    user, headers = signed_in(client, standin)
    standin.control.add_fault(method="GET", path="/v1/jwks", status=503, times=1)
    response = client.get(url(operation, user["id"]), headers=headers)
    assert_conforms(response, operation, 503)
    assert response.json["error"]["code"] == "auth_provider_unavailable"


@pytest.mark.parametrize("operation", [ME, USER], ids=operation_id)
def test_503_when_the_database_is_down(client, standin, make_app, operation):
    user, headers = signed_in(client, standin)
    down = make_app(SQLALCHEMY_DATABASE_URI=DATABASE_DOWN).test_client()
    response = down.get(url(operation, user["id"]), headers=headers)
    assert_conforms(response, operation, 503)
    assert response.json["error"]["code"] == "database_unavailable"


def test_user_200_for_yourself_and_for_an_admin(app, client, standin):
    owner, owner_headers = signed_in(client, standin, "owner@bistro.example")
    admin, admin_headers = signed_in(client, standin, "admin@iris.example")
    execute(app, "UPDATE users SET role = 'admin', email_verified_at = now() WHERE id = :id", id=admin["id"])
    response = client.get(url(USER, owner["id"]), headers=owner_headers)
    assert_conforms(response, USER, 200)
    assert response.json == owner
    response = client.get(url(USER, owner["id"]), headers=admin_headers)
    assert_conforms(response, USER, 200)
    assert response.json == owner


def test_user_404_not_found(client, standin):
    _, owner_headers = signed_in(client, standin, "owner@bistro.example")
    other, _ = signed_in(client, standin, "other@bistro.example")
    for path in (url(USER, other["id"]), url(USER), url(USER, "not-a-uuid")):
        response = client.get(path, headers=owner_headers)
        assert_conforms(response, USER, 404)
        assert response.json["error"]["code"] == "not_found"


# DELETE /api/v1/users/me, and the admin operations


def test_delete_me_204_then_403(client, standin):
    _, headers = signed_in(client, standin)
    assert_conforms(client.delete(DELETE_ME[1], headers=headers), DELETE_ME, 204)
    assert_conforms(client.delete(DELETE_ME[1], headers=headers), DELETE_ME, 403)


def test_delete_me_401_404_and_500(app, client, standin):
    assert_conforms(client.delete(DELETE_ME[1]), DELETE_ME, 401)
    outsider = clerk_call(
        standin, "POST", "/users", json={"email_address": ["x@y.example"], "password": PASSWORD}
    )
    headers = {"Authorization": f"Bearer {session_token(standin, outsider['id'], TOKEN_SECONDS)}"}
    assert_conforms(client.delete(DELETE_ME[1], headers=headers), DELETE_ME, 404)
    _, headers = signed_in(client, standin)
    execute(app, "ALTER TABLE users RENAME TO users_gone")
    assert_conforms(client.delete(DELETE_ME[1], headers=headers), DELETE_ME, 500)


@pytest.mark.parametrize(
    ("fault", "status"),
    [({"status": 503}, 503), ({"action": "garbage"}, 502), ({"status": 429, "retry_after": 7}, 429)],
    ids=["503", "502", "429"],
)
def test_delete_me_when_clerk_fails(client, standin, fault, status):
    _, headers = signed_in(client, standin)
    standin.control.add_fault(method="DELETE", path="/v1/users/", times=1, **fault)
    assert_conforms(client.delete(DELETE_ME[1], headers=headers), DELETE_ME, status)


def test_delete_me_503_when_the_database_fails_after_clerk(app, client, standin):
    _, headers = signed_in(client, standin, "fails@b.example")
    execute(app, FAILING_SOFT_DELETE)
    response = client.delete(DELETE_ME[1], headers=headers)
    assert_conforms(response, DELETE_ME, 503)
    assert response.json["error"]["code"] == "database_unavailable"


def signed_token(standin, clerk_user_id: str, **claims: Any) -> dict[str, str]:
    """The Authorization header of a token the stand-in signs with Clerk's v2 claims for ``clerk_user_id``,
    ``claims`` added (``fva``, ``act``)."""
    now = int(time.time())
    body = {
        "azp": DEFAULT_AZP,
        "exp": now + TOKEN_SECONDS,
        "iat": now,
        "iss": DEFAULT_ISSUER,
        "nbf": now - 10,
        "sid": "sess_" + uuid.uuid4().hex,
        "sts": "active",
        "sub": clerk_user_id,
        "v": 2,
        **claims,
    }
    return {"Authorization": f"Bearer {standin.control.sign(body)}"}


def test_delete_me_403_reverification_impersonation_and_csrf(client, standin):
    user, _ = signed_in(client, standin)
    stale = signed_token(standin, user["clerk_user_id"], fva=[10080, -1])
    response = client.delete(DELETE_ME[1], headers=stale)
    assert_conforms(response, DELETE_ME, 403)
    assert response.json["error"]["code"] == "reverification_required" and "clerk_error" in response.json
    act = signed_token(standin, user["clerk_user_id"], fva=[0, -1], act={"sub": "user_support"})
    response = client.delete(DELETE_ME[1], headers=act)
    assert_conforms(response, DELETE_ME, 403)
    assert response.json["error"]["code"] == "forbidden"
    client.set_cookie("__session", session_token(standin, user["clerk_user_id"], TOKEN_SECONDS))
    response = client.delete(DELETE_ME[1], headers={"Origin": "https://evil.example"})
    assert_conforms(response, DELETE_ME, 403)
    assert response.json["error"]["code"] == "csrf_failed"


@pytest.mark.parametrize("operation", [DEACTIVATE, REACTIVATE], ids=operation_id)
def test_admin_writes_403_reverification_unconfirmed_and_csrf(app, client, standin, operation):
    admin_headers, owner, _ = admin_and_owner(app, client, standin)
    admin = client.get(ME[1], headers=admin_headers).json
    stale = signed_token(standin, admin["clerk_user_id"])  # no fva at all
    response = client.post(url(operation, owner["id"]), headers=stale)
    assert_conforms(response, operation, 403)
    assert response.json["error"]["code"] == "reverification_required"
    client.set_cookie("__session", session_token(standin, admin["clerk_user_id"], TOKEN_SECONDS))
    response = client.post(url(operation, owner["id"]), data={"x": "1"}, headers={"Origin": "null"})
    assert_conforms(response, operation, 403)
    assert response.json["error"]["code"] == "csrf_failed"
    execute(app, "UPDATE users SET email_verified_at = NULL WHERE id = :id", id=admin["id"])
    response = client.post(url(operation, owner["id"]), headers=admin_headers)
    assert_conforms(response, operation, 403)
    assert response.json["error"]["code"] == "email_unverified"


def admin_and_owner(app, client, standin) -> tuple[dict[str, str], dict[str, Any], dict[str, str]]:
    """An admin's Authorization header, and a restaurant owner with theirs."""
    admin, admin_headers = signed_in(client, standin, "admin@iris.example")
    execute(app, "UPDATE users SET role = 'admin', email_verified_at = now() WHERE id = :id", id=admin["id"])
    owner, owner_headers = signed_in(client, standin, "owner@bistro.example")
    return admin_headers, owner, owner_headers


def test_list_200_404_and_422(app, client, standin):
    admin_headers, _, owner_headers = admin_and_owner(app, client, standin)
    first = client.get(LIST[1], headers=admin_headers, query_string={"limit": 1})
    assert_conforms(first, LIST, 200)
    assert len(first.json["users"]) == 1 and first.json["next_cursor"]
    last = client.get(LIST[1], headers=admin_headers, query_string={"cursor": first.json["next_cursor"]})
    assert_conforms(last, LIST, 200)
    assert last.json["next_cursor"] is None
    deleted = client.get(LIST[1], headers=admin_headers, query_string={"include_deleted": "true", "q": "x"})
    assert_conforms(deleted, LIST, 200)
    assert_conforms(client.get(LIST[1], headers=owner_headers), LIST, 404)
    assert_conforms(client.get(LIST[1] + "?limit=500&cursor=nope&x=1", headers=admin_headers), LIST, 422)
    assert_conforms(client.get(LIST[1]), LIST, 401)


def test_list_502_when_clerks_keys_are_unreadable(app, client, standin):
    admin_headers, _, _ = admin_and_owner(app, client, standin)
    standin.control.add_fault(method="GET", path="/v1/jwks", action="garbage", times=1)
    assert_conforms(client.get(LIST[1], headers=admin_headers), LIST, 502)


def test_list_403_500_and_503(app, client, standin, make_app):
    admin_headers, _, _ = admin_and_owner(app, client, standin)
    down = make_app(SQLALCHEMY_DATABASE_URI=DATABASE_DOWN).test_client()
    assert_conforms(down.get(LIST[1], headers=admin_headers), LIST, 503)
    execute(app, "UPDATE users SET deleted_at = now() WHERE role = 'admin'")
    assert_conforms(client.get(LIST[1], headers=admin_headers), LIST, 403)
    execute(app, "ALTER TABLE users RENAME TO users_gone")
    assert_conforms(client.get(LIST[1], headers=admin_headers), LIST, 500)


def test_deactivate_and_reactivate_200_404_and_409(app, client, standin):
    admin_headers, owner, owner_headers = admin_and_owner(app, client, standin)
    deactivate, reactivate = url(DEACTIVATE, owner["id"]), url(REACTIVATE, owner["id"])
    assert_conforms(client.post(url(DEACTIVATE), headers=admin_headers), DEACTIVATE, 404)
    assert_conforms(client.post(url(REACTIVATE, "not-a-uuid"), headers=admin_headers), REACTIVATE, 404)
    assert_conforms(client.post(deactivate, headers=owner_headers), DEACTIVATE, 404)
    response = client.post(deactivate, headers=admin_headers)
    assert_conforms(response, DEACTIVATE, 200)
    assert response.json["deleted_at"] is not None
    response = client.post(reactivate, headers=admin_headers)
    assert_conforms(response, REACTIVATE, 200)
    assert response.json["deleted_at"] is None
    admin_id = client.get(ME[1], headers=admin_headers).json["id"]
    response = client.post(url(DEACTIVATE, admin_id), headers=admin_headers)
    assert_conforms(response, DEACTIVATE, 409)
    assert response.json["error"]["code"] == "cannot_deactivate_self"
    client.post(deactivate, headers=admin_headers)
    clerk_call(standin, "DELETE", f"/users/{owner['clerk_user_id']}")
    response = client.post(reactivate, headers=admin_headers)
    assert_conforms(response, REACTIVATE, 409)
    assert response.json["error"]["code"] == "clerk_user_deleted"
    assert_conforms(client.post(reactivate), REACTIVATE, 401)


def test_deactivate_and_reactivate_503_and_409_email_taken(app, client, standin):
    admin_headers, owner, _ = admin_and_owner(app, client, standin)
    deactivate, reactivate = url(DEACTIVATE, owner["id"]), url(REACTIVATE, owner["id"])
    path = f"/v1/users/{owner['clerk_user_id']}"
    standin.control.add_fault(method="POST", path=f"{path}/ban", status=503, times=1)
    assert_conforms(client.post(deactivate, headers=admin_headers), DEACTIVATE, 503)
    assert_conforms(client.post(deactivate, headers=admin_headers), DEACTIVATE, 200)
    standin.control.add_fault(method="POST", path=f"{path}/unban", status=503, times=1)
    assert_conforms(client.post(reactivate, headers=admin_headers), REACTIVATE, 503)
    execute(
        app,
        "INSERT INTO users (id, email, role, pending_until) VALUES (:id, :email, 'restaurant', now())",
        id=uuid.uuid4(),
        email=owner["email"],
    )
    response = client.post(reactivate, headers=admin_headers)
    assert_conforms(response, REACTIVATE, 409)
    assert response.json["error"]["code"] == "email_taken"


# /healthz, /readyz


def test_healthz_200(client):
    assert_conforms(client.get(HEALTHZ[1]), HEALTHZ, 200)


def test_readyz_200_and_503(client, make_app):
    assert_conforms(client.get(READYZ[1]), READYZ, 200)
    down = make_app(SQLALCHEMY_DATABASE_URI=DATABASE_DOWN).test_client()
    assert_conforms(down.get(READYZ[1]), READYZ, 503)


# ----------------------------------------------------------------------------- schemathesis


@pytest.fixture
def live_url(app: Flask) -> Iterator[str]:
    """The app (migrated schema, Clerk stand-in) on a real threaded HTTP server."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


CHECKS = (
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    response_headers_conformance,
    content_type_conformance,
)
MAX_EXAMPLES = 40


@pytest.mark.slow  # several seconds: hundreds of generated requests
def test_schemathesis_finds_nothing_against_the_live_app(app, live_url, standin):
    """Every operation of the document the app serves, with schema-conforming (positive) and violating
    (negative) requests; on the users endpoints, with generated credentials and with real session tokens
    for a restaurant owner and an admin (DELETE /users/me with a third account's token, so that it deletes
    neither of them). Bounded: MAX_EXAMPLES per operation and mode, no deadline."""
    owner = register(app.test_client(), "owner@bistro.example")
    admin = register(app.test_client(), "admin@iris.example")
    leaving = register(app.test_client(), "leaving@bistro.example")
    execute(app, "UPDATE users SET role = 'admin', email_verified_at = now() WHERE id = :id", id=admin["id"])
    tokens = [
        None,
        *(session_token(standin, user["clerk_user_id"], TOKEN_SECONDS) for user in (owner, admin)),
    ]
    tokens_for = {DELETE_ME: [None, session_token(standin, leaving["clerk_user_id"], TOKEN_SECONDS)]}
    with requests.Session() as http:
        # The document as the live app serves it (from_url would leave the document's own operation out).
        schema = schemathesis.openapi.from_dict(http.get(live_url + OPENAPI[1], timeout=5).json())
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {(op.method.lower(), op.path) for op in operations} == set(EXPECTED_STATUSES)
        for operation in operations:
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                key = (operation.method.lower(), operation.path)
                sampled = st.sampled_from(tokens_for.get(key, tokens))

                @given(case=operation.as_strategy(generation_mode=mode), token=sampled)
                @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
                def check(case, token):
                    if token is not None:  # only the users endpoints read it
                        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
                    case.call_and_validate(base_url=live_url, session=http, checks=list(CHECKS))

                check()


# ----------------------------------------------------------------------------- /docs


class AssetReferences(html.parser.HTMLParser):
    """Collects src/href references, inline script bodies and inline event handlers of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []
        self.inline_scripts: list[str] = []
        self.handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.references += [value for name, value in attrs if name in ("src", "href") and value]
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        self._in_script = tag == "script"
        if tag == "script" and not values.get("src"):
            self.inline_scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


# An absolute or protocol-relative URL in script text.
EXTERNAL_URL = re.compile(r"""https?://|["'`]//""", re.IGNORECASE)


def test_docs_page_loads_only_its_own_assets_and_has_no_inline_script(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = AssetReferences()
    page.feed(response.get_data(as_text=True))
    assert page.inline_scripts == []
    assert page.handlers == []
    assert page.references, "the page references its assets"
    for reference in page.references:
        assert reference.startswith("/") and not reference.startswith("//"), reference
        with client.get(reference) as asset:
            assert asset.status_code == 200, reference
            if reference.endswith(".js") and "/docs/assets/" not in reference:  # our own init script
                assert not EXTERNAL_URL.search(asset.get_data(as_text=True)), reference
    assert "/api/v1/openapi.json" in response.get_data(as_text=True)
    assert "/static/docs/swagger-init.js" in page.references


def test_docs_serves_only_the_swagger_ui_files_it_uses(client):
    for name in ASSETS:
        with client.get(f"/docs/assets/{name}") as response:
            assert response.status_code == 200
    for name in ("index.html", "oauth2-redirect.html", "swagger-ui.js", "VERSION", "..%2FVERSION"):
        with client.get(f"/docs/assets/{name}") as response:
            assert response.status_code == 404


CHROMIUM = os.environ.get("IRIS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("Chromium is required for the browser tests in CI; .ci/run should install it")


@pytest.mark.slow  # starts Chromium
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_docs_renders_in_chromium_under_the_apps_csp_with_no_violation(live_url):
    """Swagger UI renders every operation, expands one, opens Authorize and runs "Try it out", under the
    Content-Security-Policy the app sends, without one CSP violation or console error, and every request
    goes to the app itself."""
    from playwright.sync_api import sync_playwright

    from tests.browsers import CHROMIUM_ARGS

    csp = requests.get(live_url + "/docs", timeout=5).headers.get("Content-Security-Policy", "")
    directives = dict(part.strip().partition(" ")[::2] for part in csp.split(";") if part.strip())
    assert directives.get("script-src") == "'self'", csp
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        urls: list[str] = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: urls.append(request.url))
        page.add_init_script(
            "document.addEventListener('securitypolicyviolation', e =>"
            " console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI));"
        )
        page.goto(live_url + "/docs")
        page.wait_for_selector(".opblock")
        assert page.locator(".opblock").count() == len(EXPECTED_STATUSES)
        page.click("#operations-auth-registerUser")
        page.click("#operations-auth-registerUser .try-out__btn")
        page.click("#operations-auth-registerUser .execute")
        page.wait_for_selector("#operations-auth-registerUser .live-responses-table .response-col_status")
        page.click(".btn.authorize")
        page.wait_for_selector(".modal-ux")
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
        browser.close()
    assert problems == []
    assert urls and all(url.startswith(live_url + "/") for url in urls), urls


def webhook_post(client, payload: Any, *, secret: str = WEBHOOK_SECRET) -> Any:
    """``payload`` posted to the webhook endpoint, signed as Svix signs it."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    headers = svix_headers(body, svix_id=f"msg_{uuid.uuid4().hex}", secret=secret)
    return client.post(WEBHOOK[1], data=body, headers=headers, content_type="application/json")


def test_webhook_200_400_and_413(client, standin):
    user = clerk_call(standin, "POST", "/users", json={"email_address": ["walkin@bistro.example"]})
    assert_conforms(
        webhook_post(client, {"type": "user.created", "object": "event", "data": user}), WEBHOOK, 200
    )
    assert_conforms(webhook_post(client, {"type": "session.created", "data": {}}), WEBHOOK, 200)
    other = "whsec_" + base64.b64encode(b"another-secret-another-secret-32").decode()
    assert_conforms(webhook_post(client, {"type": "user.created", "data": user}, secret=other), WEBHOOK, 400)
    assert_conforms(webhook_post(client, {"type": "user.created"}), WEBHOOK, 400)
    assert_conforms(webhook_post(client, "x" * (65 * 1024)), WEBHOOK, 413)


def test_webhook_404_without_a_signing_secret(make_app, standin):
    app = make_app(CLERK_WEBHOOK_SIGNING_SECRET=None)
    migrate(app)
    assert_conforms(webhook_post(app.test_client(), {"type": "user.created", "data": {}}), WEBHOOK, 404)


def test_webhook_503_when_the_address_is_held_by_a_registration_in_flight(app, client, standin):
    execute(
        app,
        "INSERT INTO users (id, email, role, pending_owner, pending_until) VALUES (gen_random_uuid(),"
        " 'busy@bistro.example', 'restaurant', gen_random_uuid(), now() + interval '1 hour')",
    )
    user = clerk_call(standin, "POST", "/users", json={"email_address": ["busy@bistro.example"]})
    assert_conforms(webhook_post(client, {"type": "user.created", "data": user}), WEBHOOK, 503)


def test_webhook_500(app, client, standin):
    user = clerk_call(standin, "POST", "/users", json={"email_address": ["walkin@bistro.example"]})
    execute(
        app,
        "CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN RAISE EXCEPTION 'disk full (simulated)'; END; $$;"
        " CREATE TRIGGER fail_insert BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION fail_insert();",
    )
    assert_conforms(webhook_post(client, {"type": "user.created", "data": user}), WEBHOOK, 500)
