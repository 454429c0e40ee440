"""The spam tokenizer: which tokens a message gives, what is deliberately not a token, bounds,
and the header/link/relay facts the rules read."""

from __future__ import annotations

import random

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
