"""The spam filter: chi-squared combining, the model in the KV store (idempotent training,
class flips, atomic counters shared by replicas, per-user adjustments), rules and verdict
headers, and accuracy on a held-out split of the development corpus."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import string
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import fdb.tuple
import pytest

from mailmesh_common.kv import Database, Subspace, open_database
from svc_ingest.spam.bayes import _tuple_str, chi2_combine, chi2_evidence, clues_of, token_prob
from svc_ingest.spam.bytemodel import BUCKETS, PREFIX_BYTES, grams
from svc_ingest.spam.combine import BYTES_SCALE, FEATURES, Combiner, features, regression
from svc_ingest.spam.filter import (
    BAYES_MAX,
    DEFAULT_THRESHOLD,
    POINTS_PER_LOGIT,
    AuthSummary,
    SpamFilter,
    Verdict,
    bayes_test,
)
from svc_ingest.spam.rules import CAPS_MIN_LETTERS, CAPS_SHARE, DEFAULT_WEIGHTS, SCAN_TEXT_CHARS, _mostly_caps
from svc_ingest.spam.tokenizer import GROUPS, analyze
from tests.conftest import REPO, child_env

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "spam"

# Held-out figures the accuracy test guards (measured: see test_held_out_accuracy). The
# issue's target is detection >= 99 % with false positives <= 0.1 %; on this corpus this
# content-only filter does not reach it (see the test's docstring).
MIN_DETECTION = 0.93
MAX_FALSE_POSITIVES = 0


def held_out(name: str) -> bool:
    """The deterministic 80/20 split: a file is held out when sha256(file name) % 5 == 0."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0


def mail(subject: str, body: str, *, sender: str = "Someone <someone@example.org>",
         mid: str | None = None, extra: str = "", date: bool = True) -> bytes:
    lines = [f"From: {sender}", "To: alice@example.com", f"Subject: {subject}"]
    if date:
        lines.append("Date: Mon, 1 Jul 2002 10:00:00 +0000")
    if mid != "":
        lines.append(f"Message-ID: <{mid or hashlib.sha1((subject + body).encode()).hexdigest()}@example.org>")
    head = "\n".join(lines) + ("\n" + extra.strip("\n") if extra else "")
    return (head + "\n\n" + body + "\n").encode()


HAM_WORDS = "meeting agenda project review notes schedule thanks team draft budget minutes".split()
SPAM_WORDS = "viagra cheap pills casino winner lottery mortgage refinance offer bonus unsubscribe".split()


def corpus(words: list[str], n: int, tag: str) -> list[bytes]:
    out = []
    for i in range(n):
        picked = [words[(i * 7 + k * 3) % len(words)] for k in range(8)]
        out.append(mail(f"{tag} {picked[0]} {i}", " ".join(picked) + f" ref{tag}{i}", mid=f"{tag}-{i}"))
    return out


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = open_database(tmp_path / "spam.db")
    yield database
    await database.close()


# --- combining -------------------------------------------------------------------------------

def test_robinson_f_and_fisher_chi_squared() -> None:
    assert token_prob(0, 0, 10, 10) == 0.5  # never seen: x
    assert token_prob(1, 0, 10, 10) == pytest.approx(1.05 / 1.1)  # (s*x + n*p) / (s + n), s=0.1
    assert token_prob(0, 1, 10, 10) == pytest.approx(0.05 / 1.1)
    assert 0.5 < token_prob(1, 0, 10, 10) < token_prob(10, 0, 10, 10) < 1.0  # more evidence, surer
    assert token_prob(10, 10, 100, 10) < 0.5  # ratios, not raw counts
    assert chi2_combine([]) == 0.5
    assert chi2_combine([0.99] * 20) > 0.99
    assert chi2_combine([0.01] * 20) < 0.01
    assert chi2_combine([0.99] * 20 + [0.01] * 20) == pytest.approx(0.5, abs=0.05)
    assert chi2_combine([0.999999] * 5000) <= 1.0  # no underflow
    spam_ev, ham_ev = chi2_evidence([0.99] * 20 + [0.01] * 20)  # strong evidence both ways...
    assert spam_ev > 0.99 and ham_ev > 0.99
    assert chi2_evidence([0.55, 0.45]) < (0.9, 0.9)  # ...is not the same as weak evidence
    assert chi2_evidence([]) == (0.5, 0.5)
    clues = clues_of({"a": (9, 0), "b": (5, 5), "c": (0, 9)}, 10, 10)
    assert sorted(t for t, _ in clues) == ["a", "c"]  # "b" is too close to 0.5 to count


def test_fast_key_encoding_is_fdb_tuple_encoding() -> None:
    space = Subspace(("spam",)).subspace(("g",))
    for token in ("hello", "bi:free money", "nul\x00byte", "ünïcödé", ""):
        fast = space.pack(("t",)) + _tuple_str(token) + _tuple_str("s")
        assert fast == space.pack(("t", token, "s")) == space.key + fdb.tuple.pack(("t", token, "s"))


# --- training in the KV store ----------------------------------------------------------------

