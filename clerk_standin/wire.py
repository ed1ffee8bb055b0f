"""Clerk's wire format as the stand-in speaks it: ids, timestamps, the error envelope, the password policy.

Everything here is plain data and pure functions (no Flask, no state), shared by the app and the fault
injection. The shapes follow Clerk's Backend API as its API reference and SDKs define them: ids are a prefix,
``_`` and 27 base62 characters; timestamps are Unix milliseconds; every error answer is
``{"errors": [{"message", "long_message", "code", "meta"?}], "clerk_trace_id"}``, with ``meta.param_name``
only on form errors.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

DEFAULT_API_VERSION = "2021-02-05"
SESSION_TOKEN_CATEGORY = "cl_B7d4PD111AAA"  # noqa: S105 - Clerk's public category tag
MIN_PASSWORD_LENGTH = 8


# A small stand-in for Clerk's breach corpus (compared lower-cased). All are at least 8
# characters long so they exercise the breach check rather than the length check.
BREACHED_PASSWORDS = frozenset(
    {
        "password",
        "password1",
        "password123",
        "passw0rd",
        "12345678",
        "123456789",
        "1234567890",
        "11111111",
        "00000000",
        "87654321",
        "abcd1234",
        "abc12345",
        "qwertyuiop",
        "qwerty123",
        "1q2w3e4r",
        "iloveyou",
        "iloveyou1",
        "sunshine",
        "princess",
        "football",
        "baseball",
        "superman",
        "trustno1",
        "letmein1",
        "welcome1",
        "admin123",
        "starwars",
        "whatever",
        "computer",
    }
)


# The Clerk error entry (code, message, long_message) for an injected status; 500 also for a crash.
STATUS_CODES = {
    429: ("too_many_requests", "Too many requests", "Too many requests, retry later"),
    500: ("internal_clerk_error", "Oops, an unexpected error occurred", "Internal error"),
    502: ("bad_gateway", "Bad gateway", "The upstream service answered with an error"),
    503: ("service_unavailable", "Service unavailable", "The service is temporarily unavailable"),
    504: ("gateway_timeout", "Gateway timeout", "The upstream service did not answer in time"),
}

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------- ids, timestamps, JSON types


def new_id(prefix: str) -> str:
    """Return a Clerk-looking id: ``prefix`` + ``_`` + 27 random base62 characters (uniform: bytes of 248
    and above, where ``% 62`` would favour some characters, are skipped). Fast enough to make thousands of
    users at once."""
    chars: list[str] = []
    while len(chars) < 27:
        chars.extend(BASE62[byte % 62] for byte in secrets.token_bytes(36) if byte < 248)
    return prefix + "_" + "".join(chars[:27])


def now_ms() -> int:
    """Current Unix time in milliseconds (Clerk's timestamp unit)."""
    return int(time.time() * 1000)


def is_int(value: Any) -> bool:
    """True for a JSON integer; ``true``/``false`` are not integers here, though Python says so."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a JSON number (integer or float), never for a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- email verification


def verified_by_admin() -> dict[str, Any]:
    """The ``verification`` of an address made or marked verified through the Backend API: Clerk's admin
    strategy, whose status can only be ``verified`` (so says Clerk's Python SDK, generated from its API
    spec)."""
    return {
        "object": "verification_admin",
        "status": "verified",
        "strategy": "admin",
        "attempts": None,
        "expire_at": None,
    }


def unverified() -> dict[str, Any]:
    """The ``verification`` of an address marked unverified through the Backend API. Clerk's rendering of
    that case is unconfirmed, and an admin verification cannot say ``unverified`` (Clerk's Python SDK
    rejects it), so this is the shape of an email address awaiting its emailed code, no code sent yet.
    Readers must treat any status but ``verified`` (and ``verification: null``) as unverified."""
    return {
        "object": "verification_otp",
        "status": "unverified",
        "strategy": "email_code",
        "attempts": None,
        "expire_at": None,
    }


# --------------------------------------------------------------------------- users and email addresses


def new_email_address(email: str, created: int, *, verified: bool = True) -> dict[str, Any]:
    """A new ``EmailAddress`` object (``idn_`` id), verified by admin unless ``verified`` is false."""
    return {
        "id": new_id("idn"),
        "object": "email_address",
        "email_address": email,
        "reserved": False,
        "verification": verified_by_admin() if verified else unverified(),
        "linked_to": [],
        "matches_sso_connection": False,
        "created_at": created,
        "updated_at": created,
    }


def new_user(
    emails: list[str],
    created: int,
    *,
    external_id: str | None = None,
    username: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    public_metadata: dict[str, Any] | None = None,
    private_metadata: dict[str, Any] | None = None,
    unsafe_metadata: dict[str, Any] | None = None,
    password_enabled: bool = False,
) -> dict[str, Any]:
    """A new ``User`` object with every field Clerk's Python SDK requires; the first of ``emails`` (at least
    one, all verified by admin) is the primary address. ``created`` (ms) is its ``created_at`` and
    ``updated_at``."""
    email_objects = [new_email_address(email, created) for email in emails]
    return {
        "id": new_id("user"),
        "object": "user",
        "external_id": external_id,
        "primary_email_address_id": email_objects[0]["id"],
        "primary_phone_number_id": None,
        "primary_web3_wallet_id": None,
        "username": username,
        "first_name": first_name,
        "last_name": last_name,
        "image_url": "https://img.clerk.com/standin-default-avatar",
        "has_image": False,
        "public_metadata": public_metadata or {},
        "private_metadata": private_metadata or {},
        "unsafe_metadata": unsafe_metadata or {},
        "email_addresses": email_objects,
        "phone_numbers": [],
        "web3_wallets": [],
        "passkeys": [],
        "password_enabled": password_enabled,
        "password_last_updated_at": created if password_enabled else None,
        "two_factor_enabled": False,
        "totp_enabled": False,
        "backup_code_enabled": False,
        "mfa_enabled_at": None,
        "mfa_disabled_at": None,
        "external_accounts": [],
        "saml_accounts": [],
        "enterprise_accounts": [],
        "last_sign_in_at": None,
        "banned": False,
        "locked": False,
        "lockout_expires_in_seconds": None,
        "verification_attempts_remaining": 100,
        "updated_at": created,
        "created_at": created,
        "delete_self_enabled": True,
        "create_organization_enabled": True,
        "create_organizations_limit": None,
        "last_active_at": None,
        "legal_accepted_at": None,
    }


# --------------------------------------------------------------------------- errors


class ClerkAPIError(Exception):
    """Raised inside handlers; rendered as Clerk's error envelope with ``status``."""

    def __init__(self, status: int, errors: list[dict[str, Any]], headers: dict[str, str] | None = None):
        super().__init__(errors[0]["code"] if errors else str(status))
        self.status = status
        self.errors = errors
        self.headers = headers or {}


