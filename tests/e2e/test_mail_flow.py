"""The whole system as its users meet it: `mailmesh up` (nats-server and the five services as
separate processes), administered with the `mailmesh` CLI; a remote server delivers over SMTP to
the MX; the user reads, searches and replies through the REST gateway; the reply reaches the
remote domain's MX (found through DNS) DKIM-signed and in the same thread; one trace follows each
message across the services. Real everything: SMTP, HTTP, gRPC, NATS, SQLite, tantivy, and a
DNS server on loopback for MX/SPF/DKIM/DMARC."""

from __future__ import annotations

import asyncio
import base64
import email
import json
import re
import smtplib
from collections.abc import AsyncIterator
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from mailmesh_common.dns import Resolver
from svc_ingest.checks.dkim import verify_dkim
from tests.conftest import MeshProcess, mesh_env, run_mailmesh, wait_for
from tests.dnsserver import DnsServer, module_dns_server  # noqa: F401 (fixture)
from tests.s3server import make_bucket, s3_client, s3_endpoint  # noqa: F401 (fixture)
from tests.svc_send.conftest import Sink, start_sink

LOCAL = "example.com"
REMOTE = "remote.test"
BANK = "bank.test"
WAIT_S = 45.0
pytestmark = pytest.mark.asyncio(loop_scope="module")



