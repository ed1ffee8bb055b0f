"""Hostile requests against every JSON endpoint: never a 5xx, and a body that is not strict JSON is 400.

The endpoints are read from the app's URL map (every rule under /api/, called with each of its methods), so
an endpoint added later is covered without touching this file. Requests go through the test client to the
real app, on real PostgreSQL, with the Clerk stand-in over HTTP: a generated body that happens to be a valid
registration really registers.
"""

from __future__ import annotations

import json
import logging
import operator
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iris import create_app
from iris.api import REGISTER_FIELDS
from tests.helpers import (
    PASSWORD,
    TEST_DATABASE_URL,
    b64url,
    bearer,
    migrate,
    register,
    run_sql,
    session_token,
    signed_in_admin,
)

# Every method of every API rule. Building the app touches neither the database nor the network.
_URL_MAP = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": TEST_DATABASE_URL}).url_map
ROUTES = sorted(
    (rule.rule, rule.endpoint, method)
    for rule in _URL_MAP.iter_rules()
    if rule.rule.startswith("/api/")
    for method in rule.methods or ()
)
# Values for the variable parts of a rule, by converter. A converter missing here fails the test: a new
# endpoint's URL must be generated too, not skipped.
URL_VALUES: Mapping[str, st.SearchStrategy[Any]] = MappingProxyType(
    {
        "uuid": st.uuids(),
        "int": st.integers(min_value=0, max_value=2**63),
        "default": st.text(min_size=1, max_size=40),
        "string": st.text(min_size=1, max_size=40),
    }
)
URL_VARIABLE = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")

# What an HTTP header can carry: latin-1 text without line breaks (a server refuses those outright).
HEADER_TEXT = st.text(st.characters(max_codepoint=0xFF, exclude_characters="\r\n"), max_size=300)
LONE_SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities become NaN/Infinity literals in the body
    | st.text(max_size=40)
    | LONE_SURROGATES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value: Any) -> bytes:
    # Python's defaults are the hostile ones: NaN/Infinity literals, lone surrogates as \u escapes.
    return json.dumps(value).encode()


def object_text(pairs: list[tuple[str, Any]]) -> bytes:
    """An object written pair by pair, so that a key may come twice."""
    return b"{" + b",".join(dumps(key) + b":" + dumps(value) for key, value in pairs) + b"}"


def splice(body: bytes, position: int, snippet: bytes) -> bytes:
    position %= len(body) + 1
    return body[:position] + snippet + body[position:]


# Nesting depths: well past the parser's stack (about 1,000), up to and past the 64 KiB body limit.
DEPTHS = st.sampled_from([1_500, 13_000, 40_000]) | st.integers(min_value=1, max_value=70_000)
REGISTRATIONS = st.fixed_dictionaries(
    {"email": st.emails() | JSON_VALUES, "password": st.just(PASSWORD) | JSON_VALUES},
    optional={"role": st.sampled_from(["restaurant", "admin", ""]) | JSON_VALUES, "extra": JSON_VALUES},
)
BODIES = st.one_of(
    st.just(b""),
    REGISTRATIONS.map(dumps),
    # Keys from the register fields, repeats allowed.
    st.lists(st.tuples(st.sampled_from(REGISTER_FIELDS), JSON_VALUES), max_size=5).map(object_text),
    # Deep nesting (the reported 500), unbalanced and balanced, some of it over the body size limit.
    DEPTHS.map(lambda depth: b"[" * depth),
    DEPTHS.map(lambda depth: b"[" * depth + b"]" * depth),
    st.builds(operator.mul, st.sampled_from([b'{"a":', b'[{"email":']), DEPTHS),
    # Huge numbers.
    st.builds(
        operator.mod,
        st.sampled_from([b'{"email": %s}', b'{"password": 1e%s}', b'{"role": -0.%s}', b"[%s]", b"%s"]),
        st.integers(min_value=1, max_value=20_000).map(lambda digits: b"9" * digits),
    ),
    # Bytes spliced into a valid registration: invalid UTF-8, an encoded surrogate, escapes, NUL, quotes.
    st.builds(
        splice,
        REGISTRATIONS.map(dumps),
        st.integers(min_value=0),
        st.sampled_from(
            [
                b"\xff",
                b"\xc0\xaf",
                b"\xed\xa0\x80",
                b"\\ud800",
                b"\\udfff\\ud800",
                b"\\u0000",
                b"\x00",
                b'"',
                b"\\",
            ]
        ),
    ),
    # Valid JSON in encodings JSON does not allow on the wire.
    st.builds(
        lambda value, encoding: json.dumps(value).encode(encoding),
        REGISTRATIONS,
        st.sampled_from(["utf-16", "utf-16-be", "utf-32", "utf-8-sig"]),
    ),
    st.binary(max_size=300),
)
# Two requests in three say JSON in some form, so that their bodies are parsed.
JSON_CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8"])
ODD_JSON_CONTENT_TYPES = st.sampled_from(
    [
        "application/json; charset=UTF-16",
        "application/json; charset=latin-1",
        'application/json;charset="utf-8"',
        "application/json;;;=",
        "APPLICATION/JSON",
        "application/merge-patch+json",
        "application/json; boundary=x",
    ]
)
OTHER_CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "multipart/form-data",
            "multipart/form-data; boundary=----x",
            "application/x-www-form-urlencoded",
            "",
        ]
    ),
    HEADER_TEXT,
)
CONTENT_TYPES = JSON_CONTENT_TYPES | ODD_JSON_CONTENT_TYPES | OTHER_CONTENT_TYPES
TOKEN_CHARACTERS = st.characters(codec="ascii", categories=["L", "N"]) | st.sampled_from("-_")
TOKEN_SHAPED = st.lists(st.text(TOKEN_CHARACTERS, max_size=400), min_size=3, max_size=3).map(".".join)


