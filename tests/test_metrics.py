"""``GET /metrics``: Prometheus' text format, what it counts, and who may read it.

With the test client (one process, its own registry, shared by every test of the run, so each test compares
a scrape before and after): requests by method, URL rule and status, never by path; registrations by the
outcome the caller got; Clerk calls by path template and their failures by kind; JWKS fetches; the pool's
checked-out connections; no rate limit, CSRF or session in the way; a request that came through the proxy
refused.

Under gunicorn with two workers (gunicorn.conf.py's multiprocess wiring, behind the example nginx site):
each worker serves requests while the other is frozen (SIGSTOP), as each worker's own metric file shows, and
a scrape answered by either one adds up both; registrations, Clerk calls and JWKS fetches are counted across
workers; nginx refuses /metrics while gunicorn on loopback serves it. And gunicorn.conf.py's directory for
the metric files: a given one emptied at start, a dead worker's gauge dropped, a private one kept (with its
counts) across a reload and removed when gunicorn stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import runpy
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from unittest import mock

import pytest
import requests
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from iris import mail
from iris.extensions import db
from tests.helpers import (
    ME,
    PASSWORD,
    URL,
    Mailbox,
    app_with,
    bearer,
    free_port,
    migrate,
    register,
    session_token,
    smtp_server,
    wait_for,
)
from tests.servers import GUNICORN_CONF, Gunicorn, Site, app_environment, behind_nginx, migrated_schema

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

REQUESTS = "iris_http_requests_total"
HEALTHZ = MappingProxyType({"method": "GET", "route": "/healthz", "status": "200"})


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    """One sample's value; 0 when the series does not exist yet."""
    return samples.get((name, tuple(sorted((labels or {}).items()))), 0.0)


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.get_data(as_text=True))


