"""The stand-in as a WSGI app: Clerk's ``/v1`` routes over in-memory state, and the control API.

``ClerkStandin`` serves the subset of ``https://api.clerk.com/v1`` the accounts backend uses (users, their
email addresses, sessions, session tokens, the JWKS) in Clerk's wire format (``clerk_standin.wire``), and
wraps it in the request counting and fault injection (``clerk_standin.faults``) that the control API under
``/__standin`` drives. It also serves, without a Bearer key, development's Account Portal (``/sign-in``,
``/sign-out``: ``clerk_standin.pages``) and the one Frontend API route a server-rendered app needs,
``GET /v1/client/handshake`` (``clerk_standin.handshake``). It binds no socket: ``clerk_standin.server``
runs it.
"""

from __future__ import annotations

import copy
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, redirect, request
from werkzeug.exceptions import HTTPException

from clerk_standin import handshake, pages
from clerk_standin.faults import FaultTable, apply_fault
from clerk_standin.keys import SigningKey, generate_private_key, load_or_create_private_key
from clerk_standin.state import StandinState, load_state, save_state
from clerk_standin.webhooks import DEFAULT_TIMEOUT, WebhookSender
from clerk_standin.wire import (
    DEFAULT_API_VERSION,
    SESSION_TOKEN_CATEGORY,
    STATUS_CODES,
    ClerkAPIError,
    array_size_exceeded,
    check_password,
    check_password_digest,
    clerk_error,
    error_body,
    identifier_exists,
    is_int,
    new_email_address,
    new_id,
    new_user,
    not_found,
    now_ms,
    param_missing,
    param_type_invalid,
    param_unknown,
    param_value_invalid,
    password_digest,
    unverified,
    user_banned,
    verified_by_admin,
)

log = logging.getLogger("clerk_standin")

DEFAULT_SECRET_KEY = "sk_test_iris_local_standin"  # noqa: S105 - public, local-only default
DEFAULT_ISSUER = "https://standin.clerk.accounts.dev"
DEFAULT_AZP = "http://127.0.0.1:5000"
DEFAULT_TOKEN_LIFETIME = 60
CONTROL_PREFIX = "/__standin"
# The pages a browser opens (no Bearer key, HTML answers): development's stand-in for the Account Portal.
PAGE_PATHS = ("/sign-in", "/sign-out")
# Frontend API routes: a browser calls them, so no Bearer key (FAPI is its own host at Clerk; here it shares
# the Backend API's origin).
FAPI_PATHS = ("/v1/client/handshake",)

TOKEN_LIFETIME_RANGE = (30, 315_360_000)
LIST_LIMIT_RANGE = (1, 500)
SESSION_LIFETIME_MS = 7 * 24 * 3600 * 1000
SESSION_ABANDON_MS = 30 * 24 * 3600 * 1000


CREATE_USER_PARAMS = frozenset(
    {
        "email_address",
        "password",
        "external_id",
        "skip_password_checks",
        "first_name",
        "last_name",
        "public_metadata",
        "private_metadata",
        "unsafe_metadata",
        "username",
    }
)
# Clerk's Python SDK sends notify_primary_email_address_changed (false) on every update; no email goes out.
UPDATE_EMAIL_ADDRESS_PARAMS = frozenset({"verified", "primary", "notify_primary_email_address_changed"})
CREATE_EMAIL_ADDRESS_PARAMS = frozenset(
    {"user_id", "email_address", "verified", "primary", "notify_primary_email_address_changed"}
)
# PATCH /v1/users/{id}: the string fields, plus the SDK's notify flag (sent on every call, ignored).
UPDATE_USER_STRINGS = ("external_id", "first_name", "last_name", "username", "primary_email_address_id")
UPDATE_USER_PARAMS = frozenset({*UPDATE_USER_STRINGS, "notify_primary_email_address_changed"})
# Clerk's list filters take at most this many values each.
MAX_FILTER_VALUES = 100
LIST_FILTERS = ("email_address", "external_id", "user_id")
BULK_USER_KEYS = frozenset(
    {"email_address", "external_id", "first_name", "last_name", "username", "created_at"}
)
CREATE_SESSION_PARAMS = frozenset({"user_id", "active_organization_id"})
CREATE_TOKEN_PARAMS = frozenset({"expires_in_seconds"})
# Session statuses a token may be minted for, and the sts claim each gives.
TOKEN_STATUSES = ("active", "pending")
ORDER_FIELDS = ("created_at", "updated_at", "email_address", "first_name", "last_name", "username")
# Session statuses a ban, a revocation or a sign-out ends.
LIVE_STATUSES = ("active", "pending")
# Internal session field (not part of Clerk's Session object): when its first factor was verified, in ms.
FACTOR_VERIFIED_AT = "_first_factor_verified_at"

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")


