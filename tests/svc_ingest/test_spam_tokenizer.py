"""The spam tokenizer: which tokens a message gives, what is deliberately not a token, bounds,
and the header/link/relay facts the rules read."""

from __future__ import annotations

import hashlib
import random
import re
import sys
from pathlib import Path

import pytest

from svc_ingest.spam import tokenizer
from svc_ingest.spam.tokenizer import (
    GROUPS,
    MAX_TOKEN_CHARS,
    MAX_TOKENS,
    analyze,
    host_of,
    registered_domain,
    relays_of,
    split_headers,
    token_group,
)
from tests.conftest import CORPUS

GOLDEN = Path(__file__).parent / "data" / "spam_tokens_golden.tsv"

PLAIN = (b"Return-Path: <offers@deals.example>\n"
         b"Received: from mail.deals.example (mail.deals.example [203.0.113.7]) by mx.example.com "
         b"(Postfix) with ESMTP id 1; Mon, 1 Jul 2002 10:00:00 +0000\n"
         b"From: \"Deals Team\" <offers@deals.example>\n"
         b"To: alice@example.com\n"
         b"Subject: Cheap Watches, limited offer!!\n"
         b"Date: Mon, 1 Jul 2002 10:00:00 +0000\n"
         b"Message-ID: <abc123@deals.example>\n"
         b"X-Mailer: SuperMailer 2.0\n"
         b"Content-Type: text/plain; charset=us-ascii\n"
         b"\n"
         b"Buy cheap watches today at http://www.deals.example/watches?id=42 now.\n"
         b"Write to sales@deals.example for wholesale prices.\n")

HTML_ONLY = (b"From: Shop <shop@store.example>\n"
             b"To: bob@example.com\n"
             b"Subject: News\n"
             b"Date: Mon, 1 Jul 2002 10:00:00 +0000\n"
             b"Message-ID: <n1@store.example>\n"
             b"MIME-Version: 1.0\n"
             b"Content-Type: text/html; charset=utf-8\n"
             b"\n"
             b"<html><head><style>p {color: red}</style></head><body>"
             b"<p>Hello <b>reader</b>, see <a href=\"http://tracker.example.net/c?u=1\">"
             b"http://www.store.example/sale</a></p></body></html>\n")


def tokens(raw: bytes) -> list[str]:
    return analyze(raw).tokens


def test_header_tokens_are_prefixed_with_the_header_name() -> None:
    toks = set(tokens(PLAIN))
    assert {"subject:cheap", "subject:watches", "subject:!!"} <= toks
    assert {"from:addr:deals.example", "from:user:offers", "from:name:deals", "from:name:team"} <= toks
    assert "message-id:@deals.example" in toks
    assert "x-mailer:supermailer 2.0" in toks
    assert {"received:203.0", "received:203.0.113", "received:deals.example"} <= toks
    assert {"content-type:text/plain", "charset:us-ascii"} <= toks
    assert "to:count:1" in toks


def test_body_words_bigrams_and_urls() -> None:
    toks = set(tokens(PLAIN))
    assert {"buy", "cheap", "watches", "today", "wholesale", "prices"} <= toks
    assert "bi:cheap watches" in toks
    assert {"url:www.deals.example", "url:deals.example", "url:watches", "proto:http"} <= toks
    assert "email name:sales" in toks  # long words with @ are split, SpamBayes style
    assert all(t == t.lower() or t.startswith(("bi:", "email")) for t in toks if ":" not in t)


def test_html_only_body_gives_text_words_and_link_tokens_but_no_markup() -> None:
    a = analyze(HTML_ONLY)
    toks = set(a.tokens)
    assert {"hello", "reader", "body:html-only"} <= toks
    assert "url:tracker.example.net" in toks
    assert not any(t.startswith("html:") for t in toks)
    assert "color" not in toks  # style sheets are not text
    assert a.links[0].href == "http://tracker.example.net/c?u=1"
    assert a.links[0].text == "http://www.store.example/sale"


def test_mbox_envelope_line_is_not_a_feature() -> None:
    with_envelope = b"From offers@deals.example  Mon Jul  1 10:00:00 2002\n" + PLAIN
    assert tokens(with_envelope) == tokens(PLAIN)
    assert split_headers(with_envelope) == split_headers(PLAIN)


def test_receiver_side_headers_are_not_features() -> None:
    marked = (b"X-Spam-Status: Yes, score=9.9 required=5.0 tests=BAYES_99\n"
              b"X-Spam-Score: 9.9\n"
              b"Authentication-Results: mx.example.com; spf=fail smtp.mailfrom=deals.example\n"
              b"Delivered-To: alice@example.com\n"
              b"Delivery-Date: Mon, 1 Jul 2002 10:00:01 +0000\n"
              b"X-Keywords: \n" + PLAIN)
    assert tokens(marked) == tokens(PLAIN)


