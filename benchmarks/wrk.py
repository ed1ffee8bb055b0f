"""The load driver: wrk (a C load generator), one kind of request back to back on kept-alive connections.

The interface is ``drive(target, clients, ramp, duration, observe) -> Result``. A ``Target`` says what to
send and which status counts as success. ``drive`` runs wrk twice: a warm-up run of ``ramp`` seconds (load
only, not counted), then the measured run of ``duration`` seconds, during which ``observe(window_end)`` runs
in this process (it samples CPU from /proc while wrk loads the server). wrk runs with ``-c clients``
connections, ``-t min(clients, 2)`` threads (this machine has 2 cores), ``--timeout 30s`` and ``--latency``;
wrk takes whole seconds, so ``ramp`` and ``duration`` are rounded up (a ramp of 0 skips the warm-up run).

A Lua script, written to a temporary file for each run, makes the requests and counts the answers. A body
template gets a unique part in every request (a per-run nonce, the wrk thread's number and a counter), so
every registration has its own email. Header sets (e.g. ``Authorization: Bearer <token>``) are taken in turn
by each thread, thread ``i`` starting at set ``i``: wrk's Lua has no per-connection hook, so a token belongs
to a request, not to a connection. ``response()`` counts statuses per thread, and ``done()`` prints one JSON
line: requests, statuses, socket errors (connect/read/write/timeout), p50/p95 latency of all answers in ms,
and the measured duration. That becomes the ``Result``: ``ok`` is the count of the expected status,
``errors`` every other status and every socket error (those of the warm-up run too, marked as such).
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REQUEST_TIMEOUT = 30.0  # seconds, per benchmark request (gunicorn's worker timeout is 30 s)
CORES = 2  # wrk threads at most: one per core of this machine
MARKER = "IRIS_WRK_RESULT "
# Placeholder in a Target's body for the part that must differ in every request.
UNIQUE = "{unique}"


class BenchmarkError(RuntimeError):
    """The benchmark could not set itself up or run."""


@dataclass(frozen=True)
class Target:
    """One kind of request, which every connection repeats back to back."""

    method: str
    url: str
    expected: int  # the status that counts as a success
    # A JSON body sent with every request; each ``UNIQUE`` in it is replaced by a part no other request of
    # the run has (a per-run nonce, the wrk thread's number and a counter), e.g. for a fresh email.
    body: str | None = None
    headers: Sequence[Mapping[str, str]] = ()  # header sets, taken in turn by the requests of each thread


@dataclass
class Result:
    """What one run of the driver counted."""

    ok: int  # answers with the expected status completed inside the measuring window
    throughput: float  # ok per second of the window
    p50_ms: float = 0.0  # latency of all answers in the window (wrk's histogram)
    p95_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # unexpected statuses / socket errors, measured run
    observed: dict[str, float] = field(default_factory=dict)  # what ``observe`` returned
    requests: int = 0  # every answer wrk counted in the window, whatever its status


# Called when the measuring window opens, with the time it closes (``time.perf_counter()``); returns once
# it has closed, with what it saw (CPU used, database connections in use).
Observe = Callable[[float], dict[str, float]]


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise BenchmarkError("wrk is not installed (apt-get install -y wrk)")
    return found


def lua_string(text: str) -> str:
    """A Lua string literal for ``text`` (printable ASCII only: tokens, JSON, header names)."""
    if not all(32 <= ord(char) < 127 for char in text):
        raise BenchmarkError(f"not printable ASCII, cannot pass it to wrk's Lua: {text[:40]!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lua_script(target: Target, nonce: str) -> str:
    """The wrk script for ``target`` (see the module docstring)."""
    path = urlsplit(target.url)
    request_path = path.path + (f"?{path.query}" if path.query else "")
    parts = (target.body or "").split(UNIQUE)
    body_parts = (
        "{" + ", ".join(lua_string(part) for part in parts) + "}" if target.body is not None else "nil"
    )
    header_sets = [dict(headers) for headers in target.headers] or [{}]
    if target.body is not None:
        for headers in header_sets:
            headers.setdefault("Content-Type", "application/json")
    sets = ", ".join(
        "{" + ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()) + "}"
        for headers in header_sets
    )
    return f"""-- written by benchmarks/wrk.py for one run
local method = {lua_string(target.method)}
local path = {lua_string(request_path)}
local body_parts = {body_parts}
local header_sets = {{{sets}}}
local nonce = {lua_string(nonce)}
local threads = {{}}