async def test_training_is_idempotent_and_a_flip_moves_the_counts(db: Database) -> None:
    flt = SpamFilter(db)
    raw = mail("Cheap pills", "buy cheap pills now", mid="pills-1")
    assert await flt.train(raw, is_spam=True) == (1, 0)
    assert await flt.train(raw, is_spam=True) == (1, 0)  # same message, same class: no-op
    # the stored copy carries our trace headers: still the same message (same Message-ID)
    stored = b"Received: from mx (mx [192.0.2.1]) by us\nX-Spam-Score: 9.0\n" + raw
    assert await flt.train(stored, is_spam=True) == (1, 0)
    tokens = analyze(raw).tokens
    counts = await flt.model.token_counts(tokens)
    assert counts["pills"] == (1, 0)
    assert await flt.train(raw, is_spam=False) == (0, 1)  # untrain spam, train ham
    counts = await flt.model.token_counts(tokens)
    assert counts["pills"] == (0, 1)
    assert set(counts) == set(tokens)
    assert await flt.model.forget(flt_key(raw))
    assert await flt.counts() == type(await flt.counts())(0, 0)
    assert await flt.model.token_counts(tokens) == {}


def flt_key(raw: bytes) -> str:
    from svc_ingest.spam.filter import message_key

    return message_key(analyze(raw))


async def test_messages_without_message_id_are_keyed_by_content(db: Database) -> None:
    flt = SpamFilter(db)
    a = mail("hello", "one", mid="")
    b = mail("hello", "two", mid="")
    await flt.train(a, is_spam=False)
    await flt.train(a, is_spam=False)
    assert await flt.train(b, is_spam=False) == (0, 2)


async def test_replicas_sharing_the_store_lose_no_updates(tmp_path: Path) -> None:
    dbs = [open_database(tmp_path / "shared.db") for _ in range(2)]
    try:
        filters = [SpamFilter(d) for d in dbs]
        msgs = corpus(SPAM_WORDS, 30, "s")
        await asyncio.gather(*(filters[i % 2].train(raw, is_spam=True) for i, raw in enumerate(msgs)))
        counts = await filters[0].counts()
        assert (counts.spam, counts.ham) == (30, 0)
        token_counts = await filters[1].model.token_counts(["pills", "viagra"])
        assert token_counts["viagra"][0] == sum(1 for raw in msgs if b"viagra" in raw.split(b"\n\n")[1])
    finally:
        for d in dbs:
            await d.close()


async def test_bulk_training_matches_one_by_one(tmp_path: Path) -> None:
    msgs = [(raw, True) for raw in corpus(SPAM_WORDS, 15, "s")] + \
           [(raw, False) for raw in corpus(HAM_WORDS, 15, "h")]
    one, bulk = open_database(tmp_path / "one.db"), open_database(tmp_path / "bulk.db")
    try:
        a, b = SpamFilter(one), SpamFilter(bulk)
        for raw, is_spam in msgs:
            await a.train(raw, is_spam=is_spam)
        assert await b.train_many(msgs + msgs[:5], batch=7) == (15, 15)  # repeats are no-ops
        tokens = sorted({t for raw, _ in msgs for t in analyze(raw).tokens})
        assert await a.model.token_counts(tokens) == await b.model.token_counts(tokens)
    finally:
        await one.close()
        await bulk.close()


async def test_a_training_transaction_over_the_time_limit_is_split(db: Database) -> None:
    from mailmesh_common.kv import TransactionTimedOut

    class SlowOnce:
        """A store whose first write transaction runs out of time (a loaded machine)."""

        def __init__(self, inner: Database) -> None:
            self.inner = inner
            self.writes = 0

        async def run(self, fn, *, readonly: bool = False):  # type: ignore[no-untyped-def]
            if not readonly:
                self.writes += 1
                if self.writes == 1:
                    raise TransactionTimedOut("transaction exceeded the 5 s limit")
            return await self.inner.run(fn, readonly=readonly)

    slow = SlowOnce(db)
    flt = SpamFilter(slow)  # type: ignore[arg-type]
    assert await flt.train_many([(raw, True) for raw in corpus(SPAM_WORDS, 10, "s")]) == (10, 0)
    # the whole batch, then its two halves; then the byte model's step on the 10 (one transaction)
    assert slow.writes == 4


async def test_a_byte_model_transaction_over_the_time_limit_is_split(tmp_path: Path) -> None:
    from mailmesh_common.kv import TransactionTimedOut

    class SlowSecond:
        """A store whose second write transaction (the byte model's) runs out of time."""

        def __init__(self, inner: Database) -> None:
            self.inner = inner
            self.writes = 0

        async def run(self, fn, *, readonly: bool = False):  # type: ignore[no-untyped-def]
            if not readonly:
                self.writes += 1
                if self.writes == 2:
                    raise TransactionTimedOut("transaction exceeded the 5 s limit")
            return await self.inner.run(fn, readonly=readonly)

    messages = [(raw, True) for raw in corpus(SPAM_WORDS, 5, "s")] + [(raw, False) for raw in corpus(HAM_WORDS, 5, "h")]
    weights = []
    for name, wrap in (("plain", False), ("slow", True)):
        db = open_database(tmp_path / f"{name}.db")
        try:
            store = SlowSecond(db) if wrap else db
            flt = SpamFilter(store)  # type: ignore[arg-type]
            await flt.train_many(messages, user_id="erin")
            weights.append((await flt.bytes.snapshot()).weights)
            if isinstance(store, SlowSecond):
                assert store.writes == 4  # counts; the byte model's 10 timed out; its two halves
        finally:
            await db.close()
    assert weights[0] == weights[1] and any(weights[0])  # nothing lost, nothing learnt twice


