"""Timestamps render in IRIS_TIMEZONE with their offset, across daylight-saving changes."""

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from iris.extensions import db
from iris.models import User, local_isoformat


@pytest.mark.parametrize(
    ("instant", "expected"),
    [
        # Stockholm leaves winter time at 01:00 UTC on 29 March 2026 ...
        (datetime(2026, 3, 29, 0, 59, 59, tzinfo=UTC), "2026-03-29T01:59:59+01:00"),
        (datetime(2026, 3, 29, 1, 0, 0, tzinfo=UTC), "2026-03-29T03:00:00+02:00"),
        # ... and returns to it at 01:00 UTC on 25 October 2026.
        (datetime(2026, 10, 25, 0, 59, 59, tzinfo=UTC), "2026-10-25T02:59:59+02:00"),
        (datetime(2026, 10, 25, 1, 0, 0, tzinfo=UTC), "2026-10-25T02:00:00+01:00"),
    ],
)
def test_stockholm_offsets_on_both_sides_of_dst(instant, expected):
    assert local_isoformat(instant, "Europe/Stockholm") == expected


def test_naive_values_are_read_as_utc():
    naive = datetime(2026, 7, 1, 12, 0)
    assert local_isoformat(naive, "Europe/Stockholm") == "2026-07-01T14:00:00+02:00"


def test_user_json_renders_stored_instants_in_the_configured_zone(app):
    with app.app_context():
        user = User(email="a@b.example", clerk_user_id="user_1")
        db.session.add(user)
        db.session.commit()
        db.session.execute(
            sa.text(
                "ALTER TABLE users DISABLE TRIGGER users_set_updated_at;"
                "UPDATE users SET created_at = '2026-01-15 11:00:00+00',"
                " updated_at = '2026-07-15 11:00:00.123456+00';"
                "ALTER TABLE users ENABLE TRIGGER users_set_updated_at"
            )
        )
        db.session.commit()
        db.session.refresh(user)
        stockholm = user.to_dict("Europe/Stockholm")
        new_york = user.to_dict("America/New_York")
    assert stockholm["created_at"] == "2026-01-15T12:00:00+01:00"
    assert stockholm["updated_at"] == "2026-07-15T13:00:00.123456+02:00"
    assert new_york["created_at"] == "2026-01-15T06:00:00-05:00"
