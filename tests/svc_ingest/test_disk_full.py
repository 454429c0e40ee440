"""A full disk under the DATA spool or the blob store: the message gets 452 4.3.1 (insufficient
system storage: the sender keeps it and tries again), never 250, the session stays in step, and
the same message goes through once there is room. Under the mailbox store: the accepted message
waits in INBOUND (never acknowledged before its delivery commits) and arrives once there is room. The disks are real tmpfs mounts filled up
(root with mount rights; skipped otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.svc_ingest.conftest import (
    IngestMesh,
    Nats,
    in_thread,
    message,
    start_ingest_mesh,
    stop_ingest_mesh,
)
from tests.svc_ingest.test_ingest_service import inbound_last_seq

STORAGE_FULL = (452, b"4.3.1 Insufficient system storage, try again later")


def fill(filler: Path) -> None:
    """Writes filler until the disk under it is full."""
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)


@contextmanager
def full_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at path and filled; yields the filler file (delete it to make room)."""
    if os.geteuid() != 0:
        pytest.skip("filling a disk needs a tmpfs mount: run as root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()[:200]}")
    try:
        filler = path / "filler"
        fill(filler)
        yield filler
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def session(m: IngestMesh, raw: bytes) -> list[tuple[int, bytes]]:
    """One message over SMTP, then a NOOP: the DATA reply and whether the session is in step."""
    with m.smtp() as s:
        s.ehlo()
        out = [s.docmd("MAIL FROM:<sender@remote.test>"), s.docmd("RCPT TO:<bob@example.com>"), s.docmd("DATA")]
        s.send(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        out.append(s.getreply())
        out.append(s.docmd("NOOP"))
        return out


async def test_spool_disk_full_gets_452_and_the_retry_is_delivered(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    # over a MiB: DATA spills from memory to a file in the spool directory
    raw = message("big one", to="bob@example.com") + b"".join(b"%075d\r\n" % i for i in range(40_000))  # ~3 MB of body lines
    before = await inbound_last_seq(m)
    with full_tmpfs(Path(m.settings.data_dir) / "ingest-spool"):
        got = await in_thread(session, m, raw)
        assert got[3] == STORAGE_FULL
        assert got[4] == (250, b"2.0.0 OK")  # read to its final dot: the session is still in step
        assert await inbound_last_seq(m) == before
    # room again (the spool back on the big disk): the sender's retry goes through
    got = await in_thread(session, m, raw)
    assert got[3][0] == 250 and got[4] == (250, b"2.0.0 OK")
    stored = await m.wait_subject("bob", "big one")
    assert stored.size_estimate > 3_000_000


async def test_blob_store_disk_full_gets_452_and_nothing_is_handed_off(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    raw = message("while the disk was full", to="bob@example.com")
    before = await inbound_last_seq(m)
    with full_tmpfs(Path(m.settings.data_dir) / "blobs") as filler:
        got = await in_thread(session, m, raw)
        assert got[3] == STORAGE_FULL and got[4] == (250, b"2.0.0 OK")
        assert await inbound_last_seq(m) == before
        filler.unlink()
        got = await in_thread(session, m, raw)
        assert got[3][0] == 250
        await m.wait_subject("bob", "while the disk was full")


async def test_mailbox_store_disk_full_keeps_the_message_until_there_is_room(
        tmp_path: Path, nats: Nats, dns_server: DnsServer) -> None:  # noqa: F811
    kv_dir = tmp_path / "kv"
    with full_tmpfs(kv_dir, "64m") as filler:
        filler.unlink()  # room for the store to open and the accounts to be made
        m = await start_ingest_mesh(tmp_path, nats, dns_server, mailbox_overrides={"kv_path": str(kv_dir / "m.db")})
        try:
            fill(filler)
            raw = message("waits for room", to="bob@example.com")
            got = await in_thread(session, m, raw)
            assert got[3][0] == 250  # durable in the blob store and INBOUND, which have room
            await asyncio.sleep(1.5)  # delivery attempts meet the full disk
            assert all(msg.subject != "waits for room" for msg in await m.messages("bob"))
            filler.unlink()
            await m.wait_subject("bob", "waits for room", timeout=30)
        finally:
            await stop_ingest_mesh(m)