# --- scoring ---------------------------------------------------------------------------------

async def trained(db: Database, *, fit: bool = False, **kw: object) -> SpamFilter:
    flt = SpamFilter(db, **kw)  # type: ignore[arg-type]
    await flt.train_many([(raw, True) for raw in corpus(SPAM_WORDS, 25, "s")]
                         + [(raw, False) for raw in corpus(HAM_WORDS, 25, "h")], fit=fit)
    return flt


async def test_untrained_model_abstains_and_rules_alone_score(db: Database) -> None:
    flt = SpamFilter(db)
    v = await flt.classify(mail("hello", "how are you"))
    assert v == Verdict(0.0, False, "No, score=0.0 required=5.0 tests=none")
    v = await flt.classify(mail("FREE MONEY FOR YOU NOW", "hi", mid="", date=False))
    assert v.score == pytest.approx(1.0 + 1.0 + 0.8)
    assert "tests=MISSING_DATE,MISSING_MID,SUBJ_ALL_CAPS" in v.status
    assert not v.is_spam


async def test_trained_model_separates_spam_from_ham(db: Database) -> None:
    flt = await trained(db)
    spam = await flt.classify(mail("winner bonus", "cheap pills casino lottery offer viagra"))
    ham = await flt.classify(mail("project review", "meeting agenda notes team schedule"))
    assert spam.is_spam and spam.score >= 5.0
    assert spam.status.startswith(f"Yes, score={spam.score:.1f} required=5.0 tests=BAYES_99")
    assert not ham.is_spam and ham.score < 0
    assert "BAYES_00" in ham.status
    assert SpamFilter.headers(spam) == [("X-Spam-Score", f"{spam.score:.1f}"),
                                        ("X-Spam-Status", spam.status)]


async def test_threshold_is_configurable(db: Database) -> None:
    raw = mail("PLEASE READ THIS NOW", "hello", mid="", date=False)
    assert not (await SpamFilter(db).classify(raw)).is_spam
    strict = await SpamFilter(db, threshold=2.5).classify(raw)
    assert strict.is_spam and "required=2.5" in strict.status


async def test_auth_failures_and_passes_are_rules(db: Database) -> None:
    flt = SpamFilter(db)
    raw = mail("hello", "hi")
    failed = await flt.classify(raw, auth=AuthSummary(spf="fail", dkim="fail", dmarc="fail"))
    assert failed.is_spam and failed.score == pytest.approx(1.5 + 1.0 + 2.5)
    assert "tests=DKIM_FAIL,DMARC_FAIL,SPF_FAIL" in failed.status
    soft = await flt.classify(raw, auth=AuthSummary(spf="softfail"))
    assert "SPF_SOFTFAIL" in soft.status
    good = await flt.classify(raw, auth=AuthSummary(spf="pass", dkim="pass", dmarc="pass"))
    assert good.score < 0 and "DKIM_VALID,DMARC_PASS,SPF_PASS" in good.status
    assert (await flt.classify(raw)).score == 0.0  # auth None: not checked, no auth rules


async def test_header_and_link_rules(db: Database) -> None:
    flt = SpamFilter(db)
    html = ('<html><body><p>Your account: <a href="http://203.0.113.9/login">'
            'https://www.mybank.example/login</a></p></body></html>')
    raw = mail("Account notice", html, sender='"service@mybank.com" <x1234@phish.net>',
               extra="MIME-Version: 1.0\nContent-Type: text/html; charset=utf-8")
    v = await flt.classify(raw)
    for test in ("FROM_NAME_DOMAIN_MISMATCH", "LINK_TEXT_HOST_MISMATCH", "LINK_TO_IP",
                 "HTML_ONLY_LITTLE_TEXT"):
        assert test in v.status
    same = mail("hi", "x", sender='"news@shop.com" <news@mail.shop.com>')
    assert "FROM_NAME" not in (await flt.classify(same)).status
    image = mail("look", '<html><body><img src="http://x.example/a.gif"></body></html>',
                 extra="Content-Type: text/html")
    assert "HTML_IMAGE_ONLY" in (await flt.classify(image)).status


def test_caps_share_counts_exactly_as_the_per_character_loop() -> None:
    """BODY_MOSTLY_CAPS counts ASCII text's letters in C; the answer is the per-character one."""
    def plain(text: str) -> bool:
        head = text[:SCAN_TEXT_CHARS]
        letters = sum(map(str.isalpha, head))
        return letters >= CAPS_MIN_LETTERS and sum(map(str.isupper, head)) > CAPS_SHARE * letters

    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n" + "ÄéΣσ"
    texts = ["", "A" * 199, "A" * 200, "a" * 5000 + "B" * 5000, "FREE MONEY " * 40, "Free money " * 40,
             "ÉCRIT EN MAJUSCULES " * 30]
    texts += ["".join(rng.choice(alphabet[: rng.choice((62, len(alphabet) - 4, len(alphabet)))])
                      for _ in range(rng.randint(150, 6000))) for _ in range(300)]
    texts += ["".join(rng.choice("AaB ") for _ in range(rng.randint(300, 700))) for _ in range(100)]
    for text in texts:
        assert _mostly_caps(text) is plain(text), text[:80]
    assert {plain(t) for t in texts} == {True, False}