def test_crlf_and_lf_messages_tokenize_alike() -> None:
    assert tokens(PLAIN.replace(b"\n", b"\r\n")) == tokens(PLAIN)


def test_tokens_are_bounded_in_number_and_length() -> None:
    rnd = random.Random(7)
    words = " ".join("".join(rnd.choice("abcdefghij") for _ in range(rnd.randint(3, 12)))
                     for _ in range(20_000))
    raw = (b"From: a@b.example\nSubject: " + b"x" * 5000 + b"\n\n" + words.encode()
           + b" " + b"y" * 500)
    toks = tokens(raw)
    assert len(toks) == MAX_TOKENS
    assert len(set(toks)) == len(toks)
    assert max(len(t) for t in toks) <= MAX_TOKEN_CHARS
    assert toks[:2] == ["from:addr:b.example", "from:user:a"]  # header tokens come first
    assert "subject:" + "x" * 20 in toks


def test_garbage_never_raises() -> None:
    rnd = random.Random(3)
    for n in (0, 1, 10, 1000, 20_000):
        raw = bytes(rnd.randrange(256) for _ in range(n))
        a = analyze(raw)
        assert len(a.tokens) <= MAX_TOKENS
    analyze(b"Subject: =?bogus?Q?x?=\n\n<a href=>")
    analyze(b"Received: from [999.1.1.1] by x\n\n")


def test_relays_are_the_public_hops_of_the_received_chain() -> None:
    headers = split_headers(
        b"Received: from localhost (localhost [127.0.0.1]) by mx.example.com; Mon, 1 Jul 2002\n"
        b"Received: from c2235544-a (12-245-142-206.client.attbi.com [12.245.142.206])\n"
        b"    by mx.example.com (8.11.6) with SMTP id 1; Mon, 1 Jul 2002\n"
        b"Received: from unknown (HELO mail.gmx.net) (78.165.116.169) by smtp4.example.org\n"
        b"Received: from relay.example.org (unknown [198.51.100.9]) by mx.example.com\n"
        b"\n")
    relays = relays_of(headers)
    assert [(r.helo, r.rdns, r.ip) for r in relays] == [
        ("c2235544-a", "12-245-142-206.client.attbi.com", "12.245.142.206"),
        ("mail.gmx.net", "", "78.165.116.169"),
        ("relay.example.org", "", "198.51.100.9"),
    ]
    assert relays[0].dynamic
    toks = set(analyze(b"From: x@y.example\n" + b"".join(
        f"{n}: {v}\n".encode() for n, v in headers) + b"\nhi\n").tokens)
    assert {"relay:dynamic", "relay:helo-bare"} <= toks


def test_url_hosts_and_registered_domains() -> None:
    assert host_of("http://WWW.Example.COM:8080/path") == "www.example.com"
    assert host_of("https://bank.example@evil.example/login") == "evil.example"
    assert host_of("www.example.org/x") == "www.example.org"
    assert host_of("mailto:a@b.example") == ""
    assert registered_domain("a.b.example.com") == "example.com"
    assert registered_domain("shop.example.co.uk") == "example.co.uk"
    assert registered_domain("10.1.2.3") == "10.1.2.3"


def test_every_token_falls_in_one_scored_group() -> None:
    toks = tokens(PLAIN) + tokens(HTML_ONLY)
    groups = {t: token_group(t) for t in toks}
    assert set(groups.values()) == set(GROUPS)
    assert groups["from:addr:deals.example"] == groups["received:203.0"] == "header"
    assert groups["x-mailer:supermailer 2.0"] == groups["message-id:@deals.example"] == "header"
    assert groups["subject:cheap"] == groups["watches"] == "content"
    assert groups["content-type:text/plain"] == groups["body:html-only"] == "structure"
    assert any(g == "structure" for t, g in groups.items() if t.startswith("url:"))


def test_link_hosts_are_split_into_labels_and_name_pieces() -> None:
    toks = set(tokens(PLAIN))
    assert {"url:nhosts:1", "url:nregs:1", "url:tld:example", "url:label:www", "url:label:deals",
            "url:c4:deal", "url:c4:eals", "url:reglen:1"} <= toks
    many = (b"From: a@b.example\nSubject: hi\n\nsee http://cheap-pills4u.example/ and "
            b"http://www.other.example/x and http://203.0.113.5/y\n")
    toks = set(tokens(many))
    assert {"url:nhosts:3", "url:nregs:3", "url:label-hyphen", "url:label-digits",
            "url:c4:chea", "url:c4:p-pi", "url:c4:ls4u"} <= toks
    assert not any(t.startswith("url:label:203") for t in toks)  # IPs are not labels
    assert all(token_group(t) == "structure" for t in toks if t.startswith("url:"))


