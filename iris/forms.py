"""Flask-WTF forms. They carry fields and CSRF only: every rule lives in the registration service, whose
field errors the views put back on the matching form field, so no rule is written twice."""

from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField, SelectField, SubmitField


class SignupForm(FlaskForm):
    email = EmailField("Email address", render_kw={"autocomplete": "email", "spellcheck": "false"})
    password = PasswordField("Password", render_kw={"autocomplete": "new-password"})
    role = SelectField("Account type", choices=[])


class VerifyEmailForm(FlaskForm):
    """The two choices a verification link offers; which button was pressed says which. The page renders
    them as two forms: confirming takes the account's password (checked by Clerk), removing takes nothing,
    and pressing Enter in the password field can only confirm."""

    password = PasswordField("Your Iris password", render_kw={"autocomplete": "current-password"})
    confirm = SubmitField("Yes, this is my account")
    remove = SubmitField("This wasn't me: remove the account")


class NewLinkForm(FlaskForm):
    email = EmailField("Email address", render_kw={"autocomplete": "email", "spellcheck": "false"})


class ConfirmForm(FlaskForm):
    """A confirmation step: CSRF only. The page's own button says what it confirms (deleting your account,
    deactivating or reactivating one); the rules live in iris.accounts."""


class PasswordConfirmForm(ConfirmForm):
    """A confirmation step that also asks for the person's own password: the pages' step-up for destructive
    acts (deleting your account, an admin's deactivate or reactivate), which have no clerk-js to reverify
    the session. The password is checked by Clerk (``iris.auth.confirm_password``) and never sent back."""

    password = PasswordField("Your password", render_kw={"autocomplete": "current-password"})


class SignOutForm(FlaskForm):
    """The navigation's "Sign out" button: CSRF only, so no other site can sign a visitor out."""
