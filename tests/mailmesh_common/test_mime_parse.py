"""parse_message / get_attachment / html_to_text: the real corpus, hand-built MIME, fuzzing."""

from __future__ import annotations

import base64
import csv
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailmesh_common.errors import NotFound
from mailmesh_common.mime import (
    MailAddress,
    ParsedMessage,
    get_attachment,
    html_to_text,
    parse_message,
    reference_chain,
)

CORPUS = Path(__file__).parents[2].parent / "shared" / "corpus" / "mail"


def corpus_dir(name: str) -> Path:
    path = CORPUS / name
    if not path.is_dir():
        pytest.skip(f"corpus not found at {path}")
    return path


@pytest.fixture(scope="module")
def jailhouse() -> list[tuple[dict[str, str], ParsedMessage]]:
    """Every jailhouse-dev message with its INDEX.tsv row, parsed once for the module."""
    folder = corpus_dir("jailhouse-dev")
    with open(CORPUS / "INDEX.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [(row, parse_message((folder / f"{row['sha256']}.eml").read_bytes())) for row in rows]


# --------------------------------------------------------------------------- corpus


def test_every_mime_edge_file_parses_without_raising() -> None:
    folder = corpus_dir("mime-edge")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt")
    assert len(files) >= 100
    for path in files:
        raw = path.read_bytes()
        parsed = parse_message(raw)
        assert parsed.size == len(raw)
        assert 0 <= parsed.headers_size <= len(raw)
        assert len(parsed.snippet) <= 200
        for att in parsed.attachments:
            info, data = get_attachment(raw, att.part_id)
            assert info == att, path
            assert len(data) == att.size, path


def test_every_jailhouse_message_parses_with_the_index_message_id(
    jailhouse: list[tuple[dict[str, str], ParsedMessage]],
) -> None:
    assert len(jailhouse) == 2098
    for row, parsed in jailhouse:
        assert parsed.message_id == row["message_id"].strip("<>"), row["sha256"]
        assert parsed.size == int(row["size_bytes"])
        assert parsed.date is not None and parsed.date.tzinfo is not None
        assert parsed.from_, row["sha256"]
        assert parsed.list_id == "jailhouse-dev.googlegroups.com"


def test_jailhouse_parent_is_the_newest_ancestor_in_the_reference_chain(
    jailhouse: list[tuple[dict[str, str], ParsedMessage]],
) -> None:
    with_parent = 0
    for row, parsed in jailhouse:
        parent = row["parent_message_id"].strip("<>")
        chain = reference_chain(parsed)
        assert parsed.message_id not in chain
        assert len(chain) == len(set(chain))
        if not parent:
            assert chain == [], row["sha256"]
            continue
        with_parent += 1
        assert parent in chain, row["sha256"]
        # INDEX's parent is the last In-Reply-To id, else the last References id: the
        # newest ancestor, so it leads the chain.
        assert chain[0] == parent, row["sha256"]
        if parsed.in_reply_to:
            assert parsed.in_reply_to[-1] == parent
    assert with_parent == 1579


def test_jailhouse_attachment_counts_match_the_index(
    jailhouse: list[tuple[dict[str, str], ParsedMessage]],
) -> None:
    for row, parsed in jailhouse:
        assert len(parsed.attachments) == int(row["attachments"]), row["sha256"]
        assert parsed.has_attachments == (int(row["attachments"]) > 0), row["sha256"]
        assert parsed.text_body or parsed.html_body, row["sha256"]
        assert parsed.snippet, row["sha256"]


# --------------------------------------------------------------------------- hand-built

ALTERNATIVE = b"""\
From: Alice Example <alice@Example.COM>
To: bob@example.org, "Carol, C." <carol@example.net>
Cc: undisclosed-recipients:;
Subject: Lunch?
Date: Tue, 01 Jul 2003 10:52:37 +0200
Message-ID: <lunch-1@example.com>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=utf-8

Shall we have lunch at noon?
--alt
Content-Type: text/html; charset=utf-8

<html><head><style>p {color: red}</style></head>
<body><p>Shall we have <b>lunch</b> at&nbsp;noon?</p></body></html>
--alt--
"""

PDF_BYTES = b"%PDF-1.4\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"


def mixed_with_pdf() -> bytes:
    encoded = base64.encodebytes(PDF_BYTES)
    return (
        b"From: alice@example.com\r\n"
        b"To: bob@example.org\r\n"
        b"Subject: report\r\n"
        b"Message-ID: <report@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="mix"\r\n'
        b"\r\n"
        b"preamble\r\n"
        b"--mix\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
        b"See the attached report.\r\n"
        b"--mix\r\n"
        b'Content-Type: application/pdf; name="report.pdf"\r\n'
        b'Content-Disposition: attachment; filename="report.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + encoded.replace(b"\n", b"\r\n") + b"--mix--\r\n"
    )


def test_multipart_alternative_gives_text_html_and_snippet() -> None:
    parsed = parse_message(ALTERNATIVE)
    assert parsed.subject == "Lunch?"
    assert parsed.from_ == [MailAddress(name="Alice Example", email="alice@example.com")]
    assert parsed.to == [
        MailAddress(name="", email="bob@example.org"),
        MailAddress(name="Carol, C.", email="carol@example.net"),
    ]
    assert parsed.cc == []
    assert parsed.date == datetime(2003, 7, 1, 8, 52, 37, tzinfo=UTC)
    assert parsed.message_id == "lunch-1@example.com"
    assert parsed.text_body.strip() == "Shall we have lunch at noon?"
    assert "<b>lunch</b>" in parsed.html_body
    assert parsed.snippet == "Shall we have lunch at noon?"
    assert parsed.attachments == [] and not parsed.has_attachments
    assert parsed.headers_size == ALTERNATIVE.index(b"\n\n") + 2
    assert parsed.parse_warnings == []


def test_html_only_message_gets_its_snippet_from_the_html() -> None:
    raw = (
        b"Subject: hi\nContent-Type: text/html; charset=iso-8859-1\n\n"
        b"<p>Caf\xe9 &amp; cr&egrave;me</p><script>alert(1)</script><div>next</div>"
    )
    parsed = parse_message(raw)
    assert parsed.text_body == ""
    assert parsed.snippet == "Café & crème next"


def test_mixed_with_pdf_lists_the_attachment_and_returns_its_exact_bytes() -> None:
    raw = mixed_with_pdf()
    parsed = parse_message(raw)
    assert parsed.text_body.strip() == "See the attached report."
    assert parsed.has_attachments
    [att] = parsed.attachments
    assert att.part_id == "2"
    assert att.filename == "report.pdf"
    assert att.content_type == "application/pdf"
    assert att.size == len(PDF_BYTES)
    assert not att.inline and att.content_id == ""
    info, data = get_attachment(raw, "2")
    assert info == att
    assert data == PDF_BYTES
    assert parsed.headers_size == raw.index(b"\r\n\r\n") + 4


def test_get_attachment_of_a_missing_part_raises_not_found() -> None:
    raw = mixed_with_pdf()
    for part_id in ("3", "2.1", "0", "", "x", "1..2", "99999999"):
        with pytest.raises(NotFound):
            get_attachment(raw, part_id)
    with pytest.raises(NotFound):
        get_attachment(b"\x00garbage", "2")


def test_nested_parts_get_dotted_part_ids() -> None:
    raw = b"""\
Content-Type: multipart/mixed; boundary=outer

--outer
Content-Type: multipart/related; boundary=inner

--inner
Content-Type: text/html

<p>look <img src="cid:logo@x"></p>
--inner
Content-Type: image/png
Content-ID: <logo@x>
Content-Disposition: inline; filename=logo.png
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--inner--
--outer
Content-Type: text/csv; name=data.csv

a,b
--outer--
"""
    parsed = parse_message(raw)
    assert [(a.part_id, a.filename, a.inline, a.content_id) for a in parsed.attachments] == [
        ("1.2", "logo.png", True, "logo@x"),
        ("2", "data.csv", False, ""),
    ]
    assert get_attachment(raw, "1.2")[1] == b"\x89PNG\r\n\x1a\n"
    assert parsed.snippet == "look"


def test_rfc2047_subject_and_names_are_decoded() -> None:
    raw = (
        b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@EXAMPLE.de>\n"
        b"To: =?iso-8859-1?B?QW5k6Q==?= <andre@example.fr>\n"
        b"Subject: =?utf-8?B?w4RwZmVs?= und =?iso-8859-1?q?Birnen_=E0_la?= carte\n\n"
        b"body\n"
    )
    parsed = parse_message(raw)
    assert parsed.subject == "Äpfel und Birnen à la carte"
    assert parsed.from_ == [MailAddress(name="Jörg Müller", email="joerg@example.de")]
    assert parsed.to == [MailAddress(name="Andé", email="andre@example.fr")]


def test_rfc2231_filename_is_decoded() -> None:
    raw = b"""\
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

hi
--b
Content-Type: application/octet-stream
Content-Disposition: attachment;
 filename*0*=utf-8''%E2%82%AC%20rates;
 filename*1=" 2024.xlsx"

data
--b--
"""
    parsed = parse_message(raw)
    assert [a.filename for a in parsed.attachments] == ["€ rates 2024.xlsx"]


def test_message_rfc822_attachment_is_named_after_its_subject() -> None:
    raw = b"""\
Subject: Fwd: minutes
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

see below
--b
Content-Type: message/rfc822

From: carol@example.net
Subject: Meeting minutes
Content-Type: text/plain

The minutes.
--b--
"""
    parsed = parse_message(raw)
    assert parsed.text_body.strip() == "see below"
    [att] = parsed.attachments
    assert (att.part_id, att.filename, att.content_type) == ("2", "Meeting minutes.eml", "message/rfc822")
    assert parsed.has_attachments
    info, data = get_attachment(raw, "2")
    assert len(data) == info.size == att.size
    assert b"Subject: Meeting minutes" in data and b"The minutes." in data
    assert parse_message(data).subject == "Meeting minutes"


def test_broken_base64_gives_a_warning_not_an_exception() -> None:
    raw = (
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: base64\n\n"
        b"aGVsbG8gd29y!!bGQ\n"
    )
    parsed = parse_message(raw)
    assert parsed.text_body.startswith("hello wor")
    assert any("base64" in w for w in parsed.parse_warnings)


def test_missing_boundary_is_read_as_text_with_a_warning() -> None:
    raw = b"Subject: x\nContent-Type: multipart/mixed\n\nthe only text\n"
    parsed = parse_message(raw)
    assert parsed.text_body.strip() == "the only text"
    assert any("boundary" in w for w in parsed.parse_warnings)


def test_invalid_date_is_none_with_a_warning() -> None:
    parsed = parse_message(b"Date: Pn, 29 paX 2007 21:13:00 +0100\n\nx\n")
    assert parsed.date is None
    assert any(w.startswith("Date:") for w in parsed.parse_warnings)
    assert parse_message(b"Date: 1 Jul 2003 10:52:37 -0000\n\nx\n").date == datetime(
        2003, 7, 1, 10, 52, 37, tzinfo=UTC
    )


def test_raw_8bit_headers_are_decoded_as_utf8_or_windows_1252() -> None:
    raw = (
        '"Jöhn Doe" <jdöe@Mächine.example>'.encode()
        .join([b"From: ", b"\nSubject: Gr\xfc\xdfe\nTo: m\xc3\xa4ry@example.net\n\nbody\n"])
    )
    parsed = parse_message(raw)
    assert parsed.from_ == [MailAddress(name="Jöhn Doe", email="jdöe@mächine.example")]
    assert parsed.to == [MailAddress(name="", email="märy@example.net")]
    assert parsed.subject == "Grüße"
    assert any("Subject" in w and "windows-1252" in w for w in parsed.parse_warnings)


def test_unknown_charset_falls_back_with_a_warning() -> None:
    parsed = parse_message(b"Content-Type: text/plain; charset=x-nonsense\n\ncaf\xc3\xa9\n")
    assert parsed.text_body.strip() == "café"
    assert any("x-nonsense" in w for w in parsed.parse_warnings)
    latin = parse_message(b"Content-Type: text/plain; charset=utf-8\n\ncaf\xe9\n")
    assert latin.text_body.strip() == "caf\ufffd"
    assert latin.parse_warnings


def test_body_is_bounded_by_max_body_chars() -> None:
    raw = b"Subject: big\n\n" + b"word " * 10_000
    parsed = parse_message(raw, max_body_chars=1000)
    assert len(parsed.text_body) == 1000
    assert any("truncated" in w for w in parsed.parse_warnings)


def test_snippet_skips_quoted_lines_and_the_signature() -> None:
    raw = (
        b"Subject: Re: x\n\nOn Mon, Bob wrote:\n> old text\n> more\n\nNew   answer\nhere.\n"
        b"-- \nAlice's signature\n"
    )
    assert parse_message(raw).snippet == "New answer here."
    assert parse_message(b"Subject: q\n\n> only quoted\n").snippet == "> only quoted"
    assert len(parse_message(b"\n" + b"x " * 500).snippet) <= 200


def test_list_id_auto_submitted_and_threading_headers() -> None:
    raw = (
        b"List-Id: Jailhouse development <jailhouse-dev.googlegroups.com>\n"
        b"Precedence: list\n"
        b"Message-ID: <c@x>\n"
        b"In-Reply-To: <b@x> (Bob's message of Monday)\n"
        b"References: <a@x>\n <b@x>\n\nbody\n"
    )
    parsed = parse_message(raw)
    assert parsed.list_id == "jailhouse-dev.googlegroups.com"
    assert parsed.auto_submitted
    assert parsed.in_reply_to == ["b@x"]
    assert parsed.references == ["a@x", "b@x"]
    assert parse_message(b"Auto-Submitted: auto-replied\n\nx").auto_submitted
    assert not parse_message(b"Auto-Submitted: no\n\nx").auto_submitted
    assert not parse_message(b"Subject: x\n\nx").auto_submitted


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 64,
        b"\n\n\n",
        b"Subject: no body and no separator",
        b"\xff\xfe\x00garbage\r\n\r\n\x80\x81",
        b"Content-Type: multipart/mixed; boundary=x\n\n--x\n--x\n--x--",
        b"Content-Type: text/plain; charset=\"\"\n\nx",
        b"Content-Transfer-Encoding: x-uuencode\n\nbegin 644 f\n!!!\nend\n",
        b"Content-Type: message/rfc822\n\n",
        b"From: <>, @, \"unterminated\n\nx",
        b"Date: Mon, 32 Foo 99999 99:99:99 +9999\n\nx",
        b"Content-Type: text/plain; charset=rot13\n\nx",
        b"Content-Disposition: attachment; filename*=bogus'xx'%ZZ%\n\nx",
    ],
)
def test_garbage_never_raises(raw: bytes) -> None:
    parsed = parse_message(raw)
    assert parsed.size == len(raw)
    for att in parsed.attachments:
        assert len(get_attachment(raw, att.part_id)[1]) == att.size


