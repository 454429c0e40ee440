"""Threading keys: normalize_subject, is_reply_subject, reference_chain, participants."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mailmesh_common.mime import (
    MailAddress,
    ParsedMessage,
    is_reply_subject,
    normalize_subject,
    parse_message,
    participants,
    reference_chain,
)

CORPUS = Path(__file__).parents[2].parent / "shared" / "corpus" / "mail"


@pytest.mark.parametrize(
    ("subject", "normalized"),
    [
        ("Hello", "hello"),
        ("Re: Hello", "hello"),
        ("RE: RE: Hello", "hello"),
        ("Re:Hello", "hello"),
        ("RE : Hello", "hello"),
        ("re: re: re: re: re: re: deep", "deep"),
        ("Fwd: Re: Hello", "hello"),
        ("FW: Hello", "hello"),
        ("Fw: Hello", "hello"),
        ("AW: Antwort auf alles", "antwort auf alles"),
        ("WG: AW: Termin", "termin"),
        ("SV: Hej", "hej"),
        ("VS: Terve", "terve"),
        ("Antw: Goedemorgen", "goedemorgen"),
        ("Réf: Bonjour", "bonjour"),
        ("RÉF : Bonjour", "bonjour"),
        ("TR: Bonjour", "bonjour"),
        ("Re[2]: Hello", "hello"),
        ("Re(3): Hello", "hello"),
        ("RE [12]: Hello", "hello"),
        ("回复：你好", "你好"),
        ("[jailhouse-dev] Re: foo", "foo"),
        ("Re: [jailhouse-dev] Re: foo", "foo"),
        ("Re: [list] Re: foo", "foo"),
        ("Fwd: Re: AW: WG: [ext] Test", "test"),
        ("[siemens/jailhouse] 1a2b3c: configs: add board", "1a2b3c: configs: add board"),
        ("[PATCH v2 1/3] arm64: fix the thing", "[patch v2 1/3] arm64: fix the thing"),
        ("Re: [PATCH] x86: fix it", "[patch] x86: fix it"),
        ("[jailhouse-dev] [RFC] idea", "[rfc] idea"),
        ("  Multiple   spaces\there  ", "multiple spaces here"),
        ("Straße", "strasse"),
        ("Reply to all", "reply to all"),
        ("Regarding: budget", "regarding: budget"),
        ("Re:", ""),
        ("", ""),
    ],
)
def test_normalize_subject(subject: str, normalized: str) -> None:
    assert normalize_subject(subject) == normalized


@pytest.mark.parametrize(
    ("subject", "reply"),
    [
        ("Re: x", True),
        ("AW: x", True),
        ("SV: x", True),
        ("Réf: x", True),
        ("Re[2]: x", True),
        ("[list] Re: x", True),
        ("Fwd: Re: x", True),
        ("Fwd: x", False),
        ("x", False),
        ("Re x", False),
        ("Regarding: x", False),
        ("", False),
    ],
)
def test_is_reply_subject(subject: str, reply: bool) -> None:
    assert is_reply_subject(subject) is reply


def test_reference_chain_is_newest_ancestor_first_without_duplicates_or_self() -> None:
    parsed = ParsedMessage(
        message_id="c@x",
        in_reply_to=["b@x"],
        references=["root@x", "a@x", "b@x", "c@x"],
    )
    assert reference_chain(parsed) == ["b@x", "a@x", "root@x"]
    assert reference_chain(ParsedMessage(message_id="m@x")) == []
    several = ParsedMessage(in_reply_to=["p1@x", "p2@x"], references=["r@x"])
    assert reference_chain(several) == ["p2@x", "p1@x", "r@x"]


def test_reference_chain_from_raw_headers() -> None:
    raw = (
        b"Message-ID: <c@x>\n"
        b"In-Reply-To: <b@x> (message from Bob on Monday)\n"
        b"References: <root@x> <a@x>\n\t<b@x>\n\nbody\n"
    )
    assert reference_chain(parse_message(raw)) == ["b@x", "a@x", "root@x"]


def test_participants_are_canonical_and_leave_out_bcc() -> None:
    parsed = ParsedMessage(
        from_=[MailAddress("Alice", "Alice@Example.COM")],
        sender=MailAddress("List", "list-owner@lists.example.org"),
        reply_to=[MailAddress("", "list@lists.example.org")],
        to=[MailAddress("Bob", "bob@example.org"), MailAddress("", "ALICE@example.com")],
        cc=[MailAddress("Jörg", "Jörg@Bücher.de")],
        bcc=[MailAddress("Secret", "secret@example.net")],
    )
    assert participants(parsed) == {
        "alice@example.com",
        "list-owner@lists.example.org",
        "list@lists.example.org",
        "bob@example.org",
        "jörg@xn--bcher-kva.de",
    }


def test_participants_keep_unparseable_addresses_lowercased() -> None:
    parsed = parse_message(b"From: Root <ROOT>\nTo: a@b.example\n\nx")
    assert participants(parsed) == {"root", "a@b.example"}


def test_replies_in_the_corpus_share_their_parents_normalized_subject() -> None:
    folder = CORPUS / "jailhouse-dev"
    if not folder.is_dir():
        pytest.skip(f"corpus not found at {folder}")
    with open(CORPUS / "INDEX.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    by_id = {row["message_id"]: row for row in rows}
    subjects: dict[str, str] = {}

    def subject(row: dict[str, str]) -> str:
        sha = row["sha256"]
        if sha not in subjects:
            subjects[sha] = parse_message((folder / f"{sha}.eml").read_bytes()).subject
        return subjects[sha]

    pairs = [(row, by_id[row["parent_message_id"]]) for row in rows[:800]
             if row["parent_message_id"] in by_id]
    replies = [(row, parent) for row, parent in pairs if is_reply_subject(subject(row))]
    # patches of a series answer their cover letter under their own subjects
    assert len(replies) > 200
    differ = [(subject(row), subject(parent)) for row, parent in replies
              if normalize_subject(subject(row)) != normalize_subject(subject(parent))]
    # People do edit subjects in replies; nearly all keep them.
    assert len(differ) / len(replies) < 0.05, differ[:10]