def json_nesting_token(depth: int) -> str:
    """A token-shaped string whose header is deeply nested JSON."""
    return f"{b64url(b'[' * depth)}.e30.x"


def authorization(valid_token: str) -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(),
        st.just(f"Bearer {valid_token}"),
        HEADER_TEXT,
        HEADER_TEXT.map("Bearer {}".format),
        TOKEN_SHAPED.map("Bearer {}".format),
        st.integers(min_value=1, max_value=6000).map(lambda depth: f"Bearer {json_nesting_token(depth)}"),
    )


def requests_for(valid_token: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "body": BODIES,
            "content_type": CONTENT_TYPES,
            "Authorization": authorization(valid_token),
            "Cookie": st.none()
            | st.just(f"__session={valid_token}")
            | HEADER_TEXT.map("__session={}".format)
            | HEADER_TEXT,
            "X-Request-ID": st.none() | HEADER_TEXT,
        }
    )


@pytest.fixture
def token(client, standin) -> str:
    """A session token of a registered user, so that requests also get past authentication."""
    return session_token(standin, register(client, "signed-in@bistro.example")["clerk_user_id"])


def url_for_rule(endpoint: str, rule: str, method: str, data: st.DataObject) -> str:
    values = {
        name: data.draw(URL_VALUES[converter or "default"], label=name)
        for converter, name in URL_VARIABLE.findall(rule)
    }
    return _URL_MAP.bind("localhost").build(endpoint, values, method=method)


@pytest.mark.parametrize(("rule", "endpoint", "method"), ROUTES)
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    # The app, its database and the signed-in user are shared by the examples of one test. An example may
    # register a user; that changes nothing this test asserts.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_hostile_requests_never_get_a_5xx_and_errors_keep_the_envelope(
    client, token, rule, endpoint, method, data
):
    url = url_for_rule(endpoint, rule, method, data)
    request = data.draw(requests_for(token), label="request")
    headers = {
        name: request[name]
        for name in ("Authorization", "Cookie", "X-Request-ID")
        if request[name] is not None
    }
    if request["content_type"] is not None:
        headers["Content-Type"] = request["content_type"]

    response = client.open(url, method=method, data=request["body"], headers=headers)

    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400 and method != "HEAD":
        error = response.json["error"]
        assert error["request_id"] == response.headers["X-Request-ID"]


# ---- the reported case, and each kind of body that is not strict JSON


REGISTER = "/api/v1/auth/register"


