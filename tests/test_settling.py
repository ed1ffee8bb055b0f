"""Lost, late and concurrent answers: a create that lands after Iris gave up, and settlers that meet.

Clerk is the stand-in over real HTTP, the database real PostgreSQL. The interleavings are made deterministic
with the stand-in's ``hold`` fault: a request is parked inside Clerk until the test releases it, so the test
decides which settler acts first, with no sleeps or timing assumptions.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from iris import registration
from tests.helpers import (
    PASSWORD,
    URL,
    assert_error,
    clerk_users,
    create_marked_clerk_user,
    expire_leases,
    instance_mark,
    migrate,
    password_works,
    rows,
    run_sql,
    wait_for,
)

OTHER_PASSWORD = "another horse battery staple"
EMAIL = "owner@bistro.example"


class Background:
    """Run ``work`` in a thread now; ``result()`` joins it and returns its value (or raises its error)."""

    def __init__(self, work: Callable[[], Any]):
        self.outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                self.outcome["value"] = work()
            except BaseException as error:  # handed to the test thread by result()
                self.outcome["error"] = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 30) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background work did not finish"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["value"]


def register(app, password: str = PASSWORD, email: str = EMAIL):
    return app.test_client().post(URL, json={"email": email, "password": password})


def reconcile(app) -> dict[str, int]:
    with app.app_context():
        return registration.reconcile()


def a_create_that_landed_after_iris_gave_up(app, standin, email: str = EMAIL) -> tuple[str, dict]:
    """A registration whose create answer was lost (503) and which Clerk then stored, with its lease run out:
    the pending row's id and the Clerk user that carries it."""
    held = standin.control.add_fault(method="POST", path="/v1/users", action="hold", times=1)
    assert_error(register(app, email=email), 503, "auth_provider_unavailable")  # Iris stopped waiting
    standin.control.release(held["id"])
    wait_for(lambda: clerk_users(standin, email_address=email) != [])  # ... and then Clerk stored the user
    [pending] = [row for row in rows(app) if row.email == email]
    [clerk_user] = clerk_users(standin, email_address=email)
    assert pending.clerk_user_id is None
    assert clerk_user["external_id"] == str(pending.id)
    expire_leases(app)
    return str(pending.id), clerk_user


def assert_one_account(app, standin, password: str) -> tuple[str, dict]:
    """Exactly one Clerk user and one live row pointing at each other, and ``password`` signs in."""
    [row] = rows(app)
    [clerk_user] = clerk_users(standin)
    assert row.deleted_at is None
    assert row.clerk_user_id == clerk_user["id"]
    assert clerk_user["external_id"] == str(row.id)
    assert password_works(standin, clerk_user["id"], password)
    return str(row.id), clerk_user


@pytest.mark.slow  # waits for a create that lands 2.5 s late and a 3 s lease to run out
def test_a_create_that_lands_after_iris_gave_up_ends_in_one_account(make_app, standin):
    """Clerk stores the user 2.5 s after the request, well after Iris's 1.5 s read timeout. A client that
    retries as Retry-After says ends with one Clerk user, one row, and the password of the attempt that got
    the 201."""
    app = make_app(IRIS_PENDING_TIMEOUT_SECONDS=3)
    migrate(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_port}"
    standin.control.add_fault(method="POST", path="/v1/users", latency_ms=2500, times=1)

    answers = []
    password = PASSWORD
    try:
        for _ in range(6):
            response = requests.post(base_url + URL, json={"email": EMAIL, "password": password}, timeout=30)
            answers.append(response.status_code)
            if response.status_code == 201:
                break
            assert response.status_code in (409, 503), response.text
            password = OTHER_PASSWORD  # the person picks another password when trying again
            time.sleep(int(response.headers["Retry-After"]))
    finally:
        server.shutdown()

    assert answers[0] == 503
    assert answers[-1] == 201, answers
    row_id, clerk_user = assert_one_account(app, standin, OTHER_PASSWORD)
    assert row_id == response.json()["id"]
    assert not password_works(standin, clerk_user["id"], PASSWORD)


