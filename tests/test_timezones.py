"""Timestamps render in IRIS_TIMEZONE with the offset in force at their own instant, across DST changes."""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from iris.extensions import db
from iris.models import User, local_isoformat
from tests.helpers import ME, app_with, bearer, register, session_token

STOCKHOLM, NEW_YORK = "Europe/Stockholm", "America/New_York"


def utc(year: int, month: int, day: int, hour: int) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


# Daylight-saving changes: (zone, the instant of the change, the last microsecond before it and the change
# itself as rendered in that zone). Written out by hand, not computed with zoneinfo.
CHANGES = (
    # Stockholm leaves winter time at 01:00 UTC on the last Sunday of March ...
    (STOCKHOLM, utc(2026, 3, 29, 1), "2026-03-29T01:59:59.999999+01:00", "2026-03-29T03:00:00+02:00"),
    (STOCKHOLM, utc(2027, 3, 28, 1), "2027-03-28T01:59:59.999999+01:00", "2027-03-28T03:00:00+02:00"),
    # ... and returns to it at 01:00 UTC on the last Sunday of October.
    (STOCKHOLM, utc(2026, 10, 25, 1), "2026-10-25T02:59:59.999999+02:00", "2026-10-25T02:00:00+01:00"),
    (STOCKHOLM, utc(2027, 10, 31, 1), "2027-10-31T02:59:59.999999+02:00", "2027-10-31T02:00:00+01:00"),
    # New York changes at 02:00 local time: the second Sunday of March, the first Sunday of November.
    (NEW_YORK, utc(2027, 3, 14, 7), "2027-03-14T01:59:59.999999-05:00", "2027-03-14T03:00:00-04:00"),
    (NEW_YORK, utc(2027, 11, 7, 6), "2027-11-07T01:59:59.999999-04:00", "2027-11-07T01:00:00-05:00"),
)
CHANGE_IDS = tuple(f"{zone}-{change:%Y-%m-%d}" for zone, change, _, _ in CHANGES)
JUST_BEFORE = timedelta(microseconds=1)


def set_timestamps(app, created_at: datetime, updated_at: datetime) -> None:
    """Give every row these timestamps, with the trigger that moves updated_at on UPDATE held off."""
    with app.app_context():
        db.session.execute(sa.text("ALTER TABLE users DISABLE TRIGGER users_set_updated_at"))
        db.session.execute(
            sa.text("UPDATE users SET created_at = :created_at, updated_at = :updated_at"),
            {"created_at": created_at, "updated_at": updated_at},
        )
        db.session.execute(sa.text("ALTER TABLE users ENABLE TRIGGER users_set_updated_at"))
        db.session.commit()


@pytest.mark.parametrize(("zone", "change", "before", "after"), CHANGES, ids=CHANGE_IDS)
def test_offsets_on_both_sides_of_each_dst_change(zone, change, before, after):
    assert local_isoformat(change - JUST_BEFORE, zone) == before
    assert local_isoformat(change, zone) == after


@pytest.mark.parametrize(("zone", "change", "before", "after"), CHANGES, ids=CHANGE_IDS)
def test_users_me_renders_a_rows_timestamps_on_both_sides_of_each_dst_change(
    make_app, standin, zone, change, before, after
):
    """A real row, its created_at just before the change and its updated_at at it, read over the API."""
    with app_with(make_app, IRIS_TIMEZONE=zone) as app:
        client = app.test_client()
        user = register(client)
        set_timestamps(app, created_at=change - JUST_BEFORE, updated_at=change)
        response = client.get(ME, headers=bearer(session_token(standin, user["clerk_user_id"])))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["created_at"] == before
    assert response.json["updated_at"] == after


def test_naive_values_are_read_as_utc():
    naive = datetime(2026, 7, 1, 12, 0)
    assert local_isoformat(naive, "Europe/Stockholm") == "2026-07-01T14:00:00+02:00"


def test_user_json_renders_stored_instants_in_the_configured_zone(app):
    with app.app_context():
        user = User(email="a@b.example", clerk_user_id="user_1")
        db.session.add(user)
        db.session.commit()
        user_id = user.id
    set_timestamps(
        app,
        created_at=utc(2026, 1, 15, 11),
        updated_at=datetime(2026, 7, 15, 11, 0, 0, 123456, tzinfo=UTC),
    )
    with app.app_context():
        user = db.session.get(User, user_id)
        stockholm = user.to_dict("Europe/Stockholm")
        new_york = user.to_dict("America/New_York")
    assert stockholm["created_at"] == "2026-01-15T12:00:00+01:00"
    assert stockholm["updated_at"] == "2026-07-15T13:00:00.123456+02:00"
    assert new_york["created_at"] == "2026-01-15T06:00:00-05:00"