def grew(before: Samples, after: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    return value(after, name, labels) - value(before, name, labels)


# --- one process: the test client ------------------------------------------------------------------------


def test_requests_are_counted_and_timed_by_rule_and_status_never_by_path(client):
    user_id, secret = uuid.uuid4(), uuid.uuid4().hex
    before = scrape(client)
    for _ in range(3):
        client.get("/healthz")
    client.get(f"/api/v1/users/{user_id}")  # no session: 401
    client.get(f"/no-such-page/{secret}")
    client.open("/healthz", method="BREW")  # 405: no rule matched this method
    response = client.get("/metrics")
    text = response.get_data(as_text=True)
    after = parse(text)

    assert grew(before, after, REQUESTS, HEALTHZ) == 3
    assert grew(before, after, "iris_http_request_duration_seconds_count", HEALTHZ) == 3
    assert grew(before, after, "iris_http_request_duration_seconds_bucket", {**HEALTHZ, "le": "+Inf"}) == 3
    user = {"method": "GET", "route": "/api/v1/users/<uuid:user_id>", "status": "401"}
    assert grew(before, after, REQUESTS, user) == 1
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert grew(before, after, REQUESTS, unmatched) == 1
    brew = {"method": "other", "route": "<unmatched>", "status": "405"}
    assert grew(before, after, REQUESTS, brew) == 1
    assert str(user_id) not in text
    assert secret not in text


def test_registrations_are_counted_by_the_outcome_the_caller_got(client):
    before = scrape(client)
    created = client.post(URL, json={"email": "owner@bistro.example", "password": PASSWORD})
    taken = client.post(URL, json={"email": "owner@bistro.example", "password": PASSWORD})
    invalid = client.post(URL, json={"email": "not an address", "password": PASSWORD})
    after = scrape(client)

    assert (created.status_code, taken.status_code, invalid.status_code) == (201, 409, 422)
    for outcome in ("created", "email_taken", "validation_error"):
        assert grew(before, after, "iris_registrations_total", {"outcome": outcome}) == 1, outcome
    # Only the first reached Clerk: the second found the email taken here, the third never got that far.
    create = {"method": "POST", "path": "/users"}
    assert grew(before, after, "iris_clerk_request_duration_seconds_count", create) == 1
    assert not any(name == "iris_clerk_errors_total" for name, _ in set(after) - set(before))


class HeldMailbox(Mailbox):
    """Answers a message only once ``release`` is set (at most 10 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    async def handle_DATA(self, server, session, envelope) -> str:
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10)
        return await super().handle_DATA(server, session, envelope)


def test_mails_are_counted_by_outcome_and_the_queue_gauge_follows_the_courier(make_app):
    with smtp_server(mailbox=HeldMailbox()) as held:
        app = make_app(MAIL_SERVER="127.0.0.1", MAIL_PORT=held.port)
        migrate(app)
        client = app.test_client()
        before = scrape(client)
        try:
            assert (
                client.post(URL, json={"email": "a@bistro.example", "password": PASSWORD}).status_code == 201
            )
            wait_for(lambda: held.peers or held.connections, timeout=5)  # the courier is in the SMTP exchange
            during = scrape(client)
        finally:
            held.release.set()
        held.wait_for(1)
        assert mail.wait_until_idle(app, 5)
        after = scrape(client)
    assert grew(before, during, "iris_mail_queued") == 1
    assert grew(before, after, "iris_mail_queued") == 0
    assert grew(before, after, "iris_mails_total", {"outcome": "sent"}) == 1

    unreachable = make_app(MAIL_SERVER="127.0.0.1", MAIL_PORT=free_port())  # nothing listens there
    migrate(unreachable)
    assert (
        unreachable.test_client()
        .post(URL, json={"email": "b@bistro.example", "password": PASSWORD})
        .status_code
        == 201
    )
    assert mail.wait_until_idle(unreachable, 10)
    failed = scrape(client)
    assert grew(after, failed, "iris_mails_total", {"outcome": "failed"}) == 1
    assert grew(after, failed, "iris_mails_total", {"outcome": "sent"}) == 0


def test_clerk_failures_are_counted_by_kind(client, make_app, standin):
    before = scrape(client)
    standin.control.add_fault(method="POST", path="/v1/users", times=1, status=500)
    failed = client.post(URL, json={"email": "five@b.example", "password": PASSWORD})
    with app_with(make_app, CLERK_API_URL="http://127.0.0.1:1") as unreachable:
        refused = unreachable.test_client().post(URL, json={"email": "one@b.example", "password": PASSWORD})
    after = scrape(client)

    create = {"method": "POST", "path": "/users"}
    assert failed.status_code == 503, failed.get_data(as_text=True)
    assert grew(before, after, "iris_clerk_errors_total", {**create, "kind": "server_error"}) == 1
    assert refused.status_code == 503, refused.get_data(as_text=True)
    assert grew(before, after, "iris_clerk_errors_total", {**create, "kind": "connection"}) == 1
    assert failed.json["error"]["code"] == refused.json["error"]["code"] == "auth_provider_unavailable"
    assert grew(before, after, "iris_registrations_total", {"outcome": "auth_provider_unavailable"}) == 2


def test_the_rate_limiters_refusal_of_a_registration_is_an_outcome(make_app):
    with app_with(make_app, RATELIMIT_ENABLED=True, RATELIMIT_REGISTER="1 per minute") as app:
        client = app.test_client()
        before = scrape(client)
        first = client.post(URL, json={"email": "first@b.example", "password": PASSWORD})
        second = client.post(URL, json={"email": "second@b.example", "password": PASSWORD})
        after = scrape(client)
    assert (first.status_code, second.status_code) == (201, 429)
    assert grew(before, after, "iris_registrations_total", {"outcome": "rate_limited"}) == 1
    assert grew(before, after, "iris_registrations_total", {"outcome": "created"}) == 1


def test_jwks_is_fetched_once_for_many_signed_in_requests(client, standin):
    user = register(client)
    token = session_token(standin, user["clerk_user_id"])
    before = scrape(client)
    for _ in range(3):
        assert client.get(ME, headers=bearer(token)).status_code == 200
    after = scrape(client)
    assert grew(before, after, "iris_jwks_fetches_total", {"outcome": "ok"}) == 1
    jwks = {"method": "GET", "path": "/jwks"}
    assert grew(before, after, "iris_clerk_request_duration_seconds_count", jwks) == 1


def test_the_pool_gauge_follows_checkouts_and_ignores_failed_connects(app, make_app):
    gauge = "iris_db_pool_checked_out_connections"
    client = app.test_client()
    idle = value(scrape(client), gauge)
    with app.app_context():
        first, second = db.engine.connect(), db.engine.connect()
        assert value(scrape(client), gauge) == idle + 2
        first.invalidate()  # a connection that broke while checked out still comes back once
        first.close()
        second.close()
    assert value(scrape(client), gauge) == idle

    nowhere = make_app(SQLALCHEMY_DATABASE_URI="postgresql+psycopg://nobody@127.0.0.1:1/none")
    with nowhere.app_context(), pytest.raises(sa.exc.OperationalError):
        db.engine.connect()  # a connection that was never made was never checked out
    assert value(scrape(client), gauge) == idle


def test_metrics_has_no_rate_limit_csrf_or_session(make_app):
    app = make_app(RATELIMIT_ENABLED=True, RATELIMIT_DEFAULT="1 per minute", WTF_CSRF_ENABLED=True)
    client = app.test_client()
    assert [client.get("/metrics").status_code for _ in range(3)] == [200, 200, 200]
    assert [client.get("/").status_code for _ in range(2)] == [200, 429]  # the default limit is on
    assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("hops", "headers", "status"),
    [
        (1, {"X-Forwarded-For": "203.0.113.9"}, 404),  # came through the proxy
        (1, {}, 200),  # the host's scraper, straight to gunicorn
        (0, {"X-Forwarded-For": "203.0.113.9"}, 200),  # no proxy: the header means nothing
    ],
    ids=["through-the-proxy", "direct", "no-proxy"],
)
def test_behind_a_proxy_the_app_refuses_a_scrape_that_came_through_it(make_app, hops, headers, status):
    client = make_app(IRIS_PROXY_HOPS=hops).test_client()
    response = client.get("/metrics", headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert response.status_code == status
    assert (b"iris_http_requests_total" in response.data) is (status == 200)


# --- two gunicorn workers behind nginx -------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_schema(admin_engine: sa.Engine, standin_server) -> Iterator[str]:
    with migrated_schema(admin_engine) as name:
        yield name


@pytest.fixture(scope="module")
def site(metrics_schema, standin_server, tmp_path_factory) -> Iterator[Site]:
    """gunicorn (gunicorn.conf.py, 2 workers of 8 threads, IRIS_PROXY_HOPS=1) behind the example nginx site,
    its metric files in a directory of the test's."""
    directory = tmp_path_factory.mktemp("metrics")
    env = app_environment(
        metrics_schema, standin_server, IRIS_PROXY_HOPS="1", WEB_CONCURRENCY="2",
        IRIS_METRICS_DIR=str(directory / "files"),
    )  # fmt: skip
    with behind_nginx(directory, env) as running:
        yield running


def direct(site: Site) -> str:
    return f"http://127.0.0.1:{site.gunicorn.port}"


def scrape_gunicorn(site: Site) -> tuple[Samples, str]:
    response = requests.get(direct(site) + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return parse(response.text), response.text


def per_worker(files: Path, tmp_path: Path) -> dict[int, Samples]:
    """Each worker's own counters, read from its file alone (``counter_<pid>.db``)."""
    counts = {}
    for path in files.glob("counter_*.db"):
        alone = tmp_path / path.stem
        alone.mkdir(parents=True)
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))
        counts[int(path.stem.removeprefix("counter_"))] = parse(generate_latest(registry).decode())
    return counts


