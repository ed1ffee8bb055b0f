"""The load driver: clients that send one kind of request back to back, timed, and counted.

The interface is ``drive(target, clients, ramp, duration, observe) -> Result``. A ``Target`` says what to send
and which status counts as success; ``drive`` runs the clients for ``ramp + duration`` seconds, calls
``observe`` (if given) when the measuring window opens, and counts only what completed inside the window.
This driver runs each client as a Python thread in this process, with its own keep-alive ``requests.Session``.
A driver built on an external load generator can replace it by taking the same arguments and returning the
same ``Result``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

REQUEST_TIMEOUT = 30.0  # seconds, per benchmark request (gunicorn's worker timeout is 30 s)


class BenchmarkError(RuntimeError):
    """The benchmark could not set itself up or run."""


@dataclass(frozen=True)
class Target:
    """One kind of request, which every client repeats back to back."""

    method: str
    url: str
    expected: int  # the status that counts as a success
    body: Callable[[], Any] | None = None  # a JSON body, made anew for every request (e.g. a fresh email)
    headers: Sequence[Mapping[str, str]] = ()  # client number i sends headers[i % len(headers)]


@dataclass
class Result:
    """What one run of the driver counted."""

    ok: int  # answers with the expected status completed inside the measuring window
    throughput: float  # ok per second of the window
    p50_ms: float = 0.0  # latency of those answers
    p95_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # unexpected statuses/exceptions, whole run
    observed: dict[str, float] = field(default_factory=dict)  # what ``observe`` returned


# Called when the measuring window opens, with the time it closes (``time.perf_counter()``); returns once
# it has closed, with what it saw (CPU used, database connections in use).
Observe = Callable[[float], dict[str, float]]


def drive(
    target: Target, clients: int, ramp: float, duration: float, observe: Observe | None = None
) -> Result:
    """Run ``clients`` clients that repeat ``target`` back to back for ``ramp + duration`` seconds, and count
    the answers: the first ``ramp`` seconds are load only, the last ``duration`` seconds are measured."""
    records: list[tuple[float, float, int | str]] = []  # (end time, latency, status or exception name)
    lock = threading.Lock()
    start = time.perf_counter()
    window_start = start + ramp
    window_end = window_start + duration

    def send(session: requests.Session) -> requests.Response:
        body = target.body() if target.body is not None else None
        return session.request(target.method, target.url, json=body, timeout=REQUEST_TIMEOUT)

    def client(number: int) -> None:
        mine: list[tuple[float, float, int | str]] = []
        with requests.Session() as session:
            if target.headers:
                session.headers.update(target.headers[number % len(target.headers)])
            while (began := time.perf_counter()) < window_end:
                status: int | str
                try:
                    status = send(session).status_code
                except requests.RequestException as error:
                    status = type(error).__name__
                ended = time.perf_counter()
                mine.append((ended, ended - began, status))
        with lock:
            records.extend(mine)

    threads = [
        threading.Thread(target=client, args=(i,), daemon=True, name=f"client-{i}") for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, window_start - time.perf_counter()))
    observed = observe(window_end) if observe is not None else {}
    time.sleep(max(0.0, window_end - time.perf_counter()))
    join_by = time.monotonic() + REQUEST_TIMEOUT + 5
    for thread in threads:
        thread.join(max(0.0, join_by - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise BenchmarkError("load generator threads did not stop")
    return count(records, target.expected, window_start, window_end, observed)


def count(
    records: list[tuple[float, float, int | str]],
    expected: int,
    lo: float,
    hi: float,
    observed: dict[str, float],
) -> Result:
    """Throughput and latency of the expected answers that completed in ``[lo, hi)``; every other answer,
    in or out of the window, is an error."""
    in_window = sorted(
        latency for ended, latency, status in records if status == expected and lo <= ended < hi
    )
    result = Result(ok=len(in_window), throughput=len(in_window) / (hi - lo), observed=observed)
    if in_window:
        result.p50_ms = 1000 * in_window[len(in_window) // 2]
        result.p95_ms = 1000 * in_window[min(len(in_window) - 1, int(len(in_window) * 0.95))]
    result.errors = dict(Counter(str(status) for _, _, status in records if status != expected))
    return result
