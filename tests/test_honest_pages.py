"""Pages say only what is true: the confirmation page only after an account was made, the home page on
where the password goes (as the README says) and where the API documentation is, and /account in an
owner's words, with the ids kept for support in a fine-print line."""

from __future__ import annotations

from tests.helpers import PASSWORD, register, session_token


def test_the_confirmation_page_opened_directly_redirects_to_the_sign_up_form(client):
    response = client.get("/signup/done")
    assert response.status_code == 302
    assert response.headers["Location"] == "/signup"


def test_the_confirmation_page_shows_once_after_a_sign_up_then_redirects(client, standin):
    client.post("/signup", data={"email": "owner@bistro.example", "password": PASSWORD})
    page = client.get("/signup/done")
    assert page.status_code == 200
    assert "Account created" in page.get_data(as_text=True)
    again = client.get("/signup/done")
    assert again.status_code == 302  # a reload: nothing new was made
    assert again.headers["Location"] == "/signup"


def test_the_home_page_says_where_the_password_goes_and_links_the_api_docs(client):
    page = " ".join(client.get("/").get_data(as_text=True).split())
    assert "your password goes once to Clerk and is never stored, logged or echoed here" in page
    assert "never touches Iris" not in page
    assert 'href="/docs"' in page
    assert client.get("/docs").status_code == 200


def test_the_account_page_keeps_clerk_ids_out_of_the_facts(client, standin):
    user = register(client)
    client.set_cookie("__session", session_token(standin, user["clerk_user_id"]))
    page = client.get("/account").get_data(as_text=True)
    facts = page[page.index('<dl class="facts">') : page.index("</dl>")]
    assert "Clerk" not in facts
    assert user["clerk_user_id"] not in facts
    fine_print = page[page.index('<p class="fine-print">') :]
    fine_print = " ".join(fine_print[: fine_print.index("</p>")].split())
    assert f"account <code>{user['id']}</code>" in fine_print
    assert f"(Clerk) user <code>{user['clerk_user_id']}</code>" in fine_print
