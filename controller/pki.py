"""The fleet CA: an ECDSA P-256 key in HOME/ca (0600) signing every MQTT identity of the fleet.

Devices send a CSR (their key never leaves them); ``issue_for_device`` checks it (signature,
subject = the device id, a P-256 key) and issues a short-lived client certificate. The
controller's own client certificate and the broker's server certificate are issued by
``fleetctl broker config``. Identities that are not devices have names no device id can
take (``CONTROLLER_IDENTITY`` has a ':').
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.common.errors import ProtocolError, StorageError
from edgefleet.common.fs import atomic_write
from edgefleet.common.identity import CURVE, common_name, is_identity_key, private_pem
from edgefleet.common.protocol import check_device_id

from .errors import InvalidInput, Unavailable

CA_DIR = "ca"
CA_KEY_FILE = "ca-key.pem"
CA_CERT_FILE = "ca.pem"
CA_LIFETIME = timedelta(days=3650)
MAX_SKEW_S = 300  # certificates start this much (at most a tenth of their lifetime) in the past
CONTROLLER_IDENTITY = "edgefleet:controller"
REPLICA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
MAX_CSR_CHARS = 4000


def ca_dir(home: Path) -> Path:
    return Path(home) / CA_DIR


def replica_identity(name: str) -> str:
    """The MQTT identity of one controller replica: on a broker that takes the certificate's
    name as client id, replicas sharing one identity would keep closing each other's session."""
    if not REPLICA_NAME.match(name):
        raise InvalidInput(f"replica name {name!r} must be 1-32 letters, digits, '_', '.' or '-'")
    return f"{CONTROLLER_IDENTITY}:{name}"


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def check_csr(text: str, device_id: str) -> ec.EllipticCurvePublicKey:
    """The public key of a device's CSR, if it is signed by that key, names ``device_id`` and
    holds a P-256 key; else InvalidInput saying which."""
    try:
        csr = x509.load_pem_x509_csr(text.encode())
    except ValueError:
        raise InvalidInput("csr is not a PEM certificate signing request") from None
    try:
        signed = csr.is_signature_valid
    except (InvalidSignature, ValueError, TypeError):
        signed = False
    if not signed:
        raise InvalidInput("csr signature does not verify: sign it with the device's own key")
    subject = common_name(csr.subject)
    if subject != device_id:
        raise InvalidInput(f"csr names {subject!r}, not this device {device_id!r}: use the device id as CN")
    key = csr.public_key()
    if not is_identity_key(key) or not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidInput("csr key must be ECDSA P-256")
    return key


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate

    @property
    def pem(self) -> str:
        return pem(self.certificate)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


class FleetCA:
    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self._key = key
        self.certificate = certificate

    @property
    def certificate_pem(self) -> str:
        return pem(self.certificate)

    @classmethod
    def ensure(cls, home: Path, name: str = "edgefleet fleet CA") -> FleetCA:
        """The CA of the fleet home, created the first time (an existing one is kept)."""
        folder = ca_dir(home)
        if (folder / CA_KEY_FILE).exists():
            return cls.load(home)
        key = ec.generate_private_key(CURVE())
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=MAX_SKEW_S)).not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(folder / CA_CERT_FILE, pem(certificate).encode())
            atomic_write(folder / CA_KEY_FILE, private_pem(key))  # last: its presence says "done"
        except (OSError, StorageError) as e:
            raise Unavailable(f"cannot write the fleet CA to {folder}: {e}") from e
        return cls(key, certificate)

    @classmethod
    def load(cls, home: Path) -> FleetCA:
        folder = ca_dir(home)
        try:
            key = serialization.load_pem_private_key((folder / CA_KEY_FILE).read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate((folder / CA_CERT_FILE).read_bytes())
        except FileNotFoundError:
            raise Unavailable(f"the fleet home has no CA in {folder}: run `fleetctl init`") from None
        except (OSError, ValueError) as e:
            raise Unavailable(f"cannot read the fleet CA in {folder}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise Unavailable(f"{folder / CA_KEY_FILE} is not an ECDSA key")
        return cls(key, certificate)

    def issue_for_device(self, csr: str, device_id: str, lifetime_s: float) -> Issued:
        """A client certificate for the device whose CSR this is (see ``check_csr``)."""
        try:
            check_device_id(device_id)
        except ProtocolError as e:
            raise InvalidInput(str(e)) from None
        return self.issue(check_csr(csr, device_id), device_id, lifetime_s)

    def issue(self, public_key: ec.EllipticCurvePublicKey, common: str, lifetime_s: float,
              server_names: tuple[str, ...] = ()) -> Issued:
        """A certificate for ``common``: a TLS client, or with ``server_names`` a TLS server."""
        now = datetime.now(UTC)
        skew = timedelta(seconds=min(MAX_SKEW_S, lifetime_s / 10))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common)).issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - skew).not_valid_after(now + timedelta(seconds=lifetime_s))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if server_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in server_names]), critical=False)
        return Issued(builder.sign(self._key, hashes.SHA256()))

    def issue_with_key(self, common: str, lifetime_s: float,
                       server_names: tuple[str, ...] = ()) -> tuple[bytes, Issued]:
        """A new key (PEM) and its certificate, for identities the operator installs (broker, controller)."""
        key = ec.generate_private_key(CURVE())
        return private_pem(key), self.issue(key.public_key(), common, lifetime_s, server_names)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
