"""MQTT client identities both sides agree on: an ECDSA P-256 key, a CSR naming the identity.

The key is made where it is used (on the device, for the device) and written 0600; only the
CSR leaves. The controller's fleet CA issues the certificate and checks the CSR with
``is_identity_key``; the agent renews at ``renewal_due``.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from .errors import StorageError
from .fs import atomic_write

CURVE = ec.SECP256R1
RENEW_AT = 2 / 3  # of the certificate's lifetime


def is_identity_key(key: PublicKeyTypes) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, CURVE)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A fresh key written to ``path`` (0600, atomically)."""
    key = ec.generate_private_key(CURVE())
    atomic_write(path, private_pem(key))
    return key


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read the MQTT key {path}: {e}; move it away to make a new one") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not is_identity_key(key.public_key()):
        raise StorageError(f"{path} is not an ECDSA P-256 key; move it away to make a new one")
    return key


def key_at(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key kept at ``path``, made there the first time."""
    return load_key(path) if path.exists() else new_key(path)


def csr_pem(key: ec.EllipticCurvePrivateKey, common_name: str) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def common_name(name: x509.Name) -> str | None:
    names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if len(names) == 1 else None
    return value if isinstance(value, str) else None


def renewal_due(certificate: x509.Certificate) -> datetime:
    """When a certificate should be replaced: two thirds into its lifetime."""
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return start + (end - start) * RENEW_AT
