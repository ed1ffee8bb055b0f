"""``make run``: the app and the local Clerk stand-in together, on one console a person can read.

    python scripts/dev.py [--port 5000] [--standin-port 5001] [-- STAND-IN OPTIONS...]

Everything after ``--`` goes to ``python -m clerk_standin`` as it is (the Makefile's STANDIN_ARGS).

What it guarantees:

- Development mode (FLASK_DEBUG=1) with ``.env`` read as ``flask`` reads it; when neither CLERK_SECRET_KEY nor
  CLERK_API_URL is set, the app talks to the stand-in started here.
- Both ports are free before anything starts, and the migrations have run (``flask db upgrade``'s work)
  before either server starts; otherwise it says why in one line and exits 1.
- One banner once both servers accept connections: the app's URL, the Clerk it talks to, the database, where
  mail goes, and how to stop. Then one line per request to the app (iris.observability's development
  format); werkzeug's own start-up lines are left out, since the banner says the same.
- TERM or INT (Ctrl-C) to this process, or its parent (``make``) going away, stops both servers and waits
  for them. ``make`` passes its TERM on to this process, but when it is killed outright (KILL), or a shell
  stands in between, nothing reaches us: so this process also watches for its parent to go.
- If either server stops by itself, it says so, stops the other and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"

# How long a server may take to stop after TERM before it is killed.
STOP_SECONDS = 10

# werkzeug's start-up lines, which the banner replaces. Other lines it logs (the debugger PIN, "Detected
# change ..., reloading", errors) still show.
WERKZEUG_START_UP = ("Running on", "Press CTRL+C to quit", "Restarting with", "Debugger is active")


class Stop(Exception):
    """A signal asked the runner to stop."""


def main(argv: list[str]) -> int:
    """Run both servers until a signal, the parent going away, or one of them stopping; return the exit
    status (0 when asked to stop, 1 otherwise)."""
    args = _arguments(argv)
    if args.serve_app:
        serve_app(args.port)
        return 0
    taken = [port for port in (args.port, args.standin_port) if _listening(port)]
    if taken:
        print(f"Error: port {taken[0]} on {HOST} is taken (is another `make run` going?).", file=sys.stderr)
        return 1
    standin_url = f"http://{HOST}:{args.standin_port}"
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    servers: dict[str, subprocess.Popen] = {}
    try:
        _development_environment(f"http://{HOST}:{args.port}", standin_url)
        database, clerk_url, mail_server = _migrate()
        # The stand-in's sign-in page sends people back only to the app's own origin (its --azp).
        standin_options = ["--azp", f"http://{HOST}:{args.port}"]
        standin_options += _webhook_options(args.port, clerk_url, standin_url) + args.standin_args
        servers["the stand-in"] = _start_standin(args.standin_port, standin_options)
        app_command = [sys.executable, str(Path(__file__).resolve()), "--serve-app", "--port", str(args.port)]
        servers["the app"] = _spawn(app_command)
        _watch(servers, parent, ready=lambda: _listening(args.port) and _listening(args.standin_port))
        banner = _banner(f"http://{HOST}:{args.port}", clerk_url, standin_url, database, mail_server)
        print(banner, flush=True)
        _watch(servers, parent)
    except Stop:
        return 0
    except ServerStopped as stopped:
        print(f"Error: {stopped}; stopping the other one.", file=sys.stderr, flush=True)
        return 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave a server behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_all(servers)


class ServerStopped(Exception):
    """One of the servers exited by itself."""


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/dev.py", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000, help="the app's port (default 5000)")
    parser.add_argument("--standin-port", type=int, default=5001, help="the stand-in's port (default 5001)")
    parser.add_argument("--serve-app", action="store_true", help=argparse.SUPPRESS)  # the app's own process
    parser.add_argument("standin_args", nargs="*", help="options for python -m clerk_standin, after --")
    return parser.parse_args(argv)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signum)


def _development_environment(app_url: str, standin_url: str) -> None:
    """FLASK_DEBUG=1 and .env for this process and both servers; the stand-in as Clerk unless configured;
    links in mails pointing at this app (IRIS_PUBLIC_URL) unless configured."""
    from flask.cli import load_dotenv

    load_dotenv()  # as `flask` does: .env and .flaskenv, never overriding the environment
    os.environ["FLASK_DEBUG"] = "1"
    os.environ.setdefault("IRIS_PUBLIC_URL", app_url)
    if "CLERK_SECRET_KEY" not in os.environ and "CLERK_API_URL" not in os.environ:
        os.environ["CLERK_API_URL"] = standin_url


def _webhook_options(port: int, clerk_url: str, standin_url: str) -> list[str]:
    """Stand-in options that send its webhooks to this app, signed with the secret the app verifies (the
    development default unless CLERK_WEBHOOK_SIGNING_SECRET is set); none when the app talks to another
    Clerk."""
    from iris.config import DEV_WEBHOOK_SIGNING_SECRET

    if clerk_url != standin_url:
        return []
    secret = os.environ.get("CLERK_WEBHOOK_SIGNING_SECRET") or DEV_WEBHOOK_SIGNING_SECRET
    url = f"http://{HOST}:{port}/api/v1/webhooks/clerk"
    return ["--webhook-url", url, "--webhook-secret", secret]


def _migrate() -> tuple[str, str, str | None]:
    """Bring the database to the newest migration, as ``flask db upgrade`` does; return the database URL
    (password hidden), the Clerk API URL and the MAIL_SERVER (None: the console) the app will use."""
    import flask_migrate
    import sqlalchemy as sa

    sys.path.insert(0, str(ROOT))
    from iris import create_app
    from iris.config import ConfigError

    try:
        app = create_app()
    except ConfigError as error:
        raise SystemExit(f"Error: {error}") from None
    # Alembic's per-start notices ("Context impl SQLiteImpl.") would come before the banner on every start.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with app.app_context():
        flask_migrate.upgrade()
    database = sa.make_url(app.config["SQLALCHEMY_DATABASE_URI"]).render_as_string(hide_password=True)
    return database, app.config["CLERK_API_URL"], app.config.get("MAIL_SERVER")


def _spawn(command: list[str], **options: Any) -> subprocess.Popen:
    """Start a server that ignores INT. Ctrl-C sends INT to every process in the terminal's foreground group,
    servers included; only this process acts on it, stopping each server with TERM, so that a server caught
    half-way through its imports prints no KeyboardInterrupt traceback. (An ignored signal stays ignored in
    the new program.)"""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.Popen(command, cwd=ROOT, **options)  # noqa: S603 (our own command lines)
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_standin(port: int, options: list[str]) -> subprocess.Popen:
    """The stand-in, without its per-request lines (the app's line for the same request says enough) and with
    its start-up line left out (the banner says the same); anything else it writes shows, prefixed."""
    standin = _spawn(
        [sys.executable, "-m", "clerk_standin", "--host", HOST, "--port", str(port), "--quiet", *options],
        stderr=subprocess.PIPE,
        text=True,
    )

    def relay() -> None:
        for line in standin.stderr or ():
            if not line.startswith("Clerk stand-in on "):
                sys.stderr.write(f"stand-in: {line}")
                sys.stderr.flush()

    threading.Thread(target=relay, daemon=True).start()
    return standin


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) == 0


def _watch(
    servers: dict[str, subprocess.Popen], parent: int, ready: Callable[[], bool] | None = None
) -> None:
    """Return once ``ready()`` holds (without it, never); raise ``ServerStopped`` when a server exits first,
    ``Stop`` when the parent is gone (this process was handed to another parent: ``make`` was killed)."""
    while ready is None or not ready():
        for name, server in servers.items():
            if server.poll() is not None:
                raise ServerStopped(f"{name} stopped (exit status {server.returncode})")
        if os.getppid() != parent:
            raise Stop("parent gone")
        time.sleep(0.2)


def _stop_all(servers: dict[str, subprocess.Popen]) -> None:
    """TERM every server still running, then wait for each; kill one that is still there after
    STOP_SECONDS."""
    for server in servers.values():
        if server.poll() is None:
            server.terminate()
    for server in servers.values():
        try:
            server.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _banner(app_url: str, clerk_url: str, standin_url: str, database: str, mail_server: str | None) -> str:
    if mail_server:
        mail = f"{mail_server}  SMTP from your environment"
    else:
        mail = "printed on this console, link included (no MAIL_SERVER)"
    if clerk_url == standin_url:
        clerk = f"{standin_url}  the local Clerk stand-in (no Clerk account needed)"
    else:
        clerk = f"{clerk_url}  from your environment (the stand-in on {standin_url} is not used)"
    return "\n".join(
        [
            "",
            f"Iris is running on {app_url}  (API docs: {app_url}/docs)",
            f"  clerk     {clerk}",
            f"  database  {database}",
            f"  mail      {mail}",
            "Ctrl-C stops both. One line per request follows.",
            "",
        ]
    )


def serve_app(port: int) -> None:
    """The app on werkzeug's development server with the reloader and the debugger, as ``flask run`` serves
    it in debug mode, minus werkzeug's start-up lines."""
    from flask.cli import load_dotenv
    from werkzeug.serving import run_simple

    load_dotenv()
    logging.getLogger("werkzeug").addFilter(_without_start_up_lines)
    sys.path.insert(0, str(ROOT))
    from wsgi import app

    run_simple(HOST, port, app, use_reloader=True, use_debugger=True, threaded=True)


def _without_start_up_lines(record: logging.LogRecord) -> bool:
    """Drop werkzeug's start-up lines; keep its other notices, without their `` * `` bullet."""
    if any(text in str(record.msg) for text in WERKZEUG_START_UP):
        return False
    if isinstance(record.msg, str):
        record.msg = record.msg.removeprefix(" * ")
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
