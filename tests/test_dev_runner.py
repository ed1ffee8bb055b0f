"""``make run`` (scripts/dev.py) as a newcomer sees it: one plain banner, one plain line per request, and
TERM to ``make`` or Ctrl-C stopping both servers.

Real processes in a copy of the repository (so ``instance/`` is the copy's own, with development defaults:
SQLite and the stand-in), on free ports, with this virtualenv. ``make`` is told not to install anything
(``-o`` the install stamp): installing is not what these tests are about.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import PASSWORD, URL, free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
BANNER = "Iris is running on"
# Generous: a first start migrates a fresh SQLite database and makes the stand-in's signing key.
START_SECONDS = 60
STOP_SECONDS = 30


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository without its virtualenv, instance folder, .env, tests or caches."""
    target = tmp_path_factory.mktemp("checkout") / "iris"
    shutil.copytree(
        ROOT,
        target,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "instance",
            ".env",
            "test-output",
            "tests",
            "benchmarks",
            "__pycache__",
            ".*_cache",
        ),
    )
    return target


def clean_environment() -> dict[str, str]:
    """Only PATH and HOME: no DATABASE_URL, CLERK_* or FLASK_* from the machine running the tests."""
    return {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def group_alive(group: int) -> bool:
    """Whether any process is left in process group ``group``."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class Console:
    """A started process tree (its own process group) with its stdout and stderr in files."""

    def __init__(self, command: list[str], cwd: Path, logs: Path) -> None:
        self.out, self.err = logs / "stdout.txt", logs / "stderr.txt"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                command, cwd=cwd, env=clean_environment(), stdout=out, stderr=err, start_new_session=True
            )

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for_banner(self) -> None:
        def banner_or_exit() -> bool:
            return BANNER in self.stdout() or self.process.poll() is not None

        wait_for(banner_or_exit, timeout=START_SECONDS, interval=0.1)
        assert BANNER in self.stdout(), self.stderr()

    def kill_leftovers(self) -> None:
        """Whatever a failing test left running in this tree's process group."""
        if group_alive(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def ports() -> tuple[int, int]:
    app_port, standin_port = free_port(), free_port()
    while standin_port == app_port:
        standin_port = free_port()
    return app_port, standin_port


@pytest.fixture
def make_run(checkout: Path, ports: tuple[int, int], tmp_path: Path) -> Iterator[Console]:
    app_port, standin_port = ports
    command = [
        "make",
        "--no-print-directory",
        f"VENV={VENV}",
        "-o",
        f"{VENV}/.installed-run",
        "run",
        f"RUN_ARGS=--port {app_port} --standin-port {standin_port}",
    ]
    console = Console(command, checkout, tmp_path)
    yield console
    console.kill_leftovers()


def test_make_run_prints_one_plain_banner_and_one_plain_line_per_request(make_run, ports):
    app_port, standin_port = ports
    make_run.wait_for_banner()
    base = f"http://127.0.0.1:{app_port}"
    assert requests.get(base + "/", timeout=10).status_code == 200
    assert requests.get(base + "/signup/done", allow_redirects=False, timeout=10).status_code == 302
    created = requests.post(
        base + URL, json={"email": "new@bistro.example", "password": PASSWORD}, timeout=30
    )
    assert created.status_code == 201  # the app talks to the stand-in the runner started
    assert requests.get(base + "/nothing-here", timeout=10).status_code == 404

    out = make_run.stdout()
    assert out.count(BANNER) == 1
    assert f"{BANNER} {base}  (API docs: {base}/docs)" in out
    assert f"clerk     http://127.0.0.1:{standin_port}  the local Clerk stand-in" in out
    assert "mail      printed on this console, link included (no MAIL_SERVER)" in out
    # The verification mail, printed with a link to this app's own port.
    wait_for(lambda: f"{base}/verify-email/" in make_run.stdout(), timeout=10)
    assert "Ctrl-C stops both." in out
    assert "scripts/dev.py" not in out  # make does not echo its recipe

    def request_lines() -> list[str]:
        # The stand-in's webhooks about the new user come in too (the next test); not this test's requests.
        return [
            line
            for line in make_run.stderr().splitlines()
            if re.match(r"\d\d:\d\d:\d\d (GET|POST) /", line) and "/webhooks/" not in line
        ]

    wait_for(lambda: len(request_lines()) >= 4, timeout=10)
    lines = request_lines()
    assert len(lines) == 4, lines  # once each: werkzeug's own request line is not there
    for line, (method, path, status) in zip(
        lines,
        [("GET", "/", 200), ("GET", "/signup/done", 302), ("POST", URL, 201), ("GET", "/nothing-here", 404)],
        strict=True,
    ):
        assert re.fullmatch(rf"\d\d:\d\d:\d\d {method} {re.escape(path)} {status} \d+ ms", line), line
    console = out + make_run.stderr()
    assert "\x1b[" not in console  # no colour codes
    assert not [line for line in console.splitlines() if line.startswith("{")]  # no JSON
    for noise in ("Running on", "Press CTRL+C", "Serving Flask app", "Restarting with", "Clerk stand-in on"):
        assert noise not in console


def test_under_make_run_the_stand_in_keeps_the_app_in_step_through_webhooks(make_run, ports, checkout):
    """Support makes a user in "Clerk's dashboard" (the stand-in's Backend API), then deletes it: its signed
    webhooks reach the app, which keeps its SQLite database in step."""
    standin_port = ports[1]
    make_run.wait_for_banner()
    bapi = f"http://127.0.0.1:{standin_port}/v1"
    key = {"Authorization": "Bearer sk_test_iris_local_standin"}
    made = requests.post(
        bapi + "/users", json={"email_address": ["walkin@bistro.example"]}, headers=key, timeout=10
    )
    assert made.status_code == 200, made.text
    clerk_user_id = made.json()["id"]

    def account() -> tuple | None:
        with contextlib.closing(sqlite3.connect(checkout / "instance" / "iris.sqlite3")) as database:
            return database.execute(
                "SELECT email, role, deleted_at IS NOT NULL FROM users WHERE clerk_user_id = ?",
                (clerk_user_id,),
            ).fetchone()

    wait_for(lambda: account() is not None, timeout=10)
    assert account() == ("walkin@bistro.example", "restaurant", 0)
    assert requests.delete(f"{bapi}/users/{clerk_user_id}", headers=key, timeout=10).status_code == 200
    wait_for(lambda: account()[2] == 1, timeout=10)

    def webhook_lines() -> list[str]:
        return [line for line in make_run.stderr().splitlines() if "POST /api/v1/webhooks/clerk" in line]

    # The request's log line is written after its commit: the row can change before the line appears.
    wait_for(lambda: len(webhook_lines()) >= 2, timeout=10)
    assert len(webhook_lines()) == 2 and all(" 200 " in line for line in webhook_lines()), webhook_lines()


def test_term_to_make_stops_the_app_and_the_stand_in(make_run, ports):
    make_run.wait_for_banner()
    assert all(listening(port) for port in ports)

    make_run.process.send_signal(signal.SIGTERM)
    make_run.process.wait(timeout=STOP_SECONDS)
    wait_for(lambda: not group_alive(make_run.process.pid), timeout=STOP_SECONDS, interval=0.1)
    assert not any(listening(port) for port in ports)


def test_even_when_make_is_killed_outright_both_servers_stop(make_run, ports):
    """KILL reaches make alone; the runner notices that its parent is gone."""
    make_run.wait_for_banner()
    make_run.process.send_signal(signal.SIGKILL)
    make_run.process.wait(timeout=STOP_SECONDS)
    wait_for(lambda: not group_alive(make_run.process.pid), timeout=STOP_SECONDS, interval=0.1)
    assert not any(listening(port) for port in ports)


def test_ctrl_c_stops_both_quietly_and_the_runner_exits_0(checkout, ports, tmp_path):
    app_port, standin_port = ports
    runner = Console(
        [
            sys.executable,
            "scripts/dev.py",
            "--port",
            str(app_port),
            "--standin-port",
            str(standin_port),
            "--",
            "--key-file",
            "instance/clerk-standin-key.pem",
        ],
        checkout,
        tmp_path,
    )
    try:
        runner.wait_for_banner()
        os.killpg(runner.process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        assert runner.process.wait(timeout=STOP_SECONDS) == 0
        wait_for(lambda: not group_alive(runner.process.pid), timeout=STOP_SECONDS, interval=0.1)
        assert not any(listening(port) for port in ports)
        assert "Traceback" not in runner.stderr()
    finally:
        runner.kill_leftovers()


def test_a_taken_port_is_one_line_and_exit_1(checkout, ports, tmp_path):
    app_port, standin_port = ports
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", app_port))
        taken.listen()
        finished = subprocess.run(
            [sys.executable, "scripts/dev.py", "--port", str(app_port), "--standin-port", str(standin_port)],
            cwd=checkout,
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert finished.returncode == 1
    assert finished.stdout == ""
    assert finished.stderr == (
        f"Error: port {app_port} on 127.0.0.1 is taken (is another `make run` going?).\n"
    )
    assert not listening(standin_port)