async def test_message_form_rules(db: Database) -> None:
    """How 2002-era spam tools built their mail shows in X-Spam-Status; well-formed mail
    fires none of these rules."""
    flt = SpamFilter(db)
    form_rules = ("HTML_COMMENT_SPLIT", "HTML_IN_TEXT_PLAIN", "TEXT_BASE64", "BODY_MOSTLY_CAPS",
                  "MID_NO_AT", "DATE_MALFORMED", "FROM_EMPTY_COMMENT", "PRIORITY_HIGH")
    plain = await flt.classify(mail("Lunch", "<p> is a tag name; see you at noon, " + "Bob " * 60))
    assert not any(rule in plain.status for rule in form_rules), plain.status
    html = "<html><body>Cheap V<!-- 1 -->iagra and C<!-- 2 -->ialis today</body></html>"
    encoded = mail("offer", base64.b64encode(html.encode()).decode(),
                   extra="MIME-Version: 1.0\nContent-Type: text/html\nContent-Transfer-Encoding: base64")
    status = (await flt.classify(encoded)).status
    assert "HTML_COMMENT_SPLIT" in status and "TEXT_BASE64" in status

    def multipart(text_encoding: str) -> bytes:  # as SMTP delivers it: CRLF line endings
        text = "See the attached report." if text_encoding == "7bit" else \
            base64.b64encode(b"See the attached report.").decode()
        head = mail("report", "", extra='MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"')
        body = ("--b\nContent-Type: text/plain; charset=us-ascii\n"
                f"Content-Transfer-Encoding: {text_encoding}\n\n{text}\n"
                "--b\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
                f"{base64.b64encode(b'%PDF-1.4').decode()}\n--b--\n")
        return (head.decode().rstrip("\n") + "\n\n" + body).replace("\n", "\r\n").encode()

    assert "TEXT_BASE64" not in (await flt.classify(multipart("7bit"))).status  # only the PDF is base64
    assert "TEXT_BASE64" in (await flt.classify(multipart("base64"))).status
    tagged = mail("offer", "<html><body><font size=4>Act now</font><br></body></html>")
    assert "HTML_IN_TEXT_PLAIN" in (await flt.classify(tagged)).status
    shouting = mail("offer", "YOU HAVE BEEN SELECTED TO RECEIVE A FREE GIFT. " * 8)
    assert "BODY_MOSTLY_CAPS" in (await flt.classify(shouting)).status
    ratware = mail("offer", "hello", sender="someone@example.org ()", mid="", date=False,
                   extra="Message-ID: <1234.5678.abcdef>\nDate: Thu, 18 Jul 2002 21:16:12\nX-Priority: 1")
    status = (await flt.classify(ratware)).status
    for rule in ("MID_NO_AT", "DATE_MALFORMED", "FROM_EMPTY_COMMENT", "PRIORITY_HIGH"):
        assert rule in status, (rule, status)
    short_year = mail("offer", "hello", date=False, extra="Date: Thu, 18 Jul 02 21:16:12 +0000")
    assert "DATE_MALFORMED" in (await flt.classify(short_year)).status


@pytest.mark.parametrize("fit", [False, True], ids=["fixed-mapping", "combiner"])
async def test_per_user_adjustments_move_only_that_users_scores(db: Database, fit: bool) -> None:
    flt = await trained(db, fit=fit)
    digests = [mail(f"quarterly digest {i}", f"garden club digest roses tulips soil issue{i}",
                    mid=f"garden-{i}") for i in range(12)]
    for raw in digests[:8]:  # everyone's mail: the garden digest is ham
        await flt.train(raw, is_spam=False)
    for raw in digests[:4]:  # bob says it is spam (for him, and as feedback to the global model)
        await flt.train(raw, is_spam=True, user_id="bob")
    probe = digests[11]
    bob, alice = await flt.classify(probe, user_id="bob"), await flt.classify(probe, user_id="alice")
    assert not alice.is_spam
    if fit:  # the combiner's scale: one point per unit of log-odds, the cut at 5.0
        assert bob.score > alice.score + 0.5, (bob, alice)
    else:
        assert bob.score > alice.score + 3, (bob, alice)
        assert bob.is_spam
    mine = await flt.counts("bob")
    assert (mine.spam, mine.ham) == (4, 0)
    glob = await flt.counts()
    assert (glob.spam, glob.ham) == (25 + 4, 25 + 8 - 4)  # bob's 4 moved from ham to spam


# --- the byte model --------------------------------------------------------------------------

def test_byte_grams_skip_the_mbox_line_and_read_a_bounded_prefix() -> None:
    body = b"Subject: hi\n\nhello there\n"
    assert sorted(grams(b"From spammer@x.test Mon Jul  1 10:00:00 2002\n" + body)) == sorted(grams(body))
    assert grams(b"From nobody") == []  # only an envelope line: nothing to learn
    assert len(grams(body)) == len(set(grams(body))) > 10  # distinct buckets
    assert all(0 <= b < BUCKETS for b in grams(body))
    long = body + b"x" * 50_000
    assert sorted(grams(long)) == sorted(grams(long[:PREFIX_BYTES]))  # only the first PREFIX_BYTES bytes count
    assert grams(body + b"x" * PREFIX_BYTES) != grams(body + b"y" * PREFIX_BYTES)


