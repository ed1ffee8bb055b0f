"""Command-line tools: ``flask iris ...``."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup

from iris import registration

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


def init_app(app: Flask) -> None:
    app.cli.add_command(iris_cli)