def test_a_create_that_lands_after_its_row_was_settled_is_removed_as_a_stray(app, standin):
    """The late create lands after the next attempt has settled (deleted) the row it belonged to. Clerk then
    says the email exists; the user holding it carries an id of ours that no row claims, so it is removed and
    the new registration goes on."""
    late = standin.control.add_fault(method="POST", path="/v1/users", action="hold", times=1)
    assert_error(register(app), 503, "auth_provider_unavailable")
    [first_row] = rows(app)
    expire_leases(app)

    second = standin.control.add_fault(method="POST", path="/v1/users", action="hold", times=1)
    attempt = Background(lambda: register(app, OTHER_PASSWORD))
    standin.control.wait_until_held(second["id"])  # the old row is settled, the new create is on its way
    assert str(first_row.id) not in {str(row.id) for row in rows(app)}
    standin.control.release(late["id"])
    wait_for(lambda: [user["external_id"] for user in clerk_users(standin)] == [str(first_row.id)])
    standin.control.release(second["id"])

    response = attempt.result()
    assert response.status_code == 201, response.json
    row_id, _ = assert_one_account(app, standin, OTHER_PASSWORD)
    assert row_id == response.json["id"]


def test_a_clerk_user_that_is_not_ours_still_makes_the_email_taken(app, client, standin):
    """Control for the stray rule: a user made in Clerk's dashboard (no external_id) is never removed."""
    requests.post(
        standin.api_url + "/users",
        json={"email_address": [EMAIL], "password": PASSWORD},
        headers={"Authorization": f"Bearer {standin.secret_key}"},
        timeout=5,
    ).raise_for_status()
    assert_error(register(app, OTHER_PASSWORD), 409, "email_taken")
    [kept] = clerk_users(standin)
    assert kept["external_id"] is None
    assert password_works(standin, kept["id"], PASSWORD)
    assert rows(app) == []


@pytest.mark.parametrize("mark", ["foreign", None], ids=["another-database", "no-mark"])
def test_a_clerk_user_with_a_uuid_unknown_here_but_not_our_mark_keeps_the_email_taken(app, standin, mark):
    """A UUID external_id no row here has is not proof of a stray: another Iris database on the same Clerk
    instance (its own mark) or another application (no mark) made the user. Registration leaves it alone and
    answers 409; only our own mark makes it a stray to remove (the control at the end)."""
    theirs = create_marked_clerk_user(standin, EMAIL, mark=str(uuid.uuid4()) if mark else None)
    assert_error(register(app, OTHER_PASSWORD), 409, "email_taken")
    assert [user["id"] for user in clerk_users(standin)] == [theirs["id"]]
    assert password_works(standin, theirs["id"], PASSWORD)
    assert rows(app) == []

    mine = create_marked_clerk_user(standin, "mine@bistro.example", mark=instance_mark(app))
    created = register(app, OTHER_PASSWORD, email="mine@bistro.example")
    assert created.status_code == 201, created.json
    assert mine["id"] not in {user["id"] for user in clerk_users(standin)}


def pending_row(app, email: str) -> str:
    """A pending registration whose lease has run out (it died before Clerk's answer was recorded); its id."""
    row_id = str(uuid.uuid4())
    run_sql(
        app,
        "INSERT INTO users (id, email, role, pending_owner, pending_until) VALUES"
        " (:id, :email, 'restaurant', gen_random_uuid(), now() - interval '1 second')",
        id=row_id,
        email=email,
    )
    return row_id


