"""Webhooks as Clerk sends them through Svix: signed, retried on Svix's schedule, delivered off the request.

``WebhookSender`` takes events from the app (``emit``, called while the change is made, so each message holds
the state of that moment and messages are numbered in the order the changes happened) and delivers them on
one background thread. Guarantees:

- ``emit`` never does network I/O and never waits on a delivery: the Backend API answer does not wait on the
  webhook. Nothing is queued while no endpoint is set.
- Each message has one ``svix-id`` (``msg_…``) for all its attempts and repeats; each attempt is signed anew
  with the endpoint's secret at that moment (``standardwebhooks``): ``svix-timestamp`` is the attempt's Unix
  seconds, ``svix-signature`` is ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``.
- Messages go out one at a time, in the order they were emitted, unless a fault says otherwise; a message
  whose attempt is due later (a retry, a ``delay``) does not hold back the others.
- Success is any 2xx within ``timeout`` seconds, redirects not followed. Anything else is retried after
  ``RETRY_SCHEDULE`` (Svix's: 0 s, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h) times ``retry_scale``, then given
  up. Every attempt is logged (``deliveries``).
- ``reset`` and ``disable`` drop what is queued or parked; an attempt in flight then finishes but is neither
  logged nor retried.

Faults (``parse_webhook_fault``) change what happens to the next matching messages: ``delay``, ``repeat``,
``drop``, ``reorder`` and ``hold``; see ``docs/clerk-standin.md``.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import itertools
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests
from standardwebhooks.webhooks import Webhook

from clerk_standin.wire import is_int, is_number, new_id, now_ms

# Seconds before each attempt, as Svix documents its retry schedule: 8 attempts in all.
RETRY_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
DEFAULT_TIMEOUT = 15.0
SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every Svix signing secret, not a secret
USER_AGENT = "Svix-Webhooks/1.0 (Clerk stand-in)"
WEBHOOK_FAULT_ACTIONS = ("delay", "repeat", "drop", "reorder", "hold")
WEBHOOK_FAULT_KEYS = frozenset({"action", "type", "times", "seconds", "count"})


def new_secret() -> str:
    """A fresh signing secret as Svix gives one: ``whsec_`` and 24 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def check_secret(secret: Any) -> str:
    """``secret`` if it is ``whsec_`` followed by non-empty base64, else ValueError."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValueError("secret must be a string starting with whsec_")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError("secret must be whsec_ followed by base64")
    return secret


def check_url(url: Any) -> str:
    """``url`` if it is an absolute http(s) URL, else ValueError."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError("url must be an absolute http:// or https:// URL")
    return url


@dataclass
class Message:
    """One webhook message: its ``svix-id``, event type, the user it is about and the raw JSON body."""

    svix_id: str
    type: str
    user_id: str
    body: str


@dataclass
class Job:
    """One attempt to make: ``attempt`` counts from 1; ``copy`` is 0 for the message, 1.. for repeats."""

    message: Message
    attempt: int = 1
    copy: int = 0


@dataclass
class WebhookFault:
    """A delivery fault, applied to the next ``times`` messages (all, when None) of event ``type`` (any, when
    None) as they are emitted. ``seconds`` is the ``delay``; ``count`` is the number of extra copies for
    ``repeat`` and the batch size for ``reorder``. ``parked`` holds the messages a ``hold`` keeps or a
    ``reorder`` is collecting."""

    id: int
    action: str
    type: str | None = None
    times: int | None = None
    seconds: float = 0.0
    count: int = 1
    parked: list[Job] = field(default_factory=list)

    def matches(self, event_type: str) -> bool:
        return (self.times is None or self.times > 0) and self.type in (None, event_type)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "type": self.type,
            "times": self.times,
            "seconds": self.seconds,
            "count": self.count,
            "parked": len(self.parked),
        }


def parse_webhook_fault(body: Any, fault_id: int) -> WebhookFault:
    """Validate a control-API webhook fault; ValueError with a readable reason."""
    if not isinstance(body, dict):
        raise ValueError("fault must be a JSON object")
    unknown = sorted(set(body) - WEBHOOK_FAULT_KEYS)
    if unknown:
        raise ValueError(f"unknown webhook fault keys: {', '.join(unknown)}")
    action = body.get("action")
    if action not in WEBHOOK_FAULT_ACTIONS:
        raise ValueError(f"action must be one of {', '.join(WEBHOOK_FAULT_ACTIONS)}")
    fault = WebhookFault(id=fault_id, action=action)
    event_type = body.get("type")
    if event_type is not None and (not isinstance(event_type, str) or not event_type):
        raise ValueError("type must be an event type such as user.updated")
    fault.type = event_type
    times = body.get("times")
    if times is not None and (not is_int(times) or times < 1):
        raise ValueError("times must be a positive integer")
    fault.times = times
    if action == "delay":
        seconds = body.get("seconds")
        if not is_number(seconds) or seconds < 0:
            raise ValueError("delay needs seconds, a non-negative number")
        fault.seconds = float(seconds)
    if action in ("repeat", "reorder"):
        low = 1 if action == "repeat" else 2
        count = body.get("count", low)
        if not is_int(count) or count < low:
            raise ValueError(f"count must be an integer of at least {low}")
        fault.count = count
    return fault


