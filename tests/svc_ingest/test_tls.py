"""The STARTTLS certificate: a configured one is used as is (both files required), a generated
self-signed one is kept in the data dir and reused until it nears expiry."""

from __future__ import annotations

import multiprocessing
import ssl
from pathlib import Path

import pytest

from mailmesh_common import tls
from mailmesh_common.config import load_settings
from mailmesh_common.errors import ConfigError


def test_configured_certificate_is_used_and_both_files_are_required(tmp_path: Path) -> None:
    cert_pem, key_pem = tls.generate_self_signed("mx.configured.test", tmp_path)
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    settings = load_settings(env={}, data_dir=str(tmp_path / "data"), tls_cert_file=str(tmp_path / "c.pem"),
                             tls_key_file=str(tmp_path / "k.pem"))
    ctx = tls.server_context(settings, "ignored.test")
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert not (tmp_path / "data" / "tls").exists()  # nothing generated when one is configured
    with pytest.raises(ConfigError):
        tls.server_context(load_settings(env={}, data_dir=str(tmp_path), tls_cert_file=str(tmp_path / "c.pem")),
                           "x.test")
    with pytest.raises(ConfigError):
        tls.server_context(load_settings(env={}, data_dir=str(tmp_path), tls_cert_file=str(tmp_path / "k.pem"),
                                         tls_key_file=str(tmp_path / "k.pem")), "x.test")


def test_generated_certificate_is_reused_until_it_nears_expiry(tmp_path: Path) -> None:
    cert, key = tls.ensure_self_signed(tmp_path, "mx.one.test")
    first = cert.read_bytes()
    assert tls.ensure_self_signed(tmp_path, "mx.one.test") == (cert, key)
    assert cert.read_bytes() == first
    cert.write_bytes(b"garbage")  # unreadable: replaced
    tls.ensure_self_signed(tmp_path, "mx.one.test")
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----") and cert.read_bytes() != first


def _start_worker(data_dir: str) -> str:
    """What each svc_ingest worker does at start (in its own process): '' or the error."""
    try:
        tls.server_context(load_settings(env={}, data_dir=data_dir), "mx.race.test")
    except ConfigError as exc:
        return str(exc)
    return ""


def test_workers_starting_at_once_share_one_matching_pair(tmp_path: Path) -> None:
    """Several processes starting on a fresh data dir (mailmesh up's ingest workers) each load
    a certificate with its own key: one generates, the others wait and reuse it."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        errors = pool.map(_start_worker, [str(tmp_path)] * 8)
    assert errors == [""] * 8
    cert = (tmp_path / "tls" / tls.CERT_NAME).read_bytes()
    tls.server_context(load_settings(env={}, data_dir=str(tmp_path)), "mx.race.test")  # the pair matches
    assert (tmp_path / "tls" / tls.CERT_NAME).read_bytes() == cert  # reused, not made again
