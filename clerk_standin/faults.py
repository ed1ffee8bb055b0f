"""Fault injection: what a test can make the stand-in do instead of answering like Clerk.

``parse_fault`` turns a control-API body into a ``Fault``; ``FaultTable`` keeps the faults in force, picks
the ones a request meets and parks the requests ``hold`` faults keep waiting; ``apply_fault`` gives the
faulty answer (an error status, a hang, a dropped connection, a garbage body). The JSON a fault comes from is
described in ``docs/clerk-standin.md``.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any, NoReturn

from clerk_standin.wire import DEFAULT_API_VERSION, STATUS_CODES, clerk_error, error_body, is_int, is_number

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
GARBAGE_BODY = b"<html><body><h1>Bad gateway</h1>upstream answered nonsense</body></html>"


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
        if not is_int(times) or times < 1:
            raise ValueError("times must be a positive integer")
        fault.times = times
    latency = body.get("latency_ms", 0)
    if not is_number(latency) or latency < 0:
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
        if not is_int(status) or not 400 <= status <= 599:
            raise ValueError("status must be an integer between 400 and 599")
        fault.status = status
    retry_after = body.get("retry_after")
    if retry_after is not None:
        if not is_int(retry_after) or retry_after < 0:
            raise ValueError("retry_after must be a non-negative integer")
        fault.retry_after = retry_after
    for key in ("code", "message"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
        setattr(fault, key, value)
    seconds = body.get("seconds", 0)
    if not is_number(seconds) or seconds < 0:
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


class FaultTable:
    """The faults in force, and the requests their ``hold`` faults keep waiting.

    Thread-safe: all of it sits behind ``self.lock``. Fault ids count up from 1 for the table's whole life
    (``reset()`` does not restart them), so an id never names two faults.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.faults: list[Fault] = []
        self._ids = itertools.count(1)
        # Per ``hold`` fault ever added: its release event and how many requests it has held. Kept
        # after the fault is used up, so a request it holds can still be counted and let go.
        self.releases: dict[int, threading.Event] = {}
        self.held: Counter[int] = Counter()

    def add(self, body: Any) -> dict[str, Any]:
        """Validate ``body`` (``parse_fault``; ``ValueError`` when invalid) and put the fault in force
        after those already there. Returns the fault as JSON-ready data, with its ``id``."""
        with self.lock:
            fault = parse_fault(body, next(self._ids))
            self.faults.append(fault)
            if fault.action == "hold":
                self.releases[fault.id] = threading.Event()
            return asdict(fault)

    def as_dicts(self) -> list[dict[str, Any]]:
        """The faults in force, in the order they apply; ``times`` shows the uses left."""
        with self.lock:
            return [asdict(fault) for fault in self.faults]

    def clear(self) -> int:
        """Remove every fault in force; returns how many there were. Held requests stay held."""
        with self.lock:
            cleared = len(self.faults)
            self.faults.clear()
        return cleared

    def remove(self, fault_id: int) -> int:
        """Remove the fault ``fault_id``; returns 1, or 0 when no such fault is in force."""
        with self.lock:
            before = len(self.faults)
            self.faults = [fault for fault in self.faults if fault.id != fault_id]
            return before - len(self.faults)

    def held_count(self, fault_id: int) -> int | None:
        """How many requests the ``hold`` fault ``fault_id`` has parked so far; None when no such hold
        fault was ever added (since the last reset)."""
        with self.lock:
            if fault_id not in self.releases:
                return None
            return self.held[fault_id]

    def reset(self) -> None:
        """Remove every fault, let every held request go on, and forget the hold counts."""
        with self.lock:
            self.faults.clear()
            for release in self.releases.values():
                release.set()
            self.releases.clear()
            self.held.clear()

    def take(self, method: str, path: str) -> tuple[float, Fault | None]:
        """The faults a ``method`` ``path`` request meets: the summed latency and the fault whose action
        replaces the answer, if any. Latency-only faults all apply (their latencies add up); of the faults
        with an action, the first matching one applies. Each applied fault uses up one of its ``times``."""
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

    def hold(self, fault: Fault, stopping: threading.Event) -> None:
        """Wait until ``fault`` is released (or its ``seconds`` pass, or ``stopping`` is set)."""
        with self.lock:
            release = self.releases[fault.id]
            self.held[fault.id] += 1
        deadline = time.monotonic() + fault.seconds if fault.seconds else None
        while not release.is_set() and not stopping.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return
            release.wait(0.05)

    def release(self, fault_id: int) -> bool:
        """Let every request held by ``fault_id`` (and any it would hold later) go on. False when no
        such hold fault was ever added."""
        with self.lock:
            release = self.releases.get(fault_id)
            for fault in self.faults:
                if fault.id == fault_id:
                    fault.action = None  # nothing more to hold; a latency still applies
            if release is None:
                return False
            release.set()
            return True


def apply_fault(
    fault: Fault, environ: dict[str, Any], start_response: Any, stopping: threading.Event
) -> Iterable[bytes]:
    """Answer the request in ``environ`` as ``fault`` says, as a WSGI app would (never ``hold``, which
    only delays the real answer). A ``hang`` waits ``fault.seconds`` (less if ``stopping`` is set) and
    then drops the connection."""
    version = environ.get("HTTP_CLERK_API_VERSION") or DEFAULT_API_VERSION
    if fault.action == "hang":
        stopping.wait(fault.seconds)
        drop_connection(environ)
    if fault.action == "drop":
        drop_connection(environ)
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


def drop_connection(environ: dict[str, Any]) -> NoReturn:
    """Close the client connection without a response. Under werkzeug (``serve()``,
    ``StandinServer``) the raised ``ConnectionAbortedError`` is treated as a dropped
    connection; other servers may turn it into a 500."""
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    raise ConnectionAbortedError("clerk stand-in fault: connection dropped")


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
