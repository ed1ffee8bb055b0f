"""Configuration and the app factory."""

from types import MappingProxyType

import pytest
from werkzeug.middleware.proxy_fix import ProxyFix

from iris import config, create_app

# What outside development needs beyond the database and the keys: the site's public origin and Clerk's
# publishable key (links, the handshake) and, with verification on (the default), a mail server.
PUBLIC = MappingProxyType(
    {
        "IRIS_PUBLIC_URL": "https://iris.example/",
        "CLERK_PUBLISHABLE_KEY": "pk_live_Y2xlcmsuaXJpcy5leGFtcGxlJA",  # clerk.iris.example
    }
)
MAIL = MappingProxyType({**PUBLIC, "MAIL_SERVER": "smtp.example"})


def test_outside_development_every_missing_variable_is_named_at_once(tmp_path):
    with pytest.raises(config.ConfigError) as raised:
        config.from_environment({}, development=False, instance_path=str(tmp_path))
    assert (
        "missing required configuration DATABASE_URL, CLERK_SECRET_KEY, FLASK_SECRET_KEY,"
        " CLERK_PUBLISHABLE_KEY, IRIS_PUBLIC_URL, MAIL_SERVER." in str(raised.value)
    )


def test_blank_values_count_as_missing(tmp_path):
    environ = {"DATABASE_URL": "  ", "FLASK_SECRET_KEY": "s3cret", "CLERK_SECRET_KEY": "sk_live_x"}
    with pytest.raises(
        config.ConfigError,
        match=r"configuration DATABASE_URL, CLERK_PUBLISHABLE_KEY, IRIS_PUBLIC_URL, MAIL_SERVER\.",
    ):
        config.from_environment(environ, development=False, instance_path=str(tmp_path))


def test_create_app_outside_development_refuses_to_start(monkeypatch):
    for name in ("DATABASE_URL", "CLERK_SECRET_KEY", "FLASK_SECRET_KEY", "FLASK_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLERK_SECRET_KEY", "sk_live_x")
    with pytest.raises(config.ConfigError, match="DATABASE_URL, FLASK_SECRET_KEY"):
        create_app()


def test_development_falls_back_to_sqlite_generated_key_and_local_standin(tmp_path):
    settings = config.from_environment({}, development=True, instance_path=str(tmp_path))
    assert settings["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path}/iris.sqlite3"
    assert len(settings["SECRET_KEY"]) >= 32
    assert settings["CLERK_API_URL"] == config.DEV_CLERK_API_URL
    assert settings["CLERK_SECRET_KEY"] == config.DEV_CLERK_SECRET_KEY


def test_a_real_clerk_key_in_development_talks_to_real_clerk(tmp_path):
    environ = {"CLERK_SECRET_KEY": "sk_test_real"}
    settings = config.from_environment(environ, development=True, instance_path=str(tmp_path))
    assert settings["CLERK_SECRET_KEY"] == "sk_test_real"
    assert settings["CLERK_API_URL"] == "https://api.clerk.com"


def test_development_uses_real_values_when_given(tmp_path):
    environ = {
        "DATABASE_URL": "postgres://u@db.example/iris",
        "FLASK_SECRET_KEY": "k",
        "CLERK_SECRET_KEY": "sk_test_real",
        "CLERK_API_URL": "https://api.clerk.com/",
    }
    settings = config.from_environment(environ, development=True, instance_path=str(tmp_path))
    assert settings["CLERK_SECRET_KEY"] == "sk_test_real"
    assert settings["SQLALCHEMY_DATABASE_URI"] == "postgres://u@db.example/iris"
    assert settings["SECRET_KEY"] == "k"
    assert settings["CLERK_API_URL"] == "https://api.clerk.com"


def test_lists_and_numbers_are_parsed(tmp_path):
    environ = {
        "DATABASE_URL": "sqlite://",
        "FLASK_SECRET_KEY": "k",
        "CLERK_SECRET_KEY": "sk_x",
        "IRIS_SIGNUP_ROLES": " restaurant ,",
        "CLERK_AUTHORIZED_PARTIES": "https://a.example,https://b.example",
        "IRIS_PROXY_HOPS": "2",
        **MAIL,
    }
    settings = config.from_environment(environ, development=False, instance_path=str(tmp_path))
    assert settings["IRIS_SIGNUP_ROLES"] == ["restaurant"]
    assert settings["CLERK_AUTHORIZED_PARTIES"] == ["https://a.example", "https://b.example"]
    assert settings["IRIS_PROXY_HOPS"] == 2


@pytest.mark.parametrize("roles", ["restaurant,admin", "owner"])
def test_admins_and_unknown_roles_can_never_be_self_registered(tmp_path, roles):
    environ = {
        "DATABASE_URL": "sqlite://",
        "FLASK_SECRET_KEY": "k",
        "CLERK_SECRET_KEY": "sk_x",
        "IRIS_SIGNUP_ROLES": roles,
    }
    with pytest.raises(config.ConfigError, match="IRIS_SIGNUP_ROLES may only contain restaurant"):
        config.from_environment(environ, development=False, instance_path=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "value"), [("CLERK_PUBLISHABLE_KEY", "pk_test_bm90LWEtaG9zdA"), ("CLERK_JWT_KEY", "not a pem")]
)
def test_malformed_clerk_keys_stop_start_up(tmp_path, name, value):
    environ = {"DATABASE_URL": "sqlite://", "FLASK_SECRET_KEY": "k", "CLERK_SECRET_KEY": "sk_x", name: value}
    with pytest.raises(config.ConfigError, match=f"Iris cannot start: {name}"):
        config.from_environment(environ, development=False, instance_path=str(tmp_path))


