"""The device's MQTT identity: a key made here (0600, it never leaves the device) and a
client certificate from the fleet CA, asked for with a CSR over the device API and renewed
two thirds into its lifetime by ``Renewer``, which then reconnects with the new one."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from edgefleet.common.errors import EdgefleetError
from edgefleet.common.fs import atomic_write
from edgefleet.common.identity import common_name, csr_pem, key_at, renewal_due
from edgefleet.common.retry import Backoff

from .api import post_json
from .errors import RemoteError

log = logging.getLogger(__name__)

IDENTITY_DIR = "mqtt"
RETRY = Backoff(5.0, 300.0)  # after a failed renewal


@dataclass(frozen=True)
class IdentityFiles:
    key: Path
    certificate: Path
    ca: Path  # the fleet CA: it signs the broker's certificate too

    @classmethod
    def under(cls, state_dir: Path) -> IdentityFiles:
        folder = Path(state_dir) / IDENTITY_DIR
        return cls(folder / "client-key.pem", folder / "client.pem", folder / "ca.pem")


def read_certificate(path: Path) -> x509.Certificate | None:
    """The stored certificate; None when there is none or it does not parse."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def request_certificate(controller_url: str, device_id: str, device_token: str,
                        files: IdentityFiles) -> x509.Certificate:
    """Send a CSR for this device's key (made on first use) and store what comes back."""
    files.key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = key_at(files.key)
    url = f"{controller_url.rstrip('/')}/v1/devices/{device_id}/certificate"
    answer = post_json(url, {"csr": csr_pem(key, device_id)}, "certificate request", token=device_token)
    try:
        certificate = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        ca = x509.load_pem_x509_certificate(str(answer["ca_certificate"]).encode())
    except (KeyError, ValueError) as e:
        raise RemoteError(f"certificate answer from {url} lacks a PEM certificate ({e})") from None
    if common_name(certificate.subject) != device_id or certificate.public_key() != key.public_key():
        raise RemoteError(f"certificate from {url} is not for this device's key and id {device_id!r}")
    try:
        certificate.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        raise RemoteError(f"certificate from {url} is not signed by the CA sent with it") from None
    atomic_write(files.ca, str(answer["ca_certificate"]).encode())
    atomic_write(files.certificate, str(answer["certificate"]).encode())
    return certificate


class Renewer:
    """A thread that renews the certificate when it is due (or missing), then calls ``on_renewed``."""

    def __init__(self, controller_url: str, device_id: str, device_token: str, files: IdentityFiles,
                 on_renewed: Callable[[], None], retry: Backoff = RETRY) -> None:
        self._call = (controller_url, device_id, device_token)
        self._files = files
        self._on_renewed = on_renewed
        self._retry = retry
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="certificate-renewal", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def seconds_until_due(self) -> float:
        certificate = read_certificate(self._files.certificate)
        if certificate is None:
            return 0.0
        return (renewal_due(certificate) - datetime.now(UTC)).total_seconds()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(max(0.0, self.seconds_until_due())):
            try:
                certificate = request_certificate(*self._call, self._files)
            except EdgefleetError as e:
                delay = self._retry.delay(failures)
                failures += 1
                log.warning("certificate renewal failed (%s); next try in %.0fs", e, delay)
                if self._stop.wait(delay):
                    return
                continue
            failures = 0
            log.info("MQTT client certificate renewed; valid until %s", certificate.not_valid_after_utc)
            try:
                self._on_renewed()
            except Exception:  # a failing reload must not end renewals
                log.exception("reloading the renewed certificate failed")
