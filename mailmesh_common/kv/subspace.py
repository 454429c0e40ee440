"""Tuple-encoded key prefixes (FoundationDB's Subspace), built on `fdb.tuple`.

`fdb.tuple` is pure Python: it works without the FoundationDB C client, so both drivers share
the same key encoding. Tuple encoding preserves order: ints sort numerically, strings and bytes
lexically, and a tuple's keys never mix with a sibling's (("a",) vs ("ab",)).
"""

from __future__ import annotations

import os
from typing import Any

import fdb.tuple

from mailmesh_common.errors import InvalidInput

DEFAULT_ROOT = "mm"
ROOT_ENV = "MAILMESH_KV_ROOT"


class Subspace:
    """All keys that start with the tuple encoding of `prefix` (after an optional raw prefix)."""

    __slots__ = ("_key",)

    def __init__(self, prefix: tuple[Any, ...] = (), raw_prefix: bytes = b"") -> None:
        self._key = raw_prefix + fdb.tuple.pack(prefix)

    @classmethod
    def from_key(cls, key: bytes) -> Subspace:
        """The subspace whose raw prefix is exactly `key`."""
        return cls((), key)

    @property
    def key(self) -> bytes:
        """The raw prefix of every key in this subspace."""
        return self._key

    def pack(self, t: tuple[Any, ...] = ()) -> bytes:
        return self._key + fdb.tuple.pack(t)

    def unpack(self, key: bytes) -> tuple[Any, ...]:
        if not key.startswith(self._key):
            raise InvalidInput("key is not in this subspace")
        return tuple(fdb.tuple.unpack(key[len(self._key):]))

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
