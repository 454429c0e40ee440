"""Content-Type / Content-Disposition parameters: the fast path for plain values gives exactly
what the structured (policy.default) parser gives, and anything it is not sure about (RFC 2231
parameters, encoded words, comments, escapes, a type without subtype) goes the structured way."""

from __future__ import annotations

import pytest

from mailmesh_common.mime import parse as p

PLAIN = [
    ("Content-Type", "text/plain; charset=us-ascii"),
    ("Content-Type", "TEXT/HTML; Charset=\"UTF-8\""),
    ("Content-Type", "text/plain; charset=\"utf-8\"; format=flowed; delsp=yes"),
    ("Content-Type", "multipart/mixed;\r\n\tboundary=\"----=_NextPart_000_0001_01D1\""),
    ("Content-Type", "multipart/alternative; boundary=b1_abc;"),
    ("Content-Type", "application/pdf; name=\"report 2026.pdf\""),
    ("Content-Disposition", "attachment; filename=\"a b.pdf\"; size=1234"),
    ("Content-Disposition", "inline"),
    ("Content-Disposition", "attachment;filename=x.zip"),
]
STRUCTURED = [
    ("Content-Disposition", "attachment; filename*=utf-8''%E2%82%AC.pdf"),
    ("Content-Type", "text/plain; name=\"=?utf-8?q?caf=C3=A9.txt?=\""),
    ("Content-Type", "text/plain (a comment); charset=us-ascii"),
    ("Content-Type", "text/plain; name=\"a\\\"b.txt\""),
    ("Content-Type", "text"),
    ("Content-Disposition", "attachment/odd"),
]


def structured(name: str, value: str) -> tuple[str, dict[str, str]]:
    header = p._POLICY.header_factory(name, "".join(value.splitlines()))  # unfolded, as _raw_values does
    main = str(getattr(header, "content_disposition", None) or getattr(header, "content_type", None) or "")
    return main.lower(), {str(k).lower(): str(v) for k, v in header.params.items()}


@pytest.mark.parametrize(("name", "value"), PLAIN)
def test_fast_path_equals_the_structured_parser(name: str, value: str) -> None:
    fast = p._plain_params(name, value)
    assert fast is not None, "a plain value takes the fast path"
    assert fast == structured(name, value)


@pytest.mark.parametrize(("name", "value"), STRUCTURED)
def test_unusual_values_go_the_structured_way(name: str, value: str) -> None:
    assert p._plain_params(name, value) is None


def test_attachment_names_read_the_same_through_parse_message() -> None:
    raw = (b"Content-Type: multipart/mixed;\r\n boundary=\"=_sep_=\"\r\nSubject: files\r\n\r\n"
           b"--=_sep_=\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nsee attached\r\n"
           b"--=_sep_=\r\nContent-Type: application/pdf; name=\"plain name.pdf\"\r\n"
           b"Content-Disposition: attachment; filename=\"plain name.pdf\"\r\n\r\n%PDF\r\n"
           b"--=_sep_=\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.bin\r\n\r\nxx\r\n--=_sep_=--\r\n")
    parsed = p.parse_message(raw)
    assert parsed.text_body.strip() == "see attached"
    assert [a.filename for a in parsed.attachments] == ["plain name.pdf", "\u20ac.bin"]
