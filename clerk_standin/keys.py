"""The stand-in's token signing keys: RSA keys, their stable ``kid`` and JWK, and the key file.

A key's ``kid`` is derived from its public key, so the same key file gives the same ``kid`` after a restart
and session tokens minted before it still verify.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from clerk_standin.wire import BASE62


def _base62(number: int, width: int) -> str:
    chars = []
    while number and len(chars) < width:
        number, rest = divmod(number, 62)
        chars.append(BASE62[rest])
    return "".join(chars).ljust(width, "0")


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """An RSA signing key with its stable ``kid`` (``ins_`` + 27 base62 chars of a SHA-256 of
    the public key), its public PEM and its JWK."""

    private_key: rsa.RSAPrivateKey
    kid: str
    public_pem: str
    jwk: dict[str, str]

    @classmethod
    def from_private_key(cls, private_key: rsa.RSAPrivateKey) -> SigningKey:
        public_key = private_key.public_key()
        der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        digest = int.from_bytes(hashlib.sha256(der).digest(), "big")
        kid = "ins_" + _base62(digest, 27)
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        numbers = public_key.public_numbers()
        jwk = {
            "use": "sig",
            "kty": "RSA",
            "kid": kid,
            "alg": "RS256",
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }
        return cls(private_key=private_key, kid=kid, public_pem=pem, jwk=jwk)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_private_key(generate_private_key())


def generate_private_key() -> rsa.RSAPrivateKey:
    """A fresh 2048-bit RSA key (public exponent 65537, i.e. ``e = "AQAB"``)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def load_or_create_private_key(path: str | os.PathLike[str]) -> rsa.RSAPrivateKey:
    """Load an unencrypted PEM RSA private key from ``path``; create it (mode 0600, parent
    folders included) when missing, so tokens stay valid across restarts."""
    key_path = Path(path)
    if not key_path.exists():
        key = generate_private_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: load theirs below
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
            return key
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ValueError(f"{key_path} does not hold an RSA private key")
    return loaded
