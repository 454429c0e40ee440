"""DKIM private keys. The source is svc_send's KV store (the `("send", "dkim", domain, selector)`
keys, a StoredDkimKey each), so that every svc_send replica signs with the same keys: the
embedded SQLite store locally, FoundationDB when configured. `mailmesh dkim keygen` writes
there directly; PEM files can be imported (`mailmesh dkim import`, and at every start of
svc_send the files under `{data_dir}/dkim/<domain>/<selector>.key` whose selector is not in the
store yet). RSA keys are 2048-bit (RFC 8301 3.2), Ed25519 keys follow RFC 8463. A domain signs
with its newest key of each algorithm, so rotating is: generate a key under a new selector,
publish its TXT record, and the next message (of every replica, within CACHE_TTL_S) uses it.

The TXT record to publish (RFC 6376 3.6.1): `v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo, base64>`
or `v=DKIM1; k=ed25519; p=<the 32-byte public key, base64>` at `<selector>._domainkey.<domain>`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from mailmesh.v1 import send_service_pb2 as spb

from mailmesh_common.address import validate_domain
from mailmesh_common.errors import AlreadyExists, InvalidInput
from mailmesh_common.kv import Database, Transaction
from svc_send import store

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
DEFAULT_SELECTOR = "mail"
CACHE_TTL_S = 10.0  # a key added or replaced in the store is used by every replica within this
MAX_KEYS_PER_DOMAIN = 100
MAX_KEYS_LISTED = 10_000
MAX_CACHED_DOMAINS = 10_000
MAX_PEM_BYTES = 64 * 1024
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9](?:[a-z0-9_-]{0,62}))*$")


@dataclass(frozen=True)
class DkimKey:
    """One private key of a domain."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    private_pem: bytes
    created: float = 0.0  # seconds since the epoch: when it was made (or its file last changed)

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


