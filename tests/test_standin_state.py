"""The stand-in's state file: users, their passwords and sessions survive a restart, and a file it cannot use
stops it with one clear line instead of starting empty over it. Also pending sessions, marked through the
control API, whose tokens carry ``sts: "pending"`` and which Iris refuses.

Every stand-in here is a real server on a loopback port, spoken to over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
import requests

from clerk_standin import ClerkStandin, StandinServer, StateFileError
from tests.helpers import BAPI_HEADERS, PASSWORD, clerk_users, create_clerk_user, password_works

ROOT = Path(__file__).resolve().parent.parent


def create_session(server: StandinServer, user_id: str) -> dict:
    response = requests.post(
        server.api_url + "/sessions", json={"user_id": user_id}, headers=BAPI_HEADERS, timeout=5
    )
    assert response.status_code == 200, response.text
    return response.json()


def mint(server: StandinServer, session_id: str) -> requests.Response:
    return requests.post(
        f"{server.api_url}/sessions/{session_id}/tokens", json={}, headers=BAPI_HEADERS, timeout=5
    )


def test_users_passwords_and_sessions_survive_a_restart_with_the_same_state_file(tmp_path):
    state_file = tmp_path / "instance" / "clerk-standin-state.json"
    key_file = tmp_path / "instance" / "clerk-standin-key.pem"
    with StandinServer(state_file=state_file, key_file=key_file) as first:
        owner = create_clerk_user(first, "owner@bistro.example")
        chef = create_clerk_user(first, "chef@bistro.example")
        session = create_session(first, owner["id"])
    assert oct(state_file.stat().st_mode & 0o777) == "0o600"  # it holds password digests
    assert PASSWORD not in state_file.read_text()

    with StandinServer(state_file=state_file, key_file=key_file) as second:
        assert clerk_users(second, order_by="created_at") == [owner, chef]
        assert password_works(second, owner["id"], PASSWORD)
        assert not password_works(second, owner["id"], PASSWORD + "!")
        token = mint(second, session["id"])
        assert token.status_code == 200
        claims = jwt.decode(token.json()["jwt"], options={"verify_signature": False})
        assert (claims["sid"], claims["sub"], claims["sts"]) == (session["id"], owner["id"], "active")
        # Taken emails stay taken: registering again is the 422 a real Clerk gives, not a fresh user.
        again = requests.post(
            second.api_url + "/users",
            json={"email_address": ["owner@bistro.example"]},
            headers=BAPI_HEADERS,
            timeout=5,
        )
        assert again.status_code == 422
        assert again.json()["errors"][0]["code"] == "form_identifier_exists"
        # Users made after the restart come after the loaded ones.
        newcomer = create_clerk_user(second, "host@bistro.example")
        assert [u["id"] for u in clerk_users(second, order_by="created_at")] == [
            owner["id"],
            chef["id"],
            newcomer["id"],
        ]


def test_a_deletion_and_a_reset_are_kept_too(tmp_path):
    state_file = tmp_path / "state.json"
    with StandinServer(state_file=state_file) as first:
        owner = create_clerk_user(first, "owner@bistro.example")
        chef = create_clerk_user(first, "chef@bistro.example")
        assert (
            requests.delete(
                f"{first.api_url}/users/{chef['id']}", headers=BAPI_HEADERS, timeout=5
            ).status_code
            == 200
        )
    with StandinServer(state_file=state_file) as second:
        assert clerk_users(second) == [owner]
        second.control.reset()
    with StandinServer(state_file=state_file) as third:
        assert clerk_users(third) == []


def test_an_address_marked_unverified_and_a_new_primary_survive_a_restart(tmp_path):
    state_file = tmp_path / "state.json"
    with StandinServer(state_file=state_file) as first:
        response = requests.post(
            first.api_url + "/users",
            json={"email_address": ["owner@bistro.example", "kitchen@bistro.example"]},
            headers=BAPI_HEADERS,
            timeout=5,
        )
        assert response.status_code == 200, response.text
        owner = response.json()
        kitchen_id = owner["email_addresses"][1]["id"]
        marked = requests.patch(
            f"{first.api_url}/email_addresses/{kitchen_id}",
            json={"verified": False, "primary": True},
            headers=BAPI_HEADERS,
            timeout=5,
        )
        assert marked.status_code == 200, marked.text
        assert marked.json()["verification"]["status"] == "unverified"
        [before] = clerk_users(first)
    assert before["primary_email_address_id"] == kitchen_id

    with StandinServer(state_file=state_file) as second:
        assert clerk_users(second) == [before]
        fetched = requests.get(
            f"{second.api_url}/email_addresses/{kitchen_id}", headers=BAPI_HEADERS, timeout=5
        )
        assert fetched.status_code == 200 and fetched.json() == marked.json()


def test_without_a_state_file_nothing_is_written_and_a_restart_starts_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray relative file would land here
    with StandinServer() as first:
        create_clerk_user(first, "owner@bistro.example")
    with StandinServer() as second:
        assert clerk_users(second) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "is not a Clerk stand-in state file"),
        (b'{"version": 99, "users": [], "sessions": []}', "version is 99"),
        (b'{"version": 1, "users": [{"user": {}}], "sessions": []}', "is not a Clerk stand-in state file"),
        (b"\xff\xfe", "cannot read the state file"),
    ],
)
def test_a_state_file_it_cannot_use_is_an_error_naming_the_file_and_is_left_alone(tmp_path, content, problem):
    state_file = tmp_path / "state.json"
    state_file.write_bytes(content)
    with pytest.raises(StateFileError) as raised:
        ClerkStandin(state_file=state_file)
    message = str(raised.value)
    assert problem in message
    assert str(state_file) in message
    assert "make reset" in message
    assert state_file.read_bytes() == content


def test_the_command_line_stops_at_once_with_one_line_for_a_corrupt_state_file(tmp_path):
    state_file = tmp_path / "state.json"
    state_file.write_text("[1, 2")
    finished = subprocess.run(
        [sys.executable, "-m", "clerk_standin", "--port", "0", "--state-file", str(state_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr
    [line] = finished.stderr.strip().splitlines()
    assert line.startswith(f"clerk stand-in cannot start: the state file {state_file} is not")
    assert state_file.read_text() == "[1, 2"


def test_an_unreadable_state_file_is_an_error_not_an_empty_start(tmp_path):
    if os.geteuid() == 0:
        state_file = tmp_path / "a-folder"  # root reads any file; a folder in its place cannot be read
        state_file.mkdir()
    else:
        state_file = tmp_path / "state.json"
        state_file.write_text(json.dumps({"version": 1, "users": [], "sessions": []}))
        state_file.chmod(0)
    with pytest.raises(StateFileError, match="cannot read the state file"):
        ClerkStandin(state_file=state_file)


def test_a_session_marked_pending_mints_pending_tokens_until_marked_active(standin):
    user = create_clerk_user(standin, "owner@bistro.example")
    session = create_session(standin, user["id"])
    assert standin.control.set_session_status(session["id"], "pending")["status"] == "pending"
    pending = jwt.decode(mint(standin, session["id"]).json()["jwt"], options={"verify_signature": False})
    assert pending["sts"] == "pending"
    standin.control.set_session_status(session["id"], "active")
    active = jwt.decode(mint(standin, session["id"]).json()["jwt"], options={"verify_signature": False})
    assert active["sts"] == "active"


def test_marking_an_unknown_session_or_an_unknown_status_is_refused(standin):
    user = create_clerk_user(standin, "owner@bistro.example")
    session = create_session(standin, user["id"])
    url = f"{standin.base_url}/__standin/sessions"
    assert (
        requests.post(f"{url}/sess_missing/status", json={"status": "pending"}, timeout=5).status_code == 404
    )
    refused = requests.post(f"{url}/{session['id']}/status", json={"status": "ended"}, timeout=5)
    assert refused.status_code == 400
    assert refused.json() == {"error": "status must be one of active, pending"}


def test_iris_refuses_a_token_of_a_pending_session_as_clerks_sdks_do(client, standin):
    registered = client.post(
        "/api/v1/auth/register", json={"email": "owner@bistro.example", "password": PASSWORD}
    )
    assert registered.status_code == 201, registered.get_data(as_text=True)
    session = create_session(standin, registered.json["clerk_user_id"])
    standin.control.set_session_status(session["id"], "pending")
    token = mint(standin, session["id"]).json()["jwt"]
    response = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json["error"]["message"].startswith("The session is pending")