def workers_of(master: int) -> list[int]:
    """The pids of ``master``'s children, read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == master:
                children.append(int(stat.parent.name))
    return sorted(children)


def healthz_on_new_connections(site: Site, count: int) -> None:
    for _ in range(count):
        response = requests.get(direct(site) + "/healthz", headers={"Connection": "close"}, timeout=10)
        assert response.status_code == 200


def test_a_scrape_from_either_worker_adds_up_both(site, tmp_path):
    """Each worker listens on its own socket (reuse_port), so the kernel spreads new connections over both:
    requests on 40 new connections land on both workers, each worker's own file holds its share, and every
    scrape, whichever worker answers it (both do among 20), holds the sum."""
    files = Path(site.gunicorn.env["IRIS_METRICS_DIR"])
    first, second = workers_of(site.gunicorn.process.pid)  # exactly two workers
    before, _ = scrape_gunicorn(site)
    own_before = per_worker(files, tmp_path / "before")
    healthz_on_new_connections(site, 40)
    scrapes = [scrape_gunicorn(site) for _ in range(20)]  # a new connection each
    own_after = per_worker(files, tmp_path / "after")

    def by(pid: int, labels: Mapping[str, str]) -> float:
        return grew(own_before.get(pid, {}), own_after.get(pid, {}), REQUESTS, labels)

    served = (by(first, HEALTHZ), by(second, HEALTHZ))
    assert sum(served) == 40 and min(served) > 0, served
    for after, _ in scrapes:
        assert grew(before, after, REQUESTS, HEALTHZ) == 40
        assert grew(before, after, "iris_http_request_duration_seconds_count", HEALTHZ) == 40
    scraped = {"method": "GET", "route": "/metrics", "status": "200"}
    assert by(first, scraped) >= 1 and by(second, scraped) >= 1  # both workers answered scrapes
    assert "pid=" not in scrapes[-1][1]  # summed over processes, not listed per process


def test_registrations_clerk_calls_and_jwks_fetches_are_counted_under_gunicorn(site, standin):
    before, _ = scrape_gunicorn(site)
    body = {"email": f"{uuid.uuid4().hex[:10]}@metrics.example", "password": PASSWORD}
    created = requests.post(direct(site) + URL, json=body, timeout=30)
    taken = requests.post(direct(site) + URL, json=body, timeout=30)
    assert (created.status_code, taken.status_code) == (201, 409), (created.text, taken.text)
    token = session_token(standin, created.json()["clerk_user_id"])
    me = requests.get(direct(site) + ME, headers=bearer(token), timeout=10)
    assert me.status_code == 200, me.text
    after, text = scrape_gunicorn(site)

    assert grew(before, after, "iris_registrations_total", {"outcome": "created"}) == 1
    assert grew(before, after, "iris_registrations_total", {"outcome": "email_taken"}) == 1
    create = {"method": "POST", "path": "/users"}
    assert grew(before, after, "iris_clerk_request_duration_seconds_count", create) == 1
    assert grew(before, after, "iris_jwks_fetches_total", {"outcome": "ok"}) == 1
    route = {"method": "POST", "route": URL}
    assert grew(before, after, REQUESTS, {**route, "status": "201"}) == 1
    assert grew(before, after, REQUESTS, {**route, "status": "409"}) == 1
    # Live workers' checked-out connections, summed: none between requests.
    assert ("iris_db_pool_checked_out_connections", ()) in after
    assert value(after, "iris_db_pool_checked_out_connections") == 0
    for secret in (created.json()["id"], created.json()["clerk_user_id"], body["email"], token):
        assert secret not in text


def test_nginx_refuses_metrics_while_gunicorn_on_loopback_serves_it(site):
    public = requests.get(site.https_url + "/metrics", verify=str(site.certificate), timeout=10)
    assert public.status_code == 404
    assert "X-Request-ID" not in public.headers  # nginx answered; the app never saw it
    assert "iris_" not in public.text

    # The tests' plain listener has only the site's `location /`: the app itself refuses what came through it.
    plain = requests.get(f"http://127.0.0.1:{site.ports['plain']}/metrics", timeout=10)
    assert plain.status_code == 404
    assert "X-Request-ID" in plain.headers
    assert "iris_" not in plain.text

    _, text = scrape_gunicorn(site)
    assert "iris_http_requests_total" in text


# --- gunicorn.conf.py's metrics directory ----------------------------------------------------------------


def test_the_config_empties_a_given_directory_at_start_and_drops_a_dead_workers_gauge(tmp_path):
    files = tmp_path / "files"
    with mock.patch.dict(os.environ, {"IRIS_METRICS_DIR": str(files)}):
        settings = runpy.run_path(str(GUNICORN_CONF))
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(files)
    assert files.is_dir()
    left_over = [files / name for name in ("counter_11.db", "histogram_11.db", "gauge_livesum_11.db")]
    for path in left_over:
        path.write_bytes(b"")
    settings["on_starting"](None)
    assert list(files.iterdir()) == []

    for path in left_over:
        path.write_bytes(b"")
    settings["child_exit"](None, SimpleNamespace(pid=11))
    assert sorted(path.name for path in files.iterdir()) == ["counter_11.db", "histogram_11.db"]


def metric_files_of(pid: int) -> set[Path]:
    """The metric files process ``pid`` has mapped (/proc/<pid>/maps)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    paths = {Path(line.split(maxsplit=5)[5]) for line in maps if line.endswith(".db")}
    return {path for path in paths if path.parent.name.startswith("iris-metrics-")}