class ClerkStandin:
    """The stand-in as a WSGI application (``ClerkStandin(...)`` is callable as WSGI).

    Args:
        secret_key: the only accepted ``Authorization: Bearer`` value on ``/v1``.
        private_key: RSA signing key; ``key_file`` loads/creates one; otherwise generated.
        issuer: ``iss`` claim of minted session tokens.
        azp: ``azp`` claim of minted session tokens, and the only origin the sign-in and sign-out pages
            send people back to.
        state_file: keep users, password digests and sessions in this file (``clerk_standin.state``): loaded
            here (``StateFileError`` when it exists but cannot be used), rewritten after every change.
            None (the default) keeps them in memory only.
        webhook_url, webhook_secret: send ``user.*`` webhooks there, signed with this ``whsec_`` secret (a new
            one when None), as Clerk does through Svix (``clerk_standin.webhooks``). Off without a URL; the
            control API can change both at run time.
        webhook_timeout: seconds a webhook endpoint has to answer 2xx (Svix: 15).
        webhook_retry_scale: multiplies the waits of Svix's retry schedule (tests use 0.01).
        handshake_style: ``"production"`` (the default) sends a handshake's payload or nonce back in a cookie,
            as Clerk's production instances do; ``"development"`` appends it to ``redirect_url`` as a query
            parameter, as development instances do. The control API can switch it at run time.

    Thread-safe: all state sits behind ``self.lock``, except the faults, which sit behind their own
    (``self.faults``, a ``FaultTable``), and the webhooks (``self.webhooks``, a ``WebhookSender``). Webhook
    events are emitted while ``self.lock`` is held, so their order is the order of the changes.
    ``reset()`` returns it to the state it had when constructed (no users, sessions, clients, nonces, faults
    or counts; original signing key, webhook endpoint and handshake style; no webhook faults or queue),
    emptying the state file too.

    Every change to a user moves its ``updated_at`` strictly forward (``_touch``), by 1 ms when two
    changes fall in the same millisecond: Clerk's users are ordered by it.
    """

    def __init__(
        self,
        secret_key: str = DEFAULT_SECRET_KEY,
        *,
        private_key: rsa.RSAPrivateKey | None = None,
        key_file: str | os.PathLike[str] | None = None,
        issuer: str = DEFAULT_ISSUER,
        azp: str = DEFAULT_AZP,
        state_file: str | os.PathLike[str] | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        webhook_timeout: float = DEFAULT_TIMEOUT,
        webhook_retry_scale: float = 1.0,
        handshake_style: str = "production",
    ):
        if not secret_key:
            raise ValueError("secret_key must not be empty")
        if handshake_style not in handshake.STYLES:
            raise ValueError(f"handshake_style must be one of {', '.join(handshake.STYLES)}")
        if private_key is None:
            private_key = load_or_create_private_key(key_file) if key_file else generate_private_key()
        self.secret_key = secret_key
        self.issuer = issuer
        self.azp = azp
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.initial_key = SigningKey.from_private_key(private_key)
        self.keys: list[SigningKey] = [self.initial_key]
        self.users: dict[str, dict[str, Any]] = {}
        self.password_digests: dict[str, bytes] = {}
        self.user_seq: dict[str, int] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        # Browsers signed in through /sign-in, by client id: {id, token_sha256, created_at, updated_at}.
        self.clients: dict[str, dict[str, Any]] = {}
        self.initial_handshake_style = self.handshake_style = handshake_style
        self.nonces = handshake.NonceStore()
        self.handshake_faults = handshake.HandshakeFaults()
        # Signs payloads under the bad_signature fault: never in the JWKS. Made on first use.
        self._foreign_key: rsa.RSAPrivateKey | None = None
        # (created_at, seq) of deleted users, so a list cursor naming one still has its place (memory only).
        self.deleted_positions: dict[str, tuple[int, int]] = {}
        self.faults = FaultTable()
        # The instance id in webhook envelopes is the original key's kid (Clerk's kid is its instance id).
        self.webhooks = WebhookSender(
            webhook_url,
            webhook_secret,
            instance_id=self.initial_key.kid,
            timeout=webhook_timeout,
            retry_scale=webhook_retry_scale,
        )
        self.request_counts: Counter[str] = Counter()
        self.connections_accepted = 0
        self.api_connections = 0
        self.api_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._seq = itertools.count()
        self.state_file = state_file
        # Held while a snapshot is taken and written, so the file never goes back to an older state.
        self._save_lock = threading.Lock()
        if state_file is not None:
            saved = load_state(state_file)
            if saved is not None:
                self.users, self.password_digests = saved.users, saved.password_digests
                self.user_seq, self.sessions = saved.user_seq, saved.sessions
                self.clients = saved.clients
                self._seq = itertools.count(max(self.user_seq.values(), default=-1) + 1)
        self.flask_app = self._build_flask_app()

    # ---- state helpers

    @property
    def signing_key(self) -> SigningKey:
        """The key that signs new tokens (first in the JWKS)."""
        with self.lock:
            return self.keys[0]

    def reset(self) -> None:
        """Drop users, sessions, faults and counts; restore the original signing key and webhook endpoint,
        dropping webhook faults, queue and log. Requests held by a ``hold`` fault go on."""
        self.faults.reset()
        self.webhooks.reset()
        self.nonces.clear()
        self.handshake_faults.clear()
        with self.lock:
            self.handshake_style = self.initial_handshake_style
            self.clients.clear()
            self.deleted_positions.clear()
            self.users.clear()
            self.user_seq.clear()
            self.password_digests.clear()
            self.sessions.clear()
            self.request_counts.clear()
            self.connections_accepted = 0
            self.api_connections = 0
            self.api_sockets = weakref.WeakSet()
            self.keys = [self.initial_key]
        self._save()

    def _save(self) -> None:
        """Write users, password digests and sessions to the state file, if there is one. Call after a
        change, without holding ``self.lock``."""
        if self.state_file is None:
            return
        with self._save_lock:
            with self.lock:
                state = StandinState(
                    copy.deepcopy(self.users),
                    dict(self.password_digests),
                    dict(self.user_seq),
                    copy.deepcopy(self.sessions),
                    copy.deepcopy(self.clients),
                )
            save_state(self.state_file, state)

    def set_session_status(self, session_id: str, status: str) -> dict[str, Any]:
        """Mark a session ``active`` or ``pending`` (a step Clerk requires is not done: its tokens then
        carry ``sts: "pending"``). Returns the session; KeyError for an unknown one, ValueError for another
        status."""
        if status not in TOKEN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(TOKEN_STATUSES)}")
        with self.lock:
            session = self.sessions[session_id]
            session["status"] = status
            session["updated_at"] = now_ms()
            result = _public_session(session)
        self._save()
        return result

    def set_first_factor_age(self, session_id: str, minutes: int) -> dict[str, Any]:
        """Say the session's first factor was verified ``minutes`` ago: its next tokens carry
        ``fva: [minutes, -1]``. Returns the session; KeyError for an unknown one, ValueError for a negative or
        non-integer ``minutes``."""
        if not is_int(minutes) or minutes < 0:
            raise ValueError("minutes must be a non-negative integer")
        with self.lock:
            session = self.sessions[session_id]
            session[FACTOR_VERIFIED_AT] = now_ms() - minutes * 60_000
            result = _public_session(session)
        self._save()
        return result

    def set_session_actor(self, session_id: str, actor: dict[str, Any] | None) -> dict[str, Any]:
        """Set the session's ``actor`` (Clerk's impersonation: ``{"sub": "user_..."}`` and whatever else the
        actor token carried), or clear it with None. Its next tokens carry it as ``act``. Returns the
        session; KeyError for an unknown one, ValueError unless ``actor`` is None or an object with a string
        ``sub``."""
        if actor is not None and not (isinstance(actor, dict) and isinstance(actor.get("sub"), str)):
            raise ValueError('actor must be null or an object with a string "sub"')
        with self.lock:
            session = self.sessions[session_id]
            session["actor"] = copy.deepcopy(actor)
            session["updated_at"] = now_ms()
            result = _public_session(session)
        self._save()
        return result

    def set_handshake_style(self, style: str) -> None:
        """``"production"`` (payload in a cookie) or ``"development"`` (payload in the query); ValueError
        otherwise."""
        if style not in handshake.STYLES:
            raise ValueError(f"style must be one of {', '.join(handshake.STYLES)}")
        with self.lock:
            self.handshake_style = style

    def rotate_key(self, keep_previous: bool = False) -> SigningKey:
        """Sign with a new key from now on. The JWKS serves only the new key, or the new key
        followed by the previous signing key when ``keep_previous`` is true."""
        new_key = SigningKey.generate()
        with self.lock:
            self.keys = [new_key, self.keys[0]] if keep_previous else [new_key]
        return new_key

    def note_connection_accepted(self) -> None:
        """Called by the server for every accepted TCP connection."""
        with self.lock:
            self.connections_accepted += 1

    def stats(self) -> dict[str, Any]:
        """Request counts per ``"METHOD /route"`` (``/v1`` and other non-control paths only),
        connections that carried such requests, and all accepted TCP connections."""
        with self.lock:
            return {
                "requests": dict(sorted(self.request_counts.items())),
                "requests_total": sum(self.request_counts.values()),
                "connections": self.api_connections,
                "connections_accepted": self.connections_accepted,
            }

    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        """Sign ``claims`` exactly as given with the current key. The header defaults to
        ``{"alg": "RS256", "kid": <current kid>, "typ": "JWT", "cat": <session category>}``;
        ``header`` entries override those, and a ``None`` value removes the entry. ``alg`` may
        be RS256, RS384 or RS512."""
        key = self.signing_key
        merged: dict[str, Any] = {
            "alg": "RS256",
            "kid": key.kid,
            "typ": "JWT",
            "cat": SESSION_TOKEN_CATEGORY,
        }
        merged.update(header or {})
        algorithm = merged.pop("alg", None) or "RS256"
        if algorithm not in ("RS256", "RS384", "RS512"):
            raise ValueError("alg must be RS256, RS384 or RS512")
        headers = {name: value for name, value in merged.items() if value is not None}
        if "typ" not in headers:
            headers["typ"] = None  # PyJWT drops a falsy typ instead of adding "JWT"
        return jwt.encode(claims, key.private_key, algorithm=algorithm, headers=headers)

    def bulk_create_users(
        self, entries: Any, *, webhooks: bool = False, origin: tuple[str, str] = ("", "")
    ) -> list[str]:
        """Create many users at once, for scale tests: full ``User`` objects as ``POST /v1/users`` makes them,
        without passwords (so no digest to compute). Each entry has ``email_address`` (a string or a list;
        the first is primary) and optionally ``external_id``, ``first_name``, ``last_name``, ``username``
        and ``created_at`` (ms; default now). All or nothing: a malformed entry or a taken email, username or
        external_id raises ValueError naming it, and nothing is created. Sends ``user.created`` for each
        only when ``webhooks`` is true. Returns the new ids in the order of ``entries``."""
        if not isinstance(entries, list):
            raise ValueError("users must be a list")
        prepared = [_bulk_entry(entry, index) for index, entry in enumerate(entries)]
        now = now_ms()
        with self.lock:
            taken: dict[str, set[str]] = {"email_address": set(), "username": set(), "external_id": set()}
            for user in self.users.values():
                taken["email_address"].update(e["email_address"].lower() for e in user["email_addresses"])
                taken["username"].add((user["username"] or "").lower())
                taken["external_id"].add(user["external_id"] or "")
            for index, (emails, fields) in enumerate(prepared):
                keys = [("email_address", email.lower()) for email in emails]
                keys += [
                    ("username", (fields["username"] or "").lower()),
                    ("external_id", fields["external_id"] or ""),
                ]
                for name, key in keys:
                    if key and key in taken[name]:
                        raise ValueError(f"users[{index}]: {name} {key!r} is taken")
                    taken[name].add(key)
            created = []
            for emails, fields in prepared:
                created_at = fields.pop("created_at")
                user = new_user(emails, now if created_at is None else created_at, **fields)
                self.users[user["id"]] = user
                self.user_seq[user["id"]] = next(self._seq)
                created.append(user["id"])
                if webhooks:
                    self._emit("user.created", user, origin)
        self._save()
        return created

    # ---- WSGI entry point: control API, stats and faults around the Flask app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """Control calls go straight to the app; everything else (``/v1`` and the pages) is counted and
        may meet a fault."""
        path = environ.get("PATH_INFO", "") or "/"
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            return self.flask_app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET").upper()
        self._count_request(environ, method)
        latency_ms, fault = self.faults.take(method, path)
        if latency_ms:
            self.stopping.wait(latency_ms / 1000)
        if fault is None:
            return self.flask_app(environ, start_response)
        if fault.action == "hold":
            self.faults.hold(fault, self.stopping)
            return self.flask_app(environ, start_response)
        if fault.after_commit:
            Response.from_app(self.flask_app, environ, buffered=True).close()
        return apply_fault(fault, environ, start_response, self.stopping)

    def _count_request(self, environ: dict[str, Any], method: str) -> None:
        adapter = self.flask_app.url_map.bind_to_environ(environ)
        try:
            rule, _ = adapter.match(return_rule=True)
            route = rule.rule
        except HTTPException:
            route = "<unmatched>"
        sock = environ.get("werkzeug.socket")
        with self.lock:
            self.request_counts[f"{method} {route}"] += 1
            if sock is not None and sock not in self.api_sockets:
                self.api_sockets.add(sock)
                self.api_connections += 1

    def release(self, fault_id: int) -> bool:
        """Let every request held by the ``hold`` fault ``fault_id`` (and any it would hold later) go
        on; False when there is no such fault."""
        return self.faults.release(fault_id)

    # ---- Flask app

    def _build_flask_app(self) -> Flask:
        app = Flask("clerk_standin")
        app.before_request(self._authenticate)
        app.after_request(self._add_version_header)
        app.register_error_handler(ClerkAPIError, self._render_clerk_error)
        app.register_error_handler(HTTPException, self._render_http_error)
        app.register_error_handler(Exception, self._render_unexpected_error)
        routes = [
            ("/v1/users", "create_user", self.create_user, ["POST"]),
            ("/v1/users", "list_users", self.list_users, ["GET"]),
            ("/v1/users/count", "count_users", self.count_users, ["GET"]),
            ("/v1/users/<user_id>", "get_user", self.get_user, ["GET"]),
            ("/v1/users/<user_id>", "delete_user", self.delete_user, ["DELETE"]),
            ("/v1/users/<user_id>", "update_user", self.update_user, ["PATCH"]),
            ("/v1/users/<user_id>/ban", "ban_user", self.ban_user, ["POST"]),
            ("/v1/users/<user_id>/unban", "unban_user", self.unban_user, ["POST"]),
            (
                "/v1/users/<user_id>/verify_password",
                "verify_password",
                self.verify_password,
                ["POST"],
            ),
            (
                "/v1/email_addresses/<email_address_id>",
                "get_email_address",
                self.get_email_address,
                ["GET"],
            ),
            (
                "/v1/email_addresses/<email_address_id>",
                "update_email_address",
                self.update_email_address,
                ["PATCH"],
            ),
            (
                "/v1/email_addresses/<email_address_id>",
                "delete_email_address",
                self.delete_email_address,
                ["DELETE"],
            ),
            ("/v1/email_addresses", "create_email_address", self.create_email_address, ["POST"]),
            ("/v1/sessions", "create_session", self.create_session, ["POST"]),
            ("/v1/sessions/<session_id>/tokens", "create_token", self.create_token, ["POST"]),
            ("/v1/sessions/<session_id>/revoke", "revoke_session", self.revoke_session, ["POST"]),
            (
                "/v1/clients/handshake_payload",
                "handshake_payload",
                self.handshake_payload,
                ["GET"],
            ),
            ("/v1/client/handshake", "client_handshake", self.client_handshake, ["GET"]),
            ("/v1/jwks", "jwks", self.jwks, ["GET"]),
            ("/sign-in", "sign_in", self.sign_in, ["GET", "POST"]),
            ("/sign-out", "sign_out", self.sign_out, ["GET", "POST"]),
            (CONTROL_PREFIX + "/health", "c_health", self.c_health, ["GET"]),
            (CONTROL_PREFIX + "/faults", "c_add_fault", self.c_add_fault, ["POST"]),
            (CONTROL_PREFIX + "/faults", "c_list_faults", self.c_list_faults, ["GET"]),
            (CONTROL_PREFIX + "/faults", "c_clear_faults", self.c_clear_faults, ["DELETE"]),
            (
                CONTROL_PREFIX + "/faults/<int:fault_id>",
                "c_del_fault",
                self.c_del_fault,
                ["DELETE"],
            ),
            (
                CONTROL_PREFIX + "/faults/<int:fault_id>/release",
                "c_release",
                self.c_release,
                ["POST"],
            ),
            (CONTROL_PREFIX + "/faults/<int:fault_id>/held", "c_held", self.c_held, ["GET"]),
            (CONTROL_PREFIX + "/reset", "c_reset", self.c_reset, ["POST"]),
            (CONTROL_PREFIX + "/stats", "c_stats", self.c_stats, ["GET"]),
            (CONTROL_PREFIX + "/keys/rotate", "c_rotate", self.c_rotate, ["POST"]),
            (CONTROL_PREFIX + "/sign", "c_sign", self.c_sign, ["POST"]),
            (CONTROL_PREFIX + "/public-key.pem", "c_pem", self.c_public_pem, ["GET"]),
            (
                CONTROL_PREFIX + "/sessions/<session_id>/status",
                "c_session_status",
                self.c_session_status,
                ["POST"],
            ),
            (
                CONTROL_PREFIX + "/sessions/<session_id>/first_factor",
                "c_first_factor",
                self.c_first_factor,
                ["POST"],
            ),
            (CONTROL_PREFIX + "/sessions/<session_id>/actor", "c_actor", self.c_actor, ["POST"]),
            (CONTROL_PREFIX + "/handshake", "c_handshake", self.c_handshake, ["GET"]),
            (CONTROL_PREFIX + "/handshake", "c_set_handshake", self.c_set_handshake, ["PUT"]),
            (CONTROL_PREFIX + "/handshake/faults", "c_hs_faults", self.c_handshake_faults, ["GET"]),
            (CONTROL_PREFIX + "/handshake/faults", "c_add_hs_fault", self.c_add_handshake_fault, ["POST"]),
            (
                CONTROL_PREFIX + "/handshake/faults",
                "c_clear_hs_faults",
                self.c_clear_handshake_faults,
                ["DELETE"],
            ),
            (CONTROL_PREFIX + "/users/bulk", "c_bulk_users", self.c_bulk_users, ["POST"]),
            (CONTROL_PREFIX + "/webhooks", "c_webhooks", self.c_webhooks, ["GET"]),
            (CONTROL_PREFIX + "/webhooks", "c_set_webhooks", self.c_set_webhooks, ["PUT"]),
            (CONTROL_PREFIX + "/webhooks", "c_disable_webhooks", self.c_disable_webhooks, ["DELETE"]),
            (CONTROL_PREFIX + "/webhooks/faults", "c_add_wh_fault", self.c_add_webhook_fault, ["POST"]),
            (CONTROL_PREFIX + "/webhooks/faults", "c_wh_faults", self.c_webhook_faults, ["GET"]),
            (
                CONTROL_PREFIX + "/webhooks/faults",
                "c_clear_wh_faults",
                self.c_clear_webhook_faults,
                ["DELETE"],
            ),
            (
                CONTROL_PREFIX + "/webhooks/faults/<int:fault_id>/release",
                "c_release_webhooks",
                self.c_release_webhooks,
                ["POST"],
            ),
            (CONTROL_PREFIX + "/webhooks/deliveries", "c_wh_log", self.c_webhook_deliveries, ["GET"]),
            (CONTROL_PREFIX + "/webhooks/wait", "c_wh_wait", self.c_wait_for_webhooks, ["POST"]),
        ]
        for rule, endpoint, view, methods in routes:
            app.add_url_rule(rule, endpoint, view, methods=methods)
        return app

    def _authenticate(self) -> None:
        if _is_control(request.path) or request.path in PAGE_PATHS or request.path in FAPI_PATHS:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ClerkAPIError(
                401,
                [
                    clerk_error(
                        "authorization_header_format_invalid",
                        "Invalid Authorization header format",
                        "Invalid Authorization header format. Must be 'Bearer <YOUR_API_KEY>'",
                    )
                ],
            )
        if not hmac.compare_digest(token.encode(), self.secret_key.encode()):
            message = (
                "The provided Clerk Secret Key is invalid. Make sure that your Clerk Secret Key is correct."
            )
            raise ClerkAPIError(401, [clerk_error("clerk_key_invalid", message, message)])

    def _add_version_header(self, response: Response) -> Response:
        if not _is_control(request.path) and request.path not in PAGE_PATHS + FAPI_PATHS:
            version = request.headers.get("Clerk-API-Version") or DEFAULT_API_VERSION
            response.headers["Clerk-Api-Version"] = version
        return response

    def _render_clerk_error(self, error: ClerkAPIError) -> Response:
        response = Response(error_body(error.errors), error.status, mimetype="application/json")
        for name, value in error.headers.items():
            response.headers[name] = value
        return response

    def _render_http_error(self, error: HTTPException) -> Response:
        status = error.code or 500
        if _is_control(request.path):
            return _control_error(error.description or error.name, status)
        if status in (404, 405):
            return self._render_clerk_error(
                ClerkAPIError(
                    404,
                    [
                        clerk_error(
                            "resource_not_found",
                            "not found",
                            "The requested resource was not found.",
                        )
                    ],
                )
            )
        return self._render_clerk_error(
            ClerkAPIError(
                status,
                [clerk_error("request_invalid", error.name, error.description or error.name)],
            )
        )

    def _render_unexpected_error(self, error: Exception) -> Response:
        log.error("clerk stand-in: unexpected error on %s %s", request.method, request.path)
        log.debug("%s", traceback.format_exc())
        code, message, long_message = STATUS_CODES[500]
        return self._render_clerk_error(ClerkAPIError(500, [clerk_error(code, message, long_message)]))

    # ---- /v1/users

    def create_user(self) -> Response:
        body = _json_object_body()
        unknown = sorted(set(body) - CREATE_USER_PARAMS)
        if unknown:
            raise ClerkAPIError(422, [param_unknown(name) for name in unknown])
        errors: list[dict[str, Any]] = []
        emails = body.get("email_address")
        if emails is not None and not (isinstance(emails, list) and all(isinstance(e, str) for e in emails)):
            errors.append(param_type_invalid("email_address", "an array of strings"))
            emails = None
        for name in ("password", "external_id", "first_name", "last_name", "username"):
            value = body.get(name)
            if value is not None and not isinstance(value, str):
                errors.append(param_type_invalid(name, "a string"))
        skip_checks = body.get("skip_password_checks")
        if skip_checks is not None and not isinstance(skip_checks, bool):
            errors.append(param_type_invalid("skip_password_checks", "a boolean"))
        for name in ("public_metadata", "private_metadata", "unsafe_metadata"):
            value = body.get(name)
            if value is not None and not isinstance(value, dict):
                errors.append(param_type_invalid(name, "an object"))
        if errors:
            raise ClerkAPIError(422, errors)

        emails = [e.strip() for e in (emails or [])]
        if not emails:
            errors.append(param_missing("email_address"))
        if any(not _valid_email(email) for email in emails):
            errors.append(email_format_invalid())
        password = body.get("password")
        if password is not None and not skip_checks:
            password_error = check_password(password)
            if password_error is not None:
                errors.append(password_error)
        password_given = password is not None  # only a salted digest is kept, for verify_password
        if errors:
            raise ClerkAPIError(422, errors)

        user = new_user(
            emails,
            now_ms(),
            external_id=body.get("external_id"),
            username=body.get("username"),
            first_name=body.get("first_name"),
            last_name=body.get("last_name"),
            public_metadata=body.get("public_metadata"),
            private_metadata=body.get("private_metadata"),
            unsafe_metadata=body.get("unsafe_metadata"),
            password_enabled=password_given,
        )
        user_id = user["id"]
        origin = _request_origin()
        with self.lock:
            self._check_unique(user)
            self.users[user_id] = user
            self.user_seq[user_id] = next(self._seq)
            if isinstance(password, str):
                self.password_digests[user_id] = password_digest(password)
            result = copy.deepcopy(user)
            self._emit("user.created", user, origin)
        self._save()
        return _json_response(result)

    def verify_password(self, user_id: str) -> Response:
        """``POST /v1/users/{id}/verify_password {"password"}``: 200 ``{"verified": true}``, 422
        ``incorrect_password`` when wrong (or the user has none), 404 when the user is missing."""
        body = _json_object_body()
        unknown = sorted(set(body) - {"password"})
        if unknown:
            raise ClerkAPIError(422, [param_unknown(name) for name in unknown])
        password = body.get("password")
        if not isinstance(password, str):
            raise ClerkAPIError(422, [param_missing("password")])
        with self.lock:
            if user_id not in self.users:
                raise not_found("user", user_id)
            digest = self.password_digests.get(user_id)
        if digest is None or not check_password_digest(password, digest):
            message = "Password is incorrect. Try again, or use another method."
            raise ClerkAPIError(422, [clerk_error("incorrect_password", message, message, "password")])
        return _json_response({"verified": True})

    def _check_unique(self, user: dict[str, Any]) -> None:
        """Raise 422 ``form_identifier_exists`` for an email (case-insensitive, also within the
        request), username (case-insensitive) or external_id (exact) that another user than
        ``user["id"]`` holds. Caller holds the lock."""
        taken_emails: set[str] = set()
        taken_usernames: set[str] = set()
        taken_external: set[str] = set()
        for other in self.users.values():
            if other["id"] == user["id"]:
                continue
            taken_emails.update(e["email_address"].lower() for e in other["email_addresses"])
            if other["username"] is not None:
                taken_usernames.add(other["username"].lower())
            if other["external_id"] is not None:
                taken_external.add(other["external_id"])
        errors = []
        for entry in user["email_addresses"]:
            email = entry["email_address"].lower()
            if email in taken_emails:
                errors.append(identifier_exists("email_address", "email address"))
                break
            taken_emails.add(email)
        if user["username"] is not None and user["username"].lower() in taken_usernames:
            errors.append(identifier_exists("username", "username"))
        if user["external_id"] is not None and user["external_id"] in taken_external:
            errors.append(identifier_exists("external_id", "external ID"))
        if errors:
            raise ClerkAPIError(422, errors)

    def get_user(self, user_id: str) -> Response:
        with self.lock:
            user = self.users.get(user_id)
            result = copy.deepcopy(user)
        if result is None:
            raise not_found("user", user_id)
        return _json_response(result)

    def delete_user(self, user_id: str) -> Response:
        """``DELETE /v1/users/{id}``: the user and its sessions go; its place in the created_at order is
        remembered, so a list cursor naming it keeps working. Emits ``user.deleted``."""
        origin = _request_origin()
        with self.lock:
            user = self.users.pop(user_id, None)
            seq = self.user_seq.pop(user_id, None)
            self.password_digests.pop(user_id, None)
            if user is None:
                raise not_found("user", user_id)
            if seq is not None:
                self.deleted_positions[user_id] = (user["created_at"], seq)
            for session_id in [s["id"] for s in self.sessions.values() if s["user_id"] == user_id]:
                del self.sessions[session_id]
            deleted: dict[str, Any] = {"object": "user", "id": user_id, "deleted": True}
            if user["external_id"] is not None:
                deleted["external_id"] = user["external_id"]
            self.webhooks.emit("user.deleted", deleted, user_id, *origin)
        self._save()
        return _json_response(deleted)

    def update_user(self, user_id: str) -> Response:
        """``PATCH /v1/users/{id}``: sets ``external_id``, ``first_name``, ``last_name``, ``username`` and
        ``primary_email_address_id`` (one of the user's address ids). ``null`` counts as absent; ``""``
        clears ``username`` and ``external_id``. ``notify_primary_email_address_changed`` is accepted and
        ignored. Unknown keys: 422 ``form_param_unknown`` each; non-strings: 422 ``form_param_type_invalid``;
        both before the 404. A foreign address id: 422 ``form_param_value_invalid``; a username or
        external_id another user holds: 422 ``form_identifier_exists``. Moves ``updated_at``, emits
        ``user.updated``, keeps the change in the state file."""
        body = _json_object_body()
        unknown = sorted(set(body) - UPDATE_USER_PARAMS)
        if unknown:
            raise ClerkAPIError(422, [param_unknown(name) for name in unknown])
        errors = [
            param_type_invalid(name, "a string")
            for name in UPDATE_USER_STRINGS
            if body.get(name) is not None and not isinstance(body[name], str)
        ]
        notify = body.get("notify_primary_email_address_changed")
        if notify is not None and not isinstance(notify, bool):
            errors.append(param_type_invalid("notify_primary_email_address_changed", "a boolean"))
        if errors:
            raise ClerkAPIError(422, errors)
        changes = {name: body[name] for name in UPDATE_USER_STRINGS if body.get(name) is not None}
        for name in ("username", "external_id"):
            if changes.get(name) == "":
                changes[name] = None
        origin = _request_origin()
        with self.lock:
            user = self.users.get(user_id)
            if user is None:
                raise not_found("user", user_id)
            primary = changes.pop("primary_email_address_id", None)
            if primary is not None and all(e["id"] != primary for e in user["email_addresses"]):
                message = "primary_email_address_id must be the id of one of the user's email addresses."
                raise ClerkAPIError(422, [param_value_invalid("primary_email_address_id", message)])
            self._check_unique({**user, **changes})
            user.update(changes)
            if primary is not None:
                user["primary_email_address_id"] = primary
            self._touch(user)
            result = copy.deepcopy(user)
            self._emit("user.updated", user, origin)
        self._save()
        return _json_response(result)

    def ban_user(self, user_id: str) -> Response:
        """``POST /v1/users/{id}/ban``: 200 the user with ``banned: true``. Its live sessions are revoked (no
        more tokens), new sessions and the sign-in page refuse it. Banning a banned user changes nothing."""
        return self._set_banned(user_id, True)

    def unban_user(self, user_id: str) -> Response:
        """``POST /v1/users/{id}/unban``: 200 the user with ``banned: false``. Revoked sessions stay revoked;
        unbanning a user who is not banned changes nothing."""
        return self._set_banned(user_id, False)

    def _set_banned(self, user_id: str, banned: bool) -> Response:
        origin = _request_origin()
        changed = False
        with self.lock:
            user = self.users.get(user_id)
            if user is None:
                raise not_found("user", user_id)
            if user["banned"] != banned:
                changed = True
                user["banned"] = banned
                self._touch(user)
                if banned:
                    for session in self.sessions.values():
                        if session["user_id"] == user_id and session["status"] in LIVE_STATUSES:
                            self._end_session(session, "revoked")
                self._emit("user.updated", user, origin)
            result = copy.deepcopy(user)
        if changed:
            self._save()
        return _json_response(result)

    def _touch(self, user: dict[str, Any]) -> int:
        """Move ``user["updated_at"]`` to now, and at least 1 ms past its last value; returns it. Caller
        holds the lock."""
        user["updated_at"] = max(now_ms(), user["updated_at"] + 1)
        return user["updated_at"]

    def _emit(self, event_type: str, user: dict[str, Any], origin: tuple[str, str]) -> None:
        """Queue webhook ``event_type`` carrying ``user`` as it is now. Caller holds the lock, so events
        leave in the order of the changes."""
        self.webhooks.emit(event_type, user, user["id"], *origin)

    def list_users(self) -> Response:
        """``GET /v1/users``: a bare array, filtered (``_filtered_users``), ordered by ``order_by`` with
        creation order breaking ties (so every order is total and stable), then paged by ``offset`` and
        ``limit``, or by the cursor ``starting_after=<user id>``: the users after that one in the order. The
        cursor needs created_at ordering and a zero offset (else 422 ``form_param_value_invalid`` on
        ``starting_after``); an id the stand-in never had is 422 too, while a deleted user's id keeps its
        place. Pages walked by cursor hold every user exactly once, however many share a created_at."""
        limit = _int_query("limit", 10, *LIST_LIMIT_RANGE)
        offset = _int_query("offset", 0, 0, None)
        order_by = (request.args.get("order_by") or "-created_at").strip()
        descending = order_by.startswith("-")
        field = order_by[1:] if order_by[:1] in ("-", "+") else order_by
        if field not in ORDER_FIELDS:
            raise ClerkAPIError(
                422,
                [param_value_invalid("order_by", f"order_by must be one of {', '.join(ORDER_FIELDS)}.")],
            )
        cursor = request.args.get("starting_after") or None
        if cursor is not None and (field != "created_at" or offset != 0):
            message = (
                "starting_after can only be used with order_by created_at, +created_at or -created_at "
                "and without a non-zero offset."
            )
            raise ClerkAPIError(422, [param_value_invalid("starting_after", message)])
        with self.lock:
            matched = self._filtered_users()
            if cursor is not None:
                position = self._created_position(cursor)
                if position is None:
                    message = f"starting_after must be the id of a user; {cursor} is not one."
                    raise ClerkAPIError(422, [param_value_invalid("starting_after", message)])
                matched = [
                    u
                    for u in matched
                    if (
                        self._sort_key(u, field) < position
                        if descending
                        else self._sort_key(u, field) > position
                    )
                ]
            matched.sort(key=lambda user: self._sort_key(user, field), reverse=descending)
            page = copy.deepcopy(matched[offset : offset + limit])
        return _json_response(page)

    def _created_position(self, user_id: str) -> tuple[int, int] | None:
        """Where ``user_id`` is (or was, if deleted) in the created_at order. Caller holds the lock."""
        user = self.users.get(user_id)
        if user is not None:
            return (user["created_at"], self.user_seq[user_id])
        return self.deleted_positions.get(user_id)

    def count_users(self) -> Response:
        with self.lock:
            total = len(self._filtered_users())
        return _json_response({"object": "total_count", "total_count": total})

    def _filtered_users(self) -> list[dict[str, Any]]:
        """Users matching the query filters: values of one filter are OR-ed, filters are
        AND-ed. A filter key that is present but matches nothing yields no users. More than
        ``MAX_FILTER_VALUES`` values of one filter: 422 ``form_param_array_size_exceeded``.
        Caller holds the lock."""
        args = request.args
        too_many = [
            array_size_exceeded(name, MAX_FILTER_VALUES)
            for name in LIST_FILTERS
            if len(args.getlist(name)) > MAX_FILTER_VALUES
        ]
        if too_many:
            raise ClerkAPIError(422, too_many)
        users = list(self.users.values())
        if "email_address" in args:
            wanted = {value.strip().lower() for value in args.getlist("email_address")}
            users = [
                u for u in users if any(e["email_address"].lower() in wanted for e in u["email_addresses"])
            ]
        if "external_id" in args:
            wanted = set(args.getlist("external_id"))
            users = [u for u in users if u["external_id"] in wanted]
        if "user_id" in args:
            wanted = set(args.getlist("user_id"))
            users = [u for u in users if u["id"] in wanted]
        return users

    def _sort_key(self, user: dict[str, Any], field: str) -> tuple[Any, ...]:
        seq = self.user_seq[user["id"]]
        if field in ("created_at", "updated_at"):
            return (user[field], seq)
        if field == "email_address":
            primary = next(
                e["email_address"]
                for e in user["email_addresses"]
                if e["id"] == user["primary_email_address_id"]
            )
            return (primary.lower(), seq)
        value = user[field]
        return (value is None, (value or "").lower(), seq)

    # ---- /v1/email_addresses

    def get_email_address(self, email_address_id: str) -> Response:
        """``GET /v1/email_addresses/{id}``: 200 the ``EmailAddress``, as it appears in its user's
        ``email_addresses``; 404 ``resource_not_found`` when no user has it."""
        with self.lock:
            found = self._find_email_address(email_address_id)
            result = copy.deepcopy(found[1]) if found is not None else None
        if result is None:
            raise not_found("email address", email_address_id)
        return _json_response(result)

    def update_email_address(self, email_address_id: str) -> Response:
        """``PATCH /v1/email_addresses/{id}`` ``{"verified"?, "primary"?}``: 200 the updated ``EmailAddress``.

        ``verified: true`` gives the address Clerk's admin verification (status ``verified``), ``false`` the
        unverified form (``wire.unverified``); ``primary: true`` makes it its user's
        ``primary_email_address_id`` (``false`` changes nothing: a user always has a primary address).
        ``notify_primary_email_address_changed`` is accepted and ignored (no emails here); ``null`` counts
        as absent. The address's and the user's ``updated_at`` move on, and ``user.updated`` is sent. Unknown
        keys get 422
        ``form_param_unknown``, non-booleans 422 ``form_param_type_invalid``, both before the 404 for an
        unknown address."""
        body = _json_object_body()
        unknown = sorted(set(body) - UPDATE_EMAIL_ADDRESS_PARAMS)
        if unknown:
            raise ClerkAPIError(422, [param_unknown(name) for name in unknown])
        errors = [
            param_type_invalid(name, "a boolean")
            for name in sorted(UPDATE_EMAIL_ADDRESS_PARAMS)
            if body.get(name) is not None and not isinstance(body[name], bool)
        ]
        if errors:
            raise ClerkAPIError(422, errors)
        verified, primary = body.get("verified"), body.get("primary")
        origin = _request_origin()
        with self.lock:
            found = self._find_email_address(email_address_id)
            if found is None:
                raise not_found("email address", email_address_id)
            user, address = found
            if verified is not None:
                address["verification"] = verified_by_admin() if verified else unverified()
            if primary:
                user["primary_email_address_id"] = address["id"]
            address["updated_at"] = self._touch(user)
            result = copy.deepcopy(address)
            self._emit("user.updated", user, origin)
        self._save()
        return _json_response(result)

    def create_email_address(self) -> Response:
        """``POST /v1/email_addresses`` ``{user_id, email_address, verified?, primary?}``: 200 the new
        ``EmailAddress``, added to the user; unverified unless ``verified: true``; ``primary: true`` makes it
        the primary address. ``notify_primary_email_address_changed`` is accepted and ignored; ``null``
        counts as absent. Refusals: 422 ``form_param_unknown`` / ``form_param_type_invalid`` /
        ``form_param_missing`` / ``form_param_format_invalid``, 404 for an unknown user, 422
        ``form_identifier_exists`` when any user has the address (case-insensitive)."""
        body = _json_object_body()
        unknown = sorted(set(body) - CREATE_EMAIL_ADDRESS_PARAMS)
        if unknown:
            raise ClerkAPIError(422, [param_unknown(name) for name in unknown])
        errors = [
            param_type_invalid(name, "a string")
            for name in ("user_id", "email_address")
            if body.get(name) is not None and not isinstance(body[name], str)
        ]
        errors += [
            param_type_invalid(name, "a boolean")
            for name in ("verified", "primary", "notify_primary_email_address_changed")
            if body.get(name) is not None and not isinstance(body[name], bool)
        ]
        errors += [param_missing(name) for name in ("user_id", "email_address") if body.get(name) is None]
        if errors:
            raise ClerkAPIError(422, errors)
        email = body["email_address"].strip()
        if not _valid_email(email):
            raise ClerkAPIError(422, [email_format_invalid()])
        user_id = body["user_id"]
        origin = _request_origin()
        with self.lock:
            user = self.users.get(user_id)
            if user is None:
                raise not_found("user", user_id)
            if self._email_taken(email):
                raise ClerkAPIError(422, [identifier_exists("email_address", "email address")])
            address = new_email_address(email, self._touch(user), verified=body.get("verified") is True)
            user["email_addresses"].append(address)
            if body.get("primary"):
                user["primary_email_address_id"] = address["id"]
            result = copy.deepcopy(address)
            self._emit("user.updated", user, origin)
        self._save()
        return _json_response(result)

    def delete_email_address(self, email_address_id: str) -> Response:
        """``DELETE /v1/email_addresses/{id}``: 200 ``{"object":"email_address","id","deleted":true}``; 404
        ``resource_not_found`` when no user has it; the user's primary address is refused with 422
        ``identification_deletion_failed`` (make another address primary first)."""
        origin = _request_origin()
        with self.lock:
            found = self._find_email_address(email_address_id)
            if found is None:
                raise not_found("email address", email_address_id)
            user, address = found
            if user["primary_email_address_id"] == email_address_id:
                raise ClerkAPIError(
                    422,
                    [
                        clerk_error(
                            "identification_deletion_failed",
                            "Deletion failed",
                            "The primary email address cannot be deleted. "
                            "Make another address primary first.",
                        )
                    ],
                )
            user["email_addresses"].remove(address)
            self._touch(user)
            self._emit("user.updated", user, origin)
        self._save()
        return _json_response({"object": "email_address", "id": email_address_id, "deleted": True})

    def _email_taken(self, email: str) -> bool:
        """True when any user has ``email`` (case-insensitive). Caller holds the lock."""
        wanted = email.lower()
        return any(
            e["email_address"].lower() == wanted
            for user in self.users.values()
            for e in user["email_addresses"]
        )

    def _find_email_address(self, email_address_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The user holding the address ``email_address_id`` and the address itself (both live, not
        copies), or None. Caller holds the lock."""
        for user in self.users.values():
            for address in user["email_addresses"]:
                if address["id"] == email_address_id:
                    return user, address
        return None

    # ---- /v1/sessions

    def create_session(self) -> Response:
        body = _json_object_body()
        unknown = sorted(set(body) - CREATE_SESSION_PARAMS)
        if unknown:
            raise ClerkAPIError(422, [param_unknown(name) for name in unknown])
        user_id = body.get("user_id")
        if user_id is None:
            raise ClerkAPIError(422, [param_missing("user_id")])
        if not isinstance(user_id, str):
            raise ClerkAPIError(422, [param_type_invalid("user_id", "a string")])
        organization_id = body.get("active_organization_id")
        if organization_id is not None:
            raise not_found("organization", str(organization_id))
        return _json_response(self._start_session(user_id))

    def _start_session(self, user_id: str, client_id: str | None = None) -> dict[str, Any]:
        """A new active session of ``user_id`` (saved) on ``client_id`` (a new id when None: Backend API
        sessions belong to no browser), its first factor verified now; returns it as Clerk shows it. 404
        ``resource_not_found`` when there is no such user, 403 ``user_banned`` when it is banned."""
        created = now_ms()
        session = {
            "object": "session",
            "id": new_id("sess"),
            "user_id": user_id,
            "client_id": client_id or new_id("client"),
            "actor": None,
            "status": "active",
            "last_active_organization_id": None,
            "last_active_at": created,
            "expire_at": created + SESSION_LIFETIME_MS,
            "abandon_at": created + SESSION_ABANDON_MS,
            "updated_at": created,
            "created_at": created,
            FACTOR_VERIFIED_AT: created,
        }
        with self.lock:
            user = self.users.get(user_id)
            if user is None:
                raise not_found("user", user_id)
            if user["banned"]:
                raise user_banned()
            self.sessions[session["id"]] = session
            result = _public_session(session)
        self._save()
        return result

    def create_token(self, session_id: str) -> Response:
        body = _json_object_body()
        unknown = sorted(set(body) - CREATE_TOKEN_PARAMS)
        if unknown:
            raise ClerkAPIError(422, [param_unknown(name) for name in unknown])
        lifetime = body.get("expires_in_seconds")
        if lifetime is None:
            lifetime = DEFAULT_TOKEN_LIFETIME
        low, high = TOKEN_LIFETIME_RANGE
        if not is_int(lifetime) or not low <= lifetime <= high:
            raise ClerkAPIError(
                422,
                [
                    param_value_invalid(
                        "expires_in_seconds",
                        f"expires_in_seconds must be an integer between {low} and {high}.",
                    )
                ],
            )
        with self.lock:
            session = self.sessions.get(session_id)
            session = dict(session) if session is not None else None
        # Only a live session gets tokens; one ended by the sign-out page is gone as far as tokens go.
        if session is None or session["status"] not in TOKEN_STATUSES:
            raise not_found("session", session_id)
        return _json_response({"object": "token", "jwt": self._session_token(session, lifetime)})

    def revoke_session(self, session_id: str) -> Response:
        """``POST /v1/sessions/{id}/revoke``: 200 the ``Session``, status ``revoked`` (no more tokens; a
        handshake for its client answers signed out). A session that is no longer live is answered as it
        is. 404 ``resource_not_found`` for an unknown id."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise not_found("session", session_id)
            changed = session["status"] in LIVE_STATUSES
            if changed:
                self._end_session(session, "revoked")
            result = _public_session(session)
        if changed:
            self._save()
        return _json_response(result)

    def _end_session(self, session: dict[str, Any], status: str) -> None:
        """Give ``session`` its final ``status``; its client, if a browser holds it, changes too (a later
        ``__client_uat``). Caller holds the lock and saves."""
        now = now_ms()
        session["status"] = status
        session["updated_at"] = now
        client = self.clients.get(session["client_id"])
        if client is not None:
            client["updated_at"] = max(now, client["updated_at"] + 1)

    def _session_token(self, session: dict[str, Any], lifetime: int, issued_at: int | None = None) -> str:
        """A session token for ``session`` with Clerk's v2 claims, valid ``lifetime`` seconds from
        ``issued_at`` (now by default); ``sts`` is the session's status (``active`` or ``pending``), ``fva``
        the whole minutes since its first factor was verified (no second factor: -1), ``act`` its actor if
        any."""
        if issued_at is None:
            issued_at = int(time.time())
        verified_at = session.get(FACTOR_VERIFIED_AT, session["created_at"])
        claims: dict[str, Any] = {
            "azp": self.azp,
            "exp": issued_at + lifetime,
            "fva": [max(0, (now_ms() - verified_at) // 60_000), -1],
            "iat": issued_at,
            "iss": self.issuer,
            "jti": secrets.token_hex(10),
            "nbf": issued_at - 10,
            "sid": session["id"],
            "sts": session["status"],
            "sub": session["user_id"],
            "v": 2,
        }
        if session.get("actor"):
            claims["act"] = session["actor"]
        return self.sign(claims)

    # ---- /v1/jwks

    def jwks(self) -> Response:
        with self.lock:
            keys = [dict(key.jwk) for key in self.keys]
        return _json_response({"keys": keys})

    # ---- the sign-in and sign-out pages (development's Account Portal; see clerk_standin.pages)

    def sign_in(self) -> Response:
        """``GET /sign-in?redirect_url=``: the form. ``POST /sign-in``: email and password checked like Clerk
        checks them (an unknown email, then a wrong password, each re-shows the form with Clerk's message,
        422; then a banned user, 403 with Clerk's ``user_banned`` message); on success a new client holding a
        new session, the ``__client`` and ``__client_uat`` cookies, and a 303 to ``redirect_url``. Like the
        Account Portal, it never sets ``__session``: the app gets one through the handshake. A
        ``redirect_url`` off the allowed origin (``azp``) is refused with 400; none means ``azp`` + ``/``."""
        target = pages.allowed_redirect(request.values.get("redirect_url") or self.azp + "/", self.azp)
        if target is None:
            return pages.refused_redirect(self.azp)
        if request.method == "GET":
            return pages.sign_in_form(target)
        email = request.form.get("email", "").strip()
        password = request.form.get("password", "")
        with self.lock:
            user_id = next(
                (
                    user["id"]
                    for user in self.users.values()
                    if any(e["email_address"].lower() == email.lower() for e in user["email_addresses"])
                ),
                None,
            )
            digest = self.password_digests.get(user_id) if user_id is not None else None
        if user_id is None:
            return pages.sign_in_form(target, email, pages.ACCOUNT_NOT_FOUND, 422)
        if digest is None or not check_password_digest(password, digest):
            return pages.sign_in_form(target, email, pages.PASSWORD_INCORRECT, 422)
        client_token = handshake.new_client_token()
        client_id = new_id("client")
        try:
            session = self._start_session(user_id, client_id)
        except ClerkAPIError as error:  # banned, or deleted since the check
            if error.status == 403:
                return pages.sign_in_form(target, email, pages.USER_BANNED, 403)
            return pages.sign_in_form(target, email, pages.ACCOUNT_NOT_FOUND, 422)
        created = session["created_at"]
        with self.lock:
            self.clients[client_id] = {
                "id": client_id,
                "token_sha256": handshake.client_token_digest(client_token),
                "created_at": created,
                "updated_at": created,
            }
            user = self.users.get(user_id)
            if user is not None:
                user["last_sign_in_at"] = user["last_active_at"] = created
        self._save()
        response = redirect(target, 303)
        secure = request.is_secure
        handshake.set_client_cookie(response, client_token, SESSION_LIFETIME_MS // 1000, secure=secure)
        handshake.set_client_uat_cookie(response, created // 1000, secure=secure)
        return response

    def sign_out(self) -> Response:
        """``GET`` or ``POST /sign-out?redirect_url=``: ends every live session of the client named by the
        ``__client`` cookie (status ``ended``: no more tokens, and the next handshake answers signed out),
        sets ``__client_uat=0`` and answers 303 to ``redirect_url`` (checked as for ``/sign-in``). Signing
        out while signed out, or with a ``__client`` the stand-in never issued, just sets ``__client_uat=0``
        and redirects."""
        target = pages.allowed_redirect(request.values.get("redirect_url") or self.azp + "/", self.azp)
        if target is None:
            return pages.refused_redirect(self.azp)
        ended = False
        with self.lock:
            client = self._client_from_cookie()
            for session in self.sessions.values():
                mine = client is not None and session["client_id"] == client["id"]
                if mine and session["status"] in LIVE_STATUSES:
                    self._end_session(session, "ended")
                    ended = True
        if ended:
            self._save()
        response = redirect(target, 303)
        handshake.set_client_uat_cookie(response, 0, secure=request.is_secure)
        return response

    def _client_from_cookie(self) -> dict[str, Any] | None:
        """The client whose token is in this request's ``__client`` cookie, or None (no cookie, or a token the
        stand-in never issued). Caller holds the lock."""
        token = request.cookies.get(handshake.CLIENT_COOKIE, "")
        if not token:
            return None
        digest = handshake.client_token_digest(token)
        return next(
            (c for c in self.clients.values() if hmac.compare_digest(c["token_sha256"], digest)),
            None,
        )

    # ---- the Frontend API's handshake (see clerk_standin.handshake)

    def client_handshake(self) -> Response:
        """``GET /v1/client/handshake``: FAPI's handshake, no Bearer key. ``redirect_url`` is required and
        must be on the allowed origin (400 in Clerk's envelope otherwise); ``format`` is ``token`` (default)
        or ``nonce``; ``__clerk_hs_reason``, ``suffixed_cookies``, ``__clerk_api_version`` and ``__session``
        are accepted and not used. The ``__client`` cookie decides: a client with a live session gets a fresh
        60 s session token and its ``__client_uat``; anyone else gets ``__session`` wiped and
        ``__client_uat=0``. The answer is a 307 to ``redirect_url``, ``Cache-Control: no-store``, carrying a
        signed payload ``{"handshake": [directives]}`` (or a nonce for the Backend API) in a cookie
        (production style) or in the query (development style). Faults in force shape it
        (``handshake.HandshakeFaults``)."""
        raw_target = request.args.get("redirect_url")
        if not raw_target:
            raise ClerkAPIError(400, [param_missing("redirect_url")])
        target = pages.allowed_redirect(raw_target, self.azp)
        if target is None:
            message = f"redirect_url must be an address on {self.azp}."
            raise ClerkAPIError(400, [param_value_invalid("redirect_url", message)])
        payload_format = request.args.get("format") or "token"
        if payload_format not in handshake.FORMATS:
            raise ClerkAPIError(400, [param_value_invalid("format", "format must be token or nonce.")])
        secure = urlsplit(target).scheme == "https"
        with self.lock:
            production = self.handshake_style == "production"
            client = self._client_from_cookie()
            live = [
                s
                for s in self.sessions.values()
                if client is not None and s["client_id"] == client["id"] and s["status"] in TOKEN_STATUSES
            ]
            session = dict(max(live, key=lambda s: s["created_at"])) if live else None
            uat = client["updated_at"] // 1000 if client is not None else 0
        faults = self.handshake_faults
        if session is not None:
            issued_at = int(time.time())
            if faults.take("expired_token"):
                issued_at -= 2 * DEFAULT_TOKEN_LIFETIME
            token = self._session_token(session, DEFAULT_TOKEN_LIFETIME, issued_at)
            if faults.take("iat_before_uat"):
                uat = issued_at + 1
            directives = handshake.signed_in_directives(token, uat, secure=secure, clear_handshake=production)
        else:
            directives = handshake.signed_out_directives(secure=secure, clear_handshake=production)
        if faults.take("no_session"):
            directives = handshake.without_session(directives)
        if payload_format == "nonce":
            ttl = 0.0 if faults.take("stale_nonce") else handshake.NONCE_TTL
            name, value = handshake.HANDSHAKE_NONCE_COOKIE, self.nonces.put(directives, ttl)
        else:
            name, value = handshake.HANDSHAKE_COOKIE, self._sign_handshake(directives)
        if production:
            response = redirect(target, 307)
            handshake.set_transport_cookie(response, name, value, secure=secure)
        else:
            response = redirect(_with_query(target, name, value), 307)
        response.headers["Cache-Control"] = "no-store"
        return response

    def _sign_handshake(self, directives: list[str]) -> str:
        """The payload JWT ``{"handshake": directives}``: RS256 under the current ``kid``, ``typ: JWT``, the
        session ``cat`` (clerk/javascript ``integration/testUtils/handshake.ts``), no other claim. Under the
        ``bad_signature`` fault, signed by a key the JWKS does not hold."""
        claims = {"handshake": directives}
        if not self.handshake_faults.take("bad_signature"):
            return self.sign(claims)
        if self._foreign_key is None:
            self._foreign_key = generate_private_key()
        headers = {"kid": self.signing_key.kid, "typ": "JWT", "cat": SESSION_TOKEN_CATEGORY}
        return jwt.encode(claims, self._foreign_key, algorithm="RS256", headers=headers)

    def handshake_payload(self) -> Response:
        """``GET /v1/clients/handshake_payload?nonce=`` (Bearer secret key): 200 ``{"directives": [...]}`` for
        a nonce this stand-in handed out within the last minute, once. A missing nonce is 422
        ``form_param_missing``; an unknown, used or expired one 404 ``resource_not_found``."""
        nonce = request.args.get("nonce")
        if not nonce:
            raise ClerkAPIError(422, [param_missing("nonce")])
        directives = self.nonces.take(nonce)
        if directives is None:
            message = "No handshake payload was found for this nonce."
            raise ClerkAPIError(404, [clerk_error("resource_not_found", "not found", message)])
        return _json_response({"directives": directives})

    # ---- control API (no auth)

    def c_health(self) -> Response:
        return _json_response({"ok": True, "kid": self.signing_key.kid})

    def c_add_fault(self) -> Response:
        try:
            body = json.loads(request.get_data() or b"{}")
            result = self.faults.add(body)
        except ValueError as exc:
            return _control_error(str(exc), 400)
        return _json_response(result, 201)

    def c_list_faults(self) -> Response:
        return _json_response({"faults": self.faults.as_dicts()})

    def c_held(self, fault_id: int) -> Response:
        held = self.faults.held_count(fault_id)
        if held is None:
            return _control_error(f"no hold fault with id {fault_id}", 404)
        return _json_response({"id": fault_id, "held": held})

    def c_release(self, fault_id: int) -> Response:
        if not self.release(fault_id):
            return _control_error(f"no hold fault with id {fault_id}", 404)
        return _json_response({"released": fault_id})

    def c_clear_faults(self) -> Response:
        return _json_response({"cleared": self.faults.clear()})

    def c_del_fault(self, fault_id: int) -> Response:
        removed = self.faults.remove(fault_id)
        if not removed:
            return _control_error(f"no fault with id {fault_id}", 404)
        return _json_response({"cleared": removed})

    def c_reset(self) -> Response:
        self.reset()
        return _json_response({"reset": True, "kid": self.signing_key.kid})

    def c_stats(self) -> Response:
        return _json_response(self.stats())

    def c_rotate(self) -> Response:
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            return _control_error("body must be JSON", 400)
        keep_previous = body.get("keep_previous", False) if isinstance(body, dict) else None
        if not isinstance(keep_previous, bool):
            return _control_error("keep_previous must be a boolean", 400)
        new_key = self.rotate_key(keep_previous)
        with self.lock:
            kids = [key.kid for key in self.keys]
        return _json_response({"kid": new_key.kid, "jwks_kids": kids})

    def c_sign(self) -> Response:
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            return _control_error("body must be JSON", 400)
        if not isinstance(body, dict) or not isinstance(body.get("claims"), dict):
            return _control_error('body must be {"claims": {...}, "header"?: {...}}', 400)
        header = body.get("header")
        if header is not None and not isinstance(header, dict):
            return _control_error("header must be an object", 400)
        try:
            token = self.sign(body["claims"], header)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            return _control_error(f"cannot sign: {exc}", 400)
        return _json_response({"jwt": token, "kid": self.signing_key.kid})

    def c_public_pem(self) -> Response:
        return Response(self.signing_key.public_pem, 200, mimetype="application/x-pem-file")

    def c_session_status(self, session_id: str) -> Response:
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            return _control_error("body must be JSON", 400)
        status = body.get("status") if isinstance(body, dict) else None
        try:
            session = self.set_session_status(session_id, status if isinstance(status, str) else "")
        except KeyError:
            return _control_error(f"no session with id {session_id}", 404)
        except ValueError as exc:
            return _control_error(str(exc), 400)
        return _json_response(session)

    def c_first_factor(self, session_id: str) -> Response:
        body = _control_json()
        minutes = body.get("minutes_ago") if body is not None else None
        try:
            return _json_response(self.set_first_factor_age(session_id, minutes))
        except KeyError:
            return _control_error(f"no session with id {session_id}", 404)
        except ValueError:
            return _control_error('body must be {"minutes_ago": non-negative integer}', 400)

    def c_actor(self, session_id: str) -> Response:
        body = _control_json()
        if body is None or "actor" not in body:
            return _control_error('body must be {"actor": {"sub": ...} or null}', 400)
        try:
            return _json_response(self.set_session_actor(session_id, body["actor"]))
        except KeyError:
            return _control_error(f"no session with id {session_id}", 404)
        except ValueError as exc:
            return _control_error(str(exc), 400)

    def c_handshake(self) -> Response:
        with self.lock:
            style = self.handshake_style
        return _json_response({"style": style, "publishable_key": handshake.publishable_key(self.issuer)})

    def c_set_handshake(self) -> Response:
        body = _control_json()
        try:
            self.set_handshake_style(body.get("style") if body is not None else None)
        except ValueError as exc:
            return _control_error(str(exc), 400)
        return self.c_handshake()

    def c_handshake_faults(self) -> Response:
        return _json_response({"faults": self.handshake_faults.as_dicts()})

    def c_add_handshake_fault(self) -> Response:
        try:
            return _json_response(self.handshake_faults.add(_control_json()), 201)
        except ValueError as exc:
            return _control_error(str(exc), 400)

    def c_clear_handshake_faults(self) -> Response:
        return _json_response({"cleared": self.handshake_faults.clear()})

    def c_bulk_users(self) -> Response:
        body = _control_json()
        webhooks = body.get("webhooks", False) if body is not None else None
        if body is None or not isinstance(webhooks, bool):
            return _control_error('body must be {"users": [...], "webhooks"?: bool}', 400)
        try:
            ids = self.bulk_create_users(body.get("users"), webhooks=webhooks, origin=_request_origin())
        except ValueError as exc:
            return _control_error(str(exc), 400)
        return _json_response({"created": len(ids), "ids": ids}, 201)

    def c_webhooks(self) -> Response:
        return _json_response(self.webhooks.status())

    def c_set_webhooks(self) -> Response:
        body = _control_json()
        if body is None:
            return _control_error('body must be {"url": ..., "secret"?: "whsec_..."}', 400)
        try:
            return _json_response(self.webhooks.configure(body.get("url"), body.get("secret")))
        except ValueError as exc:
            return _control_error(str(exc), 400)

    def c_disable_webhooks(self) -> Response:
        self.webhooks.disable()
        return _json_response(self.webhooks.status())

    def c_add_webhook_fault(self) -> Response:
        try:
            return _json_response(self.webhooks.add_fault(_control_json()), 201)
        except ValueError as exc:
            return _control_error(str(exc), 400)

    def c_webhook_faults(self) -> Response:
        return _json_response({"faults": self.webhooks.faults()})

    def c_clear_webhook_faults(self) -> Response:
        return _json_response({"cleared": self.webhooks.clear_faults()})

    def c_release_webhooks(self, fault_id: int) -> Response:
        if not self.webhooks.release(fault_id):
            return _control_error(f"no webhook fault with id {fault_id}", 404)
        return _json_response({"released": fault_id})

    def c_webhook_deliveries(self) -> Response:
        return _json_response({"deliveries": self.webhooks.deliveries()})

    def c_wait_for_webhooks(self) -> Response:
        body = _control_json()
        timeout = body.get("timeout", 10) if body is not None else None
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= 600:
            return _control_error('body must be {"timeout"?: seconds (0..600)}', 400)
        idle = self.webhooks.wait_idle(timeout)
        return _json_response({"idle": idle, **self.webhooks.status()}, 200 if idle else 408)


# --------------------------------------------------------------------------- request helpers


def _bulk_entry(entry: Any, index: int) -> tuple[list[str], dict[str, Any]]:
    """One ``users`` entry of the bulk control call, checked: its emails and its other fields."""
    where = f"users[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(entry) - BULK_USER_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}")
    emails = entry.get("email_address")
    emails = [emails] if isinstance(emails, str) else emails
    if not isinstance(emails, list) or not emails or not all(isinstance(e, str) for e in emails):
        raise ValueError(f"{where}: email_address must be a string or a non-empty list of strings")
    emails = [email.strip() for email in emails]
    if not all(_valid_email(email) for email in emails) or len({e.lower() for e in emails}) < len(emails):
        raise ValueError(f"{where}: email_address must hold distinct valid email addresses")
    fields = {name: entry.get(name) for name in ("external_id", "first_name", "last_name", "username")}
    if any(value is not None and not isinstance(value, str) for value in fields.values()):
        raise ValueError(f"{where}: external_id, first_name, last_name and username must be strings or null")
    created_at = entry.get("created_at")
    if created_at is not None and (not is_int(created_at) or created_at < 0):
        raise ValueError(f"{where}: created_at must be a non-negative integer (ms)")
    fields["created_at"] = created_at
    return emails, fields


def _public_session(session: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``session`` as Clerk's Session object shows it: without the stand-in's internal fields."""
    return {name: copy.deepcopy(value) for name, value in session.items() if not name.startswith("_")}


def _with_query(url: str, name: str, value: str) -> str:
    """``url`` with ``name=value`` added to its query (development style handshake answers)."""
    parts = urlsplit(url)
    extra = urlencode({name: value})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


def _valid_email(email: str) -> bool:
    return len(email) <= 320 and EMAIL_RE.match(email) is not None


def email_format_invalid() -> dict[str, Any]:
    return clerk_error(
        "form_param_format_invalid",
        "is invalid",
        "email_address must be a valid email address.",
        "email_address",
    )


def _request_origin() -> tuple[str, str]:
    """The caller's IP and User-Agent, for a webhook's ``event_attributes.http_request``."""
    return request.remote_addr or "", request.headers.get("User-Agent", "")


def _is_control(path: str) -> bool:
    return path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/")


def _json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status, mimetype="application/json")


def _control_error(message: str, status: int) -> Response:
    return _json_response({"error": message}, status)


def _control_json() -> dict[str, Any] | None:
    """A control call's body as a JSON object (an empty body is ``{}``), or None when it is not one."""
    try:
        body = json.loads(request.get_data() or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _json_object_body() -> dict[str, Any]:
    """The request body as a JSON object; an empty body counts as ``{}``. Anything else that
    is not a JSON object raises 400 ``request_body_invalid``."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ClerkAPIError(
            400,
            [
                clerk_error(
                    "request_body_invalid",
                    "Request body invalid",
                    "The request body is invalid. Please consult the API documentation for more information.",
                )
            ],
        )
    return body


def _int_query(name: str, default: int, low: int, high: int | None) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ClerkAPIError(422, [param_value_invalid(name, f"{name} must be an integer {bound}.")])
    return value
