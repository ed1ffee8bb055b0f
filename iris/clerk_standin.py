"""A local stand-in for Clerk's Backend API (BAPI), speaking Clerk's real wire format.

This module is a separate WSGI application (it imports nothing else from ``iris``) that serves
the subset of ``https://api.clerk.com/v1`` the accounts backend uses, as written down in
``clerk-wire.md``:

- ``POST /v1/users``, ``GET /v1/users/{id}``, ``DELETE /v1/users/{id}``, ``GET /v1/users``
  (filters, paging, ordering; a bare JSON array), ``GET /v1/users/count`` and
  ``POST /v1/users/{id}/verify_password``;
- ``POST /v1/sessions`` and ``POST /v1/sessions/{id}/tokens`` (RS256 session tokens with
  Clerk's v2 claims and header);
- ``GET /v1/jwks``.

Guarantees:

- Every ``/v1`` request needs ``Authorization: Bearer <secret key>``; failures, validation
  errors and unknown routes answer with Clerk's error envelope
  ``{"errors": [{"message", "long_message", "code", "meta"?}], "clerk_trace_id"}``.
- Every ``/v1`` response carries ``Clerk-Api-Version``, echoing the request's
  ``Clerk-API-Version`` header (default ``2021-02-05``).
- Passwords are validated and kept only as a salted digest in memory, for
  ``POST /v1/users/{id}/verify_password``: never stored in clear, echoed or logged.
  Request bodies are never logged.
- State is in memory and guarded by one lock; list ordering is stable for equal timestamps.

A control API under ``/__standin`` (no auth) lets tests inject latency (a create delayed past the
caller's timeout is stored all the same), error statuses, hangs, dropped connections, garbage
bodies, "commit then fail" answers and requests held until a test releases them, read request and
connection counts, rotate the signing key and sign arbitrary tokens. See ``docs/clerk-standin.md``.

``serve()``/``StandinServer`` run it on werkzeug's threaded server with working HTTP/1.1
keep-alive (werkzeug's own handler always answers ``Connection: close``).

CLI: ``python -m iris.clerk_standin --host 127.0.0.1 --port 5001 [--secret-key ...]
[--key-file path] [--issuer URL] [--azp ORIGIN] [--quiet]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wsgi import LimitedStream

log = logging.getLogger("iris.clerk_standin")

DEFAULT_SECRET_KEY = "sk_test_iris_local_standin"  # noqa: S105 - public, local-only default
DEFAULT_API_VERSION = "2021-02-05"
DEFAULT_ISSUER = "https://standin.clerk.accounts.dev"
DEFAULT_AZP = "http://127.0.0.1:5000"
DEFAULT_TOKEN_LIFETIME = 60
SESSION_TOKEN_CATEGORY = "cl_B7d4PD111AAA"  # noqa: S105 - Clerk's public category tag
CONTROL_PREFIX = "/__standin"

MIN_PASSWORD_LENGTH = 8
TOKEN_LIFETIME_RANGE = (30, 315_360_000)
LIST_LIMIT_RANGE = (1, 500)
SESSION_LIFETIME_MS = 7 * 24 * 3600 * 1000
SESSION_ABANDON_MS = 30 * 24 * 3600 * 1000
MAX_DRAIN_BYTES = 1_048_576

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
CREATE_SESSION_PARAMS = frozenset({"user_id", "active_organization_id"})
CREATE_TOKEN_PARAMS = frozenset({"expires_in_seconds"})
ORDER_FIELDS = ("created_at", "updated_at", "email_address", "first_name", "last_name", "username")
FAULT_ACTIONS = ("status", "hang", "drop", "garbage", "hold")
FAULT_KEYS = frozenset(
    {
        "method",
        "path",
        "times",
        "latency_ms",
        "action",
        "status",
        "retry_after",
        "code",
        "message",
        "seconds",
        "after_commit",
    }
)
STATUS_CODES = {
    429: ("too_many_requests", "Too many requests", "Too many requests, retry later"),
    500: ("internal_clerk_error", "Oops, an unexpected error occurred", "Internal error"),
    502: ("bad_gateway", "Bad gateway", "The upstream service answered with an error"),
    503: ("service_unavailable", "Service unavailable", "The service is temporarily unavailable"),
    504: ("gateway_timeout", "Gateway timeout", "The upstream service did not answer in time"),
}
GARBAGE_BODY = b"<html><body><h1>Bad gateway</h1>upstream answered nonsense</body></html>"

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------- ids, keys


def new_id(prefix: str) -> str:
    """Return a Clerk-looking id: ``prefix`` + ``_`` + 27 random base62 characters."""
    return prefix + "_" + "".join(secrets.choice(BASE62) for _ in range(27))


def now_ms() -> int:
    """Current Unix time in milliseconds (Clerk's timestamp unit)."""
    return int(time.time() * 1000)


def _base62(number: int, width: int) -> str:
    chars = []
    while number and len(chars) < width:
        number, rest = divmod(number, 62)
        chars.append(BASE62[rest])
    return "".join(chars).ljust(width, "0")


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """An RSA signing key with its stable ``kid`` (``ins_`` + 27 base62 chars of a SHA-256 of
    the public key), its public PEM and its JWK."""

    private_key: rsa.RSAPrivateKey
    kid: str
    public_pem: str
    jwk: dict[str, str]

    @classmethod
    def from_private_key(cls, private_key: rsa.RSAPrivateKey) -> SigningKey:
        public_key = private_key.public_key()
        der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        digest = int.from_bytes(hashlib.sha256(der).digest(), "big")
        kid = "ins_" + _base62(digest, 27)
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        numbers = public_key.public_numbers()
        jwk = {
            "use": "sig",
            "kty": "RSA",
            "kid": kid,
            "alg": "RS256",
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }
        return cls(private_key=private_key, kid=kid, public_pem=pem, jwk=jwk)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_private_key(generate_private_key())


def generate_private_key() -> rsa.RSAPrivateKey:
    """A fresh 2048-bit RSA key (public exponent 65537, i.e. ``e = "AQAB"``)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def load_or_create_private_key(path: str | os.PathLike[str]) -> rsa.RSAPrivateKey:
    """Load an unencrypted PEM RSA private key from ``path``; create it (mode 0600, parent
    folders included) when missing, so tokens stay valid across restarts."""
    key_path = Path(path)
    if not key_path.exists():
        key = generate_private_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: load theirs below
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
            return key
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ValueError(f"{key_path} does not hold an RSA private key")
    return loaded


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


def identifier_exists(name: str, label: str) -> dict[str, Any]:
    message = f"That {label} is taken. Please try another."
    return clerk_error("form_identifier_exists", message, message, name)


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    """One injected fault; see ``docs/clerk-standin.md`` for the JSON it comes from.

    A fault matches a non-control request when ``method`` (if set) equals the request method
    and the request path starts with ``path``. ``times`` (if set) is how many more requests it
    applies to. ``latency_ms`` delays the request; ``action`` then replaces the answer
    (``status``, ``hang``, ``drop``, ``garbage``), after running the real handler first when
    ``after_commit`` is true. ``hold`` keeps the request waiting until the fault is released through
    the control API (or ``seconds`` pass, when set), then handles it normally.
    """

    id: int
    method: str | None = None
    path: str = "/"
    times: int | None = None
    latency_ms: int = 0
    action: str | None = None
    status: int | None = None
    retry_after: int | None = None
    code: str | None = None
    message: str | None = None
    seconds: float = 0.0
    after_commit: bool = False

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        return path.startswith(self.path)


def parse_fault(body: Any, fault_id: int) -> Fault:
    """Validate a control-API fault body; raises ``ValueError`` with a readable reason."""
    if not isinstance(body, dict):
        raise ValueError("fault must be a JSON object")
    unknown = sorted(set(body) - FAULT_KEYS)
    if unknown:
        raise ValueError(f"unknown fault keys: {', '.join(unknown)}")
    fault = Fault(id=fault_id)
    method = body.get("method")
    if method is not None:
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a non-empty string")
        fault.method = method.upper()
    path = body.get("path")
    if path is not None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError("path must be a string starting with /")
        fault.path = path
    times = body.get("times")
    if times is not None:
        if not _is_int(times) or times < 1:
            raise ValueError("times must be a positive integer")
        fault.times = times
    latency = body.get("latency_ms", 0)
    if not _is_number(latency) or latency < 0:
        raise ValueError("latency_ms must be a non-negative number")
    fault.latency_ms = latency
    action = body.get("action")
    if action is None and body.get("status") is not None:
        action = "status"
    if action is not None and action not in FAULT_ACTIONS:
        raise ValueError(f"action must be one of {', '.join(FAULT_ACTIONS)}")
    fault.action = action
    if action == "status" or (action == "garbage" and body.get("status") is not None):
        status = body.get("status")
        if not _is_int(status) or not 400 <= status <= 599:
            raise ValueError("status must be an integer between 400 and 599")
        fault.status = status
    retry_after = body.get("retry_after")
    if retry_after is not None:
        if not _is_int(retry_after) or retry_after < 0:
            raise ValueError("retry_after must be a non-negative integer")
        fault.retry_after = retry_after
    for key in ("code", "message"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
        setattr(fault, key, value)
    seconds = body.get("seconds", 0)
    if not _is_number(seconds) or seconds < 0:
        raise ValueError("seconds must be a non-negative number")
    if action == "hang" and seconds <= 0:
        raise ValueError("action hang needs seconds > 0")
    fault.seconds = float(seconds)
    after_commit = body.get("after_commit", False)
    if not isinstance(after_commit, bool):
        raise ValueError("after_commit must be a boolean")
    if after_commit and action is None:
        raise ValueError("after_commit needs an action")
    fault.after_commit = after_commit
    if action == "hold" and after_commit:
        raise ValueError("hold runs the real handler after the release; after_commit does not apply")
    if action is None and fault.latency_ms == 0:
        raise ValueError("a fault needs latency_ms or an action")
    return fault


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- the app


class ClerkStandin:
    """The stand-in as a WSGI application (``ClerkStandin(...)`` is callable as WSGI).

    Args:
        secret_key: the only accepted ``Authorization: Bearer`` value on ``/v1``.
        private_key: RSA signing key; ``key_file`` loads/creates one; otherwise generated.
        issuer: ``iss`` claim of minted session tokens.
        azp: ``azp`` claim of minted session tokens.

    Thread-safe: all state sits behind ``self.lock``. ``reset()`` returns it to the state it
    had when constructed (no users, sessions, faults or counts; original signing key).
    """

    def __init__(
        self,
        secret_key: str = DEFAULT_SECRET_KEY,
        *,
        private_key: rsa.RSAPrivateKey | None = None,
        key_file: str | os.PathLike[str] | None = None,
        issuer: str = DEFAULT_ISSUER,
        azp: str = DEFAULT_AZP,
    ):
        if not secret_key:
            raise ValueError("secret_key must not be empty")
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
        self.faults: list[Fault] = []
        self.request_counts: Counter[str] = Counter()
        self.connections_accepted = 0
        self.api_connections = 0
        self.api_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._seq = itertools.count()
        self._fault_ids = itertools.count(1)
        # Per ``hold`` fault ever added: its release event and how many requests it has held. Kept
        # after the fault is used up, so a request it holds can still be counted and let go.
        self.releases: dict[int, threading.Event] = {}
        self.held: Counter[int] = Counter()
        self.flask_app = self._build_flask_app()

    # ---- state helpers

    @property
    def signing_key(self) -> SigningKey:
        """The key that signs new tokens (first in the JWKS)."""
        with self.lock:
            return self.keys[0]

    def reset(self) -> None:
        """Drop users, sessions, faults and counts; restore the original signing key."""
        with self.lock:
            self.users.clear()
            self.user_seq.clear()
            self.password_digests.clear()
            self.sessions.clear()
            self.faults.clear()
            for release in self.releases.values():
                release.set()
            self.releases.clear()
            self.held.clear()
            self.request_counts.clear()
            self.connections_accepted = 0
            self.api_connections = 0
            self.api_sockets = weakref.WeakSet()
            self.keys = [self.initial_key]

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

    # ---- WSGI entry point: control API, stats and faults around the Flask app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            return self.flask_app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET").upper()
        self._count_request(environ, method)
        latency_ms, fault = self._take_faults(method, path)
        if latency_ms:
            self.stopping.wait(latency_ms / 1000)
        if fault is None:
            return self.flask_app(environ, start_response)
        if fault.action == "hold":
            self._hold(fault)
            return self.flask_app(environ, start_response)
        if fault.after_commit:
            Response.from_app(self.flask_app, environ, buffered=True).close()
        return self._apply_fault(fault, environ, start_response)

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

    def _take_faults(self, method: str, path: str) -> tuple[float, Fault | None]:
        """Latency-only faults all apply (their latencies add up); of the faults with an
        action, the first matching one applies. Each applied fault uses up one of its
        ``times``."""
        latency = 0.0
        chosen: Fault | None = None
        with self.lock:
            for fault in list(self.faults):
                if not fault.matches(method, path):
                    continue
                if fault.action is not None and chosen is not None:
                    continue
                latency += fault.latency_ms
                if fault.action is not None:
                    chosen = fault
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
        return latency, chosen

    def _hold(self, fault: Fault) -> None:
        """Wait until ``fault`` is released (or its ``seconds`` pass, or the server stops)."""
        with self.lock:
            release = self.releases[fault.id]
            self.held[fault.id] += 1
        deadline = time.monotonic() + fault.seconds if fault.seconds else None
        while not release.is_set() and not self.stopping.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return
            release.wait(0.05)

    def release(self, fault_id: int) -> bool:
        """Let every request held by ``fault_id`` (and any it would hold later) go on."""
        with self.lock:
            release = self.releases.get(fault_id)
            for fault in self.faults:
                if fault.id == fault_id:
                    fault.action = None  # nothing more to hold; a latency still applies
            if release is None:
                return False
            release.set()
            return True

    def _apply_fault(self, fault: Fault, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        version = environ.get("HTTP_CLERK_API_VERSION") or DEFAULT_API_VERSION
        if fault.action == "hang":
            self.stopping.wait(fault.seconds)
            return self._drop(environ)
        if fault.action == "drop":
            return self._drop(environ)
        if fault.action == "garbage":
            headers = [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(GARBAGE_BODY))),
                ("Clerk-Api-Version", version),
            ]
            # With a status it is a gateway in front of Clerk failing, not Clerk's own error envelope.
            status = fault.status or 200
            start_response(f"{status} {_reason_phrase(status)}", headers)
            return [GARBAGE_BODY]
        status = fault.status or 500
        code, message, long_message = STATUS_CODES.get(
            status, ("standin_fault", "Injected fault", "The stand-in was told to fail")
        )
        if fault.code is not None:
            code = fault.code
        if fault.message is not None:
            message = long_message = fault.message
        body = error_body([clerk_error(code, message, long_message)])
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Clerk-Api-Version", version),
        ]
        retry_after = fault.retry_after
        if retry_after is None and status == 429:
            retry_after = 1
        if retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        start_response(f"{status} {_reason_phrase(status)}", headers)
        return [body]

    def _drop(self, environ: dict[str, Any]) -> Iterable[bytes]:
        """Close the client connection without a response. Under werkzeug (``serve()``,
        ``StandinServer``) the raised ``ConnectionAbortedError`` is treated as a dropped
        connection; other servers may turn it into a 500."""
        sock = environ.get("werkzeug.socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        raise ConnectionAbortedError("clerk stand-in fault: connection dropped")

    # ---- Flask app

    def _build_flask_app(self) -> Flask:
        app = Flask("iris.clerk_standin")
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
            (
                "/v1/users/<user_id>/verify_password",
                "verify_password",
                self.verify_password,
                ["POST"],
            ),
            ("/v1/sessions", "create_session", self.create_session, ["POST"]),
            ("/v1/sessions/<session_id>/tokens", "create_token", self.create_token, ["POST"]),
            ("/v1/jwks", "jwks", self.jwks, ["GET"]),
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
        ]
        for rule, endpoint, view, methods in routes:
            app.add_url_rule(rule, endpoint, view, methods=methods)
        return app

    def _authenticate(self) -> None:
        if _is_control(request.path):
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
        if not _is_control(request.path):
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
        for email in emails:
            if len(email) > 320 or not EMAIL_RE.match(email):
                errors.append(
                    clerk_error(
                        "form_param_format_invalid",
                        "is invalid",
                        "email_address must be a valid email address.",
                        "email_address",
                    )
                )
                break
        password = body.get("password")
        if password is not None and not skip_checks:
            password_error = check_password(password)
            if password_error is not None:
                errors.append(password_error)
        password_given = password is not None  # only a salted digest is kept, for verify_password
        if errors:
            raise ClerkAPIError(422, errors)

        created = now_ms()
        user_id = new_id("user")
        email_objects = [
            {
                "id": new_id("idn"),
                "object": "email_address",
                "email_address": email,
                "reserved": False,
                "verification": {
                    "object": "verification_admin",
                    "status": "verified",
                    "strategy": "admin",
                    "attempts": None,
                    "expire_at": None,
                },
                "linked_to": [],
                "matches_sso_connection": False,
                "created_at": created,
                "updated_at": created,
            }
            for email in emails
        ]
        user = {
            "id": user_id,
            "object": "user",
            "external_id": body.get("external_id"),
            "primary_email_address_id": email_objects[0]["id"],
            "primary_phone_number_id": None,
            "primary_web3_wallet_id": None,
            "username": body.get("username"),
            "first_name": body.get("first_name"),
            "last_name": body.get("last_name"),
            "image_url": "https://img.clerk.com/standin-default-avatar",
            "has_image": False,
            "public_metadata": body.get("public_metadata") or {},
            "private_metadata": body.get("private_metadata") or {},
            "unsafe_metadata": body.get("unsafe_metadata") or {},
            "email_addresses": email_objects,
            "phone_numbers": [],
            "web3_wallets": [],
            "passkeys": [],
            "password_enabled": password_given,
            "password_last_updated_at": created if password_given else None,
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
        with self.lock:
            self._check_unique(user)
            self.users[user_id] = user
            self.user_seq[user_id] = next(self._seq)
            if isinstance(password, str):
                self.password_digests[user_id] = password_digest(password)
            result = copy.deepcopy(user)
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
        """Raise 422 ``form_identifier_exists`` for a taken email (case-insensitive, also
        within the request), username (case-insensitive) or external_id (exact). Caller holds
        the lock."""
        taken_emails: set[str] = set()
        taken_usernames: set[str] = set()
        taken_external: set[str] = set()
        for other in self.users.values():
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
        with self.lock:
            user = self.users.pop(user_id, None)
            self.user_seq.pop(user_id, None)
            self.password_digests.pop(user_id, None)
            if user is not None:
                for session_id in [s["id"] for s in self.sessions.values() if s["user_id"] == user_id]:
                    del self.sessions[session_id]
        if user is None:
            raise not_found("user", user_id)
        deleted: dict[str, Any] = {"object": "user", "id": user_id, "deleted": True}
        if user["external_id"] is not None:
            deleted["external_id"] = user["external_id"]
        return _json_response(deleted)

    def list_users(self) -> Response:
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
        with self.lock:
            matched = self._filtered_users()
            matched.sort(key=lambda user: self._sort_key(user, field), reverse=descending)
            page = copy.deepcopy(matched[offset : offset + limit])
        return _json_response(page)

    def count_users(self) -> Response:
        with self.lock:
            total = len(self._filtered_users())
        return _json_response({"object": "total_count", "total_count": total})

    def _filtered_users(self) -> list[dict[str, Any]]:
        """Users matching the query filters: values of one filter are OR-ed, filters are
        AND-ed. A filter key that is present but matches nothing yields no users. Caller
        holds the lock."""
        args = request.args
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
        created = now_ms()
        session = {
            "object": "session",
            "id": new_id("sess"),
            "user_id": user_id,
            "client_id": new_id("client"),
            "actor": None,
            "status": "active",
            "last_active_organization_id": None,
            "last_active_at": created,
            "expire_at": created + SESSION_LIFETIME_MS,
            "abandon_at": created + SESSION_ABANDON_MS,
            "updated_at": created,
            "created_at": created,
        }
        with self.lock:
            if user_id not in self.users:
                raise not_found("user", user_id)
            self.sessions[session["id"]] = session
            result = dict(session)
        return _json_response(result)

    def create_token(self, session_id: str) -> Response:
        body = _json_object_body()
        unknown = sorted(set(body) - CREATE_TOKEN_PARAMS)
        if unknown:
            raise ClerkAPIError(422, [param_unknown(name) for name in unknown])
        lifetime = body.get("expires_in_seconds")
        if lifetime is None:
            lifetime = DEFAULT_TOKEN_LIFETIME
        low, high = TOKEN_LIFETIME_RANGE
        if not _is_int(lifetime) or not low <= lifetime <= high:
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
        if session is None:
            raise not_found("session", session_id)
        issued_at = int(time.time())
        claims = {
            "azp": self.azp,
            "exp": issued_at + lifetime,
            "fva": [0, -1],
            "iat": issued_at,
            "iss": self.issuer,
            "jti": secrets.token_hex(10),
            "nbf": issued_at - 10,
            "sid": session["id"],
            "sts": "active",
            "sub": session["user_id"],
            "v": 2,
        }
        return _json_response({"object": "token", "jwt": self.sign(claims)})

    # ---- /v1/jwks

    def jwks(self) -> Response:
        with self.lock:
            keys = [dict(key.jwk) for key in self.keys]
        return _json_response({"keys": keys})

    # ---- control API (no auth)

    def c_health(self) -> Response:
        return _json_response({"ok": True, "kid": self.signing_key.kid})

    def c_add_fault(self) -> Response:
        try:
            body = json.loads(request.get_data() or b"{}")
            with self.lock:
                fault = parse_fault(body, next(self._fault_ids))
                self.faults.append(fault)
                if fault.action == "hold":
                    self.releases[fault.id] = threading.Event()
                result = asdict(fault)
        except ValueError as exc:
            return _control_error(str(exc), 400)
        return _json_response(result, 201)

    def c_list_faults(self) -> Response:
        with self.lock:
            faults = [asdict(fault) for fault in self.faults]
        return _json_response({"faults": faults})

    def c_held(self, fault_id: int) -> Response:
        with self.lock:
            known = fault_id in self.releases
            held = self.held[fault_id]
        if not known:
            return _control_error(f"no hold fault with id {fault_id}", 404)
        return _json_response({"id": fault_id, "held": held})

    def c_release(self, fault_id: int) -> Response:
        if not self.release(fault_id):
            return _control_error(f"no hold fault with id {fault_id}", 404)
        return _json_response({"released": fault_id})

    def c_clear_faults(self) -> Response:
        with self.lock:
            cleared = len(self.faults)
            self.faults.clear()
        return _json_response({"cleared": cleared})

    def c_del_fault(self, fault_id: int) -> Response:
        with self.lock:
            before = len(self.faults)
            self.faults = [fault for fault in self.faults if fault.id != fault_id]
            removed = before - len(self.faults)
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


# --------------------------------------------------------------------------- request helpers


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


def _is_control(path: str) -> bool:
    return path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/")


def _json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status, mimetype="application/json")


def _control_error(message: str, status: int) -> Response:
    return _json_response({"error": message}, status)


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


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# --------------------------------------------------------------------------- server


class KeepAliveRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler with working HTTP/1.1 keep-alive.

    werkzeug 3's ``run_wsgi`` always answers ``Connection: close`` and, after each response,
    reads whatever arrives within 10 ms (which would swallow the next request on a reused
    connection). This handler instead bounds ``wsgi.input`` to ``Content-Length``, drains
    exactly what the application left unread, and keeps HTTP/1.1 connections open unless the
    client asks to close, the body is chunked, or something failed. Responses without a
    length use chunked encoding. HTTP/1.0 requests are answered and closed.
    """

    protocol_version = "HTTP/1.1"
    server: StandinWSGIServer

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if getattr(self.server, "log_requests", True):
            super().log_request(code, size)

    def run_wsgi(self) -> None:
        if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.environ = environ = self.make_environ()
        if self.request_version != "HTTP/1.1":
            self.close_connection = True
        body = self._bounded_body(environ)
        status_set: str | None = None
        headers_set: list[tuple[str, str]] | None = None
        headers_sent = False
        chunked = False

        def write(data: bytes) -> None:
            nonlocal headers_sent, chunked
            assert status_set is not None and headers_set is not None, "write() before start"
            if not headers_sent:
                code_str, _, phrase = status_set.partition(" ")
                code = int(code_str)
                self.send_response(code, phrase)
                keys = set()
                for key, value in headers_set:
                    self.send_header(key, value)
                    keys.add(key.lower())
                no_body = environ["REQUEST_METHOD"] == "HEAD" or 100 <= code < 200 or code in (204, 304)
                if "content-length" not in keys and not no_body:
                    if self.close_connection:
                        pass  # the body ends when the connection closes
                    else:
                        chunked = True
                        self.send_header("Transfer-Encoding", "chunked")
                if self.close_connection and "connection" not in keys:
                    self.send_header("Connection", "close")
                self.end_headers()
                headers_sent = True
            if data:
                if chunked:
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                else:
                    self.wfile.write(data)
            self.wfile.flush()

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal status_set, headers_set
            if exc_info:
                try:
                    if headers_sent:
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif headers_set:
                raise AssertionError("Headers already set")
            status_set = status
            headers_set = list(headers)
            return write

        def execute(app: Any) -> None:
            app_iter = app(environ, start_response)
            try:
                for data in app_iter:
                    write(data)
                if not headers_sent:
                    write(b"")
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
            finally:
                if hasattr(app_iter, "close"):
                    app_iter.close()

        try:
            execute(self.server.app)
        except (ConnectionError, TimeoutError) as exc:
            self.close_connection = True
            self.connection_dropped(exc, environ)
            return
        except Exception:
            self.close_connection = True
            if self.server.passthrough_errors:
                raise
            if not headers_sent:
                status_set = None
                headers_set = None
                with contextlib.suppress(ConnectionError, TimeoutError):
                    execute(InternalServerError())
            self.server.log("error", f"Error on request:\n{traceback.format_exc()}")
            return
        self._drain(body)

    def _bounded_body(self, environ: dict[str, Any]) -> LimitedStream | None:
        if environ.get("wsgi.input_terminated"):  # chunked request body
            self.close_connection = True
            return None
        raw = environ.get("CONTENT_LENGTH", "")
        try:
            length = int(raw) if raw else 0
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return None
        stream = LimitedStream(self.rfile, length)
        environ["wsgi.input"] = stream
        return stream

    def _drain(self, body: LimitedStream | None) -> None:
        if self.close_connection or body is None:
            return
        drained = 0
        try:
            while not body.is_exhausted:
                chunk = body.read(65536)
                if not chunk:
                    break
                drained += len(chunk)
                if drained > MAX_DRAIN_BYTES:
                    self.close_connection = True
                    return
        except Exception:
            self.close_connection = True


class StandinWSGIServer(ThreadedWSGIServer):
    """werkzeug's threaded server with keep-alive (``KeepAliveRequestHandler``), a count of
    accepted TCP connections (reported to ``ClerkStandin.note_connection_accepted``), and
    ``close_connections()`` so a stop does not wait for idle keep-alive clients."""

    block_on_close = False  # never join handler threads (idle keep-alive threads would block)

    def __init__(self, host: str, port: int, app: Any, *, log_requests: bool = True):
        self.log_requests = log_requests
        self._open: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._open_lock = threading.Lock()
        super().__init__(host, port, app, handler=KeepAliveRequestHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        # Headers and body go out in two sends; without this, Nagle holds the body until the client's
        # delayed ACK and every answer costs ~40 ms, which real Clerk does not.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        note = getattr(self.app, "note_connection_accepted", None)
        if note is not None:
            note()
        with self._open_lock:
            self._open.add(conn)
        return conn, address

    def close_connections(self) -> None:
        """Shut down every connection still open (unblocks handler threads)."""
        with self._open_lock:
            connections = list(self._open)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def make_server(
    app: ClerkStandin, host: str = "127.0.0.1", port: int = 0, *, log_requests: bool = True
) -> StandinWSGIServer:
    """Bind a keep-alive threaded server for ``app`` (``port=0`` picks a free port; read
    ``server.server_port``). Call ``serve_forever()`` to run it."""
    return StandinWSGIServer(host, port, app, log_requests=log_requests)


def serve(app: ClerkStandin, host: str = "127.0.0.1", port: int = 5001, *, log_requests: bool = True) -> None:
    """Serve ``app`` in the foreground until interrupted, logging one line per request
    (method, path and query, status; never bodies) unless ``log_requests`` is false."""
    server = make_server(app, host, port, log_requests=log_requests)
    base = _origin(host, server.server_port)
    log.info("Clerk stand-in on %s (API %s/v1, kid %s)", base, base, app.signing_key.kid)
    try:
        server.serve_forever()
    finally:
        app.stopping.set()
        server.close_connections()


def _origin(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class StandinControl:
    """Thin ``requests`` client for the control API of a running stand-in at ``base_url``
    (the origin, without ``/v1``)."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        response = requests.request(
            method, self.base_url + CONTROL_PREFIX + path, json=payload, timeout=self.timeout
        )
        response.raise_for_status()
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return response.json()
        return response.text

    def add_fault(self, **fault: Any) -> dict[str, Any]:
        """Add a fault (keys as in ``docs/clerk-standin.md``); returns it with its ``id``."""
        return self._call("POST", "/faults", fault)

    def faults(self) -> list[dict[str, Any]]:
        return self._call("GET", "/faults")["faults"]

    def release(self, fault_id: int) -> None:
        """Let the requests a ``hold`` fault keeps waiting go on."""
        self._call("POST", f"/faults/{fault_id}/release")

    def wait_until_held(self, fault_id: int, count: int = 1, timeout: float = 10.0) -> None:
        """Return once the ``hold`` fault has parked ``count`` requests; raise TimeoutError if not."""
        deadline = time.monotonic() + timeout
        while True:
            if self._call("GET", f"/faults/{fault_id}/held")["held"] >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"fault {fault_id} held fewer than {count} requests in {timeout} s")
            time.sleep(0.02)

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")

    def reset(self) -> None:
        self._call("POST", "/reset")

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def rotate_key(self, keep_previous: bool = False) -> dict[str, Any]:
        return self._call("POST", "/keys/rotate", {"keep_previous": keep_previous})

    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {"claims": claims}
        if header is not None:
            payload["header"] = header
        return self._call("POST", "/sign", payload)["jwt"]

    def public_key_pem(self) -> str:
        return self._call("GET", "/public-key.pem")


class StandinServer:
    """Run a ``ClerkStandin`` on a background thread (for tests).

    ``start()`` binds (``port=0`` picks a free port) and returns the base URL (origin, no
    ``/v1``); ``stop()`` stops accepting, ends hangs/latency waits early, shuts open
    connections and joins the thread. Also a context manager. ``app`` is the ``ClerkStandin``;
    ``control`` is a ``StandinControl`` for it; ``api_url`` is ``base_url + "/v1"``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret_key: str = DEFAULT_SECRET_KEY,
        private_key: rsa.RSAPrivateKey | None = None,
        key_file: str | os.PathLike[str] | None = None,
        issuer: str = DEFAULT_ISSUER,
        azp: str = DEFAULT_AZP,
        log_requests: bool = False,
    ):
        self.host = host
        self.port = port
        self.log_requests = log_requests
        self.app = ClerkStandin(
            secret_key, private_key=private_key, key_file=key_file, issuer=issuer, azp=azp
        )
        self._server: StandinWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def secret_key(self) -> str:
        return self.app.secret_key

    @property
    def base_url(self) -> str:
        return _origin(self.host, self.port)

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def control(self) -> StandinControl:
        return StandinControl(self.base_url)

    def start(self) -> str:
        if self._server is not None:
            return self.base_url
        self.app.stopping.clear()
        self._server = make_server(self.app, self.host, self.port, log_requests=self.log_requests)
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"clerk-standin-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self.app.stopping.set()
        server.shutdown()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> StandinServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iris.clerk_standin", description="Local Clerk Backend API stand-in."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    parser.add_argument("--key-file", default=None, help="PEM RSA private key; created when missing")
    parser.add_argument("--issuer", default=DEFAULT_ISSUER, help="iss claim of session tokens")
    parser.add_argument("--azp", default=DEFAULT_AZP, help="azp claim of session tokens")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    app = ClerkStandin(args.secret_key, key_file=args.key_file, issuer=args.issuer, azp=args.azp)
    with contextlib.suppress(KeyboardInterrupt):
        serve(app, args.host, args.port, log_requests=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
