"""A local stand-in for Clerk's Backend API (BAPI), speaking Clerk's real wire format.

A separate WSGI application, beside ``iris`` and independent of it: it imports nothing from ``iris``, and
nothing in ``iris`` imports it (``tests/test_layout.py`` checks). It serves the subset of
``https://api.clerk.com/v1`` the accounts backend uses, in Clerk's wire format as its API reference and SDKs
define it:

- ``POST /v1/users``, ``GET /v1/users/{id}``, ``PATCH /v1/users/{id}``, ``DELETE /v1/users/{id}``,
  ``GET /v1/users`` (filters, offset or cursor paging, ordering; a bare JSON array),
  ``GET /v1/users/count``, ``POST /v1/users/{id}/verify_password`` and ``POST /v1/users/{id}/ban`` and
  ``/unban``;
- ``GET``, ``PATCH``, ``DELETE /v1/email_addresses/{id}`` and ``POST /v1/email_addresses``;
- ``POST /v1/sessions`` and ``POST /v1/sessions/{id}/tokens`` (RS256 session tokens with
  Clerk's v2 claims and header);
- ``GET /v1/jwks``;
- ``POST /v1/sessions/{id}/revoke`` and ``GET /v1/clients/handshake_payload?nonce=``;
- and, for a browser, ``/sign-in`` and ``/sign-out``: development's stand-in for Clerk's Account
  Portal, which (like the real one) sets the stand-in's ``__client`` cookie and ``__client_uat`` but never
  ``__session`` (``clerk_standin.pages``), and the Frontend API's ``GET /v1/client/handshake``, which gives
  the app its ``__session`` through signed ``Set-Cookie`` directives (``clerk_standin.handshake``).
  ``PUBLISHABLE_KEY`` names the stand-in's default issuer host as a Frontend API.

Guarantees:

- Every ``/v1`` request but the Frontend API's ``/v1/client/handshake`` needs
  ``Authorization: Bearer <secret key>``; failures, validation
  errors and unknown routes answer with Clerk's error envelope
  ``{"errors": [{"message", "long_message", "code", "meta"?}], "clerk_trace_id"}``.
- Every ``/v1`` response carries ``Clerk-Api-Version``, echoing the request's
  ``Clerk-API-Version`` header (default ``2021-02-05``).
- Passwords are validated and kept only as a salted digest, for
  ``POST /v1/users/{id}/verify_password`` and the sign-in page: never stored in clear, echoed or logged.
  Request bodies are never logged.
- Every change to a user moves its ``updated_at`` strictly forward, and, with a webhook endpoint set,
  sends ``user.created``, ``user.updated`` or ``user.deleted`` as Clerk does through Svix
  (``clerk_standin.webhooks``): signed, off the request, in the order of the changes, retried on Svix's
  schedule.
- State is in memory and guarded by locks; list ordering is stable for equal timestamps. With a state file
  (``--state-file``) users, password digests and sessions also survive a restart (``clerk_standin.state``).

A control API under ``/__standin`` (no auth) lets tests inject latency (a create delayed past the
caller's timeout is stored all the same), error statuses, hangs, dropped connections, garbage
bodies, "commit then fail" answers and requests held until a test releases them, read request and
connection counts, rotate the signing key, sign arbitrary tokens, mark sessions pending, age a session's
first factor, give it an actor, switch the handshake between production and development style, break the
next handshakes (bad signature, no session directive, stale nonce, looping tokens), seed thousands of
users at once, point webhooks somewhere and delay, repeat, drop, reorder or hold them. See
``docs/clerk-standin.md``.

The modules, one job each:

- ``wire``: ids, timestamps, Clerk's error envelope and error entries, the password policy;
- ``keys``: RSA signing keys, their ``kid`` and JWK, the key file;
- ``state``: the state file (users, password digests, sessions, clients), written atomically;
- ``pages``: the sign-in and sign-out pages' HTML, messages and redirect check;
- ``handshake``: the Frontend API's handshake: cookie names and attributes, directives, nonces, its faults;
- ``faults``: fault parsing, the faults in force, held requests, the faulty answers;
- ``webhooks``: the webhook sender (envelope, Svix signing, retries, delivery faults, the delivery log);
- ``app``: ``ClerkStandin``, the WSGI app (the ``/v1`` routes, the control API, the state);
- ``server``: werkzeug's threaded server with working HTTP/1.1 keep-alive (``serve()``,
  ``make_server()``, ``StandinServer`` for tests) and ``StandinControl``, the control-API client;
- ``__main__``: the CLI, ``python -m clerk_standin --host 127.0.0.1 --port 5001 [--secret-key ...]
  [--key-file path] [--state-file path] [--issuer URL] [--azp ORIGIN] [--handshake-style STYLE] [--quiet]
  [--webhook-url URL --webhook-secret whsec_...] [--webhook-timeout S] [--webhook-retry-scale F]``.

Users import from the package: ``from clerk_standin import StandinServer``.
"""

from clerk_standin.app import (
    CONTROL_PREFIX,
    DEFAULT_AZP,
    DEFAULT_ISSUER,
    DEFAULT_SECRET_KEY,
    DEFAULT_TOKEN_LIFETIME,
    ClerkStandin,
)
from clerk_standin.faults import Fault, parse_fault
from clerk_standin.handshake import publishable_key
from clerk_standin.keys import SigningKey, load_or_create_private_key
from clerk_standin.server import StandinControl, StandinServer, make_server, serve
from clerk_standin.state import StateFileError
from clerk_standin.webhooks import RETRY_SCHEDULE, WebhookSender, new_secret
from clerk_standin.wire import (
    BREACHED_PASSWORDS,
    DEFAULT_API_VERSION,
    MIN_PASSWORD_LENGTH,
    SESSION_TOKEN_CATEGORY,
    ClerkAPIError,
)

# pk_test_ + base64("standin.clerk.accounts.dev$"): the publishable key naming the default issuer's host.
PUBLISHABLE_KEY = publishable_key(DEFAULT_ISSUER)

__all__ = [
    "BREACHED_PASSWORDS",
    "CONTROL_PREFIX",
    "DEFAULT_API_VERSION",
    "DEFAULT_AZP",
    "DEFAULT_ISSUER",
    "DEFAULT_SECRET_KEY",
    "DEFAULT_TOKEN_LIFETIME",
    "MIN_PASSWORD_LENGTH",
    "PUBLISHABLE_KEY",
    "RETRY_SCHEDULE",
    "SESSION_TOKEN_CATEGORY",
    "ClerkAPIError",
    "ClerkStandin",
    "Fault",
    "SigningKey",
    "StandinControl",
    "StandinServer",
    "StateFileError",
    "WebhookSender",
    "load_or_create_private_key",
    "make_server",
    "new_secret",
    "parse_fault",
    "serve",
]