def test_a_pending_row_is_never_completed_with_another_databases_user(app, standin):
    """Settling goes by the pending row's own external_id lookup. A user found there with another database's
    mark (a copy of this database, same row ids, on the same Clerk instance) is not this row's: the row is
    undone and the other database's user kept. Without a mark (made before users were marked) the user is
    this row's, as before: the control completes with it."""
    copied = pending_row(app, "copy@bistro.example")
    theirs = create_marked_clerk_user(
        standin, "copy@bistro.example", mark=str(uuid.uuid4()), external_id=copied
    )
    older = pending_row(app, "older@bistro.example")
    before_marks = create_marked_clerk_user(standin, "older@bistro.example", mark=None, external_id=older)

    assert reconcile(app) == {"completed": 1, "removed": 1, "failed": 0}
    assert [(str(row.id), row.clerk_user_id) for row in rows(app)] == [(older, before_marks["id"])]
    assert {user["id"] for user in clerk_users(standin)} == {theirs["id"], before_marks["id"]}


def test_reconcile_holding_a_row_makes_the_next_attempt_wait(app, standin):
    """Reconcile claimed the row and is asking Clerk about it: a registration of the same email does not touch
    the row (409 with Retry-After), and reconcile then completes it."""
    row_id, clerk_user = a_create_that_landed_after_iris_gave_up(app, standin)
    lookup = standin.control.add_fault(method="GET", path="/v1/users", action="hold", times=1)
    reconciling = Background(lambda: reconcile(app))
    standin.control.wait_until_held(lookup["id"])

    waiting = register(app, OTHER_PASSWORD)
    assert_error(waiting, 409, "email_taken")
    assert int(waiting.headers["Retry-After"]) > 0
    standin.control.release(lookup["id"])

    assert reconciling.result() == {"completed": 1, "removed": 0, "failed": 0}
    settled_id, settled_user = assert_one_account(app, standin, PASSWORD)
    assert (settled_id, settled_user["id"]) == (row_id, clerk_user["id"])
    assert_error(register(app, OTHER_PASSWORD), 409, "email_taken")


def test_a_next_attempt_holding_a_row_makes_reconcile_skip_it(app, standin):
    """The next attempt claimed the row and is deleting its Clerk user: reconcile skips the row (it neither
    completes it with the user being deleted nor deletes it), and the attempt then succeeds."""
    _, old_user = a_create_that_landed_after_iris_gave_up(app, standin)
    deleting = standin.control.add_fault(method="DELETE", path="/v1/users/", action="hold", times=1)
    attempt = Background(lambda: register(app, OTHER_PASSWORD))
    standin.control.wait_until_held(deleting["id"])

    assert reconcile(app) == {"completed": 0, "removed": 0, "failed": 0}
    standin.control.release(deleting["id"])

    response = attempt.result()
    assert response.status_code == 201, response.json
    _, clerk_user = assert_one_account(app, standin, OTHER_PASSWORD)
    assert clerk_user["id"] != old_user["id"]


def test_a_settler_taking_over_a_slow_registration_never_deletes_its_clerk_user(make_app, standin):
    """The original request outlives its lease (its create is slow); reconcile claims the row. When the create
    answers, the original finds the row no longer its own and leaves the Clerk user alone; reconcile completes
    the row with it. No live row ever points at a deleted Clerk user."""
    patient = make_app(CLERK_TIMEOUT=(1.0, 30.0))
    migrate(patient)
    create = standin.control.add_fault(method="POST", path="/v1/users", action="hold", times=1)
    original = Background(lambda: register(patient))
    standin.control.wait_until_held(create["id"])
    expire_leases(patient)

    lookup = standin.control.add_fault(method="GET", path="/v1/users", action="hold", times=1)
    reconciling = Background(lambda: reconcile(patient))
    standin.control.wait_until_held(lookup["id"])
    standin.control.release(create["id"])
    response = original.result()
    error = assert_error(response, 409, "email_taken")
    assert "in progress" in error["message"]
    standin.control.release(lookup["id"])

    assert reconciling.result() == {"completed": 1, "removed": 0, "failed": 0}
    assert "DELETE /v1/users/<user_id>" not in standin.control.stats()["requests"]
    assert_one_account(patient, standin, PASSWORD)


