"""The file blob store's write path under concurrency and failure: every put lands once, in its
content-addressed place, and no temp file is ever left behind."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from mailmesh_common.blobstore import BlobStore
from mailmesh_common.errors import Unavailable


def _sharing_a_directory(n: int) -> list[bytes]:
    """n different payloads whose refs all fall in the same root/ab/cd directory."""
    by_dir: dict[str, list[bytes]] = {}
    i = 0
    while True:
        data = f"message {i}".encode()
        group = by_dir.setdefault(hashlib.sha256(data).hexdigest()[:4], [])
        group.append(data)
        if len(group) == n:
            return group
        i += 1


def _temp_files(store: BlobStore) -> list[Path]:
    tmp = store.root / "tmp"
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


async def test_concurrent_puts_into_new_directories_all_land_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    same_dir = _sharing_a_directory(6)
    spread = [f"spread {i}".encode() for i in range(40)]
    payloads = same_dir + spread + same_dir  # the same content twice, at the same time
    refs = await asyncio.gather(*(store.put(p) for p in payloads))
    assert refs == [hashlib.sha256(p).hexdigest() for p in payloads]
    for ref, payload in zip(refs, payloads, strict=True):
        assert await store.get(ref) == payload
    stored = sorted(p for p in store.root.rglob("*") if p.is_file())
    assert stored == sorted({store.path(r) for r in refs})
    assert len({store.path(r).parent for r in refs[:6]}) == 1
    assert _temp_files(store) == []


async def test_a_temp_name_taken_by_another_writer_is_not_overwritten(tmp_path: Path) -> None:
    """Two writers with the same temp names (a process forked after opening the store) never
    write into each other's temp file."""
    first = BlobStore(tmp_path / "blobs")
    await first.put(b"warm up")
    second = BlobStore(tmp_path / "blobs")
    second._temp_names._stem, second._temp_names._n = first._temp_names._stem, first._temp_names._n
    taken = first.root / "tmp" / f".tmp-{first._temp_names.next()}"
    taken.write_bytes(b"the other writer's half-written message")
    ref = await second.put(b"mine")
    assert await second.get(ref) == b"mine"
    assert taken.read_bytes() == b"the other writer's half-written message"
    assert _temp_files(second) == [taken]


async def test_a_failed_rename_is_unavailable_and_leaves_no_temp_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    await store.put(b"warm up")
    data = b"cannot be placed"
    ref = hashlib.sha256(data).hexdigest()
    blocker = store.root / ref[:2]
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")  # a file where the blob's directory should be
    with pytest.raises(Unavailable, match="blob store unavailable") as info:
        await store.put(data)
    assert str(store.root) not in info.value.message
    assert _temp_files(store) == []
    blocker.unlink()
    assert await store.put(data) == ref  # the store recovers once the path is usable
    assert await store.get(ref) == data
