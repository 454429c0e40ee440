"""DATA as it arrives on the wire (RFC 5321 4.1.1.4, 4.5.2): dot-stuffed lines come back
unstuffed, a line that is only a dot inside the body does not end it, the end of data may
arrive split over many TCP segments, and commands pipelined after the final dot are answered."""

from __future__ import annotations

import socket

import pytest

from tests.svc_ingest.conftest import IngestMesh, in_thread, message

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = (".leading dot\r\n..two dots\r\n.\r\n"  # the lone dot is body (smtplib stuffs it to "..")
        "middle\r\n\r\n.\r\n..\r\nlast line.\r\n")


def send(m: IngestMesh, raw: bytes) -> dict[str, tuple[int, bytes]]:
    with m.smtp() as s:
        return s.sendmail("sender@remote.test", ["alice@example.com"], raw)


async def test_dot_stuffed_lines_are_stored_unstuffed(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    raw = message("dots", body=BODY)
    assert await in_thread(send, m, raw) == {}
    got = await m.wait_subject("alice", "dots")
    stored = await m.raw("alice", got.id)
    assert stored.endswith(raw.split(b"\r\n\r\n", 1)[1]), stored[-200:]


def byte_by_byte(m: IngestMesh, raw: bytes) -> list[bytes]:
    """One session written a byte per segment, QUIT pipelined after the final dot; the replies."""
    stuffed = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in raw.split(b"\r\n"))
    with socket.create_connection(("127.0.0.1", m.smtp_port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")

        def reply() -> bytes:
            lines = [f.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(f.readline())
            return b"".join(lines)

        out = [reply()]
        for cmd in (b"EHLO client.remote.test\r\n", b"MAIL FROM:<sender@remote.test>\r\n",
                    b"RCPT TO:<alice@example.com>\r\n", b"DATA\r\n"):
            s.sendall(cmd)
            out.append(reply())
        for b in stuffed + b".\r\nQUIT\r\n":  # the end of data and the next command together
            s.sendall(bytes([b]))
        out.append(reply())
        out.append(reply())
    return out


async def test_data_split_into_single_bytes_with_quit_pipelined(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    raw = message("byte by byte", body=".x\r\n\r\n.\r\nend\r\n")
    replies = await in_thread(byte_by_byte, m, raw)
    assert replies[4].startswith(b"354"), replies
    assert replies[5].startswith(b"250 2.0.0"), replies
    assert replies[6].startswith(b"221"), replies
    got = await m.wait_subject("alice", "byte by byte")
    assert (await m.raw("alice", got.id)).endswith(b"\r\n\r\n.x\r\n\r\n.\r\nend\r\n")


async def test_empty_message_and_one_line_message(shared_ingest: IngestMesh) -> None:
    def session(m: IngestMesh) -> list[tuple[int, bytes]]:
        with m.smtp() as s:
            s.ehlo()
            s.mail("sender@remote.test")
            s.rcpt("alice@example.com")
            empty = s.data(b"")  # smtplib sends just the final dot
            s.mail("sender@remote.test")
            s.rcpt("alice@example.com")
            one = s.data(b"Subject: one line")
            return [empty, one]
    empty, one = await in_thread(session, shared_ingest)
    assert empty[0] == 250 and one[0] == 250, (empty, one)
    await shared_ingest.wait_subject("alice", "one line")


def cut_off(m: IngestMesh) -> None:
    """A session that goes away in the middle of DATA."""
    with socket.create_connection(("127.0.0.1", m.smtp_port), timeout=60) as s:
        f = s.makefile("rb")
        f.readline()
        for cmd in (b"EHLO client.remote.test\r\n", b"MAIL FROM:<sender@remote.test>\r\n",
                    b"RCPT TO:<alice@example.com>\r\n", b"DATA\r\n"):
            s.sendall(cmd)
            while f.readline()[3:4] == b"-":
                pass
        s.sendall(message("cut off").replace(b"Hello there.", b"half a mess"))  # no final dot


async def test_a_message_cut_off_before_its_final_dot_is_not_accepted(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    await in_thread(cut_off, m)
    assert await in_thread(send, m, message("after the cut")) == {}
    inbox = await m.wait_for("alice", lambda ms: any(x.subject == "after the cut" for x in ms))
    assert not any(x.subject == "cut off" for x in inbox)
