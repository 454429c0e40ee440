"""Every REST resource over real HTTP against the running mesh: profile, labels/folders,
messages (list, get in four formats, attachments, modify, batch modify, trash, untrash, delete),
threads, drafts and send (202, Idempotency-Key, undo), with the JSON shapes clients rely on."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import wait_for as poll
from tests.svc_gateway.conftest import Gateway, raw_message

pytestmark = pytest.mark.asyncio(loop_scope="module")

PDF = b"%PDF-1.4 fake pdf bytes \x00\x01\x02" * 100


def err(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])



async def test_profile_describes_the_account(gateway: Gateway) -> None:
    users = await gateway.user_token("alice")
    alice, token = users["alice"]
    await gateway.append(alice.user_id, raw_message("one"))
    async with gateway.client(token) as http:
        r = await http.get("/v1/profile")
    assert r.status_code == 200
    p = r.json()
    assert p["userId"] == alice.user_id and p["emailAddress"] == alice.email and p["displayName"] == "Alice"
    assert p["messagesTotal"] == "1"  # int64: a string in the protobuf JSON mapping
    assert int(p["historyId"]) > 0


async def test_labels_list_create_rename_delete_with_counts(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    await gateway.append(alice.user_id, raw_message("a"), unread=True)
    await gateway.append(alice.user_id, raw_message("b"), unread=False)
    async with gateway.client(token) as http:
        labels = {lb["id"]: lb for lb in (await http.get("/v1/labels")).json()["labels"]}
        assert labels["INBOX"]["messagesTotal"] == "2" and labels["INBOX"]["messagesUnread"] == "1"
        assert labels["INBOX"]["type"] == "LABEL_TYPE_SYSTEM"
        folders = (await http.get("/v1/folders")).json()["labels"]
        assert {f["id"] for f in folders} == set(labels)

        r = await http.post("/v1/labels", json={"name": "Work/Projects"})
        assert r.status_code == 200, r.text
        created = r.json()
        assert created["name"] == "Work/Projects" and created["type"] == "LABEL_TYPE_USER"
        assert created["messagesTotal"] == "0"
        lid = created["id"]
        assert (await http.get(f"/v1/labels/{lid}")).json()["name"] == "Work/Projects"

        r = await http.patch(f"/v1/labels/{lid}", json={"name": "Work/Done"})
        assert r.status_code == 200 and r.json()["name"] == "Work/Done"
        r = await http.post("/v1/labels", json={"name": "Work/Done"})
        assert r.status_code == 409 and err(r) == "CONFLICT"

        r = await http.delete(f"/v1/labels/{lid}")
        assert r.status_code == 204
        r = await http.get(f"/v1/labels/{lid}")
        assert r.status_code == 404 and err(r) == "NOT_FOUND"
        r = await http.delete("/v1/labels/INBOX")  # system labels are not the user's to remove
        assert r.status_code == 403 and err(r) == "FORBIDDEN"
        r = await http.patch("/v1/labels/INBOX", json={"name": "Mine"})
        assert r.status_code == 403 and err(r) == "FORBIDDEN"


async def test_list_messages_filters_and_shapes(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    uid = alice.user_id
    now = int(datetime.now(UTC).timestamp())
    m_unread = await gateway.append(uid, raw_message("unread one"), unread=True, internal_date=now - 30)
    m_starred = await gateway.append(uid, raw_message("starred"), unread=False, starred=True, internal_date=now - 20)
    m_read = await gateway.append(uid, raw_message("read"), unread=False, internal_date=now - 10)
    m_spam = await gateway.append(uid, raw_message("spam"), labels=("SPAM",), internal_date=now - 5)
    async with gateway.client(token) as http:
        label = (await http.post("/v1/labels", json={"name": "Receipts"})).json()["id"]
        await http.post(f"/v1/messages/{m_read}/modify", json={"addLabelIds": [label]})

        r = await http.get("/v1/messages")
        assert r.status_code == 200
        body = r.json()
        assert [m["id"] for m in body["messages"]] == [m_read, m_starred, m_unread]  # newest first, no SPAM
        assert body["resultSizeEstimate"] == "3" and "nextPageToken" not in body
        first = body["messages"][0]
        assert {"id", "threadId", "labelIds", "unread", "starred", "snippet", "historyId", "internalDate"} <= set(first)
        assert "subject" not in first  # minimal by default

        async def ids(**params: Any) -> list[str]:
            r = await http.get("/v1/messages", params=params)
            assert r.status_code == 200, r.text
            return [m["id"] for m in r.json()["messages"]]

        assert await ids(labelIds="INBOX", unread="true") == [m_unread]
        assert await ids(starred="true") == [m_starred]
        assert await ids(labelIds=[label]) == [m_read]
        assert await ids(labelIds=["INBOX", label]) == [m_read]
        assert await ids(labelIds="SPAM") == [m_spam]
        assert await ids(maxResults=2) == [m_read, m_starred]
        meta = (await http.get("/v1/messages", params={"format": "metadata", "maxResults": 1})).json()["messages"][0]
        assert meta["subject"] == "read" and meta["from"] == [{"name": "Carol", "email": "carol@remote.test"}]

        # q goes to svc_search
        await gateway.settle_search(uid)
        assert await ids(q="subject:starred") == [m_starred]
        assert await ids(q="unread", labelIds="INBOX") == [m_unread]
        assert await ids(q="spam") == []
        assert m_spam in await ids(includeSpamTrash="true")


async def test_get_message_in_each_format(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    raw = raw_message("Report", "See attached.", attachments=[("report.pdf", "application/pdf", PDF)])
    mid = await gateway.append(alice.user_id, raw)
    async with gateway.client(token) as http:
        minimal = (await http.get(f"/v1/messages/{mid}", params={"format": "minimal"})).json()
        assert minimal["id"] == mid and "subject" not in minimal and "textBody" not in minimal
        meta = (await http.get(f"/v1/messages/{mid}", params={"format": "metadata"})).json()
        assert meta["subject"] == "Report" and meta["hasAttachments"] is True and "textBody" not in meta
        full = (await http.get(f"/v1/messages/{mid}")).json()  # full is the default
        assert "See attached." in full["textBody"]
        [att] = full["attachments"]
        assert att["filename"] == "report.pdf" and att["mimeType"] == "application/pdf"
        assert att["size"] == str(len(PDF))
        rawf = (await http.get(f"/v1/messages/{mid}", params={"format": "raw"})).json()
        assert base64.b64decode(rawf["raw"]) == raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") or \
            base64.b64decode(rawf["raw"]).replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
        r = await http.get(f"/v1/messages/{mid}", params={"format": "everything"})
        assert r.status_code == 400 and err(r) == "INVALID_REQUEST"
        r = await http.get("/v1/messages/doesnotexist")
        assert r.status_code == 404 and err(r) == "NOT_FOUND"
        r = await http.get("/v1/messages/bad%2Fid")
        assert r.status_code in (400, 404)


async def test_attachment_is_streamed_as_a_download(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    big = bytes(range(256)) * 4096  # 1 MiB: several stream chunks
    html = b"<script>alert(1)</script>"
    mid = await gateway.append(alice.user_id, raw_message("files", attachments=[
        ("report.pdf", "application/pdf", PDF), ("big.bin", "application/octet-stream", big),
        ("evil \u00e9t\u00e9.html", "text/html", html)]))
    async with gateway.client(token) as http:
        atts = {a["filename"]: a for a in (await http.get(f"/v1/messages/{mid}")).json()["attachments"]}
        r = await http.get(f"/v1/messages/{mid}/attachments/{atts['report.pdf']['attachmentId']}")
        assert r.status_code == 200 and r.content == PDF
        assert r.headers["content-type"] == "application/pdf"
        assert r.headers["content-disposition"].startswith("attachment;")
        assert 'filename="report.pdf"' in r.headers["content-disposition"]
        assert r.headers["x-content-type-options"] == "nosniff"
        r = await http.get(f"/v1/messages/{mid}/attachments/{atts['big.bin']['attachmentId']}")
        assert r.content == big
        name = "evil \u00e9t\u00e9.html"
        r = await http.get(f"/v1/messages/{mid}/attachments/{atts[name]['attachmentId']}")
        assert r.content == html and r.headers["content-disposition"].startswith("attachment;")
        assert "filename*=UTF-8''evil%20%C3%A9t%C3%A9.html" in r.headers["content-disposition"]
        assert r.headers["x-content-type-options"] == "nosniff"
        r = await http.get(f"/v1/messages/{mid}/attachments/99")
        assert r.status_code == 404 and err(r) == "NOT_FOUND"
        r = await http.get(f"/v1/messages/{mid}/attachments/x;y")
        assert r.status_code == 400 and err(r) == "INVALID_REQUEST"


async def test_modify_batch_modify_trash_untrash_delete(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    ids = [await gateway.append(alice.user_id, raw_message(f"m{i}")) for i in range(3)]
    async with gateway.client(token) as http:
        label = (await http.post("/v1/labels", json={"name": "Later"})).json()["id"]
        r = await http.post(f"/v1/messages/{ids[0]}/modify",
                            json={"addLabelIds": [label], "unread": False, "starred": True})
        assert r.status_code == 200, r.text
        m = r.json()
        assert label in m["labelIds"] and m["unread"] is False and m["starred"] is True
        r = await http.post(f"/v1/messages/{ids[0]}/modify", json={"removeLabelIds": ["INBOX"]})
        assert "INBOX" not in r.json()["labelIds"]

        r = await http.post("/v1/messages:batchModify", json={"ids": ids[1:], "addLabelIds": [label], "unread": False})
        assert r.status_code == 200 and sorted(r.json()["modifiedIds"]) == sorted(ids[1:])
        listed = (await http.get("/v1/messages", params={"labelIds": label})).json()["messages"]
        assert {x["id"] for x in listed} == set(ids) and not any(x["unread"] for x in listed)
        r = await http.post("/v1/messages:batchModify", json={"ids": [ids[1], "nosuchmessage"], "unread": True})
        assert r.status_code == 404
        assert (await http.get(f"/v1/messages/{ids[1]}")).json()["unread"] is False  # all or nothing
        r = await http.post("/v1/messages:batchModify", json={"ids": []})
        assert r.status_code == 400 and err(r) == "INVALID_REQUEST"
        r = await http.post(f"/v1/messages/{ids[1]}/modify", json={"addLabelIds": ["Label_nosuch"]})
        assert r.status_code in (400, 404)

        r = await http.post(f"/v1/messages/{ids[1]}/trash")
        assert r.status_code == 200 and "TRASH" in r.json()["labelIds"]
        assert ids[1] not in [x["id"] for x in (await http.get("/v1/messages")).json()["messages"]]
        assert ids[1] in [x["id"] for x in (await http.get("/v1/messages", params={"labelIds": "TRASH"})).json()["messages"]]
        r = await http.post(f"/v1/messages/{ids[1]}/untrash")
        assert r.status_code == 200 and "TRASH" not in r.json()["labelIds"] and label in r.json()["labelIds"]

        r = await http.delete(f"/v1/messages/{ids[2]}")
        assert r.status_code == 204
        r = await http.get(f"/v1/messages/{ids[2]}")
        assert r.status_code == 404
        r = await http.delete(f"/v1/messages/{ids[2]}")
        assert r.status_code == 404 and err(r) == "NOT_FOUND"


async def test_threads_list_and_get(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    first = await gateway.append(alice.user_id, raw_message("Plans", message_id="root@remote.test"))
    from email.message import EmailMessage
    reply = EmailMessage()
    reply["From"] = "Carol <carol@remote.test>"
    reply["To"] = alice.email
    reply["Subject"] = "Re: Plans"
    reply["Message-ID"] = "<reply@remote.test>"
    reply["In-Reply-To"] = "<root@remote.test>"
    reply["References"] = "<root@remote.test>"
    reply.set_content("Sounds good")
    second = await gateway.append(alice.user_id, bytes(reply))
    other = await gateway.append(alice.user_id, raw_message("Unrelated"))
    async with gateway.client(token) as http:
        r = await http.get("/v1/threads")
        assert r.status_code == 200
        threads = r.json()["threads"]
        assert len(threads) == 2 and r.json()["resultSizeEstimate"] == "2"
        plans = next(t for t in threads if t["subject"] == "Plans")
        assert plans["messageCount"] == 2
        r = await http.get(f"/v1/threads/{plans['id']}")
        assert [m["id"] for m in r.json()["messages"]] == [first, second]
        full = (await http.get(f"/v1/threads/{plans['id']}", params={"format": "full"})).json()
        assert "Sounds good" in full["messages"][1]["textBody"]
        r = await http.get("/v1/threads", params={"maxResults": 1})
        assert len(r.json()["threads"]) == 1 and r.json()["nextPageToken"]
        r2 = await http.get("/v1/threads", params={"maxResults": 1, "pageToken": r.json()["nextPageToken"]})
        assert {r.json()["threads"][0]["id"], r2.json()["threads"][0]["id"]} == {t["id"] for t in threads}
        assert other
        r = await http.get("/v1/threads/nosuchthread")
        assert r.status_code == 404 and err(r) == "NOT_FOUND"


async def test_drafts_create_replace_get_list_delete(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    async with gateway.client(token) as http:
        r = await http.post("/v1/drafts", json={"message": {
            "to": [{"name": "Bob", "email": "bob@remote.test"}], "subject": "Draft one", "textBody": "first words",
            "attachments": [{"filename": "notes.txt", "data": base64.b64encode(b"notes").decode()}]}})
        assert r.status_code == 200, r.text
        draft = r.json()
        did, first_msg = draft["id"], draft["message"]["id"]
        assert "DRAFTS" in draft["message"]["labelIds"]

        got = (await http.get(f"/v1/drafts/{did}")).json()
        assert got["id"] == did and got["message"]["subject"] == "Draft one"
        assert "first words" in got["message"]["textBody"]
        assert got["message"]["to"] == [{"name": "Bob", "email": "bob@remote.test"}]
        assert [a["filename"] for a in got["message"]["attachments"]] == ["notes.txt"]

        r = await http.put(f"/v1/drafts/{did}", json={"message": {"subject": "Draft two", "textBody": "better"}})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == did and r.json()["message"]["id"] != first_msg
        got = (await http.get(f"/v1/drafts/{did}")).json()
        assert got["message"]["subject"] == "Draft two"
        assert (await http.get(f"/v1/messages/{first_msg}")).status_code == 404  # the old version is gone

        listed = (await http.get("/v1/drafts")).json()
        assert [d["id"] for d in listed["drafts"]] == [did]
        assert listed["drafts"][0]["message"]["subject"] == "Draft two"

        r = await http.post("/v1/drafts", json={"message": {"to": [{"email": "not an address"}]}})
        assert r.status_code == 400 and err(r) == "INVALID_REQUEST"
        r = await http.post("/v1/drafts", json={"message": {"fromEmail": "someone@else.test"}})
        assert r.status_code == 400

        r = await http.delete(f"/v1/drafts/{did}")
        assert r.status_code == 204
        assert (await http.get(f"/v1/drafts/{did}")).status_code == 404
        assert (await http.get("/v1/drafts")).json()["drafts"] == []
        # a message that is not a draft is not reachable as one
        inbox_msg = await gateway.append(alice.user_id, raw_message("not a draft"))
        r = await http.get(f"/v1/drafts/{inbox_msg}")
        assert r.status_code == 404 and err(r) == "NOT_FOUND"


async def test_send_delivers_honours_idempotency_key_and_can_be_undone(gateway: Gateway) -> None:
    users = await gateway.user_token("alice", "bob")
    (alice, a_tok), (bob, b_tok) = users["alice"], users["bob"]
    body = {"to": [{"name": "Bob", "email": bob.email}], "subject": "Lunch?", "textBody": "At noon.",
            "attachments": [{"filename": "menu.pdf", "mimeType": "application/pdf",
                             "data": base64.b64encode(PDF).decode()}]}
    async with gateway.client(a_tok) as http:
        r = await http.post("/v1/messages", json=body, headers={"Idempotency-Key": "lunch-1"})
        assert r.status_code == 202, r.text
        sent = r.json()
        assert sent["status"] == "SEND_STATUS_QUEUED" and sent["id"] and sent["threadId"] and sent["sendTime"]
        again = await http.post("/v1/messages", json=body, headers={"Idempotency-Key": "lunch-1"})
        assert again.status_code == 202 and again.json()["id"] == sent["id"]
        in_sent = (await http.get("/v1/messages", params={"labelIds": "SENT"})).json()["messages"]
        assert [m["id"] for m in in_sent] == [sent["id"]]  # sent once

    async with gateway.client(b_tok) as http:
        async def arrived() -> list[dict[str, Any]]:
            return (await http.get("/v1/messages", params={"labelIds": "INBOX", "format": "metadata"})).json()["messages"]
        [got] = await poll(arrived, "the message in bob's INBOX")
        assert got["subject"] == "Lunch?" and got["from"][0]["email"] == alice.email

    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    async with gateway.client(a_tok) as http:
        r = await http.post("/v1/messages", json={**body, "subject": "Scheduled", "sendTime": later})
        assert r.status_code == 202 and r.json()["status"] == "SEND_STATUS_SCHEDULED"
        mid = r.json()["id"]
        r = await http.post(f"/v1/messages/{mid}/cancel")
        assert r.status_code == 200, r.text
        assert "DRAFTS" in r.json()["labelIds"]
        r = await http.post(f"/v1/messages/{mid}/cancel")  # undo is idempotent
        assert r.status_code == 200 and "DRAFTS" in r.json()["labelIds"]
        r = await http.post(f"/v1/messages/{sent['id']}/cancel")  # already delivered: too late
        assert r.status_code == 409 and err(r) == "FAILED_PRECONDITION"

        r = await http.post("/v1/messages", json={"to": [{"email": "bad address"}], "subject": "x"})
        assert r.status_code == 400 and err(r) == "INVALID_REQUEST"
        r = await http.post("/v1/messages", json={**body, "sendTime": "tomorrow"})
        assert r.status_code == 400
        r = await http.post("/v1/messages", json={**body, "attachments": [{"filename": "a", "data": "!!!"}]})
        assert r.status_code == 400
        r = await http.post("/v1/messages", json=body, headers={"Idempotency-Key": "k" * 201})
        assert r.status_code == 400


async def test_attachment_over_25_mb_is_413(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    data = base64.b64encode(b"\0" * (25 * 1024 * 1024 + 1)).decode()
    async with gateway.client(token) as http:
        r = await http.post("/v1/messages", json={"to": [{"email": "x@remote.test"}], "subject": "huge",
                                                  "attachments": [{"filename": "big.bin", "data": data}]})
        assert r.status_code == 413 and err(r) == "ATTACHMENT_TOO_LARGE"
        r = await http.post("/v1/drafts", json={"message": {"attachments": [{"filename": "big.bin", "data": data}]}})
        assert r.status_code == 413 and err(r) == "ATTACHMENT_TOO_LARGE"
        assert (await http.get("/v1/messages", params={"labelIds": "SENT"})).json()["messages"] == []


async def test_bad_input_is_400_never_500(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    async with gateway.client(token) as http:
        cases = [
            http.get("/v1/messages", params={"maxResults": 0}),
            http.get("/v1/messages", params={"maxResults": 501}),
            http.get("/v1/messages", params={"maxResults": "many"}),
            http.get("/v1/messages", params={"unread": "perhaps"}),
            http.get("/v1/messages", params={"labelIds": "no such/label"}),
            http.get("/v1/messages", params={"q": "x" * 3000}),
            http.get("/v1/messages", params={"q": "(unbalanced"}),
            http.post("/v1/labels", content=b"{not json", headers={"content-type": "application/json"}),
            http.post("/v1/labels", json={"name": ""}),
            http.post("/v1/labels", json={"name": "x", "extra": 1}),
            http.post("/v1/labels", json=["a list"]),
            http.post("/v1/messages:batchModify", json={"ids": ["a"] * 1001}),
            http.post("/v1/messages", json={"to": "not a list"}),
            http.post("/v1/auth/token", json={"email": "a@b.c"}),
        ]
        for resp in await asyncio.gather(*cases):
            assert resp.status_code == 400, (resp.request.url, resp.text)
            assert err(resp) == "INVALID_REQUEST"
            assert "Traceback" not in resp.text
        r = await http.get("/v1/messages", params={"labelIds": "Label_999"})
        assert r.status_code == 404 and err(r) == "NOT_FOUND"
        r = await http.get("/v1/nothing-here")
        assert r.status_code == 404 and err(r) == "NOT_FOUND"
        r = await http.put("/v1/profile")
        assert r.status_code == 405


async def test_openapi_and_docs_are_served(gateway: Gateway) -> None:
    async with gateway.client() as http:
        r = await http.get("/openapi.json")
        assert r.status_code == 200
        doc = r.json()
        assert doc["openapi"].startswith("3.")
        paths = doc["paths"]
        for p in ("/v1/auth/token", "/v1/messages", "/v1/messages/{message_id}", "/v1/messages:batchModify",
                  "/v1/labels", "/v1/folders", "/v1/threads", "/v1/drafts", "/v1/profile"):
            assert p in paths
        props = doc["components"]["schemas"]["MessageList"]["properties"]
        assert {"messages", "nextPageToken", "resultSizeEstimate"} <= set(props)
        assert "422" not in paths["/v1/messages"]["get"]["responses"]
        docs = await http.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_http_connections_disable_nagle(gateway: Gateway) -> None:
    # a response's header and body segments must not wait for a delayed ACK (40 ms on loopback)
    import socket

    alice, token = (await gateway.user_token("alice"))["alice"]
    async with gateway.client(token) as http:
        assert (await http.get("/v1/profile")).status_code == 200  # the keep-alive connection stays open
        server = gateway.state_components["http_server"]
        socks = [c.transport.get_extra_info("socket") for c in server.server_state.connections]
        assert socks and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)




async def test_a_request_is_one_trace_from_http_to_the_mailbox(gateway: Gateway, spans: InMemorySpanExporter) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    mid = await gateway.append(alice.user_id, raw_message("traced"))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with gateway.client(token) as http:
        r = await http.get(f"/v1/messages/{mid}", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert r.status_code == 200

    async def traced() -> list[Any]:
        return [s for s in spans.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]

    async def both() -> list[Any]:
        names = {s.name for s in await traced()}
        return [names] if "HTTP GET /v1/messages/{message_id}" in names and any(
            "MailboxService/GetMessage" in n for n in names) else []

    await poll(both, "the gateway's and the mailbox's spans of the request")
    server = next(s for s in await traced() if s.name == "HTTP GET /v1/messages/{message_id}")
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/messages/{message_id}"
