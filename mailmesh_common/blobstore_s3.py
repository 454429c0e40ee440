"""Content-addressed raw messages in an S3-compatible object store (AWS S3, MinIO, Ceph RGW,
R2...): the distributed counterpart of the file driver in blobstore.py, with the same contract.

Keys: `{prefix}ab/cd/<sha256 hex>`, so load spreads over the key space. A blob is durable when
`put` returns: S3 answers a PUT only once the object is stored, and every PUT carries the
SHA-256 checksum, so the store refuses bytes that were corrupted on the way.

Garbage collection must never remove a blob that was just stored again by someone else (ingest
re-storing identical bytes while the mailbox collects the old, unreferenced copy). The file driver
renames aside and checks the age; here the bucket must have **versioning enabled** (checked at
start): every PUT makes a new version, and `collect` deletes only the versions it saw, all older
than the grace period, so a concurrent re-PUT's version survives. A `put` of content that already
exists skips the upload only when the current version is younger than `fresh_s` (default 1 h),
which `collect` never deletes because the grace period is longer. Set a lifecycle rule expiring
noncurrent versions after a day or two: they are older copies of bytes that have a current one.

Credentials come from boto3's default chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a web
identity token on Kubernetes, instance roles...).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import tempfile
import time
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from typing import IO, Any, BinaryIO, cast
from urllib.parse import urlsplit

from mailmesh_common.blobstore import READ_CHUNK, BlobStore, BlobTooLarge, _aiter, validate_ref
from mailmesh_common.errors import ConfigError, NotFound, Unavailable

_SPOOL_IN_MEMORY = 1 << 20
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchVersion"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix/")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"blob_url: expected s3://bucket[/prefix], got {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class _Body(io.RawIOBase):
    """A botocore StreamingBody as a readable binary file (blocking reads; close it)."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(len(view))
        except Exception as e:  # a dropped connection mid-read
            raise OSError(f"blob store read failed: {type(e).__name__}") from None
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3BlobStore(BlobStore):
    """The blob store on an S3-compatible bucket (see the module docstring). Same operations
    and errors as the file driver: NotFound, InvalidInput for a bad ref, Unavailable when the
    store cannot be reached (never its address or credentials in the message)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "", region: str = "",
                 fresh_s: float = 3600.0, client: Any = None) -> None:
        super().__init__(Path("/nonexistent-s3-blob-root"))
        self.bucket = bucket
        self.prefix = prefix
        self.fresh_s = fresh_s
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url or None, region_name=region or None,
                config=Config(connect_timeout=5, read_timeout=60, max_pool_connections=32,
                              retries={"max_attempts": 4, "mode": "standard"}))
        self.s3 = client

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str = "", region: str = "") -> S3BlobStore:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, endpoint_url=endpoint_url, region=region)

    def key(self, ref: str) -> str:
        validate_ref(ref)
        return f"{self.prefix}{ref[0:2]}/{ref[2:4]}/{ref}"

    def path(self, ref: str) -> Path:
        raise NotImplementedError("an S3 blob has a key, not a path; use key()")

    async def check(self) -> None:
        """Fails with Unavailable unless the bucket is reachable and versioned (see above)."""
        def _check() -> str:
            return str(self.s3.get_bucket_versioning(Bucket=self.bucket).get("Status", ""))

        status = await self._call(_check)
        if status != "Enabled":
            raise Unavailable(f"blob store bucket {self.bucket!r} must have versioning enabled "
                              "(garbage collection relies on it)")

    # --- plumbing ---------------------------------------------------------------------------------

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except (NotFound, Unavailable, BlobTooLarge):
            raise
        except Exception as e:
            raise self._translate(e) from None

    @staticmethod
    def _translate(e: Exception) -> Exception:
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                return NotFound("blob not found")
            return Unavailable(f"blob store unavailable: {code or 'error'}")
        # Never the endpoint or credentials: messages are for clients, without internals.
        return Unavailable(f"blob store unavailable: {type(e).__name__}")

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return cast(dict[str, Any], self.s3.head_object(Bucket=self.bucket, Key=key))
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in _NOT_FOUND:
                return None
            raise

    def _is_fresh(self, head: dict[str, Any] | None) -> bool:
        return head is not None and time.time() - head["LastModified"].timestamp() < self.fresh_s

    def _put_object(self, key: str, body: bytes | IO[bytes], size: int, digest: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                           ContentType="message/rfc822",
                           ChecksumSHA256=base64.b64encode(digest).decode())

    # --- writing ----------------------------------------------------------------------------------

    async def put(self, data: bytes) -> str:
        data = bytes(data)
        digest = hashlib.sha256(data).digest()
        ref = digest.hex()
        key = self.key(ref)

        def _put() -> None:
            if not self._is_fresh(self._head(key)):
                self._put_object(key, data, len(data), digest)

        await self._call(_put)
        return ref

    async def put_stream(self, chunks: AsyncIterable[bytes] | Iterable[bytes], *,
                         max_size: int) -> tuple[str, int]:
        hasher = hashlib.sha256()
        size = 0
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
        try:
            async for chunk in _aiter(chunks):
                size += len(chunk)
                if size > max_size:
                    raise BlobTooLarge(f"blob too large: over the limit of {max_size} bytes")
                hasher.update(chunk)
                spool.write(chunk)  # memory up to 1 MiB, then a temp file (page cache)
            digest = hasher.digest()
            ref = digest.hex()
            key = self.key(ref)

            def _put() -> None:
                if self._is_fresh(self._head(key)):
                    return
                spool.seek(0)
                self._put_object(key, cast(IO[bytes], spool), size, digest)

            await self._call(_put)
        finally:
            spool.close()
        return ref, size

    # --- reading ----------------------------------------------------------------------------------

    async def get(self, ref: str) -> bytes:
        key = self.key(ref)

        def _get() -> bytes:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return cast(bytes, body.read())
            finally:
                body.close()

        return cast(bytes, await self._call(_get))

    def open(self, ref: str) -> BinaryIO:
        key = self.key(ref)
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as e:
            raise self._translate(e) from None
        return cast(BinaryIO, io.BufferedReader(_Body(body), READ_CHUNK))

    async def exists(self, ref: str) -> bool:
        key = self.key(ref)
        return bool(await self._call(lambda: self._head(key) is not None))

    # --- lifecycle --------------------------------------------------------------------------------

    async def touch(self, ref: str) -> bool:
        """Marks the blob as just used: a server-side copy onto itself makes a fresh version."""
        key = self.key(ref)

        def _touch() -> bool:
            from botocore.exceptions import ClientError

            try:
                self.s3.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                    MetadataDirective="REPLACE", ContentType="message/rfc822",
                                    Metadata={"touched": str(int(time.time()))})
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) in _NOT_FOUND:
                    return False
                raise
            return True

        return bool(await self._call(_touch))

    async def delete(self, ref: str) -> bool:
        key = self.key(ref)

        def _delete() -> bool:
            if self._head(key) is None:
                return False
            self.s3.delete_object(Bucket=self.bucket, Key=key)
            return True

        return bool(await self._call(_delete))

    def _versions(self, key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        versions: list[dict[str, Any]] = []
        markers: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key, "MaxKeys": 1000}
        for _ in range(100):  # bounded: a blob never has anywhere near 100,000 versions
            page = self.s3.list_object_versions(**kwargs)
            versions += [v for v in page.get("Versions", []) if v["Key"] == key]
            markers += [m for m in page.get("DeleteMarkers", []) if m["Key"] == key]
            if not page.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs["VersionIdMarker"] = page["NextVersionIdMarker"]
        return versions, markers

    async def collect(self, ref: str, grace_s: float) -> bool:
        """Removes an unreferenced blob unless some version of it is younger than grace_s.
        Deletes exactly the versions it listed, so a concurrent re-PUT survives."""
        key = self.key(ref)

        def _collect() -> bool:
            versions, markers = self._versions(key)
            current = [v for v in versions if v.get("IsLatest")]
            if not current:
                return False
            cutoff = time.time() - grace_s
            if any(v["LastModified"].timestamp() >= cutoff for v in versions):
                return False
            for v in versions + markers:
                self.s3.delete_object(Bucket=self.bucket, Key=key, VersionId=v["VersionId"])
            return True

        return bool(await self._call(_collect))

    async def remove_stale_temp(self, older_than: float = 3600.0) -> int:
        """Nothing to do: uploads are single PUTs, never temporary objects."""
        return 0
