"""Content-addressed raw messages: files named by their sha256 under a root directory.

Layout: `root/ab/cd/abcd...` (the 64 hex digit sha256), temp files under `root/tmp/`. A blob is
durable when `put` returns: the temp file is fsync'd, renamed into place, and the directory
fsync'd (DESIGN "Durability": nothing acknowledged is lost). Identical content is stored once.
Refs are validated strictly (64 lowercase hex digits), so a ref can never name another path.

`put` is on every inbound message's path, so it spends few system calls: no existence checks
before creating the temp file or renaming it (a missing directory shows as ENOENT and is then
created), and the entries leading to a blob's directory are fsync'd once per process (then
remembered), only the directory itself per blob. There is no group commit of that directory
fsync: blobs spread over 65,536 directories, so puts in flight at once almost never share one.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import BinaryIO

from mailmesh_common.config import Settings
from mailmesh_common.errors import InvalidInput, LimitExceeded, NotFound, SmtpFace, StorageFull, Unavailable

_REF = re.compile(r"[0-9a-f]{64}")
_TMP_DIR = "tmp"
_TMP_PREFIX = ".tmp-"
# put_stream buffers this much before each write to the temp file.
_WRITE_BUFFER = 1 << 20
READ_CHUNK = 1 << 16


class BlobTooLarge(LimitExceeded):
    """A streamed blob over its max_size; permanent for this message."""

    # RFC 3463: 5.3.4 message too big for system
    smtp = SmtpFace(552, "5.3.4", "Message too big for system")


def _unavailable(e: OSError) -> Unavailable:
    # Never the path: messages are for developers, without internals.
    reason = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"blob store full: {reason}")
    return Unavailable(f"blob store unavailable: {reason}")


def validate_ref(ref: str) -> str:
    """ref if it is 64 lowercase hex digits, else InvalidInput."""
    if not isinstance(ref, str) or _REF.fullmatch(ref) is None:
        raise InvalidInput("invalid blob ref: expected 64 lowercase hex digits (sha256)")
    return ref


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# Blob directories whose entries are known durable, per process: at most the 65,536 + 256 of a
# root.
_KNOWN_DIRS_MAX = 1 << 17


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Content-addressed blob files under root (created on first write)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / _TMP_DIR
        self._root_s = str(self.root)
        self._tmp_s = str(self._tmp)
        # blob directories (as strings) whose entries, and their parents' entries, this process
        # has seen fsync'd: an entry is added only after that fsync returned
        self._durable_dirs: set[str] = set()
        self._temp_names = _TempNames()

    async def check(self) -> None:
        """Fails with Unavailable unless the store can be written (services call it at start)."""
        try:
            await asyncio.to_thread(self._makedirs, self._tmp)
        except OSError as e:
            raise _unavailable(e) from None

    def path(self, ref: str) -> Path:
        """Where the blob ref lives (whether or not it exists)."""
        validate_ref(ref)
        return self.root / ref[0:2] / ref[2:4] / ref

    # Writing.

    async def put(self, data: bytes) -> str:
        """Store data durably; return its sha256 hex ref. Existing content is not rewritten."""
        return await asyncio.to_thread(self._put_sync, bytes(data))

    def _put_sync(self, data: bytes) -> str:
        ref = hashlib.sha256(data).hexdigest()
        directory = f"{self._root_s}/{ref[0:2]}/{ref[2:4]}"
        final = f"{directory}/{ref}"
        try:
            try:
                # Touch it: `collect` never removes a blob written or re-put within its grace period.
                os.utime(final)
            except FileNotFoundError:
                pass
            else:
                # It may have just been renamed by a concurrent put: make sure its entry is durable.
                _fsync_dir(directory)
                return ref
            tmp = self._write_temp(data)
            try:
                try:
                    os.rename(tmp, final)
                except FileNotFoundError:  # the first blob of its directory
                    os.makedirs(directory, exist_ok=True)
                    os.rename(tmp, final)
            except BaseException:
                _remove_quietly(tmp)
                raise
            self._make_entry_durable(directory)
        except OSError as e:
            raise _unavailable(e) from None
        return ref

    def _write_temp(self, data: bytes) -> str:
        """A new temp file holding data, fsync'd; its path."""
        while True:
            tmp = f"{self._tmp_s}/{_TMP_PREFIX}{self._temp_names.next()}"
            try:
                fd = os.open(tmp, _TEMP_FLAGS, 0o644)
            except FileNotFoundError:  # temp files need no durable directory: they are temporary
                os.makedirs(self._tmp_s, exist_ok=True)
                fd = os.open(tmp, _TEMP_FLAGS, 0o644)
            except FileExistsError:  # another process took this name (e.g. a fork): a fresh one
                self._temp_names.reseed()
                continue
            break
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _remove_quietly(tmp)
            raise
        return tmp

    def _make_entry_durable(self, directory: str) -> None:
        """After a rename into `directory` (root/ab/cd): fsync it, so the new entry is durable.
        The first time this process puts into a directory, the entries leading to it are made
        durable too, whoever created them (another thread or process may not have fsync'd
        them yet): root/ab for root/ab/cd, and the root for root/ab. No lock: a directory is
        remembered only after its fsync returned, and a repeated fsync is harmless."""
        known = self._durable_dirs
        if directory not in known:
            parent = directory.rpartition("/")[0]
            if parent not in known:
                _fsync_dir(self._root_s)
                self._remember_dir(parent)
            _fsync_dir(parent)
            self._remember_dir(directory)
        _fsync_dir(directory)

    def _remember_dir(self, directory: str) -> None:
        if len(self._durable_dirs) >= _KNOWN_DIRS_MAX:
            self._durable_dirs.clear()  # only costs a few repeated fsyncs
        self._durable_dirs.add(directory)

    async def put_stream(self, chunks: AsyncIterable[bytes] | Iterable[bytes], *,
                         max_size: int) -> tuple[str, int]:
        """Store the concatenated chunks durably; return (sha256 hex ref, size).

        Over max_size bytes: BlobTooLarge (a LimitExceeded), and nothing is left on disk.
        """
        hasher = hashlib.sha256()
        size = 0
        buffer: list[bytes] = []
        buffered = 0
        tmp = await asyncio.to_thread(self._new_temp_checked)
        try:
            f = await asyncio.to_thread(open, tmp, "wb")
            try:
                async for chunk in _aiter(chunks):
                    size += len(chunk)
                    if size > max_size:
                        raise BlobTooLarge(f"blob too large: over the limit of {max_size} bytes")
                    hasher.update(chunk)
                    buffer.append(chunk)
                    buffered += len(chunk)
                    if buffered >= _WRITE_BUFFER:
                        await asyncio.to_thread(f.write, b"".join(buffer))
                        buffer.clear()
                        buffered = 0
                if buffer:
                    await asyncio.to_thread(f.write, b"".join(buffer))
                await asyncio.to_thread(_flush_and_sync, f)
            finally:
                f.close()
            ref = hasher.hexdigest()
            await asyncio.to_thread(self._publish_checked, tmp, ref)
        except OSError as e:
            raise _unavailable(e) from None
        finally:
            # Synchronous on purpose: it must run even when the task is cancelled.
            _remove_quietly(tmp)
        return ref, size

    def _already_stored(self, ref: str) -> bool:
        final = self.path(ref)
        try:
            # Touch it: `collect` never removes a blob written or re-put within its grace period.
            os.utime(final)
        except FileNotFoundError:
            return False
        # It may have just been renamed by a concurrent put: make sure its entry is durable.
        _fsync_dir(final.parent)
        return True

    def _new_temp(self) -> Path:
        if not self._tmp.is_dir():
            self._makedirs(self._tmp)
        return self._tmp / f"{_TMP_PREFIX}{uuid.uuid4().hex}"

    def _new_temp_checked(self) -> Path:
        try:
            return self._new_temp()
        except OSError as e:
            raise _unavailable(e) from None

    def _makedirs(self, directory: Path) -> None:
        """mkdir -p, fsyncing each parent whose entries changed."""
        missing: list[Path] = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            if d.parent == d:
                break
            d = d.parent
        directory.mkdir(parents=True, exist_ok=True)
        for d in reversed(missing):
            _fsync_dir(d.parent)

    def _publish(self, tmp: Path, ref: str) -> None:
        """Rename the fsync'd temp file into place and make the new entry durable."""
        final = self.path(ref)
        if self._already_stored(ref):
            return
        if not final.parent.is_dir():
            self._makedirs(final.parent)
        os.rename(tmp, final)
        _fsync_dir(final.parent)

    def _publish_checked(self, tmp: Path, ref: str) -> None:
        try:
            self._publish(tmp, ref)
        except OSError as e:
            raise _unavailable(e) from None

    # Reading.

    async def get(self, ref: str) -> bytes:
        path = self.path(ref)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFound(f"blob {ref} not found") from None
        except OSError as e:
            raise _unavailable(e) from None

    def open(self, ref: str) -> BinaryIO:
        """The blob as a binary file object for streaming (blocking reads; close it)."""
        path = self.path(ref)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {ref} not found") from None
        except OSError as e:
            raise _unavailable(e) from None

    async def iter_chunks(self, ref: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks, reading in a worker thread."""
        f = await asyncio.to_thread(self.open, ref)
        try:
            while True:
                try:
                    chunk = await asyncio.to_thread(f.read, chunk_size)
                except OSError as e:
                    raise _unavailable(e) from None
                if not chunk:
                    return
                yield chunk
        finally:
            f.close()

    async def touch(self, ref: str) -> bool:
        """Marks the blob as just used (see `collect`); False if it does not exist."""
        path = self.path(ref)

        def _touch() -> bool:
            try:
                os.utime(path)
                return True
            except FileNotFoundError:
                return False

        try:
            return await asyncio.to_thread(_touch)
        except OSError as e:
            raise _unavailable(e) from None

    async def exists(self, ref: str) -> bool:
        path = self.path(ref)
        try:
            return await asyncio.to_thread(path.is_file)
        except OSError as e:
            raise _unavailable(e) from None

    async def delete(self, ref: str) -> bool:
        """Remove the blob; False if it did not exist."""
        path = self.path(ref)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise _unavailable(e) from None
        return True

    async def collect(self, ref: str, grace_s: float) -> bool:
        """Removes a blob nobody references any more, unless it was stored (or stored again,
        which touches it) within `grace_s` seconds. Safe against a concurrent `put` of the same
        content: the file is first renamed aside, its age checked, and put back if it is fresh."""
        return await asyncio.to_thread(self._collect_sync, validate_ref(ref), grace_s)

    def _collect_sync(self, ref: str, grace_s: float) -> bool:
        final = self.path(ref)
        aside = final.with_name(final.name + ".collect")
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise _unavailable(e) from None
        try:
            fresh = time.time() - aside.stat().st_mtime < grace_s
            if fresh:
                os.rename(aside, final)  # a concurrent put may have written it again: same bytes
                return False
            aside.unlink()
            _fsync_dir(final.parent)
            return True
        except OSError as e:
            raise _unavailable(e) from None

    async def remove_stale_temp(self, older_than: float = 3600.0) -> int:
        """Remove temp files left by crashed writers (older than older_than seconds)."""
        return await asyncio.to_thread(self._remove_stale_temp, older_than)

    def _remove_stale_temp(self, older_than: float) -> int:
        removed = 0
        cutoff = time.time() - older_than
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise _unavailable(e) from None
        for entry in entries:
            try:
                if entry.name.startswith(_TMP_PREFIX) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed


class _TempNames:
    """Temp file names unique to this process without a random draw per file: a random stem
    and a counter (the file is created with O_EXCL, and a clash draws a new stem)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reseed()

    def reseed(self) -> None:
        with self._lock:
            self._stem = uuid.uuid4().hex
            self._n = 0

    def next(self) -> str:
        with self._lock:
            self._n += 1
            return f"{self._stem}-{self._n}"


def _flush_and_sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _remove_quietly(path: Path | str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


async def _aiter(chunks: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


def open_blobstore(settings: Settings) -> BlobStore:
    """The configured blob store: files under `{data_dir}/blobs`, or an S3-compatible bucket
    when `blob_url` is `s3://bucket[/prefix]` (see blobstore_s3.py)."""
    if settings.blob_url:
        from mailmesh_common.blobstore_s3 import S3BlobStore

        return S3BlobStore.from_url(settings.blob_url, endpoint_url=settings.s3_endpoint_url,
                                    region=settings.s3_region)
    return BlobStore(settings.data_dir / "blobs")