async def test_byte_model_learns_from_training_and_users_and_replicas_share_it(tmp_path: Path) -> None:
    dbs = [open_database(tmp_path / "shared.db") for _ in range(2)]
    try:
        trainer, replica = SpamFilter(dbs[0]), SpamFilter(dbs[1])
        spam_probe = grams(mail("winner bonus", "cheap pills casino lottery offer viagra"))
        ham_probe = grams(mail("project review", "meeting agenda notes team schedule"))
        snap = await replica.bytes.snapshot()
        assert not snap.trained and snap.logit(spam_probe) == 0.0
        # training without a fit (`spam train --no-fit`, feedback): one online step per message
        messages = [m for pair in zip(((raw, True) for raw in corpus(SPAM_WORDS, 20, "s")),
                                      ((raw, False) for raw in corpus(HAM_WORDS, 20, "h")), strict=True)
                    for m in pair]  # online learning: interleaved, as mail arrives
        await trainer.train_many(messages)
        learned = await trainer.bytes.snapshot()
        assert learned.logit(spam_probe) > 0 > learned.logit(ham_probe)
        assert (await replica.bytes.snapshot()).logit(spam_probe) == 0.0  # within the TTL: cached
        replica.bytes.ttl_s = 0  # the TTL passes: the other replica's training shows
        assert (await replica.bytes.snapshot()).logit(spam_probe) == learned.logit(spam_probe)
        # idempotent like the token counts: the same messages again change nothing
        await trainer.train_many(messages)
        await trainer.train(messages[0][0], is_spam=True)
        assert (await trainer.bytes.snapshot()).weights == learned.weights
        # a user's judgement moves that user's adjustments (and the global weights)
        digest = mail("winner bonus digest", "cheap pills casino lottery offer viagra", mid="d-1")
        before = await replica.score(analyze(digest), "carol")
        await replica.train(digest, is_spam=False, user_id="carol")
        assert await replica.bytes.user_logit("carol", grams(digest)) < 0
        assert await replica.bytes.user_logit("dave", grams(digest)) == 0.0
        after = await trainer.score(analyze(digest), "carol")
        assert before.byte_logit is None and after.byte_logit is None  # no combiner stored yet
        assert (await replica.bytes.snapshot()).logit(grams(digest)) < learned.logit(grams(digest))
        # a fit stores the byte model it trained beside the combiner; feedback learnt stays on top
        await trainer.train_many(messages, fit=True)
        assert trainer.fitted is not None and trainer.fitted.byte_weights is not None
        carol = (await trainer.score(analyze(digest), "carol")).byte_logit
        anyone = (await trainer.score(analyze(digest))).byte_logit
        assert carol is not None and anyone is not None and carol < anyone
        fitted = await trainer.score(analyze(mail("winner bonus", "cheap pills casino lottery offer viagra")))
        assert fitted.byte_logit is not None and fitted.byte_logit > 0
    finally:
        for d in dbs:
            await d.close()


# --- the learned combiner --------------------------------------------------------------------

async def test_bulk_training_fits_a_combiner_every_replica_scores_with(tmp_path: Path) -> None:
    dbs = [open_database(tmp_path / "shared.db") for _ in range(2)]
    try:
        trainer, replica = SpamFilter(dbs[0]), SpamFilter(dbs[1])
        spam_probe = mail("winner bonus", "cheap pills casino lottery offer viagra")
        ham_probe = mail("project review", "meeting agenda notes team schedule")
        assert not (await replica.classify(spam_probe)).is_spam  # untrained: rules alone
        await trainer.train_many([(raw, True) for raw in corpus(SPAM_WORDS, 25, "s")]
                                 + [(raw, False) for raw in corpus(HAM_WORDS, 25, "h")], fit=True)
        fitted = trainer.fitted
        assert fitted is not None
        assert fitted.cv["spam"] == 25 and fitted.cv["ham"] == 25
        assert fitted.cv["detection_rate"] == 1.0 and fitted.cv["false_positive_rate"] == 0.0
        stored = await SpamFilter(dbs[1]).model.combiner()  # what every replica reads
        assert stored is not None and Combiner.from_bytes(stored) == fitted
        spam = await replica.classify(spam_probe)
        ham = await replica.classify(ham_probe)
        assert spam.is_spam and spam.score > DEFAULT_THRESHOLD + 1, spam
        assert not ham.is_spam and ham.score < DEFAULT_THRESHOLD - 1, ham
        assert spam.status.startswith(f"Yes, score={spam.score:.1f} required=5.0 tests=BAYES_99")
        assert "BAYES_00" in ham.status
        # the score is the combiner's: threshold + (log-odds - cut) points, not the fixed 6.0
        analysis = analyze(spam_probe)
        bayes = await replica.score(analysis)
        # the byte model `train` fitted beside the combiner is in the store, and replicas use it
        assert bayes.byte_logit is not None and bayes.byte_logit > 0
        ham_bytes = (await replica.score(analyze(ham_probe))).byte_logit
        assert ham_bytes is not None and ham_bytes < 0
        z = fitted.log_odds(features(bayes.probability, {g: (sp, hm) for g, sp, hm in bayes.parts}, [],
                                     bayes.byte_logit))
        assert spam.score == pytest.approx(DEFAULT_THRESHOLD + POINTS_PER_LOGIT * (z - fitted.cut), abs=0.01)
        assert [g for g, _, _ in bayes.parts] == list(GROUPS)
        parts = {g: (sp, hm) for g, sp, hm in bayes.parts}
        assert parts["content"][0] > 0.99 and parts["content"][1] < 0.01  # spam words, no ham ones
    finally:
        for d in dbs:
            await d.close()


