"""Long operations in bounded, resumable transactions: deleting an account, rebuilding counters,
exporting a mailbox (RPCs and the admin CLI)."""

from __future__ import annotations

import asyncio
import mailbox as stdlib_mailbox
import os
import sys
from pathlib import Path

import grpc
import pytest
from mailmesh.v1 import mailbox_service_pb2 as pb

from mailmesh_common.kv import encode_counter
from svc_mailbox import jobs, keys
from tests.svc_mailbox.conftest import Mesh, start_mesh, stop_mesh

RAW = ("From: Carol <carol@remote.test>\r\nTo: {to}\r\nSubject: message {i}\r\n"
       "Message-ID: <m{i}-{tag}@remote.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n"
       "Body {i}\r\nFrom the start of a line\r\n")


async def fill(mesh: Mesh, user: str, n: int, tag: str, label_ids: tuple[str, ...] = ("INBOX",)) -> list[str]:
    ids: list[str] = []
    for start in range(0, n, 50):
        rs = await asyncio.gather(*(mesh.stub.AppendMessage(pb.AppendMessageRequest(
            parent=f"users/{user}", raw=RAW.format(i=i, tag=tag, to="x@example.com").encode(),
            label_ids=list(label_ids), unread=i % 2 == 0), metadata=mesh.md(user))
            for i in range(start, min(n, start + 50))))
        ids += [r.message.id for r in rs]
    return ids


async def user_keys(mesh: Mesh, user: str) -> int:
    db = mesh.ctx.components["mailbox"].db
    b, e = keys.u_range(user)
    return len(await db.run(lambda tr: tr.get_range(b, e, limit=10), readonly=True))


async def test_delete_account_spans_many_batches_and_leaves_nothing(mesh: Mesh, users: dict[str, str]) -> None:
    alice, bob = users["alice"], users["bob"]
    n = jobs.DELETE_BATCH * 2 + 17
    await fill(mesh, alice, n, "a")
    await fill(mesh, bob, 3, "b")
    r = await mesh.stub.DeleteAccount(pb.DeleteAccountRequest(name=f"users/{alice}"), metadata=mesh.md())
    assert r.deleted_messages == n
    res = await mesh.stub.ResolveRecipient(pb.ResolveRecipientRequest(address="alice@example.com"),
                                           metadata=mesh.md())
    assert res.resolution == pb.RECIPIENT_RESOLUTION_UNKNOWN_USER
    for call in (mesh.stub.GetAccount(pb.GetAccountRequest(name=f"users/{alice}"), metadata=mesh.md()),
                 mesh.stub.ListMessages(pb.ListMessagesRequest(parent="users/me"), metadata=mesh.md(alice)),
                 mesh.stub.Authenticate(pb.AuthenticateRequest(email="alice@example.com",
                                                               password="correct horse battery"), metadata=mesh.md())):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED)
    assert await user_keys(mesh, alice) == 0
    # bob is untouched, and the address can be given to a new account
    assert len((await mesh.stub.ListMessages(pb.ListMessagesRequest(parent="users/me"),
                                             metadata=mesh.md(bob))).messages) == 3
    again = await mesh.stub.CreateAccount(pb.CreateAccountRequest(email="alice@example.com", password="a new password"),
                                          metadata=mesh.md())
    assert again.account.user_id != alice and again.account.messages_total == 0
    # the deleted mail's blobs are released (collected after the grace period)
    assert await mesh.ctx.components["mailbox"].collect_blobs(grace_s=0) >= n
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.DeleteAccount(pb.DeleteAccountRequest(name=f"users/{alice}"), metadata=mesh.md())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.DeleteAccount(pb.DeleteAccountRequest(name=f"users/{bob}"), metadata=mesh.md(bob))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_interrupted_account_deletion_finishes_after_restart(tmp_path: Path, nats_url: str) -> None:
    mesh = await start_mesh(tmp_path, nats_url)
    try:
        users = await mesh.admin_setup()
        alice = users["alice"]
        await fill(mesh, alice, jobs.DELETE_BATCH + 5, "r")
        mb = mesh.ctx.components["mailbox"]
        job = await mb.write(alice, jobs.start_delete_account)
        await mb.write(alice, lambda m: jobs.step(m, job))  # one batch, then "crash"
        assert await user_keys(mesh, alice) > 0
    finally:
        await stop_mesh(mesh)
    mesh = await start_mesh(tmp_path, nats_url)  # resumes pending jobs at start
    try:
        assert await user_keys(mesh, alice) == 0
        res = await mesh.stub.ResolveRecipient(pb.ResolveRecipientRequest(address="alice@example.com"),
                                               metadata=mesh.md())
        assert res.resolution == pb.RECIPIENT_RESOLUTION_UNKNOWN_USER
    finally:
        await stop_mesh(mesh)


