"""Command-line tools: ``flask iris ...``."""

from __future__ import annotations

from typing import NoReturn

import click
from flask import Flask
from flask.cli import AppGroup

from iris import clerk, registration
from iris.errors import IrisError
from iris.models import normalise_email

iris_cli = AppGroup("iris", help="Iris operations.")


@iris_cli.command("reconcile")
def reconcile_command() -> None:
    """Complete or undo registrations that died half-way (see iris.registration).

    Exits 1 when some could not be resolved (Clerk or the database unreachable); run it again later.
    """
    counts = registration.reconcile()
    click.echo(f"completed {counts['completed']}, removed {counts['removed']}, failed {counts['failed']}")
    if counts["failed"]:
        raise SystemExit(1)


@iris_cli.command("token")
@click.argument("email")
def token_command(email: str) -> None:
    """Print a fresh Clerk session token for the Clerk user with EMAIL (for trying the API by hand).

    Asks Clerk's Backend API: find the user by email, create a session, mint a token (valid 60 s). Only the
    token goes to stdout, so TOKEN=$(flask iris token EMAIL) works; errors go to stderr with exit status 1.
    Side effect: a new session at Clerk. Production instances refuse to create sessions this way.
    """
    try:
        users = clerk.find_users(email=normalise_email(email))
        if not users:
            _fail(f"No Clerk user has the email {normalise_email(email)}. Register it first.")
        session = _create_session(users[0]["id"])
        token = clerk.create_session_token(session["id"])
    except IrisError as error:
        _fail(f"Clerk could not be asked for a token: {error.message}")
    click.echo(token)


def _create_session(clerk_user_id: str) -> dict:
    try:
        return clerk.create_session(clerk_user_id)
    except clerk.NotFoundAtClerk:
        raise  # the user went away meanwhile; not a refusal
    except clerk.ClerkRefused:
        _fail(
            "Clerk refused to create a session. Production instances (sk_live_ keys) refuse"
            " POST /v1/sessions, which exists for testing: use a development instance's key, or sign in"
            " through the frontend and copy the __session cookie."
        )


def _fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(1)


def init_app(app: Flask) -> None:
    app.cli.add_command(iris_cli)