def test_deep_nesting_is_bounded() -> None:
    depth = 2000
    raw = b"Content-Type: multipart/mixed; boundary=b0\n\n"
    raw += b"".join(b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i, i + 1) for i in range(depth))
    raw += b"--b%d\nContent-Type: text/plain\n\nhello\n" % depth
    parsed = parse_message(raw)
    assert parsed.parse_warnings


@pytest.mark.parametrize(
    "raw",
    [
        b"From: " + b'"' * 50_000 + b"\n\nx",  # quadratic in email's header parser
        b"To: " + b"a@b.example, " * 20_000 + b"\n\nx",
        b"Content-Disposition: attachment; filename=" + b"=?utf-8?q?x?=" * 5_000 + b"\n\nx",
        b"Content-Type: text/html\n\n" + b"<a " * 100_000,  # quadratic in html.parser
        b"Content-Type: text/html\n\n" + b"<!--" * 100_000,
    ],
)
def test_pathological_input_stays_fast(raw: bytes) -> None:
    started = time.monotonic()
    parse_message(raw)
    assert time.monotonic() - started < 3


def _fuzz_seeds() -> list[bytes]:
    seeds = [ALTERNATIVE, mixed_with_pdf()]
    edge = CORPUS / "mime-edge"
    if edge.is_dir():
        seeds += [p.read_bytes() for p in sorted(edge.rglob("*.eml"))[::4]]
    return seeds


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.randrange(6)
        if not buf:
            buf += bytes([rng.randrange(256)])
        pos = rng.randrange(len(buf))
        if kind == 0:  # flip a bit
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            del buf[pos:]
        elif kind == 2:  # random byte
            buf[pos] = rng.randrange(256)
        elif kind == 3:  # insert MIME-ish noise
            noise = rng.choice([b"\n", b"\r\n\r\n", b"--", b"=?", b"?=", b"<", b">", b";", b"\x00",
                                b"\"", b"Content-Type: multipart/mixed; boundary=", b"=\n", b"\xff"])
            buf[pos:pos] = noise
        elif kind == 4:  # delete a chunk
            del buf[pos : pos + rng.randint(1, 64)]
        else:  # duplicate a chunk
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 256)]
    return bytes(buf)