function setup(thread)
    thread:set("id", #threads)
    table.insert(threads, thread)
end

function init(args)
    counter = 0
    statuses = {{}}
    prefix = nonce .. "-" .. id .. "-"
end

function request()
    counter = counter + 1
    local headers = header_sets[((id + counter) % #header_sets) + 1]
    local body = nil
    if body_parts then
        body = table.concat(body_parts, prefix .. counter)
    end
    return wrk.format(method, path, headers, body)
end

function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
    local merged = {{}}
    for _, thread in ipairs(threads) do
        local counts = thread:get("statuses")
        for status, n in pairs(counts) do
            merged[status] = (merged[status] or 0) + n
        end
    end
    local items = {{}}
    for status, n in pairs(merged) do
        table.insert(items, string.format('"%d": %d', status, n))
    end
    local e = summary.errors
    io.write(string.format(
        '{MARKER}{{"requests": %d, "statuses": {{%s}}, "connect": %d, "read": %d, "write": %d, "timeout": %d,'
            .. ' "p50_ms": %.3f, "p95_ms": %.3f, "duration_s": %.6f}}\\n',
        summary.requests, table.concat(items, ", "), e.connect, e.read, e.write, e.timeout,
        latency:percentile(50) / 1000, latency:percentile(95) / 1000, summary.duration / 1e6))
end
"""


def wrk_command(script: Path, target: Target, clients: int, seconds: int) -> list[str]:
    return [
        wrk_binary(),
        "-c",
        str(clients),
        "-t",
        str(min(clients, CORES)),
        "-d",
        f"{seconds}s",
        "--timeout",
        f"{REQUEST_TIMEOUT:.0f}s",
        "--latency",
        "-s",
        str(script),
        target.url,
    ]


def parse(output: str, expected: int) -> tuple[int, int, float, float, float, dict[str, int]]:
    """(ok, requests, seconds, p50, p95, errors) from wrk's output with our script's JSON line."""
    lines = [line for line in output.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise BenchmarkError(f"wrk printed no result line:\n{output[-2000:]}")
    data = json.loads(lines[-1][len(MARKER) :])
    statuses = {int(status): n for status, n in data["statuses"].items()}
    errors = {str(status): n for status, n in statuses.items() if status != expected and n}
    errors.update({kind: data[kind] for kind in ("connect", "read", "write", "timeout") if data[kind]})
    ok = statuses.get(expected, 0)
    return ok, int(data["requests"]), float(data["duration_s"]), data["p50_ms"], data["p95_ms"], errors


def run_wrk(
    target: Target, clients: int, seconds: int, observe: Observe | None = None
) -> tuple[Result, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="iris_wrk_") as scratch:
        script = Path(scratch) / "run.lua"
        script.write_text(lua_script(target, secrets.token_hex(6)))
        process = subprocess.Popen(
            wrk_command(script, target, clients, seconds),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            window_end = time.perf_counter() + seconds
            observed = observe(window_end) if observe is not None else {}
            output, _ = process.communicate(timeout=seconds + REQUEST_TIMEOUT + 10)
        except BaseException:
            process.kill()
            process.wait()
            raise
    if process.returncode != 0:
        raise BenchmarkError(f"wrk exited with {process.returncode}:\n{output[-2000:]}")
    ok, requests, measured, p50, p95, errors = parse(output, target.expected)
    result = Result(ok, ok / measured if measured else 0.0, p50, p95, errors, observed, requests)
    return result, observed


def whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds - 1e-9)) if seconds > 0 else 0


def drive(
    target: Target, clients: int, ramp: float, duration: float, observe: Observe | None = None
) -> Result:
    """Load ``target`` with ``clients`` connections: ``ramp`` seconds of warm-up (not counted), then
    ``duration`` seconds measured, with ``observe`` running for the measured window."""
    ramp_s, duration_s = whole_seconds(ramp), max(1, whole_seconds(duration))
    warm_errors: dict[str, int] = {}
    if ramp_s:
        warm_errors = run_wrk(target, clients, ramp_s)[0].errors
    result, _ = run_wrk(target, clients, duration_s, observe)
    # The warm-up's unexpected answers count too (the run must be clean throughout), marked as such.
    result.errors.update({f"warm-up {kind}": n for kind, n in warm_errors.items()})
    return result
