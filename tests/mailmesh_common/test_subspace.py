"""The KV key encoding's fast path is byte-identical to FoundationDB's tuple layer, both ways,
and falls back to it for every other element type."""

from __future__ import annotations

import random
from typing import Any

import fdb.tuple
import pytest

from mailmesh_common.errors import InvalidInput
from mailmesh_common.kv import Subspace
from mailmesh_common.kv.subspace import pack_tuple, unpack_tuple


def _values() -> list[Any]:
    rng = random.Random(5)
    ints = [0, 1, -1, 255, 256, -255, -256, 2**31, -(2**31), 2**63 - 1, -(2**63) + 1, 2**63, -(2**63),
            2**64 - 1, -(2**64) + 1, 2**70, -(2**70)]
    ints += [rng.randint(-(2**64), 2**64) for _ in range(1000)]
    strs = ["", "a", "INBOX", "a\x00b", "\x00", "\x00\x00", "ab\x00", "ünïcødé", "日本", "x" * 300]
    return ints + strs + [b"", b"raw\x00bytes", b"\x00\xff", 1.5, None, ("nested", 1), True]


def test_pack_and_unpack_match_the_tuple_layer() -> None:
    for v in _values():
        for t in ((v,), ("u", "user1", "tlm", v, "id"), ("k", v, v)):
            packed = fdb.tuple.pack(t)
            assert pack_tuple(t) == packed, t
            assert unpack_tuple(packed) == fdb.tuple.unpack(packed), t


def test_a_subspace_packs_inside_its_prefix_and_refuses_foreign_keys() -> None:
    space = Subspace(("mm", "spam"))
    key = space.pack(("u", "alice", 7))
    assert key == fdb.tuple.pack(("mm", "spam", "u", "alice", 7))
    assert space.unpack(key) == ("u", "alice", 7)
    begin, end = space.range(("u",))
    assert begin < key < end
    with pytest.raises(InvalidInput):
        space.unpack(fdb.tuple.pack(("other", 1)))