def test_fuzzed_messages_never_raise() -> None:
    rng = random.Random(5322)
    seeds = _fuzz_seeds()
    for _ in range(500):
        raw = _mutate(rng, rng.choice(seeds))
        parsed = parse_message(raw)
        assert isinstance(parsed, ParsedMessage)
        assert len(parsed.snippet) <= 200
        for att in parsed.attachments[:3]:
            info, data = get_attachment(raw, att.part_id)
            assert len(data) == info.size


# --------------------------------------------------------------------------- html_to_text


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>Hello <a href='https://x'>world</a></p><p>Two</p>", "Hello world\n\nTwo"),
        ("<html><head><title>T</title><style>b{}</style></head><body>x&amp;y&#233;</body></html>", "x&yé"),
        ("a<br>b<br/>c", "a\nb\nc"),
        ("<script>var a = '<p>';</script>visible", "visible"),
        ("<ul><li>one</li><li>two</li></ul>", "one\ntwo"),
        ("  lots   of \t\n  space  ", "lots of space"),
        ("<table><tr><td>a</td><td>b</td></tr></table>", "a b"),
        ("<pre>line 1\nline 2</pre>after", "line 1\nline 2\n\nafter"),
        ("", ""),
    ],
)
def test_html_to_text(html: str, text: str) -> None:
    assert html_to_text(html) == text


