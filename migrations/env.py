"""Alembic environment for Flask-Migrate.

Online migrations run over DATABASE_URL_DIRECT when it is set (Neon: DDL and session settings need a direct
connection, not the transaction-mode pooler), otherwise over the app's own engine. Either way they run without
the app's statement timeout (IRIS_DB_STATEMENT_TIMEOUT_MS): a long migration is legitimate. A migration that
must not queue behind other sessions for long sets its own ``SET LOCAL lock_timeout``.
"""

import logging
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context
from flask import current_app

from iris.config import STATEMENT_TIMEOUT_OPTION, direct_engine

config = context.config

# Configure logging from alembic.ini only when nothing else has (the `flask db` command); inside a running
# app or the test suite the existing logging setup stays as it is.
if config.config_file_name is not None and not logging.getLogger().handlers:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger("alembic.env")

target_db = current_app.extensions["migrate"].db


def get_engine() -> sa.Engine:
    direct_url = current_app.config.get("DATABASE_URL_DIRECT")
    return direct_engine(direct_url) if direct_url else target_db.engine


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it (`flask db upgrade --sql`)."""
    url = get_engine().url.render_as_string(hide_password=False)
    context.configure(url=url, target_metadata=target_db.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    def process_revision_directives(context, revision, directives):
        # Do not write an empty revision when autogenerate finds no change.
        if getattr(config.cmd_opts, "autogenerate", False):
            script = directives[0]
            if script.upgrade_ops.is_empty():
                directives[:] = []
                logger.info("No changes in schema detected.")

    conf_args = current_app.extensions["migrate"].configure_args
    conf_args.setdefault("process_revision_directives", process_revision_directives)

    engine = get_engine()
    try:
        with engine.connect() as connection:
            # The app's engine bounds every transaction (iris.extensions.bound_the_transaction); this
            # connection opts out before its first transaction begins. The direct engine has no bound at all.
            connection.execution_options(**{STATEMENT_TIMEOUT_OPTION: None})
            context.configure(connection=connection, target_metadata=target_db.metadata, **conf_args)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        if engine is not target_db.engine:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
