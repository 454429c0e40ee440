"""Every operator of the query language, with positive and negative cases, against a real
tantivy index fed through the real EVENTS path (mailbox → relay → NATS → indexer)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import pytest_asyncio
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import search_service_pb2 as pb

from tests.svc_search.conftest import Search, new_users

pytestmark = pytest.mark.asyncio(loop_scope="module")


def day(y: int, m: int, d: int, h: int = 12) -> datetime:
    return datetime(y, m, d, h, tzinfo=UTC)


@dataclass
class Corpus:
    s: Search
    alice: str
    bob: str
    ids: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.ids[name]

    def all_but(self, *names: str) -> list[str]:
        """Every visible (not SPAM/TRASH) message except `names`."""
        hidden = {"spam", "trash", *names}
        return [v for k, v in self.ids.items() if k not in hidden and not k.startswith("bob_")]

    async def expect(self, query: str, *names: str) -> None:
        await self.s.expect(self.alice, query, [self.ids[n] for n in names])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def corpus(searchmesh: Search) -> Corpus:
    s = searchmesh
    u = await new_users(s, "alice", "bob")
    alice, bob = u["alice"], u["bob"]
    md = s.mesh.md()
    work = (await s.mesh.stub.CreateLabel(mpb.CreateLabelRequest(parent=f"users/{alice}", name="Work"),
                                          metadata=md)).label.id
    travel = (await s.mesh.stub.CreateLabel(mpb.CreateLabelRequest(parent=f"users/{alice}", name="Travel/2024"),
                                            metadata=md)).label.id
    now = datetime.now(UTC)
    me = (await s.mesh.stub.GetAccount(mpb.GetAccountRequest(name=f"users/{alice}"), metadata=md)).account.email
    ids = {
        "cafe": await s.add(alice, "Café meeting tomorrow",
                            "Let's meet at the café near the station. Bring the quarterly report.",
                            frm="Bob Builder <bob@builder.test>", when=day(2024, 3, 10)),
        "report": await s.add(alice, "Quarterly report", "Attached is the quarterly report for Q1.",
                              frm="Dana Scully <dana@fbi.test>", cc="Fox Mulder <fox@fbi.test>",
                              attachments=[("report-q1.pdf", b"%PDF-1.4 quarterly numbers")],
                              unread=False, starred=True, when=day(2024, 4, 2)),
        "html": await s.add(alice, "Invoice 4711", "", frm="Billing <billing@shop.test>",
                            html="<p>Your <b>invoice</b> number 4711 is ready</p><script>evilscript()</script>",
                            when=day(2023, 12, 24)),
        "sent": await s.add(alice, "Lunch plans", "How about sushi on friday?", frm=f"Alice <{me}>",
                            to="Eve <eve@example.org>", bcc="Secret Keeper <secret@hidden.test>", labels=["SENT"],
                            unread=False, when=day(2024, 5, 20)),
        "spam": await s.add(alice, "You won a prize", "Claim your quarterly prize now", frm="Win <win@spam.test>",
                            labels=["SPAM"], when=day(2024, 5, 21)),
        "trash": await s.add(alice, "Old newsletter", "quarterly newsletter, unsubscribe here", labels=["TRASH"],
                             when=day(2022, 1, 1)),
        "big": await s.add(alice, "Large photos", "see the photos from the trip",
                           attachments=[("holiday.jpg", b"\xff\xd8" + bytes(300 * 1024))],
                           labels=["INBOX", travel], when=day(2024, 6, 1)),
        "work": await s.add(alice, "Project Phoenix status",
                            "The phoenix project is on track.\n\n> On Monday Grace wrote:\n> what about the budget?",
                            frm="Grace Hopper <grace@navy.test>", to="Alice <alice@example.com>, Team <team@example.com>",
                            labels=["INBOX", work], when=day(2024, 2, 15)),
        "recent": await s.add(alice, "Fresh news", "recent things happen", when=now - timedelta(days=1)),
        # bob shares many of alice's words: none of his mail may ever show up in alice's results
        "bob_1": await s.add(bob, "Quarterly report", "quarterly report café phoenix sushi invoice 4711",
                             frm="Dana Scully <dana@fbi.test>", attachments=[("report-q1.pdf", b"x")],
                             when=day(2024, 4, 2)),
        "bob_2": await s.add(bob, "Café", "the café bob builder", frm="Bob Builder <bob@builder.test>",
                             starred=True, when=day(2024, 3, 10)),
    }
    await s.settle(alice, bob)
    return Corpus(s, alice, bob, ids)


async def test_words_are_case_and_accent_insensitive(corpus: Corpus) -> None:
    await corpus.expect("quarterly", "cafe", "report")
    await corpus.expect("QUARTERLY", "cafe", "report")
    await corpus.expect("cafe", "cafe")
    await corpus.expect("CAFÉ", "cafe")
    await corpus.expect("quarterly station", "cafe")  # every word must match
    await corpus.expect("quarterly nonexistentword")
    await corpus.expect("zebra")


async def test_phrases(corpus: Corpus) -> None:
    await corpus.expect('"quarterly report"', "cafe", "report")
    await corpus.expect('"bring the quarterly report"', "cafe")
    await corpus.expect('"report quarterly"')  # order matters
    await corpus.expect('"meet station"')  # adjacency matters
    await corpus.expect("phoenix-project", "work")  # punctuation inside a word makes a phrase
    await corpus.expect("project.phoenix", "work")
    await corpus.expect("track-phoenix")


async def test_from_to_cc_bcc(corpus: Corpus) -> None:
    await corpus.expect("from:bob", "cafe")
    await corpus.expect("from:bob@builder.test", "cafe")
    await corpus.expect("from:builder.test", "cafe")
    await corpus.expect('from:"Dana Scully"', "report")
    await corpus.expect("from:fox")  # Fox is only in Cc
    await corpus.expect("from:me", "sent")
    await corpus.expect("to:eve", "sent")
    await corpus.expect("to:team@example.com", "work")
    await corpus.expect("to:grace")
    await corpus.expect("cc:fox", "report")
    await corpus.expect("cc:mulder", "report")
    await corpus.expect("cc:dana")
    await corpus.expect("bcc:secret", "sent")
    await corpus.expect("bcc:eve")


async def test_subject_and_filename(corpus: Corpus) -> None:
    await corpus.expect("subject:invoice", "html")
    await corpus.expect("subject:report", "report")  # the café mail has "report" only in its body
    await corpus.expect("subject:(phoenix status)", "work")
    await corpus.expect("subject:(phoenix -status)")
    await corpus.expect('subject:"meeting tomorrow"', "cafe")
    await corpus.expect("subject:sushi")
    await corpus.expect("filename:pdf", "report")
    await corpus.expect("filename:report-q1.pdf", "report")
    await corpus.expect("filename:holiday.jpg", "big")
    await corpus.expect("filename:docx")
    await corpus.expect("filename:quarterly")  # words of the body are not file names


async def test_has_and_is(corpus: Corpus) -> None:
    await corpus.expect("has:attachment", "report", "big")
    await corpus.expect("-has:attachment", *[k for k in corpus.ids if k not in
                                               ("report", "big", "spam", "trash") and not k.startswith("bob_")])
    await corpus.expect("is:starred", "report")
    await corpus.expect("is:read", "report", "sent")
    await corpus.s.expect(corpus.alice, "is:unread", corpus.all_but("report", "sent"))
    await corpus.expect("is:unread quarterly", "cafe")


async def test_in_and_label(corpus: Corpus) -> None:
    await corpus.expect("in:sent", "sent")
    await corpus.expect("in:inbox has:attachment", "report", "big")
    await corpus.expect("in:spam", "spam")
    await corpus.expect("in:trash", "trash")
    await corpus.expect("quarterly", "cafe", "report")  # SPAM and TRASH are excluded by default
    await corpus.expect("in:anywhere quarterly", "cafe", "report", "spam", "trash")
    await corpus.expect("quarterly in:spam", "spam")
    await corpus.expect("label:work", "work")
    await corpus.expect("label:WORK", "work")
    await corpus.expect("label:travel-2024", "big")
    await corpus.expect('label:"Travel/2024"', "big")
    await corpus.expect("label:travel")  # a parent name is another label
    await corpus.expect("label:nosuchlabel")
    await corpus.expect("-label:work phoenix")


async def test_dates(corpus: Corpus) -> None:
    await corpus.expect("after:2024/04/01 before:2024/06/01", "report", "sent")
    await corpus.expect("after:2024/03/10 before:2024/03/11", "cafe")  # after: includes the day
    await corpus.expect("before:2024/03/10 after:2024/01/01", "work")  # before: excludes it
    await corpus.expect("before:2024/01/01", "html")
    await corpus.expect("after:2030/01/01")
    await corpus.expect("newer_than:2d", "recent")
    await corpus.expect("newer_than:1y -newer_than:2d")
    await corpus.s.expect(corpus.alice, "older_than:2d", corpus.all_but("recent"))
    await corpus.expect("older_than:2d newer_than:2d")
    await corpus.expect("after:2024-03-10 before:2024-03-11", "cafe")


async def test_sizes(corpus: Corpus) -> None:
    await corpus.expect("larger:200K", "big")
    await corpus.expect("larger:1M")
    await corpus.s.expect(corpus.alice, "smaller:200K", corpus.all_but("big"))
    await corpus.expect("larger:200000 smaller:1M", "big")


async def test_negation_or_and_parentheses(corpus: Corpus) -> None:
    await corpus.expect("from:bob OR from:dana", "cafe", "report")
    await corpus.expect("(from:bob OR from:dana) -is:starred", "cafe")
    await corpus.expect("quarterly -station", "report")
    await corpus.expect("quarterly AND station", "cafe")
    await corpus.expect("sushi OR phoenix OR invoice", "sent", "work", "html")
    await corpus.expect("-(quarterly OR phoenix) has:attachment", "big")
    # Gmail precedence: OR binds tighter than the implicit AND
    await corpus.expect("quarterly station OR attached", "cafe", "report")


async def test_bodies_html_and_quoted_replies(corpus: Corpus) -> None:
    await corpus.expect("invoice 4711", "html")
    await corpus.expect("evilscript")  # scripts are not text
    await corpus.expect("budget", "work")  # quoted replies are kept


async def test_users_never_see_each_others_documents(corpus: Corpus) -> None:
    s, alice, bob = corpus.s, corpus.alice, corpus.bob
    for q in ("quarterly", "café", "phoenix", "sushi", "from:dana", "filename:pdf", "is:starred", "",
              "in:anywhere", "larger:0", "-zebra"):
        a = set(await s.ids(alice, q))
        b = set(await s.ids(bob, q))
        assert not a & b, q
        assert not {corpus["bob_1"], corpus["bob_2"]} & a, q
        assert b <= {corpus["bob_1"], corpus["bob_2"]}, q
    # alice may not search bob's mailbox, not even with a page token of bob's
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.stub.Search(pb.SearchRequest(parent=f"users/{bob}", query="quarterly"), metadata=s.md(alice))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    r = await s.page(bob, "", page_size=1)
    assert r.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.page(alice, "", page_size=1, token=r.next_page_token)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a token is bound to its query too, and cannot be altered
    r = await s.page(alice, "quarterly", page_size=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.page(alice, "phoenix", page_size=1, token=r.next_page_token)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    tampered = r.next_page_token[:-2] + ("A" if r.next_page_token[-2] != "A" else "B") + r.next_page_token[-1]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.page(alice, "quarterly", page_size=1, token=tampered)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_backend_syntax_is_searched_as_text(corpus: Corpus) -> None:
    s, alice, bob = corpus.s, corpus.alice, corpus.bob
    for q in (f"user:{bob}", f"user_id:{bob}", f'user = "{bob}"', "*", "* OR *", "field:", "quarterly:*",
              'labels = "SPAM" OR labels = "TRASH"', f'quarterly" OR user = "{bob}', "t_body = quarterly",
              'NOT user = "x"', "\\", "'", "quarterly' OR 1=1 --", "(*)", "key:*", "id IN [1]"):
        try:
            got = set(await s.ids(alice, q))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (q, exc)
            continue
        assert not {corpus["bob_1"], corpus["bob_2"], corpus["spam"], corpus["trash"]} & got, q
    await s.expect(alice, "*", corpus.all_but())  # punctuation only: every visible message
    await corpus.expect("quarterly:*", "cafe", "report")
    await corpus.expect('labels = "SPAM"')


async def test_pages_follow_each_other_newest_first(corpus: Corpus) -> None:
    s, alice = corpus.s, corpus.alice
    everything = await s.ids(alice, "", page_size=100)
    assert len(everything) == len(corpus.all_but())
    paged = await s.ids(alice, "", page_size=2)
    assert paged == everything
    r = await s.page(alice, "", page_size=3)
    assert r.result_size_estimate == len(everything)
    dates = [x.internal_date.seconds for x in r.results]
    assert dates == sorted(dates, reverse=True)
    assert r.results[0].message_id == corpus["recent"]
    rel = await s.ids(alice, "quarterly report", order=pb.SEARCH_ORDER_RELEVANCE, page_size=1)
    assert sorted(rel) == sorted([corpus["cafe"], corpus["report"]])
    top = await s.page(alice, "quarterly report", order=pb.SEARCH_ORDER_RELEVANCE)
    assert top.results[0].message_id == corpus["report"]  # the words are in its subject too
    assert top.results[0].score >= top.results[1].score > 0


async def test_snippets_highlight_the_query_words(corpus: Corpus) -> None:
    r = await corpus.s.page(corpus.alice, "station")
    (hit,) = r.results
    assert hit.thread_id
    assert "station" in hit.snippet
    marked = [hit.snippet[h.start:h.end] for h in hit.highlights]
    assert marked == ["station"]
    r = await corpus.s.page(corpus.alice, "CAFE -zebra")
    marked = [r.results[0].snippet[h.start:h.end] for h in r.results[0].highlights]
    assert marked == ["café"]


async def test_malformed_queries_say_where_and_what(corpus: Corpus) -> None:
    cases = {
        "(quarterly": ("character 11", "')'"),
        "from:": ("character 6", "a value after from:"),
        "is:sleeping": ("character 4", "is:unread|read|starred|important"),
        "after:2024/13/01": ("character 7", "a date YYYY/MM/DD"),
        "larger:lots": ("character 8", "a size"),
        'subject:"unterminated': ("character 22", "closing quote"),
        "quarterly OR": ("character 13", "a term after OR"),
        "older_than:5w": ("character 12", "3d, 2m or 1y"),
    }
    for q, (where, what) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await corpus.s.page(corpus.alice, q)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, q
        assert where in (err.value.details() or "") and what in (err.value.details() or ""), (q, err.value.details())
