"""The submission server's certificate: submission_tls_cert_file/key_file, else the mesh's
tls_cert_file/key_file, else a self-signed one generated into `{data_dir}/tls-submission/` on
first start (renewed when it is about to expire). Desktop clients must be told to trust a
self-signed certificate; production sets a real one."""

from __future__ import annotations

import ssl
from pathlib import Path

from mailmesh_common.config import Settings
from mailmesh_common.errors import ConfigError
from mailmesh_common.tls import ensure_self_signed as self_signed


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