def test_origin_of_the_received_chain_and_date_style() -> None:
    toks = set(tokens(PLAIN))
    # Date and the oldest Received stamp agree; a weekday and a numeric zone
    assert {"relay:skew:hour", "relay:date-tz:+0000"} <= toks
    assert not toks & {"relay:date-nodow", "relay:forged-big", "relay:first-dynamic", "relay:first-no-rdns"}
    forged = (b"Received: from mail.hotmail.com (dsl-1-2-3.pool.example.net [198.51.100.20]) by "
              b"mx.example.com with SMTP; Tue, 2 Jul 2002 12:00:00 +0000\n"
              b"From: x@hotmail.com\nTo: a@example.com\nSubject: hi\n"
              b"Date: 1 Jul 2002 10:00:00\nMessage-ID: <1@hotmail.com>\n\nhello there\n")
    toks = set(tokens(forged))
    assert {"relay:forged-big", "relay:first-dynamic", "relay:date-nodow", "relay:date-tz:none"} <= toks
    later = forged.replace(b"Date: 1 Jul 2002 10:00:00", b"Date: Mon, 1 Jul 2002 10:00:00 +0000")
    assert "relay:skew:week" in set(tokens(later))  # stamped 26 hours after its Date
    ahead = forged.replace(b"Date: 1 Jul 2002 10:00:00", b"Date: Thu, 4 Jul 2002 10:00:00 +0000")
    assert "relay:skew:future-day" in set(tokens(ahead))  # dated after it was received
    nameless = forged.replace(b"(dsl-1-2-3.pool.example.net [198.51.100.20])", b"([198.51.100.20])")
    assert "relay:first-no-rdns" in set(tokens(nameless))
    assert all(token_group(t) == "header" for t in toks if t.startswith("relay:"))


# --- the tokens never change: the stored model counts depend on every one of them ------------

def token_digest(raw: bytes) -> str:
    return hashlib.sha256("\n".join(analyze(raw).tokens).encode("utf-8", "surrogatepass")).hexdigest()


def golden() -> list[tuple[str, str]]:
    lines = GOLDEN.read_text().splitlines()
    return [(name, digest) for name, digest in (line.split("\t") for line in lines if not line.startswith("#"))]


def test_real_mail_gives_exactly_the_tokens_it_always_gave() -> None:
    """A fixed sample of the corpus (every mime-edge message, every 25th of the others) tokenizes
    to exactly the token lists, in order, that the tokenizer gave before it was made faster
    (their digests are frozen in data/spam_tokens_golden.tsv)."""
    if not CORPUS.is_dir():
        pytest.skip(f"no mail corpus at {CORPUS}")
    sample = golden()
    assert len(sample) > 300
    missing = [name for name, _ in sample if not (CORPUS / name).is_file()]
    if len(missing) == len(sample):
        pytest.skip(f"none of the sampled corpus files is in {CORPUS}")
    changed = [name for name, digest in sample
               if (CORPUS / name).is_file() and token_digest((CORPUS / name).read_bytes()) != digest]
    assert changed == [], f"{len(changed)} messages tokenize differently, e.g. {changed[:3]}"


class _ReferenceTokens:
    """The token set as first written: one bounded add per token."""

    def __init__(self, limit: int, seen: list[str] | None = None) -> None:
        self.seen: dict[str, None] = dict.fromkeys(seen or [])
        self.limit = limit

    def add(self, token: str) -> None:
        if len(self.seen) < self.limit:
            token = token[:MAX_TOKEN_CHARS]
            if "\n" in token or "\r" in token:
                token = token.replace("\n", " ").replace("\r", " ")
            self.seen.setdefault(token, None)

    @property
    def full(self) -> bool:
        return len(self.seen) >= self.limit


