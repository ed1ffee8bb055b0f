"""WSGI entry point: ``gunicorn wsgi:app``; ``flask`` finds it without ``--app``.

A configuration that cannot start the app (``ConfigError``) stops both with its one-line message: gunicorn
prints it and refuses to boot; under the ``flask`` command it becomes ``Error: <message>`` on stderr and
exit status 1, without a traceback (the message says all there is to say).
"""

import click
from flask.cli import ScriptInfo

from iris import create_app
from iris.config import ConfigError

try:
    app = create_app()
except ConfigError as error:
    context = click.get_current_context(silent=True)
    if context is None or context.find_object(ScriptInfo) is None:
        raise  # not loaded by the flask command: gunicorn shows the error and stops
    # Loaded by the flask command (ScriptInfo.load_app): click prints a ClickException as one line, exit 1.
    raise click.ClickException(str(error)) from None
