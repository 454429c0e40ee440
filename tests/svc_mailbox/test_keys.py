"""The mailbox's keys are FoundationDB tuple-layer keys under ("mm",) (the encoding itself:
tests/mailmesh_common/test_subspace.py)."""

from __future__ import annotations

import fdb.tuple

from svc_mailbox import keys


def test_keys_are_tuple_layer_keys_under_the_root() -> None:
    for v in (0, -5, 2**40, 2**70, "", "a\x00b", "日本", b"raw", 1.5, None):
        assert keys.g("k", v) == fdb.tuple.pack(("mm", "k", v)), v
        assert keys.u("user1", "msg", v) == fdb.tuple.pack(("mm", "u", "user1", "msg", v)), v
        assert keys.unpack(keys.u("user1", "tlm", "t", "INBOX", v, "id")) == \
            ("u", "user1", "tlm", "t", "INBOX", v, "id")
    begin, end = keys.u_range("user1", "lidx", "INBOX")
    prefix = fdb.tuple.pack(("mm", "u", "user1", "lidx", "INBOX"))
    assert (begin, end) == (prefix + b"\x00", prefix + b"\xff")