async def test_recount_repairs_damaged_counters(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    await fill(mesh, alice, 30, "c")
    before = {lb.id: lb for lb in (await mesh.stub.ListLabels(pb.ListLabelsRequest(parent="users/me"),
                                                             metadata=mesh.md(alice))).labels}
    db = mesh.ctx.components["mailbox"].db

    def damage(tr: object) -> None:
        tr.set(keys.u(alice, "lctr", "INBOX", "total"), encode_counter(999))  # type: ignore[attr-defined]
        tr.set(keys.u(alice, "lctr", "INBOX", "unread"), encode_counter(-4))  # type: ignore[attr-defined]
        tr.set(keys.u(alice, "ctr", "total"), encode_counter(7))  # type: ignore[attr-defined]

    await db.run(damage)
    r = await mesh.stub.RecountMailbox(pb.RecountMailboxRequest(name=f"users/{alice}"), metadata=mesh.md())
    after = {lb.id: lb for lb in r.labels}
    assert (after["INBOX"].messages_total, after["INBOX"].messages_unread) == (30, 15)
    assert after["INBOX"].threads_total == before["INBOX"].threads_total
    assert r.account.messages_total == 30
    assert r.account.used_bytes == sum(len(RAW.format(i=i, tag="c", to="x@example.com")) for i in range(30))


async def test_export_streams_everything_and_resumes(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    ids = await fill(mesh, alice, 120, "e")
    spam = await fill(mesh, alice, 3, "s", ("SPAM",))
    got = [x async for x in mesh.stub.ExportMessages(pb.ExportMessagesRequest(parent="users/me"),
                                                     metadata=mesh.md(alice))]
    assert sorted(x.message.id for x in got) == sorted(ids + spam)
    assert all(x.raw.startswith(b"From: Carol") for x in got)
    # resume from the middle: the rest, without repeats
    middle = got[59].next_page_token
    rest = [x async for x in mesh.stub.ExportMessages(pb.ExportMessagesRequest(parent="users/me", page_token=middle),
                                                      metadata=mesh.md(alice))]
    assert [x.message.id for x in rest] == [x.message.id for x in got[60:]]
    only_spam = [x async for x in mesh.stub.ExportMessages(pb.ExportMessagesRequest(parent="users/me", label_id="spam"),
                                                           metadata=mesh.md(alice))]
    assert sorted(x.message.id for x in only_spam) == sorted(spam)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in mesh.stub.ExportMessages(pb.ExportMessagesRequest(parent="users/me", page_token="garbage"),
                                                metadata=mesh.md(alice)):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in mesh.stub.ExportMessages(pb.ExportMessagesRequest(parent=f"users/{alice}"),
                                                metadata=mesh.md(users["bob"])):
            pass
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def run_cli(mesh: Mesh, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}
    env["MAILMESH_MAILBOX_PORT"] = str(mesh.settings.mailbox_port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailmesh_common.cli.main", *args, "--data-dir", str(mesh.settings.data_dir), env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_export_recount_delete(mesh: Mesh, users: dict[str, str], tmp_path: Path) -> None:
    alice = users["alice"]
    await fill(mesh, alice, 12, "cli")
    out = tmp_path / "alice.mbox"
    code, _, err = await run_cli(mesh, "user", "export", "alice@example.com", "-o", str(out))
    assert code == 0, err
    box = stdlib_mailbox.mbox(str(out))
    msgs = list(box)
    assert len(msgs) == 12
    assert all(m["X-Mailmesh-Labels"] == "INBOX" for m in msgs)
    assert all("\n>From the start of a line" in m.get_payload() for m in msgs)  # mboxrd quoting
    code, text, err = await run_cli(mesh, "user", "recount", "alice@example.com")
    assert code == 0 and "12 messages" in text, err
    code, _, err = await run_cli(mesh, "user", "delete", "alice@example.com")
    assert code == 2 and "--yes" in err
    code, text, err = await run_cli(mesh, "user", "delete", "alice@example.com", "--yes")
    assert code == 0 and "12 messages" in text, err
    code, _, err = await run_cli(mesh, "user", "delete", "alice@example.com", "--yes")
    assert code == 1 and "NOT_FOUND" in err


async def test_huge_header_lists_fit_the_record_limit(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    to = ", ".join(f'"{"Long Name " * 20}{i}" <recipient-number-{i}@example.org>' for i in range(2000))
    refs = " ".join(f"<ref-{i}-{'x' * 200}@example.org>" for i in range(500))
    raw = (f"From: a@remote.test\r\nTo: {to}\r\nReferences: {refs}\r\nSubject: big\r\n\r\nbody\r\n").encode()
    assert len(raw) > 500_000
    r = await mesh.stub.AppendMessage(pb.AppendMessageRequest(parent="users/me", raw=raw, label_ids=["INBOX"]),
                                      metadata=mesh.md(alice))
    m = (await mesh.stub.GetMessage(pb.GetMessageRequest(name=f"users/me/messages/{r.message.id}"),
                                    metadata=mesh.md(alice))).message
    assert m.ByteSize() < 100_000 and len(m.to) >= 1
    assert any("cut" in w for w in m.parse_warnings)
    full = await mesh.stub.GetMessage(pb.GetMessageRequest(name=f"users/me/messages/{r.message.id}", format=4),
                                      metadata=mesh.md(alice))
    assert full.message.raw == raw
