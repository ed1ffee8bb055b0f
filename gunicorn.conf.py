"""gunicorn settings for Iris in production: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Iris runs behind one reverse proxy (nginx, see deploy/nginx-iris.conf) on the same host. Every setting below
says why it has its value; docs/deployment.md has the whole picture. Environment overrides:

    WEB_CONCURRENCY   worker processes (default 2: one per core on a 2-core box)
    GUNICORN_THREADS  threads per worker (default 8)
    GUNICORN_BIND     comma-separated addresses, e.g. 127.0.0.1:8000 or unix:/run/iris/gunicorn.sock
    PORT              port on 127.0.0.1 when GUNICORN_BIND is unset (default 8000); never 0.0.0.0
    GUNICORN_PRELOAD  1/true to load the app in the master before forking (default off)
    GUNICORN_MAX_REQUESTS  recycle a worker after this many requests, with 10% jitter (default 0: never)

Anything else can be overridden with gunicorn's own GUNICORN_CMD_ARGS (e.g. "--log-level debug"), which
gunicorn applies after this file, or with command-line flags, which it applies last.

Time budget (keep graceful_timeout and nginx's proxy_read_timeout at or above it; tests/test_deployment.py
checks both against iris/clerk.py): one Clerk call waits at most 3.05 s to connect, once more if that fails
(urllib3 retries a failed connect once), then 8 s for each read: 3.05 x 2 + 8 = 14.1 s. A registration makes
1 Clerk call normally, 2 when Clerk's answer is lost (create, find by external_id), and 7 at most: undo a
stale pending registration of the same email (find, delete), create, find that Clerk's user holding the
email is a stray of ours and delete it, create again, then find after a lost answer or delete after a failed
local write: 7 x 14.1 = 98.7 s, plus short database work. Nothing here cuts a request off at that time
(gthread's `timeout` is a liveness check): it is how long a graceful stop waits, and nginx waits, for an
answer.
"""

import os


