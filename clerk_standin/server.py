"""Running the stand-in over HTTP: werkzeug's threaded server with working keep-alive, and a control client.

``serve()`` runs a ``ClerkStandin`` in the foreground (the CLI); ``StandinServer`` runs one on a background
thread for tests; ``StandinControl`` drives the control API of a running stand-in. werkzeug's own request
handler always answers ``Connection: close``; ``KeepAliveRequestHandler`` keeps HTTP/1.1 connections open,
so the stand-in's connection counts show whether a client reuses its connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
import weakref
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from werkzeug.exceptions import InternalServerError
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wsgi import LimitedStream

from clerk_standin.app import CONTROL_PREFIX, DEFAULT_AZP, DEFAULT_ISSUER, DEFAULT_SECRET_KEY, ClerkStandin
from clerk_standin.webhooks import DEFAULT_TIMEOUT

log = logging.getLogger("clerk_standin")

# Past this much unread request body, closing the connection is cheaper than reading it.
MAX_DRAIN_BYTES = 1_048_576


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
    if app.webhooks.endpoint is not None:
        log.info("Sending Clerk webhooks to %s", app.webhooks.endpoint[0])
    try:
        server.serve_forever()
    finally:
        app.stopping.set()
        app.webhooks.close()
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

    def _call(self, method: str, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        response = requests.request(
            method, self.base_url + CONTROL_PREFIX + path, json=payload, timeout=timeout or self.timeout
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

    def set_session_status(self, session_id: str, status: str) -> dict[str, Any]:
        """Mark a session ``pending`` (its tokens then carry ``sts: "pending"``) or ``active`` again."""
        return self._call("POST", f"/sessions/{session_id}/status", {"status": status})

    def set_first_factor_age(self, session_id: str, minutes: int) -> dict[str, Any]:
        """Say the session's first factor was verified ``minutes`` ago: its next tokens carry
        ``fva: [minutes, -1]``. Returns the session."""
        return self._call("POST", f"/sessions/{session_id}/first_factor", {"minutes_ago": minutes})

    def set_session_actor(self, session_id: str, actor: dict[str, Any] | None) -> dict[str, Any]:
        """Give the session an ``actor`` (``{"sub": "user_..."}``, Clerk's impersonation), or none: its next
        tokens carry it as ``act``. Returns the session."""
        return self._call("POST", f"/sessions/{session_id}/actor", {"actor": actor})

    def handshake_settings(self) -> dict[str, Any]:
        """``{"style": "production"|"development", "publishable_key": "pk_test_..."}``."""
        return self._call("GET", "/handshake")

    def set_handshake_style(self, style: str) -> dict[str, Any]:
        """Send handshake payloads in a cookie (``"production"``) or in the redirect's query
        (``"development"``)."""
        return self._call("PUT", "/handshake", {"style": style})

    def add_handshake_fault(self, kind: str, times: int | None = None) -> dict[str, Any]:
        """Break the next ``times`` handshakes (all, when None) one way: ``bad_signature``, ``no_session``,
        ``stale_nonce``, ``expired_token`` or ``iat_before_uat`` (``handshake.HandshakeFaults``). Adding a
        kind again replaces its count."""
        body: dict[str, Any] = {"kind": kind}
        if times is not None:
            body["times"] = times
        return self._call("POST", "/handshake/faults", body)

    def handshake_faults(self) -> list[dict[str, Any]]:
        return self._call("GET", "/handshake/faults")["faults"]

    def clear_handshake_faults(self) -> None:
        self._call("DELETE", "/handshake/faults")

    def bulk_create_users(
        self, users: list[dict[str, Any]], *, webhooks: bool = False, timeout: float = 120.0
    ) -> list[str]:
        """Create many password-less users at once (``POST /__standin/users/bulk``); returns their ids in
        order. Entries: ``email_address`` (string or list), ``external_id``, ``first_name``, ``last_name``,
        ``username``, ``created_at`` (ms). ``webhooks=True`` sends ``user.created`` for each."""
        body = {"users": users, "webhooks": webhooks}
        return self._call("POST", "/users/bulk", body, timeout=timeout)["ids"]

    def webhooks(self) -> dict[str, Any]:
        """The webhook endpoint (``enabled``, ``url``, ``secret``, ``instance_id``, ...) and the counts of
        ``queued``, ``in_flight`` and ``parked`` messages."""
        return self._call("GET", "/webhooks")

    def set_webhooks(self, url: str, secret: str | None = None) -> dict[str, Any]:
        """Send webhooks to ``url``, signed with ``secret`` (``whsec_...``; a new one when None: read it from
        the answer's ``secret``)."""
        payload: dict[str, Any] = {"url": url}
        if secret is not None:
            payload["secret"] = secret
        return self._call("PUT", "/webhooks", payload)

    def disable_webhooks(self) -> None:
        """Send no more webhooks; queued and parked ones are dropped."""
        self._call("DELETE", "/webhooks")

    def add_webhook_fault(self, **fault: Any) -> dict[str, Any]:
        """Add a delivery fault: ``action`` (delay, repeat, drop, reorder, hold), optional ``type`` and
        ``times``, ``seconds`` (delay), ``count`` (repeat, reorder). Returns it with its ``id``."""
        return self._call("POST", "/webhooks/faults", fault)

    def webhook_faults(self) -> list[dict[str, Any]]:
        return self._call("GET", "/webhooks/faults")["faults"]

    def clear_webhook_faults(self) -> None:
        """Remove every delivery fault; what they parked is delivered."""
        self._call("DELETE", "/webhooks/faults")

    def release_webhooks(self, fault_id: int) -> None:
        """Deliver what a ``hold`` (or a ``reorder`` still collecting) parked, and remove that fault."""
        self._call("POST", f"/webhooks/faults/{fault_id}/release")

    def webhook_deliveries(self) -> list[dict[str, Any]]:
        """Every delivery attempt so far: ``svix_id``, ``type``, ``user_id``, ``attempt``, ``copy``,
        ``status`` or ``error``, ``outcome``, ``at`` (ms)."""
        return self._call("GET", "/webhooks/deliveries")["deliveries"]

    def wait_for_webhooks(self, timeout: float = 10.0) -> dict[str, Any]:
        """Return once no webhook is queued (retries not yet due included) or in flight; parked ones do not
        count. Raises TimeoutError after ``timeout`` seconds."""
        response = requests.post(
            self.base_url + CONTROL_PREFIX + "/webhooks/wait", json={"timeout": timeout}, timeout=timeout + 10
        )
        if response.status_code == 408:
            raise TimeoutError(f"webhooks still queued or in flight after {timeout} s: {response.json()}")
        response.raise_for_status()
        return response.json()


class StandinServer:
    """Run a ``ClerkStandin`` on a background thread (for tests).

    ``start()`` binds (``port=0`` picks a free port) and returns the base URL (origin, no
    ``/v1``); ``stop()`` stops accepting, ends hangs/latency waits early, shuts open
    connections, stops sending webhooks (queued ones wait for a restart) and joins the thread. Also a
    context manager. ``app`` is the ``ClerkStandin``;
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
        state_file: str | os.PathLike[str] | None = None,
        log_requests: bool = False,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        webhook_timeout: float = DEFAULT_TIMEOUT,
        webhook_retry_scale: float = 1.0,
        handshake_style: str = "production",
    ):
        self.host = host
        self.port = port
        self.log_requests = log_requests
        self.app = ClerkStandin(
            secret_key,
            private_key=private_key,
            key_file=key_file,
            issuer=issuer,
            azp=azp,
            state_file=state_file,
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
            webhook_timeout=webhook_timeout,
            webhook_retry_scale=webhook_retry_scale,
            handshake_style=handshake_style,
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
        self.app.webhooks.resume()
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
        self.app.webhooks.close()
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