def clerk_error(code: str, message: str, long_message: str, param_name: str | None = None) -> dict[str, Any]:
    """One entry of Clerk's ``errors`` array; ``meta.param_name`` only for form errors."""
    error: dict[str, Any] = {"message": message, "long_message": long_message, "code": code}
    if param_name is not None:
        error["meta"] = {"param_name": param_name}
    return error


def error_body(errors: list[dict[str, Any]]) -> bytes:
    """Clerk's envelope with a fresh ``clerk_trace_id``."""
    return json.dumps({"errors": errors, "clerk_trace_id": secrets.token_hex(16)}).encode()


def not_found(kind: str, object_id: str) -> ClerkAPIError:
    return ClerkAPIError(
        404,
        [clerk_error("resource_not_found", "not found", f"No {kind} was found with id {object_id}")],
    )


def param_unknown(name: str) -> dict[str, Any]:
    return clerk_error(
        "form_param_unknown",
        "is unknown",
        f"{name} is not a valid parameter for this request.",
        name,
    )


def param_type_invalid(name: str, expected: str) -> dict[str, Any]:
    return clerk_error("form_param_type_invalid", "is invalid", f"{name} must be {expected}.", name)


def param_value_invalid(name: str, long_message: str) -> dict[str, Any]:
    return clerk_error("form_param_value_invalid", "is invalid", long_message, name)


def param_missing(name: str) -> dict[str, Any]:
    return clerk_error("form_param_missing", "is missing", f"{name} must be included.", name)


def array_size_exceeded(name: str, maximum: int) -> dict[str, Any]:
    return clerk_error(
        "form_param_array_size_exceeded",
        "exceeds maximum size",
        f"{name} should not exceed {maximum} items.",
        name,
    )


def user_banned() -> ClerkAPIError:
    """403 ``user_banned``, with the wording of Clerk's catalog of Backend API errors."""
    return ClerkAPIError(
        403,
        [
            clerk_error(
                "user_banned",
                "User banned",
                "You have been banned. If you think this was by mistake, please contact support.",
            )
        ],
    )


def identifier_exists(name: str, label: str) -> dict[str, Any]:
    message = f"That {label} is taken. Please try another."
    return clerk_error("form_identifier_exists", message, message, name)


# --------------------------------------------------------------------------- passwords


def password_digest(password: str) -> bytes:
    """A salted PBKDF2 digest (salt + hash). Few iterations: the stand-in holds throwaway test
    passwords in memory, and its cost must not show in benchmarks."""
    salt = secrets.token_bytes(16)
    return salt + hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 1000)


def check_password_digest(password: str, digest: bytes) -> bool:
    salt, expected = digest[:16], digest[16:]
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 1000), expected)


def check_password(password: str) -> dict[str, Any] | None:
    """Clerk's password policy as the stand-in applies it: at least 8 characters and not in
    ``BREACHED_PASSWORDS``. Returns the Clerk error entry, or None when acceptable."""
    if len(password) < MIN_PASSWORD_LENGTH:
        message = f"Passwords must be {MIN_PASSWORD_LENGTH} characters or more."
        return clerk_error("form_password_length_too_short", message, message, "password")
    if password.lower() in BREACHED_PASSWORDS:
        message = (
            "Password has been found in an online data breach. "
            "For account safety, please use a different password."
        )
        return clerk_error("form_password_pwned", message, message, "password")
    return None
