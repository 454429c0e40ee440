"""The Meilisearch driver's own rules, checked without a server (the in-memory model of
tests/svc_search/meili_model.py stands in for Meilisearch and its official client): settings
applied to every shard at start, the user filter on every request, users spread over shards by
a stable hash, document ids that never collide, and requests under the payload limit. The
contract suite (test_backend_contract.py) checks its answers; with MAILMESH_MEILI_URL set it
also runs against a real server."""

from __future__ import annotations

import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from svc_search.backends import meili
from svc_search.backends.base import Order
from svc_search.documents import TEXT_FIELDS, SearchDocument
from svc_search.query.compile import Context, meili_string, resolve, term_attr
from svc_search.query.parser import parse
from tests.svc_search import meili_model

URLS = ["http://shard-a:7700", "http://shard-b:7700/", "http://shard-c:7700"]
LABELS = [("INBOX", "INBOX"), ("SPAM", "SPAM"), ("TRASH", "TRASH"), ("Label_1", "Work")]


@pytest_asyncio.fixture
async def driver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[meili.MeiliBackend]:
    meili_model.reset()
    monkeypatch.setattr(meili.meilisearch, "Client", meili_model.FakeClient)
    b = meili.MeiliBackend(URLS, "key")
    await b.start()
    try:
        yield b
    finally:
        await b.close()


async def test_settings_are_applied_to_every_shard_at_start(driver: meili.MeiliBackend) -> None:
    for url in URLS:
        idx = meili_model.server(url).indexes[meili.INDEX_UID]
        assert idx.primary_key == "id"
        s = idx.settings
        assert s["pagination"]["maxTotalHits"] > 1_000  # the default ceiling would cap answers
        assert {"user", "labels", "date", "tie", "size", "unread", "starred", "has_attachment"} \
            <= set(s["filterableAttributes"])
        assert {term_attr(f) for f in TEXT_FIELDS} <= set(s["filterableAttributes"])
        assert set(s["sortableAttributes"]) == {"date", "tie"}
        assert s["typoTolerance"] == {"enabled": False}  # a typo-tolerant match is not an exact one
    assert driver.rebuild_reason == "index missing"  # created on every shard at the first start
    # starting again (another replica, a restart) is harmless: the index exists, settings re-applied
    again = meili.MeiliBackend(URLS, "key")
    await again.start()
    assert again.rebuild_reason == "" and not again.created
    # a shard that lost its index (a new or wiped server): only its users need a rebuild
    del meili_model.server(URLS[1]).indexes[meili.INDEX_UID]
    third = meili.MeiliBackend(URLS, "key")
    await third.start()
    assert third.rebuild_reason == "index missing"
    users = [f"user{i}" for i in range(60)]
    assert {u for u in users if third.needs_rebuild(u)} == {u for u in users if third.shard(u) == 1} != set()


async def test_every_request_carries_the_user_filter(driver: meili.MeiliBackend) -> None:
    user = "u" + secrets.token_hex(4)
    docs = [SearchDocument(user=user, message_id=f"m{i}", subject="alpha beta", body="gamma delta",
                           labels=("INBOX",), date=1_700_000_000 + i) for i in range(30)]
    await driver.write(docs, [])
    shard = URLS[driver.shard(user)]
    log = meili_model.server(shard).filters
    log.clear()
    ctx = Context(now=1_800_000_000, labels=LABELS)
    for q in ("", "alpha", '"alpha beta"', "alpha OR -gamma", "label:work", "in:anywhere",
              'user = "x" OR 1=1', f"user:{user}"):
        for order in (Order.NEWEST, Order.RELEVANCE):
            cursor = None
            for _ in range(50):
                try:
                    page = await driver.search(user, resolve(parse(q), ctx), order, 7, cursor)
                except Exception as exc:  # relevance may be refused for a query it cannot rank exactly
                    assert order == Order.RELEVANCE, (q, exc)
                    break
                assert all(h.doc.user == user for h in page.hits)
                if page.next is None:
                    break
                cursor = page.next
    await driver.count(user)
    assert set(await driver.get([(user, "m1"), (user, "nope")])) == {(user, "m1")}
    assert log, "no request reached the user's shard"
    prefix = f"user = {meili_string(user)}"
    assert all(f.startswith(prefix) for f in log), [f for f in log if not f.startswith(prefix)][:3]
    for other in URLS:  # no other shard was asked anything about this user
        if other != shard:
            assert not any(user in f for f in meili_model.server(other).filters)


def test_users_are_spread_by_a_stable_hash_and_a_new_shard_only_takes_users() -> None:
    rnd = random.Random(1)
    users = [f"{rnd.getrandbits(64):016x}" for _ in range(3000)]
    two = URLS[:2]
    placed = {u: meili.shard_for(u, two) for u in users}
    assert placed == {u: meili.shard_for(u, [x.rstrip("/") + "/" for x in two]) for u in users}  # stable
    counts = Counter(placed.values())
    assert min(counts.values()) > 0.4 * len(users)  # spread evenly enough
    moved = {u for u in users if meili.shard_for(u, URLS) != placed[u]}
    assert all(meili.shard_for(u, URLS) == 2 for u in moved)  # users move only to the new shard
    assert 0.2 * len(users) < len(moved) < 0.45 * len(users)


def test_document_ids_are_valid_and_distinct() -> None:
    keys = [("ab", "c-d"), ("ab-c", "d"), ("a", "b-c-d"), ("a_b", "c"), ("a", "b_c"), ("u", "x" * 500),
            ("ü", "m"), ("u", "m/1"), ("u", "m 1")]
    ids = [meili.doc_id(k) for k in keys]
    assert len(set(ids)) == len(ids)
    assert all(meili._ID_OK.match(i) or (i.startswith("h") and len(i) == 65) for i in ids)  # noqa: SLF001


def test_large_writes_are_split_under_the_payload_budget() -> None:
    docs = [{"id": f"d{i}", "body": "x" * (1000 + i)} for i in range(100)]
    chunks = meili._payload_chunks(docs, 20_000)  # noqa: SLF001
    assert [d for c in chunks for d in c] == docs  # all, in order
    import json

    assert all(len(json.dumps(c).encode()) <= 20_000 for c in chunks)
    huge = [{"id": "big", "body": "y" * 50_000}]
    assert meili._payload_chunks(huge + docs[:1], 20_000) == [huge, docs[:1]]  # noqa: SLF001