async def test_rules_the_combiner_did_not_learn_keep_their_points(db: Database) -> None:
    flt = await trained(db, fit=True)
    assert flt.fitted is not None and not flt.fitted.learned("MISSING_DATE")  # never fired in training
    raws = [mail("winner bonus", "cheap pills casino offer", mid="p1", date=d) for d in (True, False)]
    dated, undated = [await flt.classify(raw) for raw in raws]
    # the Date line's bytes also move the byte model's input a little: that part is the combiner's
    logits = [(await flt.score(analyze(raw))).byte_logit or 0.0 for raw in raws]
    moved = flt.fitted.weights[FEATURES.index("bytes")] * (logits[1] - logits[0]) / BYTES_SCALE
    assert undated.score == pytest.approx(dated.score + DEFAULT_WEIGHTS["MISSING_DATE"] + moved, abs=0.011)
    assert "MISSING_DATE" in undated.status
    ham = mail("project review", "meeting agenda notes team schedule", mid="h1")
    passed = await flt.classify(ham, auth=AuthSummary(spf="pass", dkim="pass", dmarc="pass"))
    failed = await flt.classify(ham, auth=AuthSummary(spf="fail", dkim="fail", dmarc="fail"))
    assert failed.score - passed.score == pytest.approx(1.5 + 1.0 + 2.5 + 0.1 + 0.1 + 0.3, abs=0.011)


async def test_too_little_training_fits_nothing_and_keeps_the_stored_combiner(db: Database) -> None:
    flt = await trained(db, fit=True)
    stored = flt.fitted
    assert stored is not None
    few = [(raw, True) for raw in corpus(SPAM_WORDS, 5, "fs")] + [(raw, False) for raw in corpus(HAM_WORDS, 5, "fh")]
    await flt.train_many(few, fit=True)
    assert flt.fitted is None
    assert Combiner.from_bytes(await flt.model.combiner() or b"") == stored
    user = SpamFilter(db)
    await user.train_many([(raw, True) for raw in corpus(SPAM_WORDS, 30, "u")], user_id="bob", fit=True)
    assert user.fitted is None  # per-user training never refits the global combiner
    # a fit on fewer messages than the stored one's is not stored, unless asked to
    smaller = [(raw, True) for raw in corpus(SPAM_WORDS, 21, "sms")] + \
        [(raw, False) for raw in corpus(HAM_WORDS, 21, "smh")]
    await flt.train_many(smaller, fit=True)
    assert flt.fitted is None and "kept the stored one" in flt.fit_note
    assert await flt.combiner() == stored
    await flt.train_many(smaller, fit=True, refit=True)
    assert flt.fitted is not None and flt.fitted.messages == 42
    assert await SpamFilter(db).combiner() == flt.fitted


async def test_a_combiner_for_other_features_is_ignored(db: Database) -> None:
    flt = await trained(db, fit=True)
    assert flt.fitted is not None
    doc = json.loads(flt.fitted.to_bytes())
    doc["features"] = [*doc["features"], "SOME_FUTURE_RULE"]
    doc["weights"] = [*doc["weights"], 1.0]
    await flt.model.set_combiner(json.dumps(doc).encode())
    assert Combiner.from_bytes(json.dumps(doc).encode()) is None
    v = await flt.classify(mail("winner bonus", "cheap pills casino lottery offer viagra"))
    assert v.score == pytest.approx(BAYES_MAX, abs=0.05)  # back on the fixed mapping
    await flt.model.set_combiner(b"not json")
    assert (await flt.classify(mail("winner bonus", "cheap pills casino lottery offer viagra"))).is_spam


async def test_a_combiner_fitted_before_new_rules_still_scores(db: Database) -> None:
    """After an upgrade that adds local rules, the stored fit keeps scoring: the new rules
    count with their fixed points until `spam train` learns them."""
    flt = await trained(db, fit=True)
    assert flt.fitted is not None
    doc = json.loads(flt.fitted.to_bytes())
    new_rule = "MISSING_DATE"
    at = doc["features"].index(new_rule)
    del doc["features"][at], doc["weights"][at]
    doc["cv"].pop(f"hits:{new_rule}", None)
    older = Combiner.from_bytes(json.dumps(doc).encode())
    assert older is not None and older.cut == flt.fitted.cut
    assert older.weights[at] == 0.0 and not older.learned(new_rule)
    assert [w for i, w in enumerate(older.weights) if i != at] == \
        [w for i, w in enumerate(flt.fitted.weights) if i != at]
    await flt.model.set_combiner(json.dumps(doc).encode())
    spam_v = await flt.classify(mail("winner bonus", "cheap pills casino lottery offer viagra"))
    ham_v = await flt.classify(mail("meeting notes", "agenda for the project review on monday"))
    assert spam_v.is_spam and not ham_v.is_spam
    # a stored combiner that misses a model feature (not a rule) is not used
    doc["features"].remove("bytes")
    doc["weights"].pop()
    assert Combiner.from_bytes(json.dumps(doc).encode()) is None