def reference_word_tokens(prefix: str, text: str, tokens: _ReferenceTokens) -> None:
    """The body-word tokenizer as first written: a plain loop over the words."""
    prev = ""
    for word in re.split(r"\s+", text[:tokenizer.MAX_BODY_CHARS]):
        if tokens.full:
            return
        word = word.strip("\"'.,;:!?()[]{}<>*`").lower()
        n = len(word)
        if 3 <= n <= 12:
            if prev:
                tokens.add(f"bi:{prev} {word}")
            prev = word
        else:
            prev = ""
        if n < 3:
            continue
        if n <= 12:
            tokens.add(prefix + word)
            continue
        if "@" in word:
            local, _, domain = word.rpartition("@")
            tokens.add(f"{prefix}email name:{local[:20]}")
            for part in domain.split(".")[-3:]:
                tokens.add(f"{prefix}email addr:{part}")
            continue
        if word.startswith(("http:", "https:", "www.", "ftp:")):
            continue
        tokens.add(f"{prefix}skip:{word[0]} {n // 10 * 10}")


def word_tokens_both_ways(text: str, *, limit: int = MAX_TOKENS, seen: list[str] | None = None,
                          prefix: str = "") -> tuple[list[str], list[str]]:
    ref = _ReferenceTokens(limit, seen)
    reference_word_tokens(prefix, text, ref)
    new = tokenizer._Tokens(limit)
    new.seen.update(dict.fromkeys(seen or []))
    tokenizer._word_tokens(prefix, text, new)
    return list(ref.seen), list(new.seen)


# whitespace of every kind, characters whose lowercase is longer or odd, stripped punctuation
_TRICKY = (" ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2003", "\u3000", "\u200b",
           "\u0130", "\u017f", "\u212a", "\u1e9e", "\u03a3", "\u0345", "'", "\"", ".", ",", "(", ")", "*", "`", "<",
           "@", ".", "-", ":", "http:", "www.", "ftp:")


def random_text(rnd: random.Random, words: int) -> str:
    parts: list[str] = []
    for _ in range(words):
        kind = rnd.random()
        if kind < 0.5:
            parts.append("".join(rnd.choice("abcXYZ.'é") for _ in range(rnd.randint(0, 15))))
        elif kind < 0.8:
            parts.append(rnd.choice(_TRICKY))
        elif kind < 0.9:
            parts.append(f"user{rnd.randint(0, 9)}@mail.Example{rnd.randint(0, 3)}.co.uk")
        else:
            parts.append("".join(chr(rnd.randint(0x20, 0x3000)) for _ in range(rnd.randint(1, 30))))
        parts.append(rnd.choice(_TRICKY[:12]))
    return "".join(parts)


def test_body_words_are_the_plain_loops_tokens_in_its_order() -> None:
    """The fast word tokenizer against the plain per-word loop it replaced: odd whitespace,
    characters whose lowercase changes length, addresses, long words, a nearly full or full
    token set, a prefix."""
    rnd = random.Random(11)
    for case in range(300):
        text = random_text(rnd, rnd.randint(0, 400))
        limit = rnd.choice([MAX_TOKENS, 50, 5, 1])
        seen = [f"bi:{w}" if rnd.random() < 0.3 else w
                for w in random_text(rnd, rnd.randint(0, 20)).lower().split()][:limit]
        prefix = rnd.choice(["", "", "", "subject:", "x" * 35, "p\n"])
        ref, new = word_tokens_both_ways(text, limit=limit, seen=seen, prefix=prefix)
        assert new == ref, (case, text[:200])
    long_text = "word " * (tokenizer.MAX_BODY_CHARS // 3)  # past the body bound
    assert word_tokens_both_ways(long_text + " tail") == word_tokens_both_ways(long_text)


def test_body_words_of_real_mail_are_the_plain_loops_tokens() -> None:
    """The same comparison on the text and HTML bodies of real corpus mail."""
    if not CORPUS.is_dir():
        pytest.skip(f"no mail corpus at {CORPUS}")
    files = [CORPUS / name for name, _ in golden()[::3] if (CORPUS / name).is_file()]
    if not files:
        pytest.skip(f"none of the sampled corpus files is in {CORPUS}")
    for path in files:
        a = analyze(path.read_bytes())
        for text in (a.parsed.text_body, a.html_text):
            ref, new = word_tokens_both_ways(text)
            assert new == ref, path.name
            ref, new = word_tokens_both_ways(text, limit=len(ref) // 2 + 1)
            assert new == ref, path.name


if __name__ == "__main__":
    # Regenerate the golden digests, only after a deliberate change of the tokens (the stored
    # spam model must then be retrained): python -m tests.svc_ingest.test_spam_tokenizer
    header = [line for line in GOLDEN.read_text().splitlines() if line.startswith("#")]
    rows = [f"{name}\t{token_digest((CORPUS / name).read_bytes())}" for name, _ in golden()]
    GOLDEN.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {len(rows)} digests to {GOLDEN}", file=sys.stderr)