def _integer(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RuntimeError(f"gunicorn.conf.py: {name} must be a whole number, not {raw!r}") from None
    if value < minimum:
        raise RuntimeError(f"gunicorn.conf.py: {name} must be at least {minimum}, not {value}")
    return value


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise RuntimeError(f"gunicorn.conf.py: {name} must be 1/true/yes/on or 0/false/no/off, not {raw!r}")


def _bind() -> list[str]:
    explicit = [address.strip() for address in os.environ.get("GUNICORN_BIND", "").split(",")]
    if any(explicit):
        return [address for address in explicit if address]
    # gunicorn's own default for PORT is 0.0.0.0:$PORT; clients must not reach gunicorn around the proxy.
    return [f"127.0.0.1:{_integer('PORT', 8000, minimum=0)}"]


# --- Sockets ---------------------------------------------------------------------------------------------
# Loopback only: whoever reaches gunicorn directly can forge X-Forwarded-For / -Proto (IRIS_PROXY_HOPS).
bind = _bind()

# --- Workers ---------------------------------------------------------------------------------------------
# Threads, not sync workers: requests mostly wait on Clerk's HTTPS API, and a thread waits for free.
worker_class = "gthread"
# One process per core; each has its own 5-connection database pool, so the pooler sees workers x 5.
workers = _integer("WEB_CONCURRENCY", 2, minimum=1)
# At least the pool's 5 so the pool can be used in full; more is fine, since a request holds a connection
# only for its few milliseconds of SQL and never while it waits for Clerk (iris.registration, "No
# connection held"). 2 x 8 threads at 200 ms per Clerk call is ~80 registrations/s, under Clerk's production
# limit of 100 calls/s.
threads = _integer("GUNICORN_THREADS", 8, minimum=1)
# Each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new connections across
# them. With one shared socket, kept-alive connections stay with whichever worker accepted them, and that
# was often one worker holding all 16 while the other idled. Measured with `make bench` (2 x 8, Clerk at
# 200 ms, straight at gunicorn): registrations 0.42 -> 0.69 of ideal at 16 connections, 0.15 -> 0.33 at 32;
# /users/me 353 -> 715 requests/s. The cost: a worker's own backlog goes with it when it is replaced, so a
# connection still waiting in it is reset. TCP binds with a fixed port only: on a unix socket every worker
# would bind the same path in turn, and with port 0 each worker would get a port of its own.
reuse_port = not any(address.startswith(("unix:", "fd://")) or address.endswith(":0") for address in bind)

# --- Timeouts --------------------------------------------------------------------------------------------
# For gthread a liveness check only (the worker's main loop beats every second), not a request time limit.
timeout = 30
# A stop (TERM, the default signal) lets in-flight requests finish: 98.7 s of Clerk calls at worst (above).
# The process supervisor must wait longer before it kills: systemd TimeoutStopSec=120, docker stop -t 120.
graceful_timeout = 100
# Idle keep-alive from nginx: longer than nginx's upstream keepalive_timeout (4 s), so nginx always closes
# an idle connection first and never sends a request on one gunicorn is closing.
keepalive = 5

# --- Preload and fork ------------------------------------------------------------------------------------
# Off by default: each worker imports the app itself, and HUP reloads code. On saves memory per worker.
preload_app = _flag("GUNICORN_PRELOAD", False)


def post_fork(server, worker):
    """With preload_app the master built the app before forking, so any database connection it opened is
    in every worker's copy of the pool. Give each worker an empty pool; close=False leaves the sockets to the
    master instead of closing them under it. (Clerk's requests sessions and redis-py pools already notice the
    new pid and start afresh.) Iris opens no connection at import, so this guards against future code."""
    if not server.cfg.preload_app:
        return
    from iris.extensions import db

    app = server.app.wsgi()
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose(close=False)


# Recycling workers contains leaks but costs warm pools, the JWKS cache and memory:// rate-limit counters.
max_requests = _integer("GUNICORN_MAX_REQUESTS", 0, minimum=0)
max_requests_jitter = max_requests // 10  # so workers do not all restart at once

# --- Proxy -----------------------------------------------------------------------------------------------
# Only the local proxy may set the scheme for gunicorn (the client IP is ProxyFix's job, IRIS_PROXY_HOPS).
forwarded_allow_ips = "127.0.0.1,::1"
# Only the header nginx overwrites; X-Forwarded-Ssl/-Protocol would reach us as the client sent them.
secure_scheme_headers = {"X-FORWARDED-PROTO": "https"}

# --- Logging ---------------------------------------------------------------------------------------------
# No access log: the app writes one JSON line per request (with request id, duration, user, client address
# and scheme), and nginx logs what never reaches the app. GUNICORN_CMD_ARGS="--access-logfile -" for a look.
accesslog = None
# gunicorn's own lines (start, stop, worker deaths) and the app's JSON logs share stderr for the supervisor.
errorlog = "-"
loglevel = "info"
# Shows as "gunicorn: master [iris]" in ps and top.
proc_name = "iris"

# --- Housekeeping ----------------------------------------------------------------------------------------
# No control socket: every instance would share ~/.gunicorn/gunicorn.ctl; signals do the same job.
control_socket_disable = True
# Worker heartbeats on tmpfs, never on a disk or overlay filesystem that can stall them. (gunicorn makes an
# unguessable mkstemp file there and unlinks it at once.)
_SHM = "/dev/shm"  # noqa: S108
worker_tmp_dir = _SHM if os.path.isdir(_SHM) else None

# --- Metrics (Prometheus, GET /metrics) ------------------------------------------------------------------
# Each worker counts in its own process. prometheus_client's multiprocess mode keeps every value in a file
# per process under PROMETHEUS_MULTIPROC_DIR, and a scrape, whichever worker answers it, adds up all the
# files (iris/metrics.py). prometheus_client reads the variable once, when it is first imported, so it is
# set here, as gunicorn reads this file in the master: before the app is loaded (in the workers, or in the
# master with GUNICORN_PRELOAD), and inherited by every worker forked later.
#
#   IRIS_METRICS_DIR  a directory for those files (created if missing; its *.db files are removed when the
#                     master starts). Unset: a private directory made here (on tmpfs when /dev/shm exists,
#                     like the heartbeats), removed when the process that made it exits (the master; or
#                     `gunicorn --print-config`, which reads this file too).
#
# A HUP re-reads this file in the same master: the directory stays, and so do the counts of the workers it
# replaces (counters never go back, as Prometheus expects of them). Only the live gauge (checked-out database
# connections) forgets a dead worker, in child_exit. Every worker ever started leaves two small files until
# the next master start, so recycling workers (GUNICORN_MAX_REQUESTS) grows the directory and the scrape.
_METRICS_MASTER = "IRIS_METRICS_MASTER"  # the pid of the master that chose PROMETHEUS_MULTIPROC_DIR


def _metrics_directory() -> str:
    """The directory for this master's metric files (see above)."""
    configured = os.environ.get("IRIS_METRICS_DIR", "").strip()
    if configured:
        os.makedirs(configured, mode=0o700, exist_ok=True)
        return configured
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if current and os.environ.get(_METRICS_MASTER) == str(os.getpid()):
        return current  # HUP: this master made it when it first read this file
    import atexit
    import shutil
    import tempfile

    private = tempfile.mkdtemp(prefix="iris-metrics-", dir=worker_tmp_dir)
    master = os.getpid()

    def remove() -> None:
        if os.getpid() == master:  # workers inherit this handler; only the master removes the directory
            shutil.rmtree(private, ignore_errors=True)

    atexit.register(remove)
    return private


_metrics_dir = _metrics_directory()
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
os.environ[_METRICS_MASTER] = str(os.getpid())


def on_starting(server):
    """A fresh start counts from zero: no file left by an earlier master (IRIS_METRICS_DIR) is added in."""
    import glob

    for path in glob.glob(os.path.join(_metrics_dir, "*.db")):
        os.remove(path)


def child_exit(server, worker):
    """A dead worker's connections are checked out no longer: drop its live gauge (its counters stay)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _metrics_dir)
