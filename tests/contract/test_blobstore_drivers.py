"""The blob store contract on every driver: the file store always, the S3 driver against a real
S3 API server on loopback (moto's server mode, a separate HTTP server the driver reaches through
boto3 exactly as it reaches AWS or MinIO). File-layout details are in test_blobstore.py."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailmesh_common.blobstore import BlobStore, BlobTooLarge, open_blobstore
from mailmesh_common.config import load_settings
from mailmesh_common.errors import ConfigError, InvalidInput, NotFound, Unavailable
from tests.s3server import aws_env, make_bucket, s3_client, s3_endpoint  # noqa: F401

pytest.importorskip("boto3", reason="boto3 is not installed")


@pytest.fixture(autouse=True)
def _aws(aws_env: None) -> None:  # noqa: F811
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "file":
        yield open_blobstore(load_settings(env={"MAILMESH_DATA_DIR": str(tmp_path)}))
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = make_bucket(endpoint)
    s = open_blobstore(load_settings(env={"MAILMESH_BLOB_URL": f"s3://{bucket}/mail",
                                          "MAILMESH_S3_ENDPOINT_URL": endpoint}))
    await s.check()
    yield s


async def test_round_trip_by_sha256(store: BlobStore) -> None:
    data = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n" * 100
    ref = await store.put(data)
    assert ref == hashlib.sha256(data).hexdigest()
    assert await store.get(ref) == data
    assert await store.exists(ref)
    with store.open(ref) as f:
        assert f.read(10) == data[:10]
        assert f.read() == data[10:]
    assert b"".join([c async for c in store.iter_chunks(ref, chunk_size=7)]) == data


async def test_identical_content_has_one_ref(store: BlobStore) -> None:
    a = await store.put(b"same message")
    b = await store.put(b"same message")
    ref, size = await store.put_stream([b"same ", b"message"], max_size=100)
    assert a == b == ref and size == 12
    assert await store.get(ref) == b"same message"


async def test_put_stream_of_a_large_message(store: BlobStore) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    ref, size = await store.put_stream([chunk] * 3, max_size=5 << 20)
    assert size == 3 << 20
    assert await store.get(ref) == chunk * 3


async def test_put_stream_over_the_limit_stores_nothing(store: BlobStore) -> None:
    with pytest.raises(BlobTooLarge) as info:
        await store.put_stream([b"x" * 4000, b"y" * 4000], max_size=5000)
    assert info.value.smtp.code == 552
    ref = hashlib.sha256(b"x" * 4000 + b"y" * 4000).hexdigest()
    assert not await store.exists(ref)


async def test_missing_blob(store: BlobStore) -> None:
    ref = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(NotFound):
        await store.get(ref)
    with pytest.raises(NotFound):
        store.open(ref)
    assert not await store.exists(ref)
    assert not await store.delete(ref)
    assert not await store.touch(ref)
    assert not await store.collect(ref, grace_s=0)


@pytest.mark.parametrize("ref", ["../" + "a" * 61, "A" * 64, "a" * 63, "g" * 64, ""])
async def test_bad_refs_are_invalid_input(store: BlobStore, ref: str) -> None:
    for call in (store.get, store.exists, store.delete, store.touch):
        with pytest.raises(InvalidInput):
            await call(ref)
    with pytest.raises(InvalidInput):
        store.open(ref)


async def test_delete(store: BlobStore) -> None:
    ref = await store.put(b"to delete")
    assert await store.delete(ref)
    assert not await store.exists(ref)
    with pytest.raises(NotFound):
        await store.get(ref)


async def test_collect_spares_fresh_blobs_and_removes_old_ones(store: BlobStore) -> None:
    ref = await store.put(b"collect me")
    assert not await store.collect(ref, grace_s=3600), "stored just now: within the grace period"
    assert await store.get(ref) == b"collect me"
    assert await store.touch(ref)
    assert not await store.collect(ref, grace_s=3600)
    assert await store.collect(ref, grace_s=0)
    assert not await store.exists(ref)
    assert not await store.collect(ref, grace_s=0), "already gone"
    # stored again after collection: a new, intact blob
    assert await store.put(b"collect me") == ref
    assert await store.get(ref) == b"collect me"


async def test_s3_collect_removes_every_old_version(s3_endpoint: str) -> None:  # noqa: F811
    bucket = make_bucket(s3_endpoint)
    s3 = open_blobstore(load_settings(env={"MAILMESH_BLOB_URL": f"s3://{bucket}",
                                           "MAILMESH_S3_ENDPOINT_URL": s3_endpoint}))
    s3.fresh_s = 0  # type: ignore[attr-defined]  # every put uploads: several versions
    ref = await s3.put(b"v")
    await s3.put(b"v")
    await s3.touch(ref)
    assert await s3.collect(ref, grace_s=0)
    assert not await s3.exists(ref), "no older version resurfaces after collection"
    listing = s3_client(s3_endpoint).list_object_versions(Bucket=bucket)
    assert not listing.get("Versions") and not listing.get("DeleteMarkers")


async def test_s3_bucket_without_versioning_is_refused(s3_endpoint: str) -> None:  # noqa: F811
    bucket = make_bucket(s3_endpoint, versioned=False)
    s3 = open_blobstore(load_settings(env={"MAILMESH_BLOB_URL": f"s3://{bucket}",
                                           "MAILMESH_S3_ENDPOINT_URL": s3_endpoint}))
    with pytest.raises(Unavailable, match="versioning"):
        await s3.check()


async def test_s3_unreachable_is_unavailable_without_internals() -> None:
    port = _free_port()  # nothing listens there
    s3 = open_blobstore(load_settings(env={"MAILMESH_BLOB_URL": "s3://b",
                                           "MAILMESH_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}))
    with pytest.raises(Unavailable) as info:
        await s3.put(b"data")
    assert str(port) not in info.value.message and "test" not in info.value.message
    with pytest.raises(Unavailable):
        await s3.get(hashlib.sha256(b"data").hexdigest())


@pytest.mark.parametrize("url", ["s3:/nobucket", "http://bucket/x", "s3://", "s3://b?x=1"])
def test_bad_blob_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="blob_url"):
        open_blobstore(load_settings(env={"MAILMESH_BLOB_URL": url}))


async def test_file_store_check_fails_on_an_unusable_root(tmp_path: Path) -> None:
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"")
    with pytest.raises(Unavailable, match="blob store unavailable"):
        await BlobStore(root).check()
