"""Error responses: the JSON envelope under /api/, HTML pages elsewhere, request ids everywhere."""

import logging
from types import MappingProxyType

import pytest
from flask import Blueprint, request

from iris.errors import IrisError, ReverificationRequired

probe = Blueprint("probe", __name__)


class Sneaky(IrisError):
    """An error whose extra keys try to replace the envelope: they must not."""

    status_code = 403
    code = "sneaky"
    message = "Refused."
    body_extra = MappingProxyType({"error": "replaced", "hint": {"n": 1}})


@probe.post("/api/probe/echo")
def echo():
    return {"received": request.get_json()}


@probe.get("/api/probe/boom")
def api_boom():
    raise RuntimeError("secret internal detail: dsn=postgresql://admin:hunter2@db")


@probe.get("/api/probe/reverify")
def api_reverify():
    raise ReverificationRequired()


@probe.get("/api/probe/sneaky")
def api_sneaky():
    raise Sneaky()


@probe.get("/reverify")
def page_reverify():
    raise ReverificationRequired()


@probe.get("/boom")
def page_boom():
    raise RuntimeError("secret internal detail: dsn=postgresql://admin:hunter2@db")


@pytest.fixture
def probe_client(make_app):
    app = make_app(MAX_CONTENT_LENGTH=1024)
    app.register_blueprint(probe)
    return app.test_client()


def assert_envelope(response, status, code):
    assert response.status_code == status
    assert response.mimetype == "application/json"
    error = response.json["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


def test_api_routing_404_is_the_envelope(probe_client):
    assert_envelope(probe_client.get("/api/v1/nothing-here"), 404, "not_found")


def test_api_405_is_the_envelope_with_allow(probe_client):
    response = probe_client.get("/api/probe/echo")
    assert_envelope(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_api_400_is_the_envelope(probe_client):
    response = probe_client.post("/api/probe/echo", data="{not json", content_type="application/json")
    assert_envelope(response, 400, "bad_request")


def test_api_413_is_the_envelope(probe_client):
    response = probe_client.post("/api/probe/echo", data="x" * 2048, content_type="application/json")
    assert_envelope(response, 413, "payload_too_large")


def test_api_500_is_the_envelope_without_internals(probe_client, caplog):
    with caplog.at_level(logging.ERROR):
        response = probe_client.get("/api/probe/boom")
    error = assert_envelope(response, 500, "internal_error")
    body = response.get_data(as_text=True)
    assert "hunter2" not in body
    assert "Traceback" not in body
    assert "RuntimeError" not in body
    # The log keeps the traceback and the request id, so the failure can be found from the response.
    assert error["request_id"] in caplog.text
    assert "RuntimeError" in caplog.text


def test_page_errors_are_html_in_the_site_layout(probe_client):
    response = probe_client.get("/no-such-page")
    assert response.status_code == 404
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "<title>Nothing is here. · Iris</title>" in page
    assert "Error 404" in page
    assert 'class="site-header"' in page
    assert response.headers["X-Request-ID"]


def test_page_500_shows_no_internals(probe_client):
    response = probe_client.get("/boom")
    assert response.status_code == 500
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "hunter2" not in page
    assert "Traceback" not in page


def test_a_well_formed_incoming_request_id_is_kept(probe_client):
    response = probe_client.get("/api/nope", headers={"X-Request-ID": "edge-7f3a9c2e1b"})
    assert response.headers["X-Request-ID"] == "edge-7f3a9c2e1b"
    assert response.json["error"]["request_id"] == "edge-7f3a9c2e1b"


@pytest.mark.parametrize("incoming", ["short", "has spaces in it", "<script>alert(1)</script>", "x" * 200])
def test_a_malformed_incoming_request_id_is_replaced(probe_client, incoming):
    response = probe_client.get("/api/nope", headers={"X-Request-ID": incoming})
    assert response.headers["X-Request-ID"] != incoming
    assert len(response.headers["X-Request-ID"]) == 32


def test_successful_responses_carry_a_request_id(client):
    first = client.get("/healthz").headers["X-Request-ID"]
    second = client.get("/healthz").headers["X-Request-ID"]
    assert first != second


def test_an_error_can_carry_top_level_keys_beside_the_envelope(probe_client):
    response = probe_client.get("/api/probe/reverify")
    assert_envelope(response, 403, "reverification_required")
    assert response.json["clerk_error"] == {
        "type": "forbidden",
        "reason": "reverification-error",
        "metadata": {"reverification": {"level": "first_factor", "afterMinutes": 10}},
    }
    assert set(response.json) == {"error", "clerk_error"}


def test_extra_keys_never_replace_the_envelope_and_pages_leave_them_out(probe_client):
    response = probe_client.get("/api/probe/sneaky")
    assert_envelope(response, 403, "sneaky")
    assert response.json["hint"] == {"n": 1}
    page = probe_client.get("/reverify")
    assert page.status_code == 403 and page.mimetype == "text/html"
    assert "clerk_error" not in page.get_data(as_text=True)
