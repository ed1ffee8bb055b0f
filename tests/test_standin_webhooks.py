"""The stand-in's webhooks, as Clerk sends them through Svix, received by a real HTTP endpoint in the test.

Every message is checked the way a receiver must check it: ``standardwebhooks`` verifies the signature over
the raw body with the ``svix-*`` headers mapped to their ``webhook-*`` names. Covered: the envelope and the
user snapshot in it, the order of events, retries with one ``svix-id``, giving up, the delivery faults
(delay, repeat, drop, reorder, hold), the control API and the command-line flags.

One stand-in serves the module (no database needed), reset before each test; Svix's retry waits are
scaled down to a thousandth.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from clerk_standin import DEFAULT_SECRET_KEY, RETRY_SCHEDULE, StandinServer, new_secret
from tests.helpers import StandinApi, free_port, wait_for

PASSWORD = "a fine long passphrase"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SVIX_ID_RE = re.compile(r"^msg_[0-9A-Za-z]{27}$")
USER_AGENT = "iris-tests/1.0"


@dataclass
class Received:
    """One POST the endpoint got: lower-cased headers, the raw body, the status it answered."""

    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def svix_id(self) -> str:
        return self.headers["svix-id"]

    def verified(self, secret: str = SECRET) -> dict[str, Any]:
        """The payload, once its signature checks out as a receiver checks it."""
        headers = {
            "webhook-id": self.headers["svix-id"],
            "webhook-timestamp": self.headers["svix-timestamp"],
            "webhook-signature": self.headers["svix-signature"],
        }
        return Webhook(secret).verify(self.body, headers)


class Receiver:
    """A tiny real webhook endpoint on a loopback port. It records every POST and answers the next status of
    ``script`` (200 once the script is used up); while ``gate`` is clear it keeps every answer back."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.script: deque[int] = deque()
        self.gate = threading.Event()
        self.gate.set()
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.gate.wait(10)
                with receiver.cond:
                    status = receiver.script.popleft() if receiver.script else 200
                    headers = {name.lower(): value for name, value in self.headers.items()}
                    receiver.received.append(Received(headers, body, status))
                    receiver.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/webhooks/clerk"

    def clear(self) -> None:
        with self.cond:
            self.received.clear()
            self.script.clear()
        self.gate.set()

    def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.received) >= count, timeout), self.received
            return list(self.received)

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver()
    yield endpoint
    endpoint.close()


# Named like tests/conftest.py's autouse fixture, so this module runs on its own server without a database.
@pytest.fixture(scope="module")
def standin() -> Iterator[StandinServer]:
    with StandinServer(port=0, webhook_retry_scale=0.001) as server:
        yield server


@pytest.fixture
def api(standin: StandinServer, receiver: Receiver) -> StandinApi:
    """A reset stand-in sending webhooks, signed with ``SECRET``, to a cleared ``receiver``."""
    api = StandinApi(standin)
    api.headers["User-Agent"] = USER_AGENT
    standin.control.reset()
    receiver.clear()
    standin.control.set_webhooks(receiver.url, SECRET)
    return api


def settled(standin: StandinServer, receiver: Receiver, count: int) -> list[Received]:
    """What the receiver got once the stand-in has nothing left to send; exactly ``count`` messages."""
    standin.control.wait_for_webhooks(timeout=10)
    got = receiver.wait_for(count)
    assert len(got) == count, [r.verified()["type"] for r in got]
    return got


def payloads(messages: list[Received]) -> list[tuple[str, dict[str, Any]]]:
    return [(body["type"], body["data"]) for body in (message.verified() for message in messages)]


# --------------------------------------------------------------------------- what arrives


