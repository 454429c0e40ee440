"""The submission server's certificate: submission_tls_cert_file/key_file, else the mesh's
tls_cert_file/key_file, else a self-signed one generated into `{data_dir}/tls-submission/` on
first start (renewed when it is about to expire). Desktop clients must be told to trust a
self-signed certificate; production sets a real one."""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from pathlib import Path

from mailmesh_common.config import Settings
from mailmesh_common.errors import ConfigError

log = logging.getLogger(__name__)

VALID_DAYS = 825
RENEW_BEFORE_DAYS = 30


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fresh(cert_file: Path) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left > datetime.timedelta(days=RENEW_BEFORE_DAYS)


def self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed certificate and key for hostname under directory (made when needed)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    if cert_file.exists() and key_file.exists() and _fresh(cert_file):
        return cert_file, key_file
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    _write(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("generated a self-signed submission certificate for %s", hostname)
    return cert_file, key_file


def submission_context(settings: Settings, hostname: str) -> ssl.SSLContext:
    cert, key = settings.submission_tls_cert_file, settings.submission_tls_key_file
    if bool(cert) != bool(key):
        raise ConfigError("submission_tls_cert_file and submission_tls_key_file must be set together")
    if not cert:
        cert, key = settings.tls_cert_file, settings.tls_key_file
        if bool(cert) != bool(key):
            raise ConfigError("tls_cert_file and tls_key_file must be set together")
    if cert:
        cert_file, key_file = Path(cert), Path(key)
    else:
        cert_file, key_file = self_signed(settings.data_dir / "tls-submission", hostname)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"submission certificate: cannot load it: {exc}") from exc
    return ctx


__all__ = ["self_signed", "submission_context"]
