"""Flask extensions, created unbound here and bound to the app in ``create_app``."""

import sqlalchemy as sa
from flask import current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    # Stable constraint names, so migrations can name (and later drop) every constraint.
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
csrf = CSRFProtect()


def default_limit() -> str:
    """The limit on every route without one of its own, from RATELIMIT_DEFAULT."""
    return current_app.config["RATELIMIT_DEFAULT"]


def register_limit() -> str:
    """The limit shared by every way to register (API and sign-up page), from RATELIMIT_REGISTER."""
    return current_app.config["RATELIMIT_REGISTER"]


# Per client IP (request.remote_addr, which ProxyFix corrects behind trusted proxies). Storage and switches
# come from the app config (RATELIMIT_STORAGE_URI, RATELIMIT_ENABLED, ...). The limits are read from the
# config on each request: Flask-Limiter would otherwise keep the first app's defaults for every later app.
limiter = Limiter(key_func=get_remote_address, default_limits=[default_limit])