def test_regression_learns_weights_that_separate_the_classes() -> None:
    xs = [[0.1 * i, 0.0] for i in range(-10, 11)] + [[0.1 * i + 0.5, 1.0] for i in range(-10, 11)]
    ys = [False] * 21 + [True] * 21
    bias, weights = regression(xs, ys)
    assert weights[0] > 0 and weights[1] > 0
    assert bias + weights[1] > 0 > bias  # the second feature alone moves a message across
    assert regression(xs, ys) == (bias, weights)  # deterministic
    # ham counted 10 times: the fit leans towards calling borderline mail ham
    heavy, _ = regression(xs, ys, ham_weight=10.0)
    assert heavy < bias


def test_bayes_bands() -> None:
    assert [bayes_test(p) for p in (0.0, 0.03, 0.5, 0.97, 0.995, 0.9999)] == \
        ["BAYES_00", "BAYES_05", "BAYES_50", "BAYES_95", "BAYES_99", "BAYES_999"]


# --- accuracy on held-out mail ---------------------------------------------------------------

def link_split(tmp_path: Path) -> dict[str, Path]:
    """Folders of symlinks: train/{ham,spam} (80 %) and held/{ham,spam} (20 %)."""
    dirs = {}
    for part in ("train", "held"):
        for cls in ("ham", "spam"):
            d = tmp_path / part / cls
            d.mkdir(parents=True)
            dirs[f"{part}/{cls}"] = d
    for cls in ("ham", "spam"):
        for f in sorted((CORPUS / cls).glob("*.eml")):
            part = "held" if held_out(f.name) else "train"
            (dirs[f"{part}/{cls}"] / f.name).symlink_to(f)
    return dirs


