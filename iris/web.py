"""Server-rendered pages. Views call the same service as the API and show its errors at their fields."""

from __future__ import annotations

from flask import Blueprint, current_app, g, redirect, render_template, session, url_for

from iris import auth, registration
from iris.errors import EmailTaken, ValidationFailed
from iris.extensions import limiter, register_limit
from iris.forms import SignupForm
from iris.models import DEFAULT_ROLE, RESTAURANT

bp = Blueprint("web", __name__)

ROLE_LABELS = {RESTAURANT: "Restaurant"}


@bp.get("/")
def home():
    return render_template("home.html")


@bp.route("/signup", methods=["GET", "POST"])
@limiter.shared_limit(register_limit, scope="register", methods=["POST"])
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
    return render_template("signup_done.html", email=email)


@bp.get("/account")
def account():
    """The signed-in user's account (Clerk's ``__session`` cookie, as a browser sends it), or a signed-out
    page. A deleted account is a 403 page; Clerk or the database unreachable, a 503 page."""
    g.user = auth.current_user()
    return render_template("account.html", user=g.user, timezone=current_app.config["IRIS_TIMEZONE"])