class DkimKeyFiles:
    """PEM key files under `root` (`{data_dir}/dkim/<domain>/<selector>.key`, mode 0600): what
    older installations used, and an import source for the store."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, domain: str) -> Path:
        return self.root / validate_domain(domain)

    def generate(self, domain: str, selector: str = DEFAULT_SELECTOR, algorithm: str = "rsa", *,
                 force: bool = False) -> DkimKey:
        """Creates (or with force, replaces) the key file of domain/selector; returns the key."""
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
        return DkimKey(domain, selector, algorithm, pem, path.stat().st_mtime)

    def all_keys(self) -> list[DkimKey]:
        """Every readable key file (unreadable or foreign files are skipped)."""
        found: list[DkimKey] = []
        if not self.root.is_dir():
            return found
        for directory in sorted(self.root.iterdir()):
            try:
                domain = validate_domain(directory.name)
            except InvalidInput:
                continue
            for path in sorted(directory.glob("*.key"))[:MAX_KEYS_PER_DOMAIN]:
                try:
                    selector = check_selector(path.stem)
                    pem = path.read_bytes()[:MAX_PEM_BYTES]
                    found.append(DkimKey(domain, selector, _algorithm_of(pem), pem, path.stat().st_mtime))
                except (OSError, ValueError, TypeError, InvalidInput):
                    continue
        return found


def _record(key: DkimKey) -> spb.StoredDkimKey:
    rec = spb.StoredDkimKey(domain=key.domain, selector=key.selector, algorithm=key.algorithm,
                            private_pem=key.private_pem)
    rec.create_time.FromNanoseconds(int(key.created * 1e9))
    return rec


def _put(tr: Transaction, key: DkimKey, force: bool) -> bool:
    """Stores key; False when its selector exists and force is not set (nothing written)."""
    k = store.key("dkim", key.domain, key.selector)
    if tr.get(k) is not None and not force:
        return False
    tr.set(k, _record(key).SerializeToString())
    return True


def _load(tr: Transaction, domain: str) -> list[DkimKey]:
    rows = tr.get_range(*store.prefix_range("dkim", domain), limit=MAX_KEYS_PER_DOMAIN)
    out = []
    for _, value in rows:
        rec = spb.StoredDkimKey.FromString(value)
        out.append(DkimKey(rec.domain, rec.selector, rec.algorithm, rec.private_pem,
                           rec.create_time.ToNanoseconds() / 1e9))
    return out


def _load_all(tr: Transaction) -> list[DkimKey]:
    rows = tr.get_range(*store.prefix_range("dkim"), limit=MAX_KEYS_LISTED)
    out = []
    for _, value in rows:
        rec = spb.StoredDkimKey.FromString(value)
        out.append(DkimKey(rec.domain, rec.selector, rec.algorithm, rec.private_pem,
                           rec.create_time.ToNanoseconds() / 1e9))
    return out


def _newest_first(keys: list[DkimKey]) -> list[DkimKey]:
    return sorted(keys, key=lambda k: (k.created, k.selector), reverse=True)


class DkimKeyStore:
    """The keys in svc_send's KV store. The async methods serve svc_send (signing keys cached
    for CACHE_TTL_S per domain); the `_sync` ones serve the `mailmesh dkim` commands."""

    def __init__(self, db: Database, cache_ttl_s: float = CACHE_TTL_S) -> None:
        self.db = db
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, list[DkimKey]]] = {}  # domain -> (loaded at, signing keys)

    # --- writing ------------------------------------------------------------------------------------
    @staticmethod
    def new_key(domain: str, selector: str = DEFAULT_SELECTOR, algorithm: str = "rsa") -> DkimKey:
        return DkimKey(validate_domain(domain), check_selector(selector), algorithm, new_private_pem(algorithm),
                       time.time())

    @staticmethod
    def key_from_pem(domain: str, selector: str, pem: bytes, created: float | None = None) -> DkimKey:
        """A key from a PEM file's content; InvalidInput when it is no RSA or Ed25519 private key."""
        if len(pem) > MAX_PEM_BYTES:
            raise InvalidInput(f"a DKIM key file is at most {MAX_PEM_BYTES} bytes")
        try:
            algorithm = _algorithm_of(pem)
        except (ValueError, TypeError):
            raise InvalidInput("not a PEM private key (RSA or Ed25519, unencrypted)") from None
        return DkimKey(validate_domain(domain), check_selector(selector), algorithm, pem,
                       time.time() if created is None else created)

    def _check_put(self, key: DkimKey, stored: bool) -> DkimKey:
        if not stored:
            raise AlreadyExists(f"a DKIM key for selector {key.selector!r} of {key.domain} exists already")
        self._cache.pop(key.domain, None)
        return key

    async def put(self, key: DkimKey, *, force: bool = False) -> DkimKey:
        return self._check_put(key, await self.db.run(lambda tr: _put(tr, key, force)))

    def put_sync(self, key: DkimKey, *, force: bool = False) -> DkimKey:
        return self._check_put(key, self.db.run_sync(lambda tr: _put(tr, key, force)))

    async def generate(self, domain: str, selector: str = DEFAULT_SELECTOR, algorithm: str = "rsa", *,
                       force: bool = False) -> DkimKey:
        key = await asyncio.to_thread(self.new_key, domain, selector, algorithm)
        return await self.put(key, force=force)

    async def import_files(self, files: DkimKeyFiles) -> list[DkimKey]:
        """Stores every key file whose selector is not in the store yet; returns those stored."""
        found = await asyncio.to_thread(files.all_keys)
        imported = []
        for key in found:
            if await self.db.run(lambda tr, k=key: _put(tr, k, False)):  # type: ignore[misc]
                self._cache.pop(key.domain, None)
                imported.append(key)
        return imported

    # --- reading ------------------------------------------------------------------------------------
    async def keys(self, domain: str) -> list[DkimKey]:
        """Every key of the domain, newest first."""
        try:
            domain = validate_domain(domain)
        except InvalidInput:
            return []
        return _newest_first(await self.db.run(lambda tr: _load(tr, domain), readonly=True))

    def list_sync(self, domain: str = "") -> list[DkimKey]:
        """Every key (of one domain, when given), by domain, newest first."""
        if domain:
            d = validate_domain(domain)
            return _newest_first(self.db.run_sync(lambda tr: _load(tr, d), readonly=True))
        keys = self.db.run_sync(_load_all, readonly=True)
        return sorted(keys, key=lambda k: (k.domain, -k.created, k.selector))

    async def signing_keys(self, domain: str) -> list[DkimKey]:
        """The newest key of each algorithm: RSA first, then Ed25519 (RFC 8463 3: sign with both).
        Cached per domain for cache_ttl_s; the same DkimKey objects (and their parsed keys) are
        kept while the store holds the same key."""
        cached = self._cache.get(domain)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.cache_ttl_s:
            return cached[1]
        chosen: dict[str, DkimKey] = {}
        for key in await self.keys(domain):
            chosen.setdefault(key.algorithm, key)
        previous = {(k.selector, k.private_pem): k for k in (cached[1] if cached else [])}
        keys = [previous.get((chosen[a].selector, chosen[a].private_pem), chosen[a]) for a in ALGORITHMS if a in chosen]
        if len(self._cache) >= MAX_CACHED_DOMAINS:
            self._cache.clear()
        self._cache[domain] = (now, keys)
        return keys


def dkim_root(data_dir: Path) -> Path:
    return data_dir / "dkim"


__all__ = ["ALGORITHMS", "DEFAULT_SELECTOR", "DkimKey", "DkimKeyFiles", "DkimKeyStore", "check_selector", "dkim_root"]
