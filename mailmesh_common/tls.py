"""TLS certificates for the mesh's SMTP listeners (MX STARTTLS, submission): the configured one (tls_cert_file + tls_key_file), or a self-signed
one generated into `{data_dir}/tls/` on first start and reused after (renewed when it is about
to expire).

Generation uses the `cryptography` package, or the `openssl` command when it is not installed.
Opportunistic STARTTLS between MTAs does not verify certificates (RFC 3207 4.1, RFC 7435), so a
self-signed one protects against passive eavesdropping out of the box.

Several processes share the data dir and may start at once (svc_send, svc_ingest's workers):
generating and loading the pair happen under an exclusive lock on `tls/.lock`, so no process
loads a certificate beside another process's key.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

from mailmesh_common.config import Settings
from mailmesh_common.errors import ConfigError

log = logging.getLogger(__name__)

VALID_DAYS = 825
RENEW_BEFORE_DAYS = 30
CERT_NAME = "smtp-cert.pem"
KEY_NAME = "smtp-key.pem"


def _write_private(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _generate_with_cryptography(hostname: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _generate_with_openssl(hostname: str, workdir: Path) -> tuple[bytes, bytes]:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("tls: cannot generate a certificate: neither the cryptography package nor "
                          "the openssl command is installed; set tls_cert_file and tls_key_file")
    cert, key = workdir / ".gen-cert.pem", workdir / ".gen-key.pem"
    try:
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                        "-days", str(VALID_DAYS), "-subj", f"/CN={hostname[:64]}",
                        "-addext", f"subjectAltName=DNS:{hostname}",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=60)
        return cert.read_bytes(), key.read_bytes()
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"tls: openssl could not generate a certificate: {exc.__class__.__name__}") from exc
    finally:
        cert.unlink(missing_ok=True)
        key.unlink(missing_ok=True)


def generate_self_signed(hostname: str, workdir: Path) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for hostname, valid VALID_DAYS days."""
    try:
        return _generate_with_cryptography(hostname)
    except ImportError:
        return _generate_with_openssl(hostname, workdir)


def _not_after(cert_file: Path) -> float:
    try:
        from cryptography import x509
    except ImportError:
        # CPython's own PEM decoder (what the ssl tests use); enough for one date
        info = ssl._ssl._test_decode_cert(str(cert_file))  # type: ignore[attr-defined]
        return float(ssl.cert_time_to_seconds(info["notAfter"]))
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.not_valid_after_utc.timestamp()


def _expires_soon(cert_file: Path) -> bool:
    try:
        not_after = _not_after(cert_file)
    except Exception:
        return True  # unreadable: make a new one
    remaining = not_after - datetime.datetime.now(datetime.UTC).timestamp()
    return remaining < RENEW_BEFORE_DAYS * 86400


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Holds the exclusive lock of the generated pair in directory (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a generation at most: seconds
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """The generated certificate and key under directory, made (or renewed) when needed."""
    with _locked(directory):
        return _ensure_self_signed(directory, hostname)


def _ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    cert_file, key_file = directory / CERT_NAME, directory / KEY_NAME
    if cert_file.exists() and key_file.exists() and not _expires_soon(cert_file):
        return cert_file, key_file
    cert_pem, key_pem = generate_self_signed(hostname, directory)
    # key first: a reader that sees the new certificate finds its key
    _write_private(key_file, key_pem, 0o600)
    _write_private(cert_file, cert_pem, 0o644)
    log.info("generated a self-signed certificate for %s in %s", hostname, directory)
    return cert_file, key_file


def server_context(settings: Settings, hostname: str) -> ssl.SSLContext:
    """The SSLContext for STARTTLS: TLS 1.2+, no client certificates asked for."""
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ConfigError("tls_cert_file and tls_key_file must be set together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if settings.tls_cert_file:
        _load(ctx, Path(settings.tls_cert_file), Path(settings.tls_key_file))
    else:
        directory = settings.data_dir / "tls"
        with _locked(directory):  # no other process renews the pair while it is read
            _load(ctx, *_ensure_self_signed(directory, hostname))
    return ctx


def _load(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert_file/tls_key_file: cannot load the certificate: {exc}") from exc