def test_user_created_arrives_signed_in_clerks_envelope(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    before = time.time()
    user = api.create_user("hook@example.com")
    [message] = settled(standin, receiver, 1)

    assert message.headers["content-type"] == "application/json"
    assert SVIX_ID_RE.match(message.svix_id)
    assert before - 1 <= int(message.headers["svix-timestamp"]) <= time.time() + 1
    assert message.headers["svix-signature"].startswith("v1,")
    event = message.verified()
    assert event == {
        "data": user,
        "object": "event",
        "type": "user.created",
        "timestamp": event["timestamp"],
        "instance_id": standin.control.webhooks()["instance_id"],
        "event_attributes": {"http_request": {"client_ip": "127.0.0.1", "user_agent": USER_AGENT}},
    }
    assert before * 1000 - 1000 <= event["timestamp"] <= time.time() * 1000 + 1000  # milliseconds
    assert re.match(r"^ins_[0-9A-Za-z]+$", event["instance_id"])
    with pytest.raises(WebhookVerificationError):
        message.verified(new_secret())
    with pytest.raises(WebhookVerificationError):
        Received(message.headers, message.body.replace(b"hook@", b"hack@"), 200).verified()
    [entry] = standin.control.webhook_deliveries()
    assert entry["svix_id"] == message.svix_id and entry["user_id"] == user["id"]
    assert (entry["type"], entry["attempt"], entry["status"], entry["outcome"]) == (
        "user.created",
        1,
        200,
        "delivered",
    )


def test_every_change_sends_the_user_as_it_was_at_that_moment_in_order(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    user = api.create_user("order@example.com", external_id="row-3")
    path = f"/v1/users/{user['id']}"
    snapshots = [("user.created", user)]

    def change(response: requests.Response) -> None:
        assert response.status_code == 200, response.text
        snapshots.append(("user.updated", api.get(path).json()))

    change(api.patch(path, {"first_name": "First"}))
    added = api.post("/v1/email_addresses", {"user_id": user["id"], "email_address": "order2@example.com"})
    change(added)
    change(api.patch(f"/v1/email_addresses/{added.json()['id']}", {"verified": True, "primary": True}))
    change(api.patch(path, {"first_name": "Second"}))
    change(api.delete(f"/v1/email_addresses/{user['primary_email_address_id']}"))
    change(api.post(f"{path}/ban"))
    change(api.post(f"{path}/unban"))
    assert api.delete(path).status_code == 200
    snapshots.append(
        ("user.deleted", {"object": "user", "id": user["id"], "deleted": True, "external_id": "row-3"})
    )

    messages = settled(standin, receiver, len(snapshots))
    assert payloads(messages) == snapshots
    assert len({m.svix_id for m in messages}) == len(messages)
    stamps = [data["updated_at"] for kind, data in snapshots if kind != "user.deleted"]
    assert stamps == sorted(set(stamps))


def test_user_deleted_names_the_external_id_only_when_set(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    plain = api.create_user("plain@example.com")
    linked = api.create_user("linked@example.com", external_id="row-1")
    api.delete(f"/v1/users/{plain['id']}")
    api.delete(f"/v1/users/{linked['id']}")
    deleted = payloads(settled(standin, receiver, 4))[2:]
    assert deleted == [
        ("user.deleted", {"object": "user", "id": plain["id"], "deleted": True}),
        ("user.deleted", {"object": "user", "id": linked["id"], "deleted": True, "external_id": "row-1"}),
    ]


def test_the_api_answers_without_waiting_for_the_webhook(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    receiver.gate.clear()  # the endpoint takes every message and answers nothing for now
    first = api.create_user("slow1@example.com")
    second = api.create_user("slow2@example.com")
    assert api.patch(f"/v1/users/{first['id']}", {"first_name": "Quick"}).status_code == 200
    wait_for(lambda: standin.control.webhooks()["in_flight"] == 1, 5)  # the first waits on the endpoint
    assert receiver.received == []
    receiver.gate.set()
    got = payloads(settled(standin, receiver, 3))
    assert [(kind, data["id"]) for kind, data in got] == [
        ("user.created", first["id"]),
        ("user.created", second["id"]),
        ("user.updated", first["id"]),
    ]


# --------------------------------------------------------------------------- retries


def test_a_failed_delivery_is_retried_with_the_same_svix_id_and_a_fresh_signature(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    receiver.script.extend([500, 302])  # a redirect is a failure too
    user = api.create_user("retry@example.com")
    attempts = settled(standin, receiver, 3)
    assert len({m.svix_id for m in attempts}) == 1
    assert [m.status for m in attempts] == [500, 302, 200]
    assert all(m.verified()["data"] == user for m in attempts)
    log = standin.control.webhook_deliveries()
    assert [(e["attempt"], e["status"], e["outcome"]) for e in log] == [
        (1, 500, "retrying"),
        (2, 302, "retrying"),
        (3, 200, "delivered"),
    ]
    assert {e["svix_id"] for e in log} == {attempts[0].svix_id}
    # Svix waits 5 s, then 5 min; scaled by 0.001 that is 5 ms, then 300 ms.
    assert log[2]["at"] - log[1]["at"] >= 250


def test_an_endpoint_that_never_answers_gets_svixs_eight_attempts_then_is_given_up(api: StandinApi) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens there
    with StandinServer(webhook_url=dead, webhook_secret=SECRET, webhook_retry_scale=0.00001) as server:
        created = StandinApi(server).create_user("nobody-listens@example.com")
        server.control.wait_for_webhooks(timeout=30)
        log = server.control.webhook_deliveries()
    assert len(RETRY_SCHEDULE) == 8
    assert [e["attempt"] for e in log] == list(range(1, 9))
    assert all(e["status"] is None and "ConnectionError" in e["error"] for e in log)
    assert [e["outcome"] for e in log] == ["retrying"] * 7 + ["gave_up"]
    assert {(e["svix_id"], e["user_id"]) for e in log} == {(log[0]["svix_id"], created["id"])}


# --------------------------------------------------------------------------- delivery faults


def test_delay_holds_back_one_message_while_the_others_go(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    standin.control.add_webhook_fault(action="delay", seconds=1.5, times=1)
    late = api.create_user("late@example.com")
    early = api.create_user("early@example.com")
    got = payloads(settled(standin, receiver, 2))
    assert [data["id"] for _, data in got] == [early["id"], late["id"]]


def test_repeat_sends_one_message_several_times_with_one_svix_id(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    standin.control.add_webhook_fault(action="repeat", count=2, type="user.created", times=1)
    user = api.create_user("twice@example.com")
    api.patch(f"/v1/users/{user['id']}", {"first_name": "Once"})
    messages = settled(standin, receiver, 4)
    assert [m.svix_id for m in messages[:3]] == [messages[0].svix_id] * 3
    assert [m.body for m in messages[:3]] == [messages[0].body] * 3
    assert [kind for kind, _ in payloads(messages)] == ["user.created"] * 3 + ["user.updated"]
    assert [e["copy"] for e in standin.control.webhook_deliveries()] == [0, 1, 2, 0]


def test_drop_loses_a_message_for_good(api: StandinApi, standin: StandinServer, receiver: Receiver) -> None:
    standin.control.add_webhook_fault(action="drop", type="user.updated", times=1)
    user = api.create_user("lost@example.com")
    path = f"/v1/users/{user['id']}"
    api.patch(path, {"first_name": "Lost"})
    api.patch(path, {"first_name": "Kept"})
    got = payloads(settled(standin, receiver, 2))
    assert [(kind, data["first_name"]) for kind, data in got] == [
        ("user.created", None),
        ("user.updated", "Kept"),
    ]
    log = standin.control.webhook_deliveries()
    # A drop is logged when the message is made, a delivery when it is answered: compare without order.
    assert sorted((e["type"], e["outcome"]) for e in log) == [
        ("user.created", "delivered"),
        ("user.updated", "delivered"),
        ("user.updated", "dropped"),
    ]
    assert standin.control.webhook_faults()[0]["times"] == 0


def test_reorder_sends_the_next_messages_in_reverse(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    standin.control.add_webhook_fault(action="reorder", count=3, times=3)
    ids = [api.create_user(f"r{i}@example.com")["id"] for i in range(4)]
    got = [data["id"] for _, data in payloads(settled(standin, receiver, 4))]
    assert got == [ids[2], ids[1], ids[0], ids[3]]


def test_hold_keeps_messages_until_released(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    hold = standin.control.add_webhook_fault(action="hold", type="user.created")
    first = api.create_user("held1@example.com")
    second = api.create_user("held2@example.com")
    api.patch(f"/v1/users/{first['id']}", {"first_name": "Passes"})
    idle = standin.control.wait_for_webhooks(timeout=5)  # parked messages do not count
    assert idle["parked"] == 2 and idle["queued"] == 0
    [passed] = receiver.wait_for(1)
    assert passed.verified()["type"] == "user.updated"
    standin.control.release_webhooks(hold["id"])
    got = payloads(settled(standin, receiver, 3))[1:]
    assert got == [("user.created", first), ("user.created", second)]
    assert standin.control.webhook_faults() == []


def test_invalid_webhook_faults_are_400(api: StandinApi) -> None:
    for fault in (
        {},
        {"action": "explode"},
        {"action": "delay"},
        {"action": "reorder", "count": 1},
        {"action": "drop", "times": 0},
        {"action": "drop", "type": ""},
        {"action": "drop", "when": "now"},
    ):
        response = api.control("POST", "/webhooks/faults", fault)
        assert response.status_code == 400 and response.json()["error"], fault
    assert api.control("POST", "/webhooks/faults/99/release").status_code == 404


# --------------------------------------------------------------------------- control API, reset, CLI


def test_reset_drops_faults_queue_and_log_and_restores_the_starting_endpoint(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    standin.control.add_webhook_fault(action="hold")
    api.create_user("parked@example.com")
    assert standin.control.webhooks()["parked"] == 1
    standin.control.reset()
    status = standin.control.webhooks()
    assert (status["enabled"], status["parked"], status["queued"]) == (False, 0, 0)
    assert standin.control.webhook_faults() == [] and standin.control.webhook_deliveries() == []
    api.create_user("after-reset@example.com")
    assert receiver.received == []

    with StandinServer(webhook_url=receiver.url, webhook_secret=SECRET) as configured:
        configured.control.disable_webhooks()
        configured.control.reset()
        status = configured.control.webhooks()
        assert (status["enabled"], status["url"], status["secret"]) == (True, receiver.url, SECRET)
        user = StandinApi(configured).create_user("restored@example.com")
        configured.control.wait_for_webhooks()
        assert payloads(receiver.wait_for(1)) == [("user.created", user)]


def test_webhooks_are_set_and_turned_off_through_the_control_api(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    fresh = standin.control.set_webhooks(receiver.url)  # no secret given: a new one
    assert fresh["secret"].startswith("whsec_") and fresh["secret"] != SECRET
    api.create_user("fresh@example.com")
    [message] = settled(standin, receiver, 1)
    assert message.verified(fresh["secret"])["type"] == "user.created"

    for body in (
        {"url": "ftp://x"},
        {"url": receiver.url, "secret": "nope"},
        {"url": receiver.url, "secret": "whsec_"},
    ):
        assert api.control("PUT", "/webhooks", body).status_code == 400, body
    standin.control.disable_webhooks()
    assert standin.control.webhooks()["enabled"] is False
    api.create_user("silent@example.com")
    standin.control.wait_for_webhooks()
    assert len(receiver.received) == 1


def test_the_bulk_seed_sends_user_created_only_when_asked(
    api: StandinApi, standin: StandinServer, receiver: Receiver
) -> None:
    standin.control.bulk_create_users([{"email_address": "quiet@example.com"}])
    loud = standin.control.bulk_create_users(
        [{"email_address": f"loud{i}@example.com", "first_name": f"L{i}"} for i in range(3)], webhooks=True
    )
    got = payloads(settled(standin, receiver, 3))
    assert got == [("user.created", api.get(f"/v1/users/{user_id}").json()) for user_id in loud]


def test_the_command_line_sends_webhooks(receiver: Receiver) -> None:
    receiver.clear()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    base = [sys.executable, "-m", "clerk_standin", "--port", str(port), "--quiet"]
    refused = subprocess.run(
        [*base, "--webhook-url", receiver.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 2 and "--webhook-secret" in refused.stderr
    flags = ["--webhook-url", receiver.url, "--webhook-secret", SECRET, "--webhook-retry-scale", "0.01"]
    process = subprocess.Popen(
        [*base, *flags], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(url + "/__standin/health", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "stand-in CLI did not start"
                time.sleep(0.05)
        headers = {"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"}
        response = requests.post(
            url + "/v1/users", json={"email_address": ["cli@example.com"]}, headers=headers, timeout=5
        )
        assert response.status_code == 200
        [message] = receiver.wait_for(1)
        assert message.verified()["data"] == response.json()
        assert requests.get(url + "/__standin/webhooks", timeout=5).json()["retry_scale"] == 0.01
    finally:
        process.terminate()
        process.communicate(timeout=10)
