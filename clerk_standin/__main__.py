"""The stand-in's command line: ``python -m clerk_standin --host 127.0.0.1 --port 5001 [--secret-key ...]
[--key-file path] [--state-file path] [--issuer URL] [--azp ORIGIN] [--handshake-style production|development]
[--quiet] [--webhook-url URL
--webhook-secret whsec_... [--webhook-timeout S] [--webhook-retry-scale F]]``. Serves in the foreground
until interrupted. A state file it cannot use stops it at once with one line saying so (exit status 2)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from clerk_standin.app import DEFAULT_AZP, DEFAULT_ISSUER, DEFAULT_SECRET_KEY, ClerkStandin
from clerk_standin.handshake import STYLES
from clerk_standin.server import serve
from clerk_standin.state import StateFileError
from clerk_standin.webhooks import DEFAULT_TIMEOUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clerk_standin", description="Local Clerk Backend API stand-in."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    parser.add_argument("--key-file", default=None, help="PEM RSA private key; created when missing")
    parser.add_argument(
        "--state-file", default=None, help="keep users and sessions in this JSON file across restarts"
    )
    parser.add_argument("--issuer", default=DEFAULT_ISSUER, help="iss claim of session tokens")
    parser.add_argument(
        "--azp",
        default=DEFAULT_AZP,
        help="azp claim of session tokens; the only origin /sign-in and /sign-out send people back to",
    )
    parser.add_argument(
        "--handshake-style",
        choices=STYLES,
        default="production",
        help="send the handshake payload in a cookie (production) or in the redirect's query (development)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    parser.add_argument("--webhook-url", default=None, help="send Clerk's user.* webhooks (Svix-signed) here")
    parser.add_argument("--webhook-secret", default=None, help="whsec_... signing secret for --webhook-url")
    parser.add_argument(
        "--webhook-timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for a 2xx (default 15)"
    )
    parser.add_argument(
        "--webhook-retry-scale", type=float, default=1.0, help="multiplies Svix's retry waits (default 1)"
    )
    args = parser.parse_args(argv)
    if args.webhook_url and not args.webhook_secret:
        parser.error("--webhook-url needs --webhook-secret (whsec_...), the secret the app verifies with")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        app = ClerkStandin(
            args.secret_key,
            key_file=args.key_file,
            issuer=args.issuer,
            azp=args.azp,
            state_file=args.state_file,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
            webhook_timeout=args.webhook_timeout,
            webhook_retry_scale=args.webhook_retry_scale,
            handshake_style=args.handshake_style,
        )
    except (StateFileError, ValueError) as error:
        print(f"clerk stand-in cannot start: {error}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        serve(app, args.host, args.port, log_requests=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