def test_a_non_numeric_proxy_hop_count_is_a_clear_error(tmp_path):
    environ = {
        "DATABASE_URL": "sqlite://",
        "FLASK_SECRET_KEY": "k",
        "CLERK_SECRET_KEY": "sk_x",
        "IRIS_PROXY_HOPS": "one",
    }
    with pytest.raises(config.ConfigError, match="IRIS_PROXY_HOPS must be a whole number"):
        config.from_environment(environ, development=False, instance_path=str(tmp_path))


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:p@ep-x-pooler.neon.tech/db?sslmode=require",
        "postgresql://u:p@ep-x-pooler.neon.tech/db?sslmode=require",
    ],
)
def test_postgres_urls_are_driven_by_psycopg3(url):
    assert config.database_uri(url) == "postgresql+psycopg://u:p@ep-x-pooler.neon.tech/db?sslmode=require"


def test_engine_options_for_neon():
    options = config.engine_options("postgresql+psycopg://h/db")
    assert options["pool_size"] == 5
    assert options["max_overflow"] == 0
    assert options["pool_pre_ping"] is False  # discard_closed_connection instead (test_pool_liveness.py)
    assert 0 < options["pool_recycle"] < 300
    assert options["connect_args"]["prepare_threshold"] is None
    assert options["connect_args"]["connect_timeout"] > 0


def test_engine_option_overrides_merge_connect_args():
    options = config.engine_options(
        "postgresql+psycopg://h/db", {"pool_size": 2, "connect_args": {"options": "-cx=y"}}
    )
    assert options["pool_size"] == 2
    assert options["connect_args"]["options"] == "-cx=y"
    assert options["connect_args"]["prepare_threshold"] is None


def test_sqlite_gets_no_postgres_options():
    assert config.engine_options("sqlite:///x.db") == {}


def test_the_app_engine_is_built_with_the_neon_options(app):
    from iris.extensions import db

    with app.app_context():
        pool = db.engine.pool
        assert pool.size() == 5
        assert pool._max_overflow == 0
        assert pool._pre_ping is False
        assert db.engine.dialect.driver == "psycopg"


def test_test_config_ignores_the_environment(monkeypatch, make_app):
    monkeypatch.setenv("IRIS_TIMEZONE", "Asia/Tokyo")
    app = make_app()
    assert app.config["IRIS_TIMEZONE"] == "Europe/Stockholm"


def test_flask_settings_come_from_prefixed_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    monkeypatch.setenv("FLASK_SECRET_KEY", "from-env")
    monkeypatch.setenv("CLERK_SECRET_KEY", "sk_x")
    monkeypatch.setenv("FLASK_MAX_CONTENT_LENGTH", "1234")
    monkeypatch.setenv("IRIS_EMAIL_VERIFICATION", "off")
    for name, value in PUBLIC.items():
        monkeypatch.setenv(name, value)
    app = create_app()
    assert app.config["SECRET_KEY"] == "from-env"
    assert app.config["MAX_CONTENT_LENGTH"] == 1234


