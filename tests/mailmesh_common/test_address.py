"""Address parsing, validation and canonical form (RFC 5321 / 5322 / 6531 / 6532)."""

from __future__ import annotations

import pytest

from mailmesh_common.address import (
    MailAddress,
    canonical,
    is_valid_mailbox,
    parse_address,
    split,
    validate_domain,
)
from mailmesh_common.errors import InvalidInput

LOCAL_64 = "a" * 64
LABEL_63 = "b" * 63
# 64 + 1 + (63 + 1) * 2 + 61 = 254 octets exactly
LONGEST = f"{LOCAL_64}@{LABEL_63}.{LABEL_63}.{'c' * 61}"


@pytest.mark.parametrize(
    "email",
    [
        "alice@example.com",
        "Alice.Smith+tag@sub.example.co.uk",
        "o'brien@example.ie",
        "x!#$%&'*+-/=?^_`{|}~@example.com",
        '"john doe"@example.com',
        '"a@b"@example.com',
        '"quoted \\" quote"@example.com',
        "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        "user@localhost",
        "jörg@bücher.de",
        "用户@例子.广告",
        "δοκιμή@παράδειγμα.δοκιμή",
        "user@xn--bcher-kva.de",
        f"{LOCAL_64}@example.com",
        LONGEST,
    ],
)
def test_valid_mailboxes(email: str) -> None:
    assert is_valid_mailbox(email), email
    canonical(email)  # does not raise


@pytest.mark.parametrize(
    "email",
    [
        "",
        "@",
        "alice",
        "alice@",
        "@example.com",
        "a@b@example.com",
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "a b@example.com",
        '"unterminated@example.com',
        "a\n@example.com",
        "a\x00@example.com",
        "\u200ba@example.com",
        "a@exa mple.com",
        "a@-example.com",
        "a@example-.com",
        "a@example..com",
        "a@example.com.",
        "a@exam_ple.com",
        "a@1.2.3.4",
        "a@[300.1.1.1]",
        "a@[IPv6:nonsense]",
        "a@\u202eexample.com",
        f"{'a' * 65}@example.com",
        f"{'é' * 33}@example.com",  # 66 octets in UTF-8
        f"a@{'b' * 64}.com",
        LONGEST + "c",
        "<alice@example.com>",
        " alice@example.com",
    ],
)
def test_invalid_mailboxes(email: str) -> None:
    assert not is_valid_mailbox(email), email


def test_is_valid_mailbox_rejects_non_strings() -> None:
    assert not is_valid_mailbox(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("email", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        (" <Alice@Example.COM> ", "alice@example.com"),
        ("Jörg@Bücher.DE", "jörg@xn--bcher-kva.de"),
        ("JÖRG@xn--bcher-kva.de", "jörg@xn--bcher-kva.de"),
        ('"John Doe"@Example.com', '"john doe"@example.com'),
        ("user@[IPv6:2001:DB8:0:0::1]", "user@[IPv6:2001:db8::1]"),
    ],
)
def test_canonical(email: str, expected: str) -> None:
    assert canonical(email) == expected


@pytest.mark.parametrize("email", ["", "a@b@c.com", "no-at-sign", f"{'a' * 65}@example.com", "<>"])
def test_canonical_rejects_invalid_addresses(email: str) -> None:
    with pytest.raises(InvalidInput):
        canonical(email)


def test_split_gives_canonical_parts() -> None:
    assert split("Bob@Example.ORG") == ("bob", "example.org")
    assert split('"a@b"@x.example') == ('"a@b"', "x.example")
    with pytest.raises(InvalidInput):
        split("bob")


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.COM", "example.com"),
        (" example.org ", "example.org"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("例子.测试", "xn--fsqu00a.xn--0zwm56d"),
        ("localhost", "localhost"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("Example.com.", "example.com"),
    ],
)
def test_validate_domain(domain: str, expected: str) -> None:
    assert validate_domain(domain) == expected


@pytest.mark.parametrize(
    "domain",
    ["", ".", "..", "a..b", "example.com..", "-a.com", "a-.com", "exa mple.com", "a_b.com", f"{'a' * 64}.com",
     ".".join(["abcdefghi"] * 26), "example.123", "exa\u200bmple.com"],
)
def test_validate_domain_rejects(domain: str) -> None:
    with pytest.raises(InvalidInput):
        validate_domain(domain)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice@Example.COM", MailAddress("", "alice@example.com")),
        ("<alice@example.com>", MailAddress("", "alice@example.com")),
        ("Alice Example <Alice@Example.COM>", MailAddress("Alice Example", "Alice@example.com")),
        ('"Smith, John" <john@example.com>', MailAddress("Smith, John", "john@example.com")),
        ('"say \\"hi\\"" <hi@example.com>', MailAddress('say "hi"', "hi@example.com")),
        ("=?utf-8?q?J=C3=B6rg?= <j@example.de>", MailAddress("Jörg", "j@example.de")),
        ("Jörg <jörg@Bücher.de>", MailAddress("Jörg", "jörg@bücher.de")),
        ("Lit <u@[IPv6:2001:db8::1]>", MailAddress("Lit", "u@[IPv6:2001:db8::1]")),
        ("  spaced   name   <s@example.com>  ", MailAddress("spaced name", "s@example.com")),
    ],
)
def test_parse_address(text: str, expected: MailAddress) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Name <>", "empty"),
        ("Name <a@b@example.com>", "exactly one '@'"),
        ("Name <a@example.com", "angle brackets"),
        ("alice@example.com\r\nBcc: evil@example.net", "line break"),
        ("no at sign", "exactly one '@'"),
        (f"{'a' * 65}@example.com", "64 octets"),
        ("a@exa_mple.com", "letters, digits and hyphens"),
    ],
)
def test_parse_address_rejects_with_a_clear_message(text: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_address(text)
    assert reason in err.value.message


def test_mail_address_str_quotes_the_name() -> None:
    assert str(MailAddress('Smith, "J"', "j@example.com")) == '"Smith, \\"J\\"" <j@example.com>'
    assert str(MailAddress("", "j@example.com")) == "j@example.com"
