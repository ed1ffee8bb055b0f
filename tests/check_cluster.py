"""A throwaway PostgreSQL cluster with SSL on, for tests/test_check_command.py.

``SSLCluster`` runs initdb in a temporary directory, writes a self-signed server certificate for 127.0.0.1 and
localhost (made with ``cryptography``; key mode 0600, owned by the cluster's user), and starts the server on a
free loopback port with ``ssl = on`` and trust auth. ``set_ssl(False)`` turns SSL off (a reload, no restart).
Used as a context manager it is stopped and removed on exit, even when a test failed.

PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the ``postgres`` user through
``runuser``, in a directory that user owns. Without initdb or pg_ctl the tests skip, with the reason; in CI
(``CI`` set) they fail instead.
"""

from __future__ import annotations

import datetime
import glob
import ipaddress
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from typing import NoReturn

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERVICE_USER = "postgres"


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine; fail in CI, where the SSL tests must run."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}. CI is set: the SSL tests must run there, so this fails instead of skipping")
    pytest.skip(reason)


def find_tool(name: str) -> str:
    """``name`` on PATH, else in the newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found is None:
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_of, reverse=True)
        found = candidates[0] if candidates else None
    if found is None:
        unavailable(f"{name} not found: install the PostgreSQL server (Debian: apt-get install postgresql)")
    return found


def _version_of(path: str) -> int:
    version = path.split("/")[4]
    return int(version) if version.isdigit() else 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def self_signed_certificate() -> tuple[bytes, bytes]:
    """A PEM certificate and its PEM private key, for 127.0.0.1 and localhost, valid for a day.

    It is its own CA (basicConstraints CA:TRUE), so clients can trust it as ``sslrootcert``.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


class SSLCluster:
    """A private PostgreSQL cluster with SSL on, on a free loopback port; user ``postgres``, trust auth."""

    def __init__(self) -> None:
        self.initdb = find_tool("initdb")
        self.pg_ctl = find_tool("pg_ctl")
        self.owner = SERVICE_USER if os.geteuid() == 0 else None
        if self.owner is not None and shutil.which("runuser") is None:
            unavailable("running as root, and runuser (util-linux) is missing to run PostgreSQL as postgres")
        self.port = free_port()
        self.directory = ""

    @property
    def data(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def certificate_path(self) -> str:
        return os.path.join(self.directory, "server.crt")

    def url(self, **query: str) -> str:
        """A libpq URL for the ``postgres`` database, with ``query`` as parameters."""
        params = "&".join(f"{name}={value}" for name, value in query.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres" + (f"?{params}" if params else "")

    def __enter__(self) -> SSLCluster:
        try:
            self._create()
            self._run(self.pg_ctl, "-D", self.data, "-l", self._log_path, "-w", "-t", "30", "start")
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    @property
    def _log_path(self) -> str:
        return os.path.join(self.directory, "postgresql.log")

    def _create(self) -> None:
        try:
            owner = pwd.getpwnam(self.owner) if self.owner is not None else None
        except KeyError:
            unavailable(f"running as root, and there is no {self.owner!r} user to run PostgreSQL as")
        self.directory = tempfile.mkdtemp(prefix="iris-check-postgres-")  # mode 0700
        if owner is not None:
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
        self._run(self.initdb, "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        certificate, key = self_signed_certificate()
        key_path = os.path.join(self.directory, "server.key")
        with open(self.certificate_path, "wb") as handle:
            handle.write(certificate)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(key)
        if owner is not None:  # the server reads its key only when its own user owns it
            for path in (self.certificate_path, key_path):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        # In postgresql.conf, not on the command line, so that ALTER SYSTEM can turn ssl off (set_ssl).
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.directory}'",
            "fsync": "off",
            "ssl": "on",
            "ssl_cert_file": f"'{self.certificate_path}'",
            "ssl_key_file": f"'{key_path}'",
        }
        with open(os.path.join(self.data, "postgresql.conf"), "a") as handle:
            handle.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", self.owner, "--"] if self.owner is not None else []
        result = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, cwd=self.directory, timeout=60, check=False
        )
        if result.returncode != 0:
            log = ""
            if os.path.exists(self._log_path):
                with open(self._log_path, errors="replace") as handle:
                    log = handle.read()[-4000:]
            name = os.path.basename(args[0])
            raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout}{result.stderr}{log}")

    def set_ssl(self, on: bool) -> None:
        """Turn SSL on or off (ALTER SYSTEM and a reload), and wait until new connections see it."""
        with psycopg.connect(self.url(sslmode="prefer"), autocommit=True, connect_timeout=5) as connection:
            if on:
                connection.execute("ALTER SYSTEM RESET ssl")
            else:
                connection.execute("ALTER SYSTEM SET ssl = off")
            connection.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while self._ssl_in_use() != on:
            if time.monotonic() > deadline:
                raise AssertionError(f"PostgreSQL did not turn ssl {'on' if on else 'off'} within 10 s")
            time.sleep(0.05)

    def _ssl_in_use(self) -> bool:
        with psycopg.connect(self.url(sslmode="prefer"), connect_timeout=5) as connection:
            return connection.pgconn.ssl_in_use

    def destroy(self) -> None:
        """Stop the server (fast, else immediate) if it runs, and remove the directory."""
        try:
            if self.directory and os.path.exists(os.path.join(self.data, "postmaster.pid")):
                try:
                    self._run(self.pg_ctl, "-D", self.data, "-m", "fast", "-w", "-t", "20", "stop")
                except (AssertionError, subprocess.TimeoutExpired):
                    self._run(self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "-t", "20", "stop")
        finally:
            if self.directory:
                shutil.rmtree(self.directory, ignore_errors=True)
