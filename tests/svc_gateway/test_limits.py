"""Configurable limits: API requests and searches per user per minute (429 + Retry-After), the
request body size (413), CORS origins, and 503 when a backend service is down."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.svc_gateway.conftest import Gateway, module_nats_url, start_gateway, stop_gateway  # noqa: F401

pytestmark = pytest.mark.asyncio(loop_scope="module")

REQUESTS = 30
SEARCHES = 3


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limited(tmp_path_factory: pytest.TempPathFactory, module_nats_url: str) -> AsyncIterator[Gateway]:  # noqa: F811
    gw = await start_gateway(tmp_path_factory.mktemp("gw"), module_nats_url, gateway_requests_per_minute=REQUESTS,
                             gateway_searches_per_minute=SEARCHES, gateway_max_request_bytes=10_000,
                             gateway_cors_origins="https://app.example")
    try:
        yield gw
    finally:
        await stop_gateway(gw)


async def test_requests_per_user_are_rate_limited(limited: Gateway) -> None:
    users = await limited.user_token("alice", "bob")
    async with limited.client(users["alice"][1]) as http:
        statuses = [(await http.get("/v1/labels")).status_code for _ in range(REQUESTS + 5)]
        assert statuses[:REQUESTS - 1].count(200) == REQUESTS - 1  # (a little refills meanwhile)
        assert statuses[-1] == 429
        r = await http.get("/v1/profile")
        assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMITED"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    async with limited.client(users["bob"][1]) as http:  # another user is not affected
        assert (await http.get("/v1/labels")).status_code == 200


async def test_searches_per_user_are_rate_limited(limited: Gateway) -> None:
    alice, token = (await limited.user_token("alice"))["alice"]
    async with limited.client(token) as http:
        statuses = [(await http.get("/v1/messages", params={"q": "hello"})).status_code for _ in range(SEARCHES + 2)]
        assert statuses[:SEARCHES] == [200] * SEARCHES and statuses[-1] == 429
        r = await http.get("/v1/messages", params={"q": "hello"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert (await http.get("/v1/messages")).status_code == 200  # plain listing is not a search


async def test_request_body_over_the_limit_is_413(limited: Gateway) -> None:
    alice, token = (await limited.user_token("alice"))["alice"]
    async with limited.client(token) as http:
        r = await http.post("/v1/labels", json={"name": "x" * 20_000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "ATTACHMENT_TOO_LARGE"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(20):
                yield b" " * 1000

        r = await http.post("/v1/labels", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


async def test_cors_allows_only_configured_origins(limited: Gateway) -> None:
    async with limited.client() as http:
        r = await http.options("/v1/messages", headers={"Origin": "https://app.example",
                                                        "Access-Control-Request-Method": "GET",
                                                        "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = await http.options("/v1/messages", headers={"Origin": "https://evil.example",
                                                        "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in r.headers
        r = await http.get("/openapi.json", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


async def test_a_service_that_is_down_is_503(limited: Gateway) -> None:
    # last test of the module: it stops svc_search
    alice, token = (await limited.user_token("alice"))["alice"]
    search = limited.ctxs.pop(0)
    search.server.stop()
    run_task = search.tasks[-1]
    search.tasks.remove(run_task)
    await run_task
    async with limited.client(token) as http:
        r = await http.get("/v1/messages", params={"q": "anything"})
        assert r.status_code == 503
        assert r.json()["error"] == {"code": "SERVICE_UNAVAILABLE", "message": "service unavailable, try again later"}
        assert (await http.get("/v1/messages")).status_code == 200  # the mailbox still answers
