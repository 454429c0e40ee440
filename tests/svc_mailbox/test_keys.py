"""The mailbox's fast key packer is byte-identical to FoundationDB's tuple layer."""

from __future__ import annotations

import random

import fdb.tuple

from svc_mailbox import keys


def test_fast_packing_matches_the_tuple_layer() -> None:
    rng = random.Random(7)
    ints = [0, 1, -1, 255, 256, -255, -256, 2**31, -(2**31), 2**63 - 1, -(2**63) + 1, 2**63, -(2**63), 2**70]
    ints += [rng.randint(-(2**64), 2**64) for _ in range(2000)]
    strs = ["", "a", "INBOX", "Label_1", "a\x00b", "\x00", "ünïcødé", "日本", "x" * 300]
    for v in ints + strs + [b"raw\x00bytes", 1.5, None, ("nested", 1)]:
        assert keys.g("k", v) == fdb.tuple.pack(("mm", "k", v)), v
        assert keys.u("user1", "msg", v) == fdb.tuple.pack(("mm", "u", "user1", "msg", v)), v
    begin, end = keys.u_range("user1", "lidx", "INBOX")
    prefix = fdb.tuple.pack(("mm", "u", "user1", "lidx", "INBOX"))
    assert (begin, end) == (prefix + b"\x00", prefix + b"\xff")
    assert keys.unpack(keys.u("user1", "lidx", "INBOX", -5, "id")) == ("u", "user1", "lidx", "INBOX", -5, "id")


def test_fast_unpacking_matches_the_tuple_layer() -> None:
    rng = random.Random(11)
    ints = [0, 1, -1, 255, 256, -255, -256, 2**31, -(2**31), 2**63 - 1, -(2**63) + 1, 2**64 - 1, -(2**64) + 1]
    ints += [rng.randint(-(2**64) + 1, 2**64 - 1) for _ in range(2000)]
    strs = ["", "a", "INBOX", "a\x00b", "\x00", "\x00\x00", "ab\x00", "ünïcødé", "日本", "x" * 300]
    others = [b"", b"raw\x00bytes", b"\x00\xff", 1.5, None, ("nested", 1), 2**70, -(2**70), True]
    for v in ints + strs + others:
        for t in (("u", "user1", "tlm", "thread", "INBOX", v, "id"), ("k", v), ("k", v, v)):
            assert keys.unpack(fdb.tuple.pack(("mm", *t))) == fdb.tuple.unpack(fdb.tuple.pack(t)), t
