"""The documents as svc_search changes them: a backend plus the rules that make concurrent
writers (the EVENTS indexer and a reindex) safe.

- One writer at a time: `lock` is held across read, decide and write.
- A document is replaced only by one reflecting the same or a later MODSEQ, so a redelivered
  or stale event, or a reindex reading an older snapshot, never undoes a newer change.
- While a user is being reindexed, deletions seen by the indexer are remembered (tombstones),
  so the reindex cannot bring back a message deleted after it was exported, nor any message
  of an account deleted meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

from svc_search.backends.base import Backend, Key
from svc_search.documents import SearchDocument

# a generation and MODSEQ above every real one: delete_stale(user, EVERYTHING, EVERYTHING)
# removes every document of the user
EVERYTHING = (1 << 63) - 1


class DocStore:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.lock = asyncio.Lock()
        self._reindexing: Counter[str] = Counter()
        self._tombstones: dict[str, set[str]] = {}
        self._gone: set[str] = set()  # users being reindexed whose account was deleted meanwhile

    # --- reindex bookkeeping
    def begin_reindex(self, user: str) -> None:
        self._reindexing[user] += 1
        self._tombstones.setdefault(user, set())

    def end_reindex(self, user: str) -> None:
        self._reindexing[user] -= 1
        if self._reindexing[user] <= 0:
            del self._reindexing[user]
            self._tombstones.pop(user, None)
            self._gone.discard(user)

    def note_deleted(self, keys: Sequence[Key]) -> None:
        for user, mid in keys:
            if user in self._reindexing:
                self._tombstones[user].add(mid)

    def note_account_deleted(self, user: str) -> None:
        if user in self._reindexing:
            self._gone.add(user)

    def deleted_during_reindex(self, key: Key) -> bool:
        return key[0] in self._gone or key[1] in self._tombstones.get(key[0], ())

    # --- writes from a snapshot (reindex)
    async def put_snapshot(self, docs: Sequence[SearchDocument]) -> int:
        """Writes `docs` unless newer state is already indexed or the message was deleted
        meanwhile; returns how many were written."""
        async with self.lock:
            current = await self.backend.get([d.key for d in docs])
            keep = []
            for d in docs:
                cur = current.get(d.key)
                if self.deleted_during_reindex(d.key) or (cur is not None and cur.modseq > d.modseq):
                    continue
                keep.append(d)
            await self.backend.write(keep, [])
            return len(keep)
