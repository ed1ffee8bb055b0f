"""Self-signed TLS certificates for tests that need a real TLS server (PostgreSQL, nginx)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed_certificate(
    *, dns_names: tuple[str, ...] = ("localhost",), ca: bool = True
) -> tuple[bytes, bytes]:
    """A PEM certificate for 127.0.0.1 (and ``dns_names``) and its PEM private key, valid for a day.

    With ``ca`` the certificate is its own CA (basicConstraints CA:TRUE), so a client can trust it directly
    as its root (libpq's ``sslrootcert``).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0] if dns_names else "127.0.0.1")])
    now = datetime.now(UTC)
    names: list[x509.GeneralName] = [x509.DNSName(dns) for dns in dns_names]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem
