"""Flask-WTF forms. They carry fields and CSRF only: every rule lives in the registration service, whose
field errors the views put back on the matching form field, so no rule is written twice."""

from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField, SelectField, SubmitField


class SignupForm(FlaskForm):
    email = EmailField("Email address", render_kw={"autocomplete": "email", "spellcheck": "false"})
    password = PasswordField("Password", render_kw={"autocomplete": "new-password"})
    role = SelectField("Account type", choices=[])


class VerifyEmailForm(FlaskForm):
    """The two choices a verification link offers; which button was pressed says which."""

    confirm = SubmitField("Yes, this is my account")
    remove = SubmitField("I did not sign up: remove it")


class NewLinkForm(FlaskForm):
    email = EmailField("Email address", render_kw={"autocomplete": "email", "spellcheck": "false"})


class ConfirmForm(FlaskForm):
    """A confirmation step: CSRF only. The page's own button says what it confirms (deleting your account,
    deactivating or reactivating one); the rules live in iris.accounts."""


class SignOutForm(FlaskForm):
    """The navigation's "Sign out" button: CSRF only, so no other site can sign a visitor out."""
