"""The admin pages under /admin: list and search accounts, see one with its audit trail, deactivate or
reactivate it after a confirmation step. Server-rendered in the site's layout; no JavaScript needed.

Only a signed-in admin sees them; anyone else (signed out, not an admin, a deleted account) gets the 404
page, exactly as for a page that does not exist. The rules live in iris.accounts, shared with the API.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for

from iris import accounts, auth, personal_data
from iris.errors import (
    AccountErased,
    CannotDeactivateSelf,
    ClerkUserDeleted,
    EmailTaken,
    Forbidden,
    UserNotFound,
    ValidationFailed,
)
from iris.extensions import wrong_passwords_limited
from iris.forms import PasswordConfirmForm
from iris.models import ROLES, User
from iris.web import signed_in_user

bp = Blueprint("admin", __name__, url_prefix="/admin")

# What each confirmation page does: its heading, its button, and the service function it calls.
ACTIONS = {
    "deactivate": ("Deactivate this account?", "Yes, deactivate it", accounts.deactivate),
    "reactivate": ("Reactivate this account?", "Yes, reactivate it", accounts.reactivate),
}


def signed_in_admin() -> User:
    """The signed-in admin, or the 404 page for anyone else. Clerk or the database unreachable is the 503
    page (whether the visitor is an admin cannot be told then)."""
    try:
        user = signed_in_user()
    except (Forbidden, UserNotFound):
        user = None
    if not auth.is_admin(user):
        abort(404)
    assert user is not None
    return user


def account_or_404(user_id: uuid.UUID) -> User:
    account = accounts.find_account(user_id)
    if account is None:
        abort(404)
    return account


@bp.get("/users")
def users():
    """Accounts, newest first, a page at a time; searched and filtered by the same query parameters as
    ``GET /api/v1/users`` (a bad one: the page says which, 422)."""
    signed_in_admin()
    problems: list[dict[str, str]] = []
    found: list[User] = []
    next_cursor = None
    try:
        query = accounts.parse_list_query(request.args)
        found, next_cursor = accounts.list_accounts(query)
    except ValidationFailed as error:
        problems = error.details
    # The filters as given, for the form and the next page's link (the cursor apart).
    filters: dict[str, Any] = {
        name: request.args.get(name, "") for name in accounts.LIST_PARAMETERS if name != "cursor"
    }
    next_args = {name: value for name, value in filters.items() if value}
    return render_template(
        "admin/users.html",
        users=found,
        filters=filters,
        roles=ROLES,
        problems=problems,
        next_url=url_for("admin.users", **next_args, cursor=next_cursor) if next_cursor else None,
        first_url=url_for("admin.users", **next_args) if request.args.get("cursor") else None,
        timezone=current_app.config["IRIS_TIMEZONE"],
    ), (422 if problems else 200)


@bp.get("/users/<uuid:user_id>")
def user(user_id: uuid.UUID):
    """One account: its facts, what an admin can do with it, and its audit trail, newest first."""
    admin = signed_in_admin()
    account = account_or_404(user_id)
    retention_days = personal_data.retention_days()
    return render_template(
        "admin/user.html",
        account=account,
        own=account.id == admin.id,
        trail=accounts.audit_trail(account.id),
        reactivatable=accounts.can_reactivate(account),
        retention_days=retention_days,
        erase_on=account.deleted_at + timedelta(days=retention_days) if account.deleted_at else None,
        timezone=current_app.config["IRIS_TIMEZONE"],
    )


@bp.route("/users/<uuid:user_id>/deactivate", methods=["GET", "POST"])
@wrong_passwords_limited()
def deactivate(user_id: uuid.UUID):
    """The confirmation step of deactivating (``confirm``). Your own account cannot be: the 409 page."""
    return confirm(user_id, "deactivate")


@bp.route("/users/<uuid:user_id>/reactivate", methods=["GET", "POST"])
@wrong_passwords_limited()
def reactivate(user_id: uuid.UUID):
    """The confirmation step of reactivating (``confirm``)."""
    return confirm(user_id, "reactivate")


def confirm(user_id: uuid.UUID, action: str):
    """GET says what will happen and changes nothing; the POST (CSRF-checked) must carry the admin's own
    password, which Clerk checks (``auth.confirm_password``: the pages' recent sign-in), then does it and
    redirects (303) to the account's page. A missing or wrong password re-renders the page with 422 and
    does nothing (wrong ones rate-limited per client IP). An admin whose address is not confirmed gets the
    403 page (``auth.require_confirmed``). A refusal (the email taken meanwhile, the Clerk user gone) is
    shown on this page (409); an account that can never be reactivated (erased, or deleted by its owner:
    ``accounts.can_reactivate``) gets the 409 page at once. Clerk or the database failing is the 503 page,
    and pressing the button again completes it. Under impersonation the change is audited as the
    impersonator's (``auth.audit_actor_name``).
    """
    admin = signed_in_admin()
    auth.require_confirmed(admin)
    account = account_or_404(user_id)
    if action == "deactivate" and account.id == admin.id:
        raise CannotDeactivateSelf()
    if action == "reactivate" and account.deleted_at is not None and not accounts.can_reactivate(account):
        # Not offered on the account's page: erased, or deleted by its owner (its Clerk user is gone).
        raise AccountErased() if account.erased_at is not None else ClerkUserDeleted()
    heading, button, operation = ACTIONS[action]
    form = PasswordConfirmForm()
    problem = None
    status = 200
    if form.validate_on_submit():
        email = account.email
        try:
            auth.confirm_password(admin, form.password.data)
            operation(admin, account, actor_name=auth.audit_actor_name())
        except ValidationFailed as refused:
            form.password.errors = [detail["message"] for detail in refused.details]
            status = 422
        except (AccountErased, EmailTaken, ClerkUserDeleted) as error:
            problem = error.message
            status = 409
            account = account_or_404(user_id)
        else:
            flash(f"{email} is {action}d.")
            return redirect(url_for("admin.user", user_id=user_id), code=303)
    return render_template(
        "admin/confirm.html",
        account=account,
        action=action,
        heading=heading,
        button=button,
        form=form,
        problem=problem,
        retention_days=personal_data.retention_days(),
    ), status