class World:
    def __init__(self, mesh: MeshProcess, dns: DnsServer, sink: Sink, trace_file: Path) -> None:
        self.mesh = mesh
        self.dns = dns
        self.sink = sink
        self.trace_file = trace_file
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{mesh.port('MAILMESH_HTTP_PORT')}",
                                      timeout=30)

    def cli(self, *args: str, stdin: str | None = None) -> str:
        res = run_mailmesh(*args, "--data-dir", str(self.mesh.data_dir), env=self.mesh.env, timeout=60)
        assert res.returncode == 0, f"mailmesh {' '.join(args)}: {res.stdout}{res.stderr}"
        return res.stdout

    async def login(self, email_addr: str, password: str) -> dict[str, str]:
        r = await self.http.post("/v1/auth/token", json={"email": email_addr, "password": password})
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['accessToken']}"}

    def spans(self) -> list[dict[str, Any]]:
        try:
            lines = self.trace_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written right now
                continue
        return out


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["files", "s3"])
async def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                module_dns_server: DnsServer) -> AsyncIterator[World]:  # noqa: F811
    """The mesh with its raw messages in files, then in an S3 bucket (a loopback S3 server)."""
    tmp = tmp_path_factory.mktemp("e2e")
    dns = module_dns_server
    dns.clear()  # shared by both worlds: each publishes its own records (and its own DKIM key)
    sink = await start_sink(tmp)
    # the remote domain: its MX is the sink; its SPF authorizes loopback (where our test "remote
    # server" connects from), its DMARC policy is reject
    dns.add(REMOTE, "MX", (10, f"mx.{REMOTE}"))
    dns.add(f"mx.{REMOTE}", "A", "127.0.0.1")
    dns.add(REMOTE, "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns.add(f"_dmarc.{REMOTE}", "TXT", "v=DMARC1; p=reject")
    # a bank whose mail only ever comes from 192.0.2.1, and which asks for forgeries to be refused
    dns.add(BANK, "TXT", "v=spf1 ip4:192.0.2.1 -all")
    dns.add(f"_dmarc.{BANK}", "TXT", "v=DMARC1; p=reject")
    data_dir = tmp / "data"
    trace_file = tmp / "spans.jsonl"
    env = mesh_env(data_dir) | {
        "MAILMESH_DNS_SERVERS": dns.address,
        "MAILMESH_OUTBOUND_SMTP_PORT": str(sink.port),
        "MAILMESH_TRACE_FILE": str(trace_file),
        "MAILMESH_UNDO_SEND_S": "0",
        "MAILMESH_SMTP_HOSTNAME": f"mx.{LOCAL}",
        "MAILMESH_LOG_LEVEL": "WARNING",
    }
    if request.param == "s3":
        pytest.importorskip("boto3", reason="boto3 is not installed")
        endpoint = request.getfixturevalue("s3_endpoint")
        env |= {"MAILMESH_BLOB_URL": f"s3://{make_bucket(endpoint)}/mail", "MAILMESH_S3_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    mesh = MeshProcess(data_dir, env)
    w = World(mesh, dns, sink, trace_file)
    try:
        await asyncio.to_thread(mesh.wait_up, 90)
        w.cli("domain", "add", LOCAL)
        w.cli("user", "add", f"alice@{LOCAL}", "--name", "Alice", "--password", "correct horse battery")
        out = w.cli("dkim", "keygen", "--domain", LOCAL, "--selector", "e2e")
        record = re.search(r'(v=DKIM1;[^"\n]*p=[A-Za-z0-9+/=]+)', out.replace('" "', ""))
        assert record, f"no TXT record in: {out}"
        dns.add(f"e2e._domainkey.{LOCAL}", "TXT", record.group(1))
        dns.add(LOCAL, "TXT", "v=spf1 ip4:127.0.0.1 -all")
        yield w
    finally:
        await w.http.aclose()
        assert sink.server is not None
        sink.server.close()
        await asyncio.to_thread(mesh.stop)


def _smtp_deliver(port: int, msg: EmailMessage, sender: str = f"carol@{REMOTE}") -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=f"mx.{REMOTE}", timeout=30) as s:
        s.ehlo()
        s.starttls()
        s.ehlo()
        s.send_message(msg, from_addr=sender, to_addrs=[f"alice@{LOCAL}"])


async def test_mail_in_read_search_reply_out(world: World) -> None:
    w = world
    inbound = EmailMessage()
    inbound["From"] = f"Carol <carol@{REMOTE}>"
    inbound["To"] = f"Alice <alice@{LOCAL}>"
    inbound["Subject"] = "Lunch on Thursday?"
    inbound["Message-ID"] = f"<lunch-1@{REMOTE}>"
    inbound["Date"] = email.utils.formatdate(localtime=False)
    inbound.set_content("Shall we try the zanzibarian place on Thursday at noon?\n")
    inbound.add_attachment(b"menu items\n", maintype="text", subtype="plain", filename="menu.txt")
    await asyncio.to_thread(_smtp_deliver, w.mesh.port("MAILMESH_SMTP_PORT"), inbound)

    auth = await w.login(f"alice@{LOCAL}", "correct horse battery")

    async def inbox() -> list[dict[str, Any]] | None:
        r = await w.http.get("/v1/messages", params={"labelIds": "INBOX"}, headers=auth)
        assert r.status_code == 200, r.text
        return r.json()["messages"] or None

    [listed] = await wait_for(inbox, "the message in alice's INBOX over REST", WAIT_S)
    r = await w.http.get(f"/v1/messages/{listed['id']}", params={"format": "full"}, headers=auth)
    assert r.status_code == 200, r.text
    msg = r.json()
    assert msg["subject"] == "Lunch on Thursday?"
    assert "zanzibarian" in msg["textBody"]
    assert msg["from"][0]["email"] == f"carol@{REMOTE}"
    [att] = msg["attachments"]
    assert att["filename"] == "menu.txt"
    r = await w.http.get(f"/v1/messages/{listed['id']}/attachments/{att['attachmentId']}", headers=auth)
    assert r.status_code == 200 and r.content == b"menu items\n"
    raw = await w.http.get(f"/v1/messages/{listed['id']}", params={"format": "raw"}, headers=auth)
    head = base64.urlsafe_b64decode(raw.json()["raw"] + "==").split(b"\r\n\r\n")[0].decode()
    assert re.search(r"Authentication-Results: mx\.example\.com;.*spf=pass", head, re.S), head
    assert f"Received: from mx.{REMOTE}" in head

    async def found() -> list[dict[str, Any]] | None:
        r = await w.http.get("/v1/messages", params={"q": "zanzibarian has:attachment"}, headers=auth)
        assert r.status_code == 200, r.text
        return r.json()["messages"] or None

    hits = await wait_for(found, "the message found by search", WAIT_S)
    assert [h["id"] for h in hits] == [listed["id"]]

    # the reply: through the gateway, svc_send, OUTBOUND, DNS MX → the remote sink
    r = await w.http.post("/v1/messages", headers=auth | {"Idempotency-Key": "reply-1"}, json={
        "to": [{"email": f"carol@{REMOTE}", "name": "Carol"}],
        "subject": "Re: Lunch on Thursday?", "textBody": "Yes, see you at noon.",
        "replyToMessageId": listed["id"]})
    assert r.status_code == 202, r.text
    sent = r.json()
    assert sent["threadId"] == listed["threadId"], "the reply joins the conversation"

    async def delivered() -> Any:
        return w.sink.messages or None

    [out] = await wait_for(delivered, "the reply at the remote MX", WAIT_S)
    parsed = email.message_from_bytes(out.data, policy=policy.default)
    assert parsed["In-Reply-To"] == f"<lunch-1@{REMOTE}>"
    assert out.rcpts == [f"carol@{REMOTE}"] and out.mail_from == f"alice@{LOCAL}"
    results = await verify_dkim(Resolver([w.dns.address]), out.data)
    assert ("rsa-sha256", "pass") in {(x.algorithm, x.result) for x in results}

    async def recorded() -> dict[str, Any] | None:
        r = await w.http.get(f"/v1/messages/{sent['id']}", params={"format": "full"}, headers=auth)
        states = {x["email"]: x["state"] for x in r.json().get("recipients") or []}
        return r.json() if states.get(f"carol@{REMOTE}") == "RECIPIENT_STATE_DELIVERED" else None

    await wait_for(recorded, "the delivery recorded on the SENT message", WAIT_S)
    r = await w.http.get(f"/v1/threads/{listed['threadId']}", headers=auth)
    assert r.status_code == 200
    assert {m["id"] for m in r.json()["messages"]} == {listed["id"], sent["id"]}

    # one trace per message across the services (spans are exported in batches: poll)
    async def inbound_trace() -> set[str] | None:
        spans = w.spans()
        smtp = [s for s in spans if s["service"] == "svc_ingest" and s["name"] == "smtp.session"]
        for s in smtp:
            services = {x["service"] for x in spans if x["trace_id"] == s["trace_id"]}
            if {"svc_ingest", "svc_mailbox", "svc_search"} <= services:
                return services
        return None

    await wait_for(inbound_trace, "one trace from SMTP DATA through the mailbox to the index", WAIT_S)

    async def outbound_trace() -> set[str] | None:
        spans = w.spans()
        for s in spans:
            if s["name"] == "outbound.attempt":
                services = {x["service"] for x in spans if x["trace_id"] == s["trace_id"]}
                if {"svc_gateway", "svc_send"} <= services:
                    return services
        return None

    await wait_for(outbound_trace, "one trace from the REST request to the delivery attempt", WAIT_S)

    # the raw messages went where the configuration says
    url = w.mesh.env.get("MAILMESH_BLOB_URL", "")
    local = w.mesh.data_dir / "blobs"
    if url:
        bucket = url.removeprefix("s3://").split("/")[0]
        keys = s3_client(w.mesh.env["MAILMESH_S3_ENDPOINT_URL"]).list_objects_v2(Bucket=bucket).get("Contents", [])
        assert len(keys) >= 2, "the inbound message and the reply are in the bucket"
        assert not any(p.is_file() for p in local.rglob("*")) if local.exists() else True
    else:
        assert sum(1 for p in local.rglob("*") if p.is_file()) >= 2


async def test_forged_mail_from_a_reject_domain_is_refused(world: World) -> None:
    """The bank's domain says p=reject; mail claiming to be from it, sent from an address its SPF
    does not authorize and unsigned, is refused at DATA: nothing reaches the mailbox."""
    w = world
    forged = EmailMessage()
    forged["From"] = f"Bank <security@{BANK}>"
    forged["To"] = f"alice@{LOCAL}"
    forged["Subject"] = "Urgent wire transfer"
    forged["Message-ID"] = f"<forged-1@{BANK}>"
    forged.set_content("Please pay this invoice today.\n")
    with pytest.raises(smtplib.SMTPDataError) as info:
        await asyncio.to_thread(_smtp_deliver, w.mesh.port("MAILMESH_SMTP_PORT"), forged, f"security@{BANK}")
    assert info.value.smtp_code == 550 and b"5.7.1" in info.value.smtp_error
    auth = await w.login(f"alice@{LOCAL}", "correct horse battery")
    r = await w.http.get("/v1/messages", params={"q": "wire transfer in:anywhere"}, headers=auth)
    assert r.status_code == 200 and r.json()["messages"] == []