class WebhookSender:
    """Queues, signs and delivers webhook messages to one endpoint (module docstring).

    ``url``/``secret`` given here are the endpoint set at construction, which ``reset`` brings back; without a
    ``url`` nothing is sent until ``configure``. ``retry_scale`` multiplies every wait of ``RETRY_SCHEDULE``
    (tests use 0.01). ``instance_id`` goes into every envelope. Thread-safe.
    """

    def __init__(
        self,
        url: str | None = None,
        secret: str | None = None,
        *,
        instance_id: str,
        timeout: float = DEFAULT_TIMEOUT,
        retry_scale: float = 1.0,
    ):
        if timeout <= 0 or retry_scale < 0:
            raise ValueError("webhook timeout must be positive and retry scale non-negative")
        self.instance_id = instance_id
        self.timeout = timeout
        self.retry_scale = retry_scale
        self.initial = (check_url(url), check_secret(secret or new_secret())) if url else None
        self.endpoint: tuple[str, str] | None = self.initial
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Job]] = []
        self._order = itertools.count()
        self._fault_ids = itertools.count(1)
        self._faults: list[WebhookFault] = []
        self._log: list[dict[str, Any]] = []
        self._in_flight = 0
        self._generation = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    # ---- configuration

    def configure(self, url: str, secret: str | None = None) -> dict[str, Any]:
        """Send to ``url`` from now on, signed with ``secret`` (a new one when None). Returns ``status()``."""
        endpoint = (check_url(url), check_secret(secret) if secret is not None else new_secret())
        with self._cond:
            self.endpoint = endpoint
            self._cond.notify_all()
        return self.status()

    def disable(self) -> None:
        """Send nothing any more; what is queued or parked is dropped."""
        with self._cond:
            self.endpoint = None
            self._drop_pending()

    def reset(self) -> None:
        """Back to the endpoint given at construction; faults, the queue, parked messages and the log go."""
        with self._cond:
            self.endpoint = self.initial
            self._faults.clear()
            self._log.clear()
            self._drop_pending()

    def _drop_pending(self) -> None:
        self._queue.clear()
        for fault in self._faults:
            fault.parked.clear()
        self._generation += 1
        self._cond.notify_all()

    def status(self) -> dict[str, Any]:
        """The endpoint (``url``, ``secret``; None when off) and how many messages are queued (including
        retries not yet due), in flight or parked by a fault."""
        with self._cond:
            url, secret = self.endpoint if self.endpoint is not None else (None, None)
            return {
                "enabled": self.endpoint is not None,
                "url": url,
                "secret": secret,
                "instance_id": self.instance_id,
                "timeout": self.timeout,
                "retry_scale": self.retry_scale,
                "queued": len(self._queue),
                "in_flight": self._in_flight,
                "parked": sum(len(fault.parked) for fault in self._faults),
            }

    def close(self) -> None:
        """Stop the delivery thread (the stand-in stops). An attempt in flight finishes on its own (the
        thread is a daemon; this waits at most a second for it); what is queued stays queued until
        ``resume`` or the next ``emit``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1)

    def resume(self) -> None:
        """Start delivering again after ``close`` (the stand-in starts again)."""
        with self._cond:
            if self._queue:
                self._ensure_thread()

    # ---- emitting

    def emit(
        self, event_type: str, data: dict[str, Any], user_id: str, client_ip: str, user_agent: str
    ) -> str | None:
        """Queue event ``event_type`` with ``data`` (serialised now: the state at this moment). Call it while
        the change is made, under the lock that orders changes. Returns the ``svix-id``, or None when no
        endpoint is set."""
        with self._cond:
            if self.endpoint is None:
                return None
            envelope = {
                "data": data,
                "object": "event",
                "type": event_type,
                "timestamp": now_ms(),
                "instance_id": self.instance_id,
                "event_attributes": {"http_request": {"client_ip": client_ip, "user_agent": user_agent}},
            }
            message = Message(new_id("msg"), event_type, user_id, json.dumps(envelope))
            fault = next((f for f in self._faults if f.matches(event_type)), None)
            if fault is None:
                self._push(Job(message))
            else:
                self._apply(fault, message)
            self._ensure_thread()
            return message.svix_id

    def _apply(self, fault: WebhookFault, message: Message) -> None:
        """Put ``message`` through ``fault`` (which has a use left). Caller holds the condition."""
        if fault.times is not None:
            fault.times -= 1
        if fault.action == "drop":
            self._record(Job(message, attempt=0), None, "dropped by a fault", "dropped")
        elif fault.action == "delay":
            self._push(Job(message), delay=fault.seconds)
        elif fault.action == "repeat":
            for copy in range(fault.count + 1):
                self._push(Job(message, copy=copy))
        elif fault.action == "hold":
            fault.parked.append(Job(message))
        else:  # reorder
            fault.parked.append(Job(message))
            if len(fault.parked) >= fault.count or fault.times == 0:
                self._flush(fault, reverse=True)

    def _flush(self, fault: WebhookFault, *, reverse: bool) -> None:
        jobs, fault.parked = fault.parked, []
        for job in reversed(jobs) if reverse else jobs:
            self._push(job)

    def _push(self, job: Job, delay: float = 0.0) -> None:
        heapq.heappush(self._queue, (time.monotonic() + delay, next(self._order), job))
        self._cond.notify_all()

    def _ensure_thread(self) -> None:
        self._closed = False  # a thread that has not noticed a close yet simply carries on
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="clerk-standin-webhooks", daemon=True)
            self._thread.start()

    # ---- faults

    def add_fault(self, body: Any) -> dict[str, Any]:
        """Add a delivery fault (``parse_webhook_fault``); returns it with its ``id``."""
        with self._cond:
            fault = parse_webhook_fault(body, next(self._fault_ids))
            self._faults.append(fault)
            return fault.as_dict()

    def faults(self) -> list[dict[str, Any]]:
        with self._cond:
            return [fault.as_dict() for fault in self._faults]

    def release(self, fault_id: int) -> bool:
        """Deliver what fault ``fault_id`` parked (a ``hold`` in order, a ``reorder`` batch reversed) and
        remove the fault. False when there is no such fault."""
        with self._cond:
            fault = next((f for f in self._faults if f.id == fault_id), None)
            if fault is None:
                return False
            self._faults.remove(fault)
            self._flush(fault, reverse=fault.action == "reorder")
            return True

    def clear_faults(self) -> int:
        """Remove every fault, delivering what they parked (as ``release`` does); returns how many."""
        with self._cond:
            count = len(self._faults)
            for fault in list(self._faults):
                self._faults.remove(fault)
                self._flush(fault, reverse=fault.action == "reorder")
            return count

    # ---- observing

    def deliveries(self) -> list[dict[str, Any]]:
        """Every attempt so far, oldest first (see ``_record``)."""
        with self._cond:
            return [dict(entry) for entry in self._log]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued (retries not yet due included) or in flight; parked messages do
        not count. True when idle, False when ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def _record(self, job: Job, status: int | None, error: str | None, outcome: str) -> None:
        self._log.append(
            {
                "svix_id": job.message.svix_id,
                "type": job.message.type,
                "user_id": job.message.user_id,
                "attempt": job.attempt,
                "copy": job.copy,
                "status": status,
                "error": error,
                "outcome": outcome,
                "at": now_ms(),
            }
        )

    # ---- the delivery thread

    def _run(self) -> None:
        with requests.Session() as session:
            while True:
                with self._cond:
                    job = self._next_due()
                    if job is None:
                        return
                    generation, endpoint = self._generation, self.endpoint
                    self._in_flight += 1
                status, error = self._attempt(session, job, endpoint)
                with self._cond:
                    self._in_flight -= 1
                    if generation == self._generation:
                        self._settle(job, status, error)
                    self._cond.notify_all()

    def _next_due(self) -> Job | None:
        """The next job whose time has come, waiting for it; None once closed. Caller holds the condition."""
        while not self._closed:
            if self._queue and self.endpoint is not None:
                wait = self._queue[0][0] - time.monotonic()
                if wait <= 0:
                    return heapq.heappop(self._queue)[2]
                self._cond.wait(wait)
            else:
                self._cond.wait()
        return None

    def _attempt(
        self, session: requests.Session, job: Job, endpoint: tuple[str, str] | None
    ) -> tuple[int | None, str | None]:
        """POST ``job`` once, signed now; the status, or None and the connection error."""
        if endpoint is None:
            return None, "webhooks turned off"
        url, secret = endpoint
        message = job.message
        sent_at = int(time.time())
        signature = Webhook(secret).sign(message.svix_id, datetime.fromtimestamp(sent_at, UTC), message.body)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "svix-id": message.svix_id,
            "svix-timestamp": str(sent_at),
            "svix-signature": signature,
        }
        try:
            response = session.post(
                url, data=message.body.encode(), headers=headers, timeout=self.timeout, allow_redirects=False
            )
            response.close()
        except requests.RequestException as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return response.status_code, None

    def _settle(self, job: Job, status: int | None, error: str | None) -> None:
        """Log the attempt and schedule the retry it needs. Caller holds the condition."""
        if status is not None and 200 <= status < 300:
            self._record(job, status, None, "delivered")
        elif job.attempt < len(RETRY_SCHEDULE):
            self._record(job, status, error, "retrying")
            retry = Job(job.message, job.attempt + 1, job.copy)
            self._push(retry, delay=RETRY_SCHEDULE[job.attempt] * self.retry_scale)
        else:
            self._record(job, status, error, "gave_up")