def spam_cli(*args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-m", "mailmesh_common.cli.spam", *args], cwd=REPO,
                          env=child_env({}), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.skipif(not (CORPUS / "ham").is_dir(), reason=f"spam corpus not found at {CORPUS}")
def test_held_out_accuracy(tmp_path: Path) -> None:
    """Train with `mailmesh spam train` on 80 % of the development corpus (which also fits the
    combiner by 5-fold cross-validation inside those 80 %), score the other 20 % with
    `mailmesh spam eval` (the live pipeline's classify, no auth results).

    Measured on this split (613 ham, 300 spam held out), at the default threshold 5.0:
    detection 95.3 % (14 missed: 13 from spam_2, 1 from spam), 0 false positives, with the
    message-form rules (rules.py; chosen by tests/bench/cv_spam.py inside the training part:
    95.1 % against 94.4 % at 2 training ham, 90.7 % with 1.8 ham over the cut against 90.0 %
    with 2.0; the fit on the whole training part predicted 90.6 % at 0.08 % false positives).
    Before them: 94.3 % (17 missed: 16 from spam_2, 1 from spam), 0 false positives, with the byte
    model (bytemodel.py) as a combiner input and the combiner's fit weighing ham 10x
    (combine.HAM_WEIGHT), both chosen by nested cross-validation inside the training part
    (90.2 % against 84.0 % at the cut, with 2.2 against 2.8 of 2497 ham over it); the fit on
    the whole training part predicted 90.6 % at 0.08 % false positives. An intermediate step,
    chosen the same way and scored here once before HAM_WEIGHT was measured: the byte model
    with the cut one unit further up instead (CUT_MARGIN 1.25, unweighted fit), 96.0 % (12
    missed), 0 false positives, predicted 91.2 %; the 5 messages between the two are within the
    spread, and no choice was made on these held-out figures. (Before the byte model: 94.0 %,
    18 missed, 0 false positives, predicted 90.5 %. Before the link-host label/4-gram and
    chain-origin tokens, see tokenizer.py: 92.0 %, 24 missed, 0 false positives. With the
    2098 messages of ../shared/corpus/mail/jailhouse-dev as extra training ham, not adopted
    here: 96.7 %, 10 missed, 0 false positives; but the cut then allows 4 of 4595 ham, and
    cross-validation on this corpus's ham alone gained only 1.6 points, 88.3 -> 89.9 %.) The issue's target (>= 99 % detection with
    <= 0.1 % false positives) is not reached: the corpus's hard ham is commercial newsletters
    (Netscape, Amazon, Tesco, CuteFTP...) and list mail whose content is spam-like, and part of
    its spam was relayed through mailing lists the model knows as ham; with content alone (2002
    mail: no usable SPF/DKIM/DMARC or DNS), out-of-fold, two of 2497 training ham score above
    99 % of the spam, so a cut at <= 0.1 % false positives leaves 9-13 % of spam below it (five fold
    assignments; 13-17 training ham score above the 99 %-detection cut). With the byte model and
    HAM_WEIGHT, nested over five assignments: 3.6-10.2 % of spam below the 2-ham cut, 7-13 ham
    above the 99 %-detection cut. The spam missed out of fold on every assignment is mostly
    list-relayed ([ILUG], [SA] prefixes), newsletter-like (Ticketmaster, PalmGear, Amazon
    affiliates), Chinese, German and Portuguese mail, 419 letters and a bounce.
    This test guards what is achieved.
    """
    dirs = link_split(tmp_path)
    data = tmp_path / "data"
    trained = spam_cli("train", "--ham", str(dirs["train/ham"]), "--spam", str(dirs["train/spam"]),
                       "--data-dir", str(data))
    report = spam_cli("eval", "--ham", str(dirs["held/ham"]), "--spam", str(dirs["held/spam"]),
                      "--data-dir", str(data), "--details")
    print(json.dumps({"trained": trained, "eval": report}, indent=2))
    ham, spam = report["ham"], report["spam"]
    assert isinstance(ham, dict) and isinstance(spam, dict)
    assert ham["messages"] > 500 and spam["messages"] > 250
    assert trained["combiner"]["fitted"] is True  # type: ignore[index]
    assert report["combiner"] is True
    assert report["detection_rate"] >= MIN_DETECTION  # type: ignore[operator]
    assert ham["flagged_spam"] <= MAX_FALSE_POSITIVES


async def test_replica_token_cache_sees_own_training_at_once_and_others_after_its_ttl(tmp_path: Path) -> None:
    """Each replica reuses global token counts it read recently (the hot path reads far fewer
    keys); its own training shows at once, another replica's within the cache's TTL."""
    dbs = [open_database(tmp_path / "shared.db") for _ in range(2)]
    try:
        trainer = await trained(dbs[0])
        replica = SpamFilter(dbs[1])
        probe = analyze(mail("zorblax update", "zorblax zorblax quarterly"))
        before = await replica.model.score(probe.tokens)
        assert before.ready
        await trainer.train_many([(mail(f"zorblax {i}", f"zorblax casino winner {i}", mid=f"z-{i}"), True)
                                  for i in range(40)])
        cached = await replica.model.score(probe.tokens)
        assert cached.probability == before.probability, "within the TTL the replica's cached counts stand"
        replica.model._cache.ttl_s = 0  # noqa: SLF001  (the TTL passes)
        after = await replica.model.score(probe.tokens)
        assert after.probability > before.probability + 0.2, (before, after)
        # the replica's own training: no wait at all
        replica.model._cache.ttl_s = 3600  # noqa: SLF001
        await replica.train_many([(mail(f"quarterly zorblax {i}", f"zorblax quarterly review {i}", mid=f"q-{i}"),
                                   False) for i in range(80)])
        mine = await replica.model.score(probe.tokens)
        assert mine.probability < after.probability - 0.2, (after, mine)
    finally:
        for d in dbs:
            await d.close()


# --- reads per message -----------------------------------------------------------------------

class CountingStore:
    """The real store, counting the read-only transactions the filter runs."""

    def __init__(self, inner: Database) -> None:
        self.inner = inner
        self.reads = 0

    async def run(self, fn, *, readonly: bool = False):  # type: ignore[no-untyped-def]
        if readonly:
            self.reads += 1
        return await self.inner.run(fn, readonly=readonly)


async def reference_score(flt: SpamFilter, raw: bytes, user: str) -> tuple[object, ...]:
    """The model's evidence read key family by key family, with no caches (as score() did
    before it read everything in one transaction)."""
    from svc_ingest.spam.bayes import USER_WEIGHT, clues_and_parts

    tokens = analyze(raw).tokens
    glob = await flt.model.counts()
    counts: dict[str, tuple[float, float]] = dict(await flt.model.token_counts(tokens))
    nspam: float = glob.spam
    nham: float = glob.ham
    mine = await flt.model.counts(user)
    if mine.spam or mine.ham:
        nspam += USER_WEIGHT * mine.spam
        nham += USER_WEIGHT * mine.ham
        for token, (s, h) in (await flt.model.token_counts(tokens, user)).items():
            gs, gh = counts.get(token, (0, 0))
            counts[token] = (gs + USER_WEIGHT * s, gh + USER_WEIGHT * h)
    probability, clues, parts = clues_and_parts(counts, nspam, nham)
    buckets = grams(raw)
    logit = (await flt.bytes.snapshot()).logit(buckets) + await flt.bytes.user_logit(user, buckets)
    return probability, tuple(clues), tuple((g, *parts[g]) for g in GROUPS), logit


async def test_scoring_reads_once_per_message_and_scores_exactly_as_separate_reads(tmp_path: Path) -> None:
    db = open_database(tmp_path / "spam.db")
    other = open_database(tmp_path / "spam.db")
    try:
        await trained(db, fit=True)
        trainer = SpamFilter(db)
        for i in range(3):  # bob's own judgement: his token counts and byte adjustments
            await trainer.train(mail(f"garden digest {i}", f"roses tulips soil issue{i}"), is_spam=True,
                                user_id="bob")
        store = CountingStore(other)
        replica = SpamFilter(store)  # type: ignore[arg-type]
        probes = [mail("winner bonus", "cheap pills casino lottery offer viagra"),
                  mail("project review", "meeting agenda notes team schedule"),
                  mail("garden digest 9", "roses tulips soil issue9 unsubscribe")]
        for raw in probes:
            for user in ("bob", "alice"):
                before = store.reads
                analysis = analyze(raw)
                result = await replica.score(analysis, user)
                assert store.reads - before == 1, user  # one transaction, caches cold or warm
                want = await reference_score(SpamFilter(db), raw, user)
                assert (result.probability, result.clues, result.parts, result.byte_logit) == want
                assert replica.judge(analysis, result) == await SpamFilter(db).classify(raw, user_id=user)
        before = store.reads
        await replica.score(analyze(probes[0]))  # no user, everything cached: no read at all
        assert store.reads == before
        # this replica's own training shows at once, with its caches warm
        await replica.train(probes[1], is_spam=True, user_id="alice")
        result = await replica.score(analyze(probes[1]), "alice")
        assert (result.probability, result.clues, result.parts, result.byte_logit) == \
            await reference_score(SpamFilter(db), probes[1], "alice")
    finally:
        await other.close()
        await db.close()
