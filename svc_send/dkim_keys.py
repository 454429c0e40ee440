"""DKIM private keys: one PEM file per selector under `{data_dir}/dkim/<domain>/<selector>.key`
(mode 0600), made by `mailmesh dkim keygen`. RSA keys are 2048-bit (RFC 8301 3.2), Ed25519 keys
follow RFC 8463. A domain signs with its newest key of each algorithm, so rotating is: generate
a key under a new selector, publish its TXT record, and the next message uses it.

The TXT record to publish (RFC 6376 3.6.1): `v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo, base64>`
or `v=DKIM1; k=ed25519; p=<the 32-byte public key, base64>` at `<selector>._domainkey.<domain>`.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailmesh_common.address import validate_domain
from mailmesh_common.errors import AlreadyExists, InvalidInput

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
DEFAULT_SELECTOR = "mail"
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9](?:[a-z0-9_-]{0,62}))*$")


@dataclass(frozen=True)
class DkimKey:
    """One private key of a domain."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    private_pem: bytes
    mtime: float = 0.0

    @property
    def signature_algorithm(self) -> bytes:
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    @functools.cached_property
    def _private(self) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
        # our own file: the (slow) RSA consistency checks were made when it was generated
        key = serialization.load_pem_private_key(self.private_pem, password=None,
                                                 unsafe_skip_rsa_key_validation=True)
        if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise InvalidInput("unsupported DKIM key type")
        return key

    @functools.cached_property
    def _dkimpy_private(self) -> bytes:
        key = self._private
        if isinstance(key, rsa.RSAPrivateKey):
            return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
        if isinstance(key, ed25519.Ed25519PrivateKey):
            seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
            return base64.b64encode(seed)
        raise InvalidInput("unsupported DKIM key type")

    def dkimpy_private_key(self) -> bytes:
        """The form dkimpy signs with: PKCS#1 PEM for RSA, the base64 seed for Ed25519."""
        return self._dkimpy_private

    def public_key_b64(self) -> str:
        key = self._private
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        elif isinstance(key, rsa.RSAPrivateKey):
            raw = key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        else:
            raise InvalidInput("unsupported DKIM key type")
        return base64.b64encode(raw).decode("ascii")

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def txt_record(self) -> str:
        """The TXT record value to publish at record_name."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_key_b64()}"


def check_selector(selector: str) -> str:
    sel = selector.strip().lower()
    if not _SELECTOR.match(sel) or len(sel) > 200:
        raise InvalidInput(f"selector {selector!r}: letters, digits, '-', '_' and dots only")
    return sel


def _algorithm_of(pem: bytes) -> str:
    key = serialization.load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=True)
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise InvalidInput("unsupported DKIM key type")


def new_private_pem(algorithm: str) -> bytes:
    if algorithm == "rsa":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(65537, RSA_BITS)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise InvalidInput(f"algorithm must be one of {', '.join(ALGORITHMS)}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class DkimKeyStore:
    """The key files under `root` (`{data_dir}/dkim`), read again when a domain's directory changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, tuple[float, list[DkimKey]]] = {}
        self._lock = threading.Lock()

    def _dir(self, domain: str) -> Path:
        return self.root / validate_domain(domain)

    def generate(self, domain: str, selector: str = DEFAULT_SELECTOR, algorithm: str = "rsa", *,
                 force: bool = False) -> DkimKey:
        """Creates (or with force, replaces) the key of domain/selector; returns it."""
        domain = validate_domain(domain)
        selector = check_selector(selector)
        pem = new_private_pem(algorithm)
        directory = self._dir(domain)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / f"{selector}.key"
        if path.exists() and not force:
            raise AlreadyExists(f"a DKIM key for selector {selector!r} of {domain} exists already")
        tmp = directory / f".{selector}.key.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        with self._lock:
            self._cache.pop(domain, None)
        return DkimKey(domain, selector, algorithm, pem, path.stat().st_mtime)

    def keys(self, domain: str) -> list[DkimKey]:
        """Every readable key of the domain, newest first."""
        try:
            directory = self._dir(domain)
        except InvalidInput:
            return []
        try:
            stamp = directory.stat().st_mtime
        except FileNotFoundError:
            return []
        with self._lock:
            cached = self._cache.get(directory.name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        found: list[DkimKey] = []
        for path in directory.glob("*.key"):
            try:
                pem = path.read_bytes()
                found.append(DkimKey(directory.name, path.stem, _algorithm_of(pem), pem, path.stat().st_mtime))
            except (OSError, ValueError, InvalidInput):
                continue
        found.sort(key=lambda k: k.mtime, reverse=True)
        with self._lock:
            self._cache[directory.name] = (stamp, found)
        return found

    def signing_keys(self, domain: str) -> list[DkimKey]:
        """The newest key of each algorithm: RSA first, then Ed25519 (RFC 8463 3: sign with both)."""
        chosen: dict[str, DkimKey] = {}
        for key in self.keys(domain):
            chosen.setdefault(key.algorithm, key)
        return [chosen[a] for a in ALGORITHMS if a in chosen]


def dkim_root(data_dir: Path) -> Path:
    return data_dir / "dkim"


__all__ = ["ALGORITHMS", "DEFAULT_SELECTOR", "DkimKey", "DkimKeyStore", "check_selector", "dkim_root"]
