"""Server-rendered pages. Views call the same service as the API and show its errors at their fields.

Every page's navigation knows whether the request is signed in (``page_user``; Clerk's handshake keeps the
``__session`` cookie fresh, ``iris.handshake``) and links to sign in through Clerk (IRIS_SIGN_IN_URL: the
Account Portal in production, the stand-in's page in development) with ``redirect_url`` back to this app,
and signs out with a form (``sign_out``). Every absolute link is built from IRIS_PUBLIC_URL, never from the
request's Host.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from flask import Blueprint, current_app, g, redirect, render_template, request, session, url_for
from sqlalchemy.exc import SQLAlchemyError

from iris import accounts, auth, clerk, handshake, metrics, registration, tokens, verification
from iris.errors import EmailTaken, IrisError, NotFoundAtClerk, ValidationFailed
from iris.extensions import (
    db,
    limiter,
    register_limit,
    verification_email_limit,
    wrong_passwords_limited,
)
from iris.forms import NewLinkForm, PasswordConfirmForm, SignOutForm, SignupForm, VerifyEmailForm
from iris.models import DEFAULT_ROLE, RESTAURANT, User

log = logging.getLogger(__name__)

bp = Blueprint("web", __name__)

ROLE_LABELS = {RESTAURANT: "Restaurant"}
# flask.g attribute holding the request's page user once known (None: signed out).
PAGE_USER = "iris_page_user"


def page_user() -> User | None:
    """The signed-in user for a page's navigation, or None; worked out once per request.

    Never raises: a token that cannot be checked now (Clerk's keys or the database unreachable), a deleted
    account or a Clerk user without an account all show the page as signed out. Only /account reports
    those (``account``). Costs what ``auth.current_user`` costs, once: no token, nothing; a token, at most
    one JWKS fetch (usually none: the keys are cached per process) and one database read.
    """
    if PAGE_USER not in g:
        try:
            user = None if handshake.gave_up() else auth.current_user()
        except IrisError as error:
            log.info("page shown signed out: %s", error.code)
            user = None
        except SQLAlchemyError as error:
            log.info("page shown signed out: database error %s", type(error).__name__)
            db.session.rollback()
            user = None
        setattr(g, PAGE_USER, user)
    return getattr(g, PAGE_USER)


def with_redirect_url(url: str, back_to: str) -> str:
    """``url`` with ``redirect_url=back_to`` added to its query (Clerk's Account Portal's parameter)."""
    parts = urlsplit(url)
    query = "&".join(part for part in (parts.query, urlencode({"redirect_url": back_to})) if part)
    return urlunsplit(parts._replace(query=query))


def public_url(endpoint: str, **values: Any) -> str:
    """The absolute address of ``endpoint`` on IRIS_PUBLIC_URL: a request's Host never makes a link."""
    return current_app.config["IRIS_PUBLIC_URL"] + url_for(endpoint, **values)


def sign_in_link() -> str | None:
    """IRIS_SIGN_IN_URL sending the person back to /account once signed in; None when it is not set."""
    url = current_app.config.get("IRIS_SIGN_IN_URL")
    return with_redirect_url(url, public_url("web.account")) if url else None


@bp.app_context_processor
def navigation() -> dict[str, Any]:
    """For every template: functions, so a page that shows no navigation costs nothing."""
    return {"page_user": page_user, "sign_in_link": sign_in_link, "sign_out_form": SignOutForm}


@bp.get("/")
def home():
    return render_template("home.html")


@bp.route("/signup", methods=["GET", "POST"])
@limiter.shared_limit(
    register_limit, scope="register", methods=["POST"], on_breach=metrics.registration_rate_limited
)
def signup():
    """The sign-up form. Success redirects (303) to the confirmation page; field problems re-render the form
    with 422 (409 for a taken email), the typed email kept and the password never sent back. Clerk or the
    database being down reaches the app's error page (503)."""
    form = SignupForm()
    roles = current_app.config["IRIS_SIGNUP_ROLES"]
    if len(roles) > 1:
        form.role.choices = [(role, ROLE_LABELS.get(role, role.title())) for role in roles]
    else:
        del form.role
    status = 200
    if form.validate_on_submit():
        role = form.role.data if "role" in form else DEFAULT_ROLE
        try:
            user = registration.register(form.email.data or "", form.password.data or "", role)
        except ValidationFailed as error:
            for detail in error.details:
                form[detail["field"]].errors.append(detail["message"])
            status = 422
        except EmailTaken as error:
            form.email.errors.append(error.message)
            status = 409
        else:
            session["signed_up_email"] = user.email
            return redirect(url_for("web.signup_done"), code=303)
    return render_template("signup.html", form=form), status


@bp.get("/signup/done")
def signup_done():
    """What happens next, once, right after the sign-up form created an account (its email is in the
    session). Opened any other way, nothing was just created here: it redirects to the sign-up form."""
    email = session.pop("signed_up_email", None)
    if email is None:
        return redirect(url_for("web.signup"))
    return render_template("signup_done.html", email=email, verification_required=verification.required())


# HTTP status of the verification page for each state of its link (and for a wrong password).
LINK_STATUS = {
    "open": 200,
    "confirmed": 200,
    "removed": 200,
    "expired": 410,
    "invalid": 404,
    "wrong_password": 422,
}


def removing() -> bool:
    """Whether this POST is "this wasn't me": it needs no password, so the wrong-password limit spares it."""
    return bool(VerifyEmailForm().remove.data)  # as the view reads it: "remove=" is not pressing it


@bp.route("/verify-email/<token>", methods=["GET", "POST"])
@wrong_passwords_limited(exempt_when=removing)
def verify_email(token: str):
    """The link from a verification mail. GET only says what the two choices do and changes nothing (a link
    scanner may open it); a POST (CSRF-checked) confirms the address, which takes the account's password
    (checked by Clerk), or removes the account ("this wasn't me", no password) (``iris.verification``).
    A wrong password re-renders the page (422) and confirms nothing; wrong passwords are limited per client
    IP (RATELIMIT_WRONG_PASSWORD, with the other pages that ask for one) and per account (429 page). The
    password is never rendered back. Clerk failing is the 503 error page, with nothing changed. An expired,
    used or tampered link gets a page saying so, with a form to ask for a new mail. The token never reaches a
    log (``iris.observability.loggable_path``)."""
    form = VerifyEmailForm()
    state, _ = verification.look_up(token)
    acted = False
    if state == "open" and form.validate_on_submit():
        # Acted on only while open: pressing a button on a used, expired or unknown link just says so.
        if form.remove.data:
            state = verification.remove(token)
        else:
            state = verification.confirm(token, form.password.data or "")
        acted = state in ("confirmed", "removed")
    return render_template(
        "verify_email.html", state=state, acted=acted, form=form, new_link_form=NewLinkForm()
    ), LINK_STATUS[state]


@bp.route("/verify-email", methods=["GET", "POST"])
@limiter.shared_limit(verification_email_limit, scope="verification_email", methods=["POST"])
def new_verification_link():
    """Ask for a new verification mail. The answer is the same whatever the address (it never says whether an
    account has it); only an unconfirmed account's address gets a mail, at most one per few minutes."""
    form = NewLinkForm()
    if form.validate_on_submit():
        verification.request_mail(form.email.data or "")
        return render_template("new_link_sent.html")
    return render_template("new_link.html", form=form)


def signed_in_user() -> User | None:
    """The signed-in user of a page that is about the account (``auth.current_user``), also set as the
    navigation's page user and as ``g.user`` for the request log; None when signed out. Unlike ``page_user``
    it raises: ``Forbidden`` (deleted account), ``UserNotFound``, and the 503s; and, for a form posted with a
    ``__session`` that Clerk's handshake would refresh (expired, say), ``handshake.SubmitAgain``: its page
    is asked for again, which refreshes the sign-in, and nothing is done until the person submits again."""
    if request.method == "POST" and handshake.refresh_needed():
        setattr(g, PAGE_USER, None)
        raise handshake.SubmitAgain()
    try:
        user = None if handshake.gave_up() else auth.current_user()
    except (IrisError, SQLAlchemyError):
        setattr(g, PAGE_USER, None)  # the error page's navigation shows signed out, without asking again
        raise
    setattr(g, PAGE_USER, user)
    g.user = user
    return user


@bp.get("/account")
def account():
    """The signed-in user's account (Clerk's ``__session`` cookie, as a browser sends it), or a signed-out
    page. A deleted account is a 403 page; Clerk or the database unreachable, a 503 page."""
    user = signed_in_user()
    return render_template("account.html", user=user, timezone=current_app.config["IRIS_TIMEZONE"])


@bp.route("/account/delete", methods=["GET", "POST"])
@wrong_passwords_limited()
def delete_account():
    """The confirmation step of "Delete my account". GET says what deleting means and changes nothing; the
    POST (CSRF-checked) must carry the account's password, which Clerk checks (``auth.confirm_password``: the
    pages' recent sign-in); then it deletes the account (``accounts.delete_own_account``: the Clerk user,
    then the row) and redirects (303) to /account/deleted. A missing or wrong password re-renders the page
    with 422 and does nothing; wrong passwords are rate-limited per client IP (429 page). An impersonation
    (``act`` claim) gets the 403 page. Signed out: redirect to /account. Clerk or the database failing is
    the 503 page; a retry completes."""
    user = signed_in_user()
    if user is None:
        return redirect(url_for("web.account"))
    auth.refuse_impersonation()
    form = PasswordConfirmForm()
    status = 200
    if form.validate_on_submit():
        problems = deletion_password_problems(user, form.password.data)
        if not problems:
            email = user.email
            accounts.delete_own_account(user)
            session["deleted_email"] = email
            return redirect(url_for("web.account_deleted"), code=303)
        form.password.errors = problems
        status = 422
    return render_template("delete_account.html", user=user, form=form), status


def deletion_password_problems(user: User, password: str | None) -> list[str]:
    """Why ``password`` does not confirm the deletion of ``user``'s account (empty: it does). Clerk checks it
    (``auth.confirm_password``). A Clerk user that is gone already counts as confirmed: an earlier press
    deleted it and then failed on the row, and only the row is left, which Clerk's webhook or reconcile
    would soft-delete anyway."""
    try:
        auth.confirm_password(user, password)
    except NotFoundAtClerk:
        log.info("account %s: its Clerk user is gone already; completing the deletion", user.id)
    except ValidationFailed as refused:
        return [detail["message"] for detail in refused.details]
    return []


@bp.post("/sign-out")
def sign_out():
    """Sign out without clerk-js (CSRF-checked form in the navigation): the session of the ``__session``
    cookie is revoked at Clerk (``POST /v1/sessions/{id}/revoke``) when the cookie names one this instance
    signed, expired or not; the cookie is cleared; then Clerk's own sign-out (IRIS_SIGN_OUT_URL, with
    ``redirect_url`` back to the home page), or the home page.

    Never fails open: when Clerk could not be asked (the revoke, or the keys to read the cookie, unreachable),
    Clerk's sign-out page still ends the session through Clerk's own cookie; without IRIS_SIGN_OUT_URL
    nothing would, and the next page's handshake would sign the person back in, so the answer is then the
    503 page ("try again"), with the cookie kept and nothing pretended."""
    token = request.cookies.get(auth.SESSION_COOKIE, "")
    url = current_app.config.get("IRIS_SIGN_OUT_URL")
    try:
        session_id = tokens.session_id_for_sign_out(token) if token else None
        if session_id is not None:
            clerk.revoke_session(session_id)
    except NotFoundAtClerk:
        pass  # already gone
    except IrisError as error:
        log.warning("sign-out: Clerk did not revoke the session (%s)", error.code)
        if not url:
            raise

    home = public_url("web.home")
    response = redirect(with_redirect_url(url, home) if url else home, 303)
    response.delete_cookie(auth.SESSION_COOKIE, path="/", samesite="Lax", secure=request.is_secure)
    return response


@bp.get("/account/deleted")
def account_deleted():
    """Said once, right after the deletion (its email is in the session); opened any other way, it
    redirects to /account."""
    email = session.pop("deleted_email", None)
    if email is None:
        return redirect(url_for("web.account"))
    return render_template("account_deleted.html", email=email)
