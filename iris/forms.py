"""Flask-WTF forms. They carry fields and CSRF only: every rule lives in the registration service, whose
field errors the views put back on the matching form field, so no rule is written twice."""

from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField, SelectField


class SignupForm(FlaskForm):
    email = EmailField("Email address", render_kw={"autocomplete": "email", "spellcheck": "false"})
    password = PasswordField("Password", render_kw={"autocomplete": "new-password"})
    role = SelectField("Account type", choices=[])
