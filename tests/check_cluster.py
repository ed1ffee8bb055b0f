"""A throwaway PostgreSQL cluster with SSL on, for tests/test_check_command.py.

``SSLCluster`` is the drills' ``PrivateCluster`` (initdb in a temporary directory, a free loopback port, trust
auth, run as ``postgres`` through runuser when we are root, skipped with the reason without initdb locally
and failed in CI) plus a self-signed server certificate for 127.0.0.1 and localhost and ``ssl = on``.
``set_ssl(False)`` turns SSL off (a reload, no restart). Used as a context manager it is stopped and removed
on exit, even when a test failed.
"""

from __future__ import annotations

import os
import pwd
import time

import psycopg

from tests.drill_support import PrivateCluster, libpq_url
from tests.tls import self_signed_certificate


class SSLCluster(PrivateCluster):
    """A private PostgreSQL cluster with SSL on; user ``postgres``, trust auth."""

    @property
    def certificate_path(self) -> str:
        return os.path.join(self.directory, "server.crt")

    def create(self) -> None:
        super().create()
        certificate, key = self_signed_certificate(dns_names=("localhost",))
        key_path = os.path.join(self.directory, "server.key")
        with open(self.certificate_path, "wb") as handle:
            handle.write(certificate)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(key)
        if self.owner is not None:  # the server reads its key only when its own user owns it
            entry = pwd.getpwnam(self.owner)
            for path in (self.certificate_path, key_path):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        # In postgresql.conf, not on pg_ctl's command line, so that ALTER SYSTEM can turn ssl off (set_ssl).
        settings = {
            "ssl": "on",
            "ssl_cert_file": f"'{self.certificate_path}'",
            "ssl_key_file": f"'{key_path}'",
        }
        with open(os.path.join(self.data, "postgresql.conf"), "a") as handle:
            handle.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def dsn(self, **query: str) -> str:
        """A libpq URL for the ``postgres`` database, with ``query`` as parameters."""
        return libpq_url(self.url().update_query_dict(query))

    def set_ssl(self, on: bool) -> None:
        """Turn SSL on or off (ALTER SYSTEM and a reload), and wait until new connections see it."""
        with psycopg.connect(self.dsn(sslmode="prefer"), autocommit=True, connect_timeout=5) as connection:
            connection.execute("ALTER SYSTEM RESET ssl" if on else "ALTER SYSTEM SET ssl = off")
            connection.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while self._ssl_in_use() != on:
            if time.monotonic() > deadline:
                raise AssertionError(f"PostgreSQL did not turn ssl {'on' if on else 'off'} within 10 s")
            time.sleep(0.05)

    def _ssl_in_use(self) -> bool:
        with psycopg.connect(self.dsn(sslmode="prefer"), connect_timeout=5) as connection:
            return connection.pgconn.ssl_in_use
