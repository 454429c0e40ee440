"""The blob store contract: content-addressed, durable, never escapes its root."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailmesh_common.blobstore import BlobStore, BlobTooLarge
from mailmesh_common.errors import InvalidInput, LimitExceeded, NotFound, Unavailable


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


async def test_put_get_round_trip_uses_the_sha256_ref(store: BlobStore) -> None:
    data = b"From: a@example.com\r\n\r\nhello\r\n"
    ref = await store.put(data)
    assert ref == hashlib.sha256(data).hexdigest()
    assert await store.get(ref) == data
    assert await store.exists(ref)
    assert store.path(ref) == store.root / ref[:2] / ref[2:4] / ref
    with store.open(ref) as f:
        assert f.read() == data
    assert b"".join([c async for c in store.iter_chunks(ref, chunk_size=4)]) == data


async def test_same_content_is_stored_once(store: BlobStore) -> None:
    first = await store.put(b"same message")
    inode = store.path(first).stat().st_ino
    second = await store.put(b"same message")
    ref, size = await store.put_stream([b"same ", b"message"], max_size=100)
    assert first == second == ref and size == 12
    assert _files(store.root) == [store.path(first)]
    assert store.path(first).stat().st_ino == inode, "existing content is not rewritten"


async def test_collect_spares_recently_stored_blobs(store: BlobStore) -> None:
    ref = await store.put(b"collect me")
    past = time.time() - 7200
    os.utime(store.path(ref), (past, past))
    await store.put(b"collect me")  # stored again (e.g. by ingest): touched, so it is fresh
    assert not await store.collect(ref, grace_s=3600)
    assert await store.get(ref) == b"collect me"
    os.utime(store.path(ref), (past, past))
    assert await store.collect(ref, grace_s=3600)
    assert not await store.exists(ref)
    assert _files(store.root) == []
    assert not await store.collect(ref, grace_s=0)  # already gone
    ref2 = await store.put(b"touched")
    os.utime(store.path(ref2), (past, past))
    assert await store.touch(ref2)
    assert not await store.collect(ref2, grace_s=3600)
    assert not await store.touch("0" * 64)


async def test_put_stream_hashes_async_chunks(store: BlobStore) -> None:
    chunks = [os.urandom(300_000) for _ in range(5)]

    async def gen() -> AsyncIterator[bytes]:
        for c in chunks:
            yield c

    ref, size = await store.put_stream(gen(), max_size=10_000_000)
    data = b"".join(chunks)
    assert (ref, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert await store.get(ref) == data
    assert _files(store.root) == [store.path(ref)]


async def test_put_stream_over_max_size_is_rejected_and_leaves_no_temp_file(store: BlobStore) -> None:
    await store.put(b"existing")

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    with pytest.raises(BlobTooLarge, match="over the limit of 5000 bytes") as info:
        await store.put_stream(gen(), max_size=5000)
    assert isinstance(info.value, LimitExceeded)
    assert info.value.smtp.code == 552
    assert _files(store.root) == [store.path(hashlib.sha256(b"existing").hexdigest())]


@pytest.mark.parametrize("ref", [
    "../etc/passwd",
    "../../" + "a" * 58,
    "A" * 64,
    "a" * 63,
    "a" * 65,
    "",
    "g" * 64,
    "a" * 63 + "\n",
    "/" + "a" * 63,
])
async def test_bad_refs_are_invalid_input(store: BlobStore, ref: str) -> None:
    with pytest.raises(InvalidInput):
        await store.get(ref)
    with pytest.raises(InvalidInput):
        await store.exists(ref)
    with pytest.raises(InvalidInput):
        await store.delete(ref)
    with pytest.raises(InvalidInput):
        store.open(ref)
    with pytest.raises(InvalidInput):
        store.path(ref)


async def test_missing_blob_is_not_found(store: BlobStore) -> None:
    ref = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(NotFound):
        await store.get(ref)
    with pytest.raises(NotFound):
        store.open(ref)
    assert not await store.exists(ref)
    assert not await store.delete(ref)


async def test_delete_removes_the_blob(store: BlobStore) -> None:
    ref = await store.put(b"to delete")
    assert await store.delete(ref)
    assert not await store.exists(ref)


async def test_unwritable_root_is_unavailable(tmp_path: Path) -> None:
    # Root ignores permissions, so make the root a regular file: every mkdir under it fails.
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"")
    store = BlobStore(root)
    with pytest.raises(Unavailable, match="blob store unavailable") as info:
        await store.put(b"data")
    assert str(root) not in info.value.message
    with pytest.raises(Unavailable, match="blob store unavailable"):
        await store.put_stream([b"data"], max_size=100)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_read_only_directory_is_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(Unavailable, match="blob store unavailable"):
            await BlobStore(root).put(b"data")
    finally:
        root.chmod(0o755)