def test_40_kb_of_open_brackets_is_400_invalid_json_with_one_log_line_and_no_traceback(client, caplog):
    caplog.set_level(logging.DEBUG)
    response = client.post(REGISTER, data=b"[" * 40_000, content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_json"
    [record] = caplog.records
    assert record.name == "iris.request"
    assert record.status == 400
    assert record.exc_info is None
    assert "Traceback" not in caplog.text


NOT_JSON = "The request body is not valid JSON."
LONE_SURROGATE = "The request body holds a \\u escape that is not a Unicode character."


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # Deeper than any parser stack, and still under the 64 KiB limit.
        pytest.param(b"[" * 30_000 + b"]" * 30_000, NOT_JSON, id="balanced-deep-nesting"),
        pytest.param(b'{"email": ' + b"9" * 5000 + b"}", NOT_JSON, id="5000-digit-integer"),
        pytest.param(b'{"email": "a@b.example", "password": NaN}', "NaN is not a JSON number.", id="nan"),
        pytest.param(b'{"email": -Infinity}', "-Infinity is not a JSON number.", id="infinity"),
        pytest.param(
            b'{"role": "restaurant", "role": "admin"}',
            "The request body gives a key more than once in one object.",
            id="duplicate-key",
        ),
        pytest.param(b'{"email": "\xff@b.example"}', NOT_JSON, id="invalid-utf8"),
        pytest.param(b'{"email": "\xed\xa0\x80@b.example"}', NOT_JSON, id="utf8-encoded-surrogate"),
        pytest.param(b'{"password": "x\\ud800"}', LONE_SURROGATE, id="lone-surrogate-escape"),
        pytest.param(b'{"a": [{"b": ["\\udc00"]}]}', LONE_SURROGATE, id="nested-lone-surrogate-escape"),
        pytest.param('{"email": "a@b.example"}'.encode("utf-16"), NOT_JSON, id="utf-16"),
    ],
)
def test_a_body_that_is_not_strict_json_is_400_invalid_json(client, standin, body, message):
    response = client.post(REGISTER, data=body, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.json["error"]["code"] == "invalid_json"
    assert response.json["error"]["message"] == message
    assert standin.control.stats()["requests"].get("POST /v1/users", 0) == 0


def test_a_surrogate_pair_escape_is_one_character_and_accepted(client):
    response = client.post(
        REGISTER,
        data=b'{"email": "owner@bistro.example", "password": "%s \\ud83d\\ude00"}' % PASSWORD.encode(),
        content_type="application/json; charset=utf-8",
    )
    assert response.status_code == 201, response.get_data(as_text=True)


# ---- the admin listing's query string: Python's limits are not the answer


LISTING = "/api/v1/users"


def year_one_cursor() -> str:
    """A well-formed cursor whose instant is 1 January of year 1, the first datetime Python has."""
    return b64url(json.dumps(["0001-01-01T00:00:00+00:00", "0b5c6c1e-8d4f-4a0e-9d5b-3f4e8a1c2d3e"]).encode())


@pytest.mark.parametrize(
    ("query", "field", "code"),
    [
        # Past Python's 4,300-digit limit on int(): ValueError, not a small number or a large one.
        pytest.param("limit=" + "1" * 4301, "limit", "out_of_range", id="4301-digit-limit"),
        pytest.param("limit=" + "0" * 5000 + "5", "limit", "out_of_range", id="zero-padded-limit"),
        # Valid JSON, a valid instant and UUID, at the very edge of what datetime can hold.
        pytest.param("cursor=" + year_one_cursor(), "cursor", "invalid_cursor", id="year-1-cursor"),
        pytest.param(
            "cursor=" + b64url(b'["0001-01-01T00:00:00+01:00","0b5c6c1e-8d4f-4a0e-9d5b-3f4e8a1c2d3e"]'),
            "cursor",
            "invalid_cursor",
            id="year-1-cursor-east-of-utc",
        ),
        pytest.param(
            "cursor=" + b64url(b'["9999-12-31T23:59:59-01:00","0b5c6c1e-8d4f-4a0e-9d5b-3f4e8a1c2d3e"]'),
            "cursor",
            "invalid_cursor",
            id="year-9999-cursor-west-of-utc",
        ),
    ],
)
def test_a_listing_parameter_past_pythons_limits_is_a_422_naming_it(app, client, standin, query, field, code):
    _, headers = signed_in_admin(client, app, standin)
    response = client.get(f"{LISTING}?{query}", headers=headers)
    assert response.status_code == 422, response.get_data(as_text=True)[:500]
    error = response.json["error"]
    assert error["code"] == "validation_error"
    assert [(detail["field"], detail["code"]) for detail in error["details"]] == [(field, code)]


@pytest.mark.parametrize(
    "instant",
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0999-01-01T00:00:00+00:00"],
    ids=["year-1-east-of-utc", "year-9999-west-of-utc", "three-digit-year"],
)
def test_on_sqlite_a_cursor_at_the_ends_of_time_is_a_422(make_app, standin, tmp_path, instant):
    """Development's SQLite compares created_at as UTC text: converting year 1 east of UTC (or 9999 west of
    it) overflowed into a 500, and a three-digit year compared as text would sort after every real one."""
    app = make_app(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/iris.sqlite3", SQLALCHEMY_ENGINE_OPTIONS={})
    migrate(app)
    client = app.test_client()
    admin = register(client, "admin@iris.example")
    run_sql(app, "UPDATE users SET role = 'admin', email_verified_at = CURRENT_TIMESTAMP")
    headers = bearer(session_token(standin, admin["clerk_user_id"], 600))
    cursor = b64url(json.dumps([instant, "0b5c6c1e-8d4f-4a0e-9d5b-3f4e8a1c2d3e"]).encode())
    response = client.get(f"{LISTING}?cursor={cursor}", headers=headers)
    assert response.status_code == 422, response.get_data(as_text=True)[:500]
    assert [(detail["field"], detail["code"]) for detail in response.json["error"]["details"]] == [
        ("cursor", "invalid_cursor")
    ]
