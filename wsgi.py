"""WSGI entry point: ``gunicorn wsgi:app``; ``flask`` finds it without ``--app``."""

from iris import create_app

app = create_app()