@pytest.mark.parametrize("hops", [0, 2])
def test_proxy_fix_only_with_trusted_hops(make_app, hops):
    app = make_app(IRIS_PROXY_HOPS=hops)
    assert isinstance(app.wsgi_app, ProxyFix) is (hops > 0)
    if hops:
        assert app.wsgi_app.x_for == 2
        assert app.wsgi_app.x_proto == 1  # set, not appended, by the nearest proxy


@pytest.mark.parametrize(
    ("name", "default"), [("IRIS_DB_STATEMENT_TIMEOUT_MS", 5000), ("IRIS_PENDING_TIMEOUT_SECONDS", 120)]
)
def test_timeouts_have_defaults_and_are_read_from_the_environment(tmp_path, name, default):
    base = {"DATABASE_URL": "sqlite://", "FLASK_SECRET_KEY": "k", "CLERK_SECRET_KEY": "sk_x", **MAIL}
    settings = config.from_environment(base, development=False, instance_path=str(tmp_path))
    assert settings[name] == default
    settings = config.from_environment({**base, name: " 25 "}, development=False, instance_path=str(tmp_path))
    assert settings[name] == 25


@pytest.mark.parametrize("name", ["IRIS_DB_STATEMENT_TIMEOUT_MS", "IRIS_PENDING_TIMEOUT_SECONDS"])
@pytest.mark.parametrize("value", ["5s", "2.5", "0", "-100"])
def test_a_timeout_that_is_not_a_positive_whole_number_stops_start_up(tmp_path, name, value):
    environ = {"DATABASE_URL": "sqlite://", "FLASK_SECRET_KEY": "k", "CLERK_SECRET_KEY": "sk_x", name: value}
    with pytest.raises(config.ConfigError, match=f"Iris cannot start: {name} must be"):
        config.from_environment(environ, development=False, instance_path=str(tmp_path))


def test_each_app_engine_carries_its_own_statement_timeout(make_app):
    from iris.extensions import db

    default, short = make_app(), make_app(IRIS_DB_STATEMENT_TIMEOUT_MS=1234)
    for app, expected in ((default, 5000), (short, 1234)):
        with app.app_context():
            assert db.engine.get_execution_options()[config.STATEMENT_TIMEOUT_OPTION] == expected


def test_the_direct_engine_for_migrations_carries_no_statement_timeout():
    engine = config.direct_engine("postgresql://u@db.example/iris")
    assert config.STATEMENT_TIMEOUT_OPTION not in engine.get_execution_options()
    engine.dispose()


def test_verification_required_needs_a_public_url_and_a_mail_server_outside_development(tmp_path):
    base = {"DATABASE_URL": "sqlite://", "FLASK_SECRET_KEY": "k", "CLERK_SECRET_KEY": "sk_x"}
    with pytest.raises(
        config.ConfigError, match=r"configuration CLERK_PUBLISHABLE_KEY, IRIS_PUBLIC_URL, MAIL_SERVER\. Set"
    ):
        config.from_environment(base, development=False, instance_path=str(tmp_path))
    off = {**base, **PUBLIC, "IRIS_EMAIL_VERIFICATION": "off"}
    assert config.from_environment(off, development=False, instance_path=str(tmp_path))["MAIL_SERVER"] is None
    only_mail_optional = r"configuration CLERK_PUBLISHABLE_KEY, IRIS_PUBLIC_URL\. Set"
    with pytest.raises(config.ConfigError, match=only_mail_optional):
        config.from_environment(
            {**base, "IRIS_EMAIL_VERIFICATION": "off"}, development=False, instance_path=str(tmp_path)
        )
    settings = config.from_environment({**base, **MAIL}, development=False, instance_path=str(tmp_path))
    assert settings["IRIS_PUBLIC_URL"] == "https://iris.example"
    assert settings["IRIS_UNVERIFIED_TTL_HOURS"] == 168
    development = config.from_environment(base, development=True, instance_path=str(tmp_path))
    assert development["MAIL_SERVER"] is None  # mails go to the console
    assert development["IRIS_PUBLIC_URL"] == config.DEV_PUBLIC_URL