def test_a_reload_keeps_the_private_directory_and_its_counts_and_a_stop_removes_it(schema, standin, tmp_path):
    env = app_environment(schema, standin, WEB_CONCURRENCY="2")
    with Gunicorn(tmp_path, env) as server:
        base_url = f"http://127.0.0.1:{server.port}"
        master = server.process.pid
        old_workers = workers_of(master)
        for _ in range(4):
            assert requests.get(base_url + "/healthz", headers={"Connection": "close"}, timeout=10).ok
        before = parse(requests.get(base_url + "/metrics", timeout=10).text)
        [directory] = {path.parent for pid in old_workers for path in metric_files_of(pid)}
        assert directory.name.startswith("iris-metrics-")  # the private one, under /dev/shm when there is one

        os.kill(master, signal.SIGHUP)  # a reload: new workers, same master

        def replaced() -> bool:
            workers = workers_of(master)
            return len(workers) == 2 and not set(workers) & set(old_workers)

        wait_for(replaced, timeout=30)
        wait_for(lambda: requests.get(base_url + "/healthz", timeout=10).ok)
        after = parse(requests.get(base_url + "/metrics", timeout=10).text)
        assert value(after, REQUESTS, HEALTHZ) > value(before, REQUESTS, HEALTHZ) >= 4  # the old workers' too
        assert {path.parent for pid in workers_of(master) for path in metric_files_of(pid)} == {directory}
    assert not directory.exists()
