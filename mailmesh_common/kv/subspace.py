"""Tuple-encoded key prefixes (FoundationDB's Subspace), built on `fdb.tuple`.

`fdb.tuple` is pure Python: it works without the FoundationDB C client, so both drivers share
the same key encoding. Tuple encoding preserves order: ints sort numerically, strings and bytes
lexically, and a tuple's keys never mix with a sibling's (("a",) vs ("ab",)).

`pack_tuple` / `unpack_tuple` are byte-identical to `fdb.tuple.pack` / `unpack`, with a fast
path for the str, bytes and int (up to 8 bytes) elements nearly every key is made of; anything
else goes to `fdb.tuple`. Keys are built and read on every hot path (a delivery writes dozens).
"""

from __future__ import annotations

import os
from typing import Any

import fdb.tuple

from mailmesh_common.errors import InvalidInput

DEFAULT_ROOT = "mm"
ROOT_ENV = "MAILMESH_KV_ROOT"
_INT_LIMIT = 1 << 63


def pack_tuple(t: tuple[Any, ...]) -> bytes:
    """fdb.tuple.pack(t) (see the module doc)."""
    out = []
    for v in t:
        if type(v) is str:
            out.append(b"\x02" + v.encode().replace(b"\x00", b"\x00\xff") + b"\x00")
        elif type(v) is int and -_INT_LIMIT < v < _INT_LIMIT:
            if v == 0:
                out.append(b"\x14")
            elif v > 0:
                n = (v.bit_length() + 7) // 8
                out.append(bytes((0x14 + n,)) + v.to_bytes(n, "big"))
            else:
                n = ((-v).bit_length() + 7) // 8
                out.append(bytes((0x14 - n,)) + (v + (1 << (8 * n)) - 1).to_bytes(n, "big"))
        else:
            out.append(fdb.tuple.pack((v,)))
    return b"".join(out)


def _unpack_fast(b: bytes) -> tuple[Any, ...] | None:
    """fdb.tuple.unpack(b) for str, bytes and int elements (ints of up to 8 bytes); None for
    anything else, which unpack_tuple leaves to fdb.tuple."""
    out: list[Any] = []
    pos, n = 0, len(b)
    while pos < n:
        code = b[pos]
        if code == 0x02 or code == 0x01:
            end = b.find(b"\x00", pos + 1)
            while 0 <= end < n - 1 and b[end + 1] == 0xFF:  # an escaped NUL inside the string
                end = b.find(b"\x00", end + 2)
            if end < 0:
                return None
            raw = b[pos + 1:end]
            if b"\x00\xff" in raw:
                raw = raw.replace(b"\x00\xff", b"\x00")
            out.append(raw.decode() if code == 0x02 else raw)
            pos = end + 1
        elif 0x0C <= code <= 0x1C:
            size = code - 0x14
            if size >= 0:
                out.append(int.from_bytes(b[pos + 1:pos + 1 + size], "big"))
            else:
                size = -size
                out.append(int.from_bytes(b[pos + 1:pos + 1 + size], "big") - (1 << (8 * size)) + 1)
            pos += 1 + size
            if pos > n:
                return None
        else:
            return None
    return tuple(out)


def unpack_tuple(b: bytes) -> tuple[Any, ...]:
    """fdb.tuple.unpack(b) (see the module doc)."""
    fast = _unpack_fast(b)
    return fast if fast is not None else tuple(fdb.tuple.unpack(b))


class Subspace:
    """All keys that start with the tuple encoding of `prefix` (after an optional raw prefix)."""

    __slots__ = ("_key",)

    def __init__(self, prefix: tuple[Any, ...] = (), raw_prefix: bytes = b"") -> None:
        self._key = raw_prefix + pack_tuple(prefix)

    @classmethod
    def from_key(cls, key: bytes) -> Subspace:
        """The subspace whose raw prefix is exactly `key`."""
        return cls((), key)

    @property
    def key(self) -> bytes:
        """The raw prefix of every key in this subspace."""
        return self._key

    def pack(self, t: tuple[Any, ...] = ()) -> bytes:
        return self._key + pack_tuple(t)

    def unpack(self, key: bytes) -> tuple[Any, ...]:
        if not key.startswith(self._key):
            raise InvalidInput("key is not in this subspace")
        return unpack_tuple(key[len(self._key):])

    def range(self, t: tuple[Any, ...] = ()) -> tuple[bytes, bytes]:
        """[begin, end) of every key strictly inside pack(t) (FDB: p + 0x00 .. p + 0xff)."""
        p = self.pack(t)
        return p + b"\x00", p + b"\xff"

    def subspace(self, t: tuple[Any, ...]) -> Subspace:
        return Subspace.from_key(self.pack(t))

    def contains(self, key: bytes) -> bool:
        return key.startswith(self._key)

    def __getitem__(self, item: Any) -> Subspace:
        return self.subspace((item,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Subspace) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Subspace(raw_prefix={self._key!r})"


def root_subspace(name: str | None = None) -> Subspace:
    """The subspace holding all of mailmesh's keys: (name,), default MAILMESH_KV_ROOT or "mm"."""
    return Subspace((name or os.environ.get(ROOT_ENV) or DEFAULT_ROOT,))