@pytest.mark.parametrize(
    "html",
    ["<div><p unclosed<<>>&bogus; <!-- c --> ok", "<![CDATA[x]]> ok", "<!DOCTYPE x [ <!ENTITY a 'b'> ]> ok",
     "<a href='x' <b>> ok", "</p></p></div> ok", "<style> never closed ok"],
)
def test_html_to_text_survives_broken_markup(html: str) -> None:
    text = html_to_text(html)
    assert "<!--" not in text
    assert "ok" in text or html.startswith("<style>")


def test_html_to_text_is_bounded() -> None:
    assert len(html_to_text("<p>word</p>" * 20_000, max_chars=500)) <= 500


def test_fast_address_path_agrees_with_the_structured_parser() -> None:
    from email.policy import default

    from mailmesh_common.mime.parse import _simple_addresses

    values = ["a@b.example", "Alice <alice@example.com>", "Alice Smith <alice@example.com>, bob@example.org",
              "<x@y.example>", "Tab\tName <t@example.com>"]
    for v in values:
        fast = _simple_addresses(v)
        assert fast is not None, v
        slow = [(str(a.display_name), str(a.addr_spec)) for a in default.header_factory("To", v).addresses]
        assert [(" ".join(n.split()), a) for n, a in fast] == [(" ".join(n.split()), a) for n, a in slow], v
    for v in ['"Quoted, Name" <q@example.com>', "=?utf-8?q?J=C3=B6rg?= <j@example.com>", "group: a@b.example;",
              "Jörg <j@example.com>", "(comment) c@example.com", "broken@", "no-at-sign"]:
        assert _simple_addresses(v) is None, v


