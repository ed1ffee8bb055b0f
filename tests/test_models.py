"""The data layer, checked against the migrated PostgreSQL schema."""

import time
import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from iris.extensions import db
from iris.models import User
from tests.helpers import USER_JSON_FIELDS


def add_user(email="owner@bistro.example", clerk_user_id="user_1", **fields) -> User:
    user = User(email=email, clerk_user_id=clerk_user_id, **fields)
    db.session.add(user)
    db.session.commit()
    return user


def test_id_is_a_uuid_made_by_the_app_and_timestamps_by_the_database(app):
    with app.app_context():
        user = User(email="a@b.example", clerk_user_id="user_a")
        db.session.add(user)
        db.session.flush()
        assert isinstance(user.id, uuid.UUID)
        db.session.commit()
        row = db.session.execute(sa.text("SELECT created_at, updated_at, now() AS db_now FROM users")).one()
        assert row.created_at == row.updated_at
        assert abs((row.db_now - row.created_at).total_seconds()) < 5
        assert user.role == "restaurant"


def test_updated_at_moves_on_every_update_even_from_raw_sql(app):
    with app.app_context():
        user = add_user()
        first = user.updated_at
        time.sleep(0.01)
        user.role = "admin"
        db.session.commit()
        second = user.updated_at
        assert second > first
        time.sleep(0.01)
        db.session.execute(sa.text("UPDATE users SET role = 'restaurant'"))
        db.session.commit()
        db.session.refresh(user)
        assert user.updated_at > second
        assert user.created_at == first


def test_email_is_stored_trimmed_and_lower_cased(app):
    with app.app_context():
        add_user(email="  Owner@Bistro.EXAMPLE ")
        assert db.session.execute(sa.text("SELECT email FROM users")).scalar() == ("owner@bistro.example")


def test_email_is_unique_among_live_rows(app):
    with app.app_context():
        add_user(email="a@b.example", clerk_user_id="user_1")
        db.session.add(User(email="A@B.example", clerk_user_id="user_2"))
        with pytest.raises(sa.exc.IntegrityError, match="uq_users_email_live"):
            db.session.commit()


def test_soft_deleted_rows_are_invisible_and_free_their_email(app):
    with app.app_context():
        user = add_user(email="a@b.example", clerk_user_id="user_1")
        user_id = user.id
        user.soft_delete()
        db.session.commit()
        db.session.expunge_all()
        assert db.session.scalars(sa.select(User)).all() == []
        assert db.session.get(User, user_id) is None
        hidden = db.session.scalars(sa.select(User).execution_options(include_deleted=True)).one()
        assert hidden.deleted_at is not None

        add_user(email="a@b.example", clerk_user_id="user_2")
        assert db.session.scalars(sa.select(User.clerk_user_id)).all() == ["user_2"]


def test_clerk_user_id_is_unique(app):
    with app.app_context():
        add_user(email="a@b.example", clerk_user_id="user_1")
        db.session.add(User(email="c@d.example", clerk_user_id="user_1"))
        with pytest.raises(sa.exc.IntegrityError, match="uq_users_clerk_user_id"):
            db.session.commit()


def test_role_is_limited_to_restaurant_or_admin(app):
    with app.app_context():
        db.session.add(User(email="a@b.example", clerk_user_id="user_1", role="owner"))
        with pytest.raises(sa.exc.IntegrityError, match="ck_users_role_known"):
            db.session.commit()


def test_no_password_like_column_exists_in_the_migrated_schema(app, schema):
    with app.app_context():
        columns = db.session.execute(
            sa.text(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = :schema"
            ),
            {"schema": schema},
        ).all()
    names = {f"{table}.{column}" for table, column in columns}
    assert "users.email" in names  # the query really read the migrated schema
    suspicious = [name for name in names if any(w in name for w in ("pass", "pwd", "hash", "hint"))]
    assert suspicious == []


def test_user_json_has_the_contract_fields(app):
    with app.app_context():
        user = add_user()
        body = user.to_dict("Europe/Stockholm")
    assert set(body) == USER_JSON_FIELDS
    assert body["email_verified"] is False  # email_verified_at not set yet
    assert uuid.UUID(body["id"]) == user.id
    parsed = datetime.fromisoformat(body["created_at"])
    assert parsed.utcoffset() is not None
    assert parsed.astimezone(UTC) == user.created_at.astimezone(UTC)
