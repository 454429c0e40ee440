"""Bearer tokens: login, every endpoint requiring a valid token, logout, expiry, tokens kept only
as hashes, and failed logins rate limited per account and per client IP."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from svc_gateway.errors import ApiError
from svc_gateway.tokens import TokenStore
from tests.svc_gateway.conftest import PASSWORD, Gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

# one request per authenticated operation of the API (bodies valid enough to pass validation)
PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/auth/logout", None), ("GET", "/v1/profile", None), ("GET", "/v1/labels", None),
    ("GET", "/v1/folders", None), ("POST", "/v1/labels", {"name": "x"}), ("GET", "/v1/labels/INBOX", None),
    ("PATCH", "/v1/labels/Label_1", {"name": "y"}), ("DELETE", "/v1/labels/Label_1", None),
    ("GET", "/v1/messages", None), ("GET", "/v1/messages/abc", None),
    ("GET", "/v1/messages/abc/attachments/2", None), ("POST", "/v1/messages", {"subject": "x"}),
    ("POST", "/v1/messages/abc/cancel", None), ("POST", "/v1/messages/abc/modify", {}),
    ("POST", "/v1/messages:batchModify", {"ids": ["abc"]}), ("POST", "/v1/messages/abc/trash", None),
    ("POST", "/v1/messages/abc/untrash", None), ("DELETE", "/v1/messages/abc", None),
    ("GET", "/v1/threads", None), ("GET", "/v1/threads/abc", None), ("GET", "/v1/drafts", None),
    ("POST", "/v1/drafts", {"message": {}}), ("PUT", "/v1/drafts/abc", {"message": {}}),
    ("GET", "/v1/drafts/abc", None), ("DELETE", "/v1/drafts/abc", None),
]


async def test_login_returns_an_expiring_opaque_token(gateway: Gateway) -> None:
    alice = (await gateway.new_users("alice"))["alice"]
    async with gateway.client() as http:
        r = await http.post("/v1/auth/token", json={"email": alice.email, "password": PASSWORD})
    assert r.status_code == 200
    body = r.json()
    assert body["tokenType"] == "Bearer" and body["userId"] == alice.user_id
    assert body["expiresIn"] == int(gateway.settings.gateway_token_ttl_s)
    assert len(body["accessToken"]) >= 40 and alice.user_id not in body["accessToken"]
    assert body["expireTime"].endswith("Z")


async def test_tokens_are_stored_only_as_hashes(gateway: Gateway) -> None:
    alice = (await gateway.new_users("alice"))["alice"]
    token = await gateway.login(alice.email)
    db = gateway.state.db
    assert db is not None
    rows = await db.run(lambda tr: tr.get_range(b"", b"\xff"), readonly=True)
    assert rows and not any(token.encode() in k or token.encode() in v for k, v in rows)


async def test_wrong_password_and_unknown_account_are_401(gateway: Gateway) -> None:
    alice = (await gateway.new_users("alice"))["alice"]
    async with gateway.client() as http:
        for email, password in ((alice.email, "wrong password"), ("nobody@nowhere.test", PASSWORD)):
            r = await http.post("/v1/auth/token", json={"email": email, "password": password})
            assert r.status_code == 401
            assert r.json() == {"error": {"code": "UNAUTHORIZED", "message": "wrong email or password"}}


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer not-a-real-token", "Basic YWxpY2U6cHc=", "Bearer " + "x" * 5000])
async def test_every_endpoint_requires_a_valid_bearer_token(gateway: Gateway, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    async with gateway.client(headers=headers) as http:
        for method, path, body in PROTECTED:
            r = await http.request(method, path, json=body)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "UNAUTHORIZED"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_logout_revokes_the_token_at_once(gateway: Gateway) -> None:
    alice = (await gateway.new_users("alice"))["alice"]
    token = await gateway.login(alice.email)
    other = await gateway.login(alice.email)
    async with gateway.client(token) as http:
        assert (await http.get("/v1/profile")).status_code == 200
        assert (await http.post("/v1/auth/logout")).status_code == 204
        r = await http.get("/v1/profile")
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
        assert (await http.post("/v1/auth/logout")).status_code == 401
    async with gateway.client(other) as http:  # other sessions of the user stay valid
        assert (await http.get("/v1/profile")).status_code == 200


async def test_an_expired_token_is_401(gateway: Gateway) -> None:
    alice = (await gateway.new_users("alice"))["alice"]
    db = gateway.state.db
    assert db is not None
    short = TokenStore(db, ttl_s=0.5)  # same store, issued with a short lifetime
    token, expires_at = await short.issue(alice.user_id, alice.email)
    async with gateway.client(token) as http:
        assert (await http.get("/v1/profile")).status_code == 200
        while time.time() <= expires_at:
            await asyncio.sleep(0.1)
        assert (await http.get("/v1/profile")).status_code == 401


async def test_failed_logins_are_rate_limited_per_account(gateway: Gateway) -> None:
    alice, bob = (await gateway.new_users("alice", "bob")).values()
    limit = gateway.settings.gateway_login_failures_per_account
    async with gateway.client() as http:
        for _ in range(limit):
            r = await http.post("/v1/auth/token", json={"email": alice.email, "password": "guess"})
            assert r.status_code == 401
        # blocked now, even with the right password
        r = await http.post("/v1/auth/token", json={"email": alice.email.upper(), "password": PASSWORD})
        assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMITED"
        assert int(r.headers["Retry-After"]) > 0
        # another account from the same client is not blocked
        r = await http.post("/v1/auth/token", json={"email": bob.email, "password": PASSWORD})
        assert r.status_code == 200


async def test_failed_logins_are_rate_limited_per_client_ip(gateway: Gateway) -> None:
    users = await gateway.new_users("carol")
    limit = gateway.settings.gateway_login_failures_per_ip
    per_account = gateway.settings.gateway_login_failures_per_account
    async with gateway.client() as http:
        for i in range(limit):  # spread over accounts so that no account limit is reached
            r = await http.post("/v1/auth/token", json={"email": f"u{i // max(per_account - 1, 1)}@spray.test",
                                                        "password": "guess"})
            assert r.status_code in (401, 429)
        r = await http.post("/v1/auth/token", json={"email": users["carol"].email, "password": PASSWORD})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    await gateway.state.limits.login_ip.clear("127.0.0.1")  # the other tests of the module log in from here too


async def test_failed_logins_from_one_ipv6_64_add_up(gateway: Gateway) -> None:
    """A client rotating through the addresses of its IPv6 /64 is still one client."""
    from svc_gateway.limits import Limits

    db = gateway.state.db
    assert db is not None
    lim = Limits(gateway.settings, db)
    for i in range(gateway.settings.gateway_login_failures_per_ip):
        await lim.login_failed(f"spray{i}@example.com", f"2001:db8:7:8::{i + 1:x}")
    with pytest.raises(ApiError) as info:
        await lim.check_login("someone@example.com", "2001:db8:7:8:ffff::1")
    assert info.value.status == 429
    await lim.check_login("someone@example.com", "2001:db8:7:9::1")  # another /64 is another client
    await lim.login_ip.clear("2001:db8:7:8::/64")


async def test_failed_logins_count_across_gateway_replicas(gateway: Gateway) -> None:
    """Two replicas share the KV: guesses spread over them add up, a success on either clears the
    account, and counts leave the window (then `sweep` removes them)."""
    from svc_gateway.limits import _FAILS, SLICES, Limits

    db = gateway.state.db
    assert db is not None
    now = [1_000_000.0]
    replicas = [Limits(gateway.settings, db) for _ in range(2)]
    for lim in replicas:
        for counter in (lim.login_account, lim.login_ip):
            counter.clock = lambda: now[0]
    limit = gateway.settings.gateway_login_failures_per_account
    for i in range(limit):
        await replicas[i % 2].login_failed("victim@example.com", f"203.0.113.{i}")
    for lim in replicas:
        with pytest.raises(ApiError) as info:
            await lim.check_login("victim@example.com", "198.51.100.1")
        assert info.value.status == 429 and info.value.retry_after
    await replicas[0].check_login("other@example.com", "198.51.100.1")  # other accounts are free
    await replicas[1].login_succeeded("victim@example.com")
    await replicas[0].check_login("victim@example.com", "198.51.100.1")
    # failures older than the window no longer count, and the sweep removes them
    for _ in range(limit):
        await replicas[0].login_failed("slow@example.com", "198.51.100.2")
    now[0] += replicas[0].login_account.window_s + replicas[0].login_account.window_s / SLICES
    await replicas[1].check_login("slow@example.com", "198.51.100.2")
    await replicas[0].sweep()
    left = await db.run(lambda tr: list(tr.get_range_startswith(_FAILS.key)), readonly=True)
    assert not any(b"slow@example.com" in k for k, _ in left)