@pytest.mark.parametrize(("raw", "text", "subject"), [
    # plain single-part mail (read without walking the body line by line): the body as sent
    (b"Subject: a\r\nTo: b@example.com\r\n\r\nline one\r\nline two\r\n\r\nend", "line one\nline two\n\nend", "a"),
    (b"Subject: a\n\nx\r\ny\rz\n", "x\ny\nz\n", "a"),
    # the header section ends earlier than the first CRLF CRLF / LF LF: a bare CR line,
    # an LF line followed by a CRLF line, a non-header line, a trailing envelope line
    (b"Subject: a\r\n\rbody\r\n\r\nmore", "body\n\nmore", "a"),
    (b"Subject: a\n\r\nbody\n\nmore", "body\n\nmore", "a"),
    (b"Subject: a\r\nnot a header\r\n\r\nbody", "not a header\n\nbody", "a"),
    (b"Subject: a\nFrom someone\n\nbody", "From someone\nbody", "a"),  # the email package eats the blank line
    # folded headers and 8-bit bodies
    (b"Subject: a\r\n b\r\n\r\ncaf\xc3\xa9\r\n", "caf\u00e9\n", "a b"),
])
def test_single_part_bodies_are_read_as_the_full_parser_reads_them(raw: bytes, text: str, subject: str) -> None:
    parsed = parse_message(raw)
    assert parsed.text_body == text
    assert parsed.subject == subject


def test_a_long_plain_body_gives_a_snippet_from_its_start_only() -> None:
    body = "\n".join(f"line {i} of a long note" for i in range(5000))
    parsed = parse_message(b"Subject: s\n\n> quoted first\n" + body.encode() + b"\n-- \nsig\n")
    assert parsed.snippet == " ".join(f"line {i} of a long note" for i in range(40))[:200].rstrip()
    assert len(parsed.snippet) == 200 and "quoted" not in parsed.snippet
