"""MAIL FROM / RCPT TO path parsing: the listener's fast path for plain `<local@domain>` paths
gives exactly what aiosmtpd's parser (the email package's) gives, for every argument."""

from __future__ import annotations

import random
from collections.abc import Callable

from aiosmtpd.smtp import SMTP

from svc_ingest.smtp_handler import MxSMTP

PLAIN = ["<alice@example.com>", "<a.b-c+d_e@mail-1.example.co.uk>", "<x@y>", "<1@2.3.4.5>",
         "<UPPER.Case@Example.COM>"]
ODD = ["<>", "", "<a@b", "a@b>", "a@b", "<a..b@c>", "<.a@b>", "<a.@b>", "<a@b.>", "<a@.b>",
       "<a@[127.0.0.1]>", '<"quoted local"@example.com>', "<@route.example:a@b.example>",
       "<a@b> (comment) SIZE=10", "<a@b>(comment)", "<a@b>\t\tSIZE=1", "<a@b>  ", "<a@b>>",
       "<a b@c>", "<a@b c>", "<jörg@example.com>", "<a@exämple.com>", "< a@b>", "<a@b >",
       "<a@b>\x0bSIZE=1", "<a@b>\x85 SIZE=1", "<a@b> \x85SIZE=1", "<a@b>SIZE=1", "<a(c)@b>"]
PARAMS = ["", " SIZE=1000", " SIZE=1000 BODY=8BITMIME", "\tSMTPUTF8", " ", " (x) SIZE=1"]


def _outcome(parse: Callable[[MxSMTP, str], object], mx: MxSMTP, arg: str) -> object:
    try:
        return parse(mx, arg)
    except Exception as exc:  # the email parser trips over some inputs ("<"): so must we
        return type(exc)


def parse_both(arg: str, limit: int = 0) -> tuple[object, object]:
    mx = object.__new__(MxSMTP)  # only the parser runs: no connection, no handler
    mx.local_part_limit = limit
    return _outcome(MxSMTP._getaddr, mx, arg), _outcome(SMTP._getaddr, mx, arg)


def test_plain_paths_with_parameters_parse_as_aiosmtpd_parses_them() -> None:
    for path in PLAIN + ODD:
        for params in PARAMS:
            fast, slow = parse_both(path + params)
            assert fast == slow, path + params
    assert parse_both("<alice@example.com> SIZE=1000")[0] == ("alice@example.com", "SIZE=1000")


def test_local_part_limit_applies_on_the_fast_path() -> None:
    long_local = "<" + "a" * 65 + "@example.com>"
    assert parse_both(long_local, limit=64) == ((None, None), (None, None))
    assert parse_both(long_local)[0] == ("a" * 65 + "@example.com", "")


def test_random_arguments_parse_as_aiosmtpd_parses_them() -> None:
    rnd = random.Random(5)
    alphabet = "ab1.-_+@<>()[]\" \t\x0b\x85é:,;\\"
    for _ in range(3000):
        arg = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 16)))
        if rnd.random() < 0.5:
            arg = "<" + arg
        fast, slow = parse_both(arg)
        assert fast == slow, repr(arg)
    pieces = ["a", "B", "1", "x", "y", "z", ".", "-", "_", "+", "é", " ", "(", '"', "["]
    fast_hits = 0
    for _ in range(6000):  # path-shaped: "<" local "@" domain ">" tail
        local, domain, tail = ("".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 4)))
                               for _ in range(3))
        arg = f"<{local}@{domain}>{tail}"
        fast, slow = parse_both(arg)
        assert fast == slow, repr(arg)
        fast_hits += MxSMTP._getaddr.__globals__["_PLAIN_PATH"].match(arg) is not None
    assert fast_hits > 100  # the fast path was taken often enough to mean something