def test_two_reconciles_never_settle_one_row_twice(app, standin):
    """Cron overlapping itself: the second run finds the row claimed and skips it."""
    a_create_that_landed_after_iris_gave_up(app, standin)
    lookup = standin.control.add_fault(method="GET", path="/v1/users", action="hold", times=1)
    first = Background(lambda: reconcile(app))
    standin.control.wait_until_held(lookup["id"])
    assert reconcile(app) == {"completed": 0, "removed": 0, "failed": 0}
    standin.control.release(lookup["id"])
    assert first.result() == {"completed": 1, "removed": 0, "failed": 0}
    assert_one_account(app, standin, PASSWORD)


def test_a_row_one_reconcile_claimed_is_skipped_by_another_that_read_it_as_unclaimed(app, standin):
    """Both runs read the second row while its lease had run out; only the one that claims it first settles
    it. The claim is one conditional UPDATE, so reading a row as claimable is never enough to act on it."""
    a_create_that_landed_after_iris_gave_up(app, standin, "one@bistro.example")
    a_create_that_landed_after_iris_gave_up(app, standin, "two@bistro.example")
    first_lookup = standin.control.add_fault(method="GET", path="/v1/users", action="hold", times=1)
    first = Background(lambda: reconcile(app))  # reads both rows, claims "one", parks on its lookup
    standin.control.wait_until_held(first_lookup["id"])
    second_lookup = standin.control.add_fault(method="GET", path="/v1/users", action="hold", times=1)
    second = Background(lambda: reconcile(app))  # reads "two" alone, claims it, parks on its lookup
    standin.control.wait_until_held(second_lookup["id"])

    standin.control.release(first_lookup["id"])  # the first run completes "one", then finds "two" claimed
    assert first.result() == {"completed": 1, "removed": 0, "failed": 0}
    standin.control.release(second_lookup["id"])
    assert second.result() == {"completed": 1, "removed": 0, "failed": 0}
    assert {(row.email, row.clerk_user_id is not None) for row in rows(app)} == {
        ("one@bistro.example", True),
        ("two@bistro.example", True),
    }


def test_a_lost_create_whose_lookup_is_lost_too_keeps_the_row_until_the_create_cannot_land(app, standin):
    """Clerk's answer to the create and to the lookup after it are both lost: Iris cannot know whether the
    user exists, so the row stays pending with a full lease. The create then lands, and the next attempt,
    once the lease has run out, settles it and registers afresh."""
    create = standin.control.add_fault(method="POST", path="/v1/users", action="hold", times=1)
    standin.control.add_fault(method="GET", path="/v1/users", action="drop", times=1)
    response = register(app)
    assert_error(response, 503, "auth_provider_unavailable")
    assert int(response.headers["Retry-After"]) == app.config["IRIS_PENDING_TIMEOUT_SECONDS"] + 1
    assert [row.clerk_user_id for row in rows(app)] == [None]

    standin.control.release(create["id"])
    wait_for(lambda: clerk_users(standin) != [])
    expire_leases(app)
    created = register(app, OTHER_PASSWORD)
    assert created.status_code == 201, created.json
    assert_one_account(app, standin, OTHER_PASSWORD)


@pytest.mark.parametrize(
    "fault", [{"action": "drop"}, {"action": "drop", "after_commit": True}], ids=["not-done", "done"]
)
def test_a_stray_whose_delete_answer_is_lost_is_left_for_a_later_attempt(app, standin, fault):
    """A Clerk user carrying an id of ours that no row has holds the email, and the answer to deleting it is
    lost (the delete was or was not carried out). The attempt answers 409 and leaves no row; the next one
    succeeds either way, with one account."""
    stray = create_marked_clerk_user(standin, EMAIL, mark=instance_mark(app))
    standin.control.add_fault(method="DELETE", path="/v1/users/", times=1, **fault)
    assert_error(register(app), 409, "email_taken")
    assert rows(app) == []

    created = register(app, OTHER_PASSWORD)
    assert created.status_code == 201, created.json
    _, clerk_user = assert_one_account(app, standin, OTHER_PASSWORD)
    assert clerk_user["id"] != stray["id"]
