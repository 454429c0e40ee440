"""Two users cannot see or change each other's messages, labels, attachments, threads or drafts,
by any id, token or page token; page tokens are tamper-proof (400); pagination walks 1,000
messages without gaps or repeats."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from tests.svc_gateway.conftest import Gateway, raw_message

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_pagination_walks_1000_messages_without_gaps_or_repeats(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    base = int(time.time()) - 10_000
    expected: list[str] = []
    for start in range(0, 1000, 50):  # 1,000 messages, some sharing an internal date
        batch = [gateway.append(alice.user_id, raw_message(f"m{i}"), internal_date=base + i // 3)
                 for i in range(start, start + 50)]
        expected.extend(await asyncio.gather(*batch))
    seen: list[str] = []
    pages = 0
    async with gateway.client(token) as http:
        page_token = ""
        while True:
            params: dict[str, str | int] = {"maxResults": 37}
            if page_token:
                params["pageToken"] = page_token
            r = await http.get("/v1/messages", params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["resultSizeEstimate"] == "1000"
            seen.extend(m["id"] for m in body["messages"])
            pages += 1
            page_token = body.get("nextPageToken", "")
            if not page_token:
                break
            assert pages < 100
    assert len(seen) == len(set(seen)) == 1000
    assert set(seen) == set(expected)
    assert pages == 28  # ceil(1000 / 37)


async def test_tampered_page_token_is_400(gateway: Gateway) -> None:
    alice, token = (await gateway.user_token("alice"))["alice"]
    for i in range(3):
        await gateway.append(alice.user_id, raw_message(f"m{i}"))
    async with gateway.client(token) as http:
        page_token = (await http.get("/v1/messages", params={"maxResults": 1})).json()["nextPageToken"]
        raw = bytearray(base64.urlsafe_b64decode(page_token + "=" * (-len(page_token) % 4)))
        raw[-3] ^= 0x01
        tampered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
        for bad in (tampered, page_token[:-2], "garbage", page_token + "AAAA"):
            r = await http.get("/v1/messages", params={"maxResults": 1, "pageToken": bad})
            assert r.status_code == 400, bad
            assert r.json()["error"]["code"] == "INVALID_REQUEST"
        # a token of one listing does not continue another
        r = await http.get("/v1/messages", params={"maxResults": 1, "pageToken": page_token, "unread": "true"})
        assert r.status_code == 400
        thread_token = (await http.get("/v1/threads", params={"maxResults": 1})).json()["nextPageToken"]
        r = await http.get("/v1/messages", params={"pageToken": thread_token})
        assert r.status_code == 400


async def test_users_cannot_reach_each_others_mail(gateway: Gateway) -> None:
    users = await gateway.user_token("alice", "bob")
    (alice, a_tok), (bob, b_tok) = users["alice"], users["bob"]
    secret = b"alice's secret attachment"
    mid = await gateway.append(alice.user_id, raw_message("private", "for alice only",
                                                          attachments=[("s.txt", "text/plain", secret)]))
    for i in range(3):
        await gateway.append(alice.user_id, raw_message(f"more {i}"))
    await gateway.append(bob.user_id, raw_message("bob's own"))
    async with gateway.client(a_tok) as http:
        full = (await http.get(f"/v1/messages/{mid}")).json()
        att_id = full["attachments"][0]["attachmentId"]
        thread_id = full["threadId"]
        a_label = (await http.post("/v1/labels", json={"name": "AliceOnly"})).json()["id"]
        a_draft = (await http.post("/v1/drafts", json={"message": {"subject": "alice draft"}})).json()["id"]
        a_page = (await http.get("/v1/messages", params={"maxResults": 1})).json()["nextPageToken"]
        a_thread_page = (await http.get("/v1/threads", params={"maxResults": 1})).json()["nextPageToken"]
        await gateway.settle_search(alice.user_id, bob.user_id)
        a_search_page = (await http.get("/v1/messages", params={"q": "more", "maxResults": 1})).json()["nextPageToken"]

    async with gateway.client(b_tok) as http:
        listed = (await http.get("/v1/messages")).json()["messages"]
        assert len(listed) == 1 and listed[0]["id"] != mid
        assert (await http.get("/v1/messages", params={"q": "private"})).json()["messages"] == []
        assert (await http.get("/v1/messages", params={"q": "secret", "includeSpamTrash": "true"})).json()["messages"] == []
        assert (await http.get("/v1/messages", params={"includeSpamTrash": "true"})).json()["messages"][0]["id"] != mid
        not_found = [
            http.get(f"/v1/messages/{mid}"), http.get(f"/v1/messages/{mid}", params={"format": "raw"}),
            http.get(f"/v1/messages/{mid}/attachments/{att_id}"),
            http.post(f"/v1/messages/{mid}/modify", json={"unread": False}),
            http.post("/v1/messages:batchModify", json={"ids": [mid], "addLabelIds": ["STARRED"]}),
            http.post(f"/v1/messages/{mid}/trash"), http.post(f"/v1/messages/{mid}/untrash"),
            http.post(f"/v1/messages/{mid}/cancel"),
            http.delete(f"/v1/messages/{mid}"), http.get(f"/v1/threads/{thread_id}"),
            http.get(f"/v1/labels/{a_label}"), http.patch(f"/v1/labels/{a_label}", json={"name": "stolen"}),
            http.delete(f"/v1/labels/{a_label}"),
            http.get("/v1/messages", params={"labelIds": a_label}),
            http.get(f"/v1/drafts/{a_draft}"), http.put(f"/v1/drafts/{a_draft}", json={"message": {"subject": "x"}}),
            http.delete(f"/v1/drafts/{a_draft}"),
        ]
        for r in await asyncio.gather(*not_found):
            assert r.status_code == 404, (r.request.method, r.request.url, r.status_code, r.text)
            assert "private" not in r.text and secret.decode() not in r.text
        for params in ({"pageToken": a_page}, {"pageToken": a_search_page, "q": "more"}):
            r = await http.get("/v1/messages", params=params)
            assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_REQUEST"
        r = await http.get("/v1/threads", params={"pageToken": a_thread_page})
        assert r.status_code == 400
        labels = (await http.get("/v1/labels")).json()["labels"]
        assert a_label not in {lb["id"] for lb in labels} or all(lb["name"] != "AliceOnly" for lb in labels)
        assert (await http.get("/v1/drafts")).json()["drafts"] == []

    async with gateway.client(a_tok) as http:  # nothing of alice's changed
        m = (await http.get(f"/v1/messages/{mid}")).json()
        assert m["unread"] is True and "TRASH" not in m["labelIds"] and "STARRED" not in m["labelIds"]
        assert (await http.get(f"/v1/labels/{a_label}")).json()["name"] == "AliceOnly"
        assert (await http.get(f"/v1/drafts/{a_draft}")).json()["message"]["subject"] == "alice draft"
