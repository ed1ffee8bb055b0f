"""The /account page: the signed-in user through Clerk's __session cookie, or a clear signed-out state."""

from __future__ import annotations

import sqlalchemy as sa

from iris.extensions import db
from tests.helpers import claims, register, session_token


def test_the_signed_in_user_sees_their_account(client, standin):
    user = register(client)
    client.set_cookie("__session", session_token(standin, user["clerk_user_id"]))
    response = client.get("/account")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "<title>Your account · Iris</title>" in page
    assert "owner@bistro.example" in page
    assert user["clerk_user_id"] in page
    assert f'datetime="{user["created_at"]}"' in page  # rendered in IRIS_TIMEZONE
    assert 'aria-current="page">Account</a>' in page


def test_without_a_cookie_the_page_is_signed_out(client):
    page = client.get("/account").get_data(as_text=True)
    assert "<title>Signed out · Iris</title>" in page
    assert "You are signed out" in page
    assert 'href="/signup"' in page


def test_an_expired_cookie_is_signed_out_not_an_error(client, standin):
    user = register(client)
    expired = standin.control.sign(claims(user["clerk_user_id"], exp=1_000_000, iat=999_940, nbf=999_930))
    client.set_cookie("__session", expired)
    response = client.get("/account")
    assert response.status_code == 200
    assert "You are signed out" in response.get_data(as_text=True)


def test_a_deleted_account_gets_a_403_page(app, client, standin):
    user = register(client)
    with app.app_context():
        db.session.execute(sa.text("UPDATE users SET deleted_at = now()"))
        db.session.commit()
    client.set_cookie("__session", session_token(standin, user["clerk_user_id"]))
    response = client.get("/account")
    assert response.status_code == 403
    assert response.mimetype == "text/html"
    assert "This account has been deleted." in response.get_data(as_text=True)
